"""The DropoutNTP strategy (mpo_data/sampling/dropout_ntp.py): the prefix cut, the join, drop reasons, and its
request and outcome on the session's real engine."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mpo_data.sampling.dropout_ntp import (
    DropoutNTPStage,
    collapse_whitespace,
    cut_prefix,
    drop_reason,
    join_continuation,
)
from mpo_data.sampling.engine import Completion
from mpo_data.sampling.stage_config import DropoutNTPConfig, EngineConfig, SamplingConfig

MULTILINE = "The picture shows:\n1. a red  circle\n2. a blue square\n\n- on a white background\n- nothing else"


def test_cut_prefix_keeps_chosens_own_text_byte_for_byte():
    assert cut_prefix("a b  c\nd e", 0.5) == ("a b", "  c\nd e")  # int(5 x 0.5) = 2 words
    assert cut_prefix("a b c", 0.0) == ("", "a b c")
    assert cut_prefix("a b c", 1.0) == ("a b c", "")
    assert cut_prefix("one", 0.5) == ("", "one")
    prefix, rest = cut_prefix(MULTILINE, 0.5)  # 19 words -> 9
    assert prefix == "The picture shows:\n1. a red  circle\n2. a" and prefix + rest == MULTILINE


def test_join_continuation_keeps_the_models_own_space():
    assert join_continuation("The image shows a", " red circle.") == "The image shows a red circle."
    assert join_continuation("The image shows a", "n orange one.") == "The image shows an orange one."
    assert join_continuation("", "  A red circle.") == "A red circle."


@pytest.mark.parametrize(
    "text, finish, reason",
    [
        ("   ", "stop", "empty"),
        (" a red", "length", "max_tokens"),
        (" circle  on a\nwhite background.", "stop", "same_as_chosen"),
        (" square on a white background.", "stop", None),
    ],
)
def test_drop_reason(text, finish, reason):
    assert drop_reason(Completion(text, 5, finish), rest="circle on a white background.") == reason
    assert collapse_whitespace(" a \n b ") == "a b"


@pytest.mark.engine
def test_dropout_ntp_continues_chosens_exact_prefix_without_image_placeholders(text_engine):
    config = DropoutNTPConfig("p.jsonl", EngineConfig("m"), SamplingConfig(n=3, max_new_tokens=24))
    stage = DropoutNTPStage(config)
    item = {"image": "x.png", "question": "<image>\nDescribe the picture.", "chosen": MULTILINE}
    [result] = text_engine.generate([stage.request(item, [])], config.sampling_config())
    seen = text_engine.llm.get_tokenizer().decode(result.prompt_token_ids)
    prefix, _ = cut_prefix(MULTILINE, 0.5)
    assert "<image>" not in seen and "Describe the picture." in seen  # the image and its placeholder both dropped
    assert seen.endswith(prefix)  # the model continued chosen's own text, newlines and double spaces kept
    kept = 0
    for index, completion in enumerate(result.completions):
        line, reason = stage.outcome(item, {"item_id": "i", "sample_index": index}, completion, result.prompt_tokens)
        if reason is None:
            assert line["rejected"] == MULTILINE[: len(prefix)] + completion.text
            kept += 1
        else:  # a drop is one of the counted kinds; the same continuation, had it stopped, joins the same way
            assert reason in {"empty", "max_tokens", "same_as_chosen"}
            if reason == "max_tokens":
                line, reason = stage.outcome(
                    item,
                    {"item_id": "i", "sample_index": index},
                    replace(completion, finish_reason="stop"),
                    result.prompt_tokens,
                )
                assert reason is None and line["rejected"] == MULTILINE[: len(prefix)] + completion.text
                kept += 1
    assert kept  # the join was checked on at least one real continuation
