"""The correctness strategy (mpo_data/sampling/correctness.py): its request and output line on the session's real
VLM engine."""

from __future__ import annotations

import pytest
from PIL import Image

from mpo_data.sampling.correctness import CorrectnessStage
from mpo_data.sampling.prompts import render
from mpo_data.sampling.stage_config import CorrectnessConfig, EngineConfig, SamplingConfig


@pytest.mark.engine
def test_correctness_request_places_images_at_placeholders_and_keeps_the_prompt(vlm_engine):
    config = CorrectnessConfig("p.jsonl", EngineConfig("m"), SamplingConfig(n=1, max_new_tokens=4))
    stage = CorrectnessStage(config)
    item = {"image": ["a.png", "b.png"], "question": "Same colour?", "answer": "no"}
    red, blue = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 40), "blue")
    [result] = vlm_engine.generate([stage.request(item, [red, blue])], config.sampling_config())
    seen = vlm_engine.llm.get_tokenizer().decode(result.prompt_token_ids)
    first, second = seen.index("Image-1:"), seen.index("Image-2:")
    assert first < seen.index("<image>", first) < second < seen.index("<image>", second) < seen.index("Same colour?")
    line, _ = stage.outcome(item, {"item_id": "i", "sample_index": 0}, result.completions[0], result.prompt_tokens)
    assert line["prompt"] == "Image-1: <image>\nImage-2: <image>\n" + render("Same colour?", "en_v2")
    assert line["question"] == "Same colour?"
