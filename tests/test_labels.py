"""Self-consistency labels: prompt sets without answers, labelled in `pairs` by their samples' majority answer."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from mpo_data.cli import main
from mpo_data.errors import InputError
from mpo_data.preference.judge import JudgeConfig
from mpo_data.preference.pairs import PairsConfig, build_pairs
from mpo_data.records.inputs import PromptReader
from mpo_data.sampling.stage_config import CorrectnessConfig, EngineConfig


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def _read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def _samples(item: int, responses: list[str], **row) -> list[dict]:
    question = f"Compute ({item})"
    return [
        {
            "question": question,
            **row,
            "item_id": f"item{item}",
            "sample_index": k,
            "prompt": question,
            "response": r,
            "finish_reason": "stop",
            "prompt_version": "en_v2",
            "model": "m",
        }
        for k, r in enumerate(responses)
    ]


def _boxed(*answers: str) -> list[str]:
    return [f"Work {k}. So \\boxed{{{a}}}" for k, a in enumerate(answers)]


@pytest.fixture
def unlabelled(tmp_path) -> Path:
    """One dataset sampled with labels: majority (run.json), 8 samples an item."""
    folder = tmp_path / "samples" / "correctness" / "vote"
    rows = _samples(0, _boxed("0.5", "0.5", "0.5", "1/2", "1/2", "3", "3") + ["no box at all"])  # 5/8 once 1/2 votes
    rows += _samples(1, _boxed("2", "2", "2", "3", "3", "3", "4", "4"))  # best 3/8: under 0.5
    rows += _samples(2, _boxed("7", "7", "7", "7", "8", "8", "8", "8"))  # 4/8 against 4/8: tied
    rows += _samples(3, _boxed("6", "6", "6", "6", "6", "6", "9", "9"), answer="9")  # a given answer is not the label
    _write(folder / "part-00000.jsonl", rows)
    (folder / "run.json").write_bytes(orjson.dumps({"labels": "majority", "model": "m"}))
    return tmp_path / "samples"


def test_majority_label_groups_equal_answers_and_drops_weak_votes(unlabelled, tmp_path):
    out = tmp_path / "pairs"
    counts = build_pairs(PairsConfig(unlabelled, out, judge=JudgeConfig(workers=1)))["correctness/vote"]
    assert counts["items_majority_labelled"] == 2 and counts["items"] == 2
    assert counts["items_below_majority_threshold"] == 1 and counts["items_majority_tied"] == 1
    assert counts["samples"] == 32
    pairs = _read(out / "vote_pairs_vqa_correctness_rules.jsonl")
    by_item = {p["chosen_meta"]["item_id"] for p in pairs}
    assert by_item == {"item0", "item3"}
    for pair in pairs:
        item = pair["chosen_meta"]["item_id"]
        chosen, rejected = pair["chosen_meta"]["answer_pred"], pair["rejected_meta"]["answer_pred"]
        if item == "item0":  # 0.5 and 1/2 vote together and both are chosen; 3 is rejected
            assert (pair["answer_gt"], chosen in {"0.5", "1/2"}, rejected) == ("0.5", True, "3")
            assert pair["provenance"]["majority_share"] == 0.625
        else:  # the row's own answer (9) is not used as the label
            assert (pair["answer_gt"], chosen, rejected) == ("6", "6", "9")
            assert pair["provenance"]["majority_share"] == 0.75
        assert pair["provenance"]["label_source"] == "majority"
    malformed = _read(
        out / "vote_pairs_vqa_format_rules.jsonl"
    )  # each of the 5 majority answers x the one without a box
    assert {(p["rejected"], p["chosen_meta"]["item_id"]) for p in malformed} == {("no box at all", "item0")}
    assert len(malformed) == 5
    positives = _read(out / "pos_items" / "vote.jsonl")
    assert len(positives) == 5 + 6 and {p["majority_answer"] for p in positives} == {"0.5", "6"}
    # a stricter threshold keeps only item3 (6/8)
    strict = build_pairs(
        PairsConfig(unlabelled, tmp_path / "strict", majority_threshold=0.7, judge=JudgeConfig(workers=1))
    )
    assert strict["correctness/vote"]["items_majority_labelled"] == 1
    assert strict["correctness/vote"]["items_below_majority_threshold"] == 3  # the tie too


def test_pairs_command_labels_by_majority_and_ground_truth_side_by_side(unlabelled, tmp_path, capsys):
    labelled = unlabelled / "correctness" / "truth"
    _write(labelled / "part-00000.jsonl", _samples(9, _boxed("6", "9", "9"), answer="6"))
    out = tmp_path / "pairs"
    assert (
        main(
            [
                "pairs",
                "--data-dir",
                str(unlabelled),
                "--save-dir",
                str(out),
                "--workers",
                "1",
                "--majority-threshold",
                "0.6",
            ]
        )
        == 0
    )
    summary = orjson.loads((out / "pairs_summary.json").read_bytes())
    assert summary["correctness/vote"]["items_majority_labelled"] == 2  # 0.625 and 0.75 pass 0.6
    truth = _read(out / "truth_pairs_vqa_correctness_rules.jsonl")
    assert {(p["answer_gt"], p["chosen_meta"]["answer_pred"]) for p in truth} == {("6", "6")}  # the minority is right
    assert {p["provenance"]["label_source"] for p in truth} == {"ground_truth"}
    assert "majority_share" not in truth[0]["provenance"]
    assert main(["pairs", "--data-dir", str(unlabelled), "--save-dir", str(out), "--majority-threshold", "0"]) == 1
    assert "--majority-threshold must be within (0, 1]" in capsys.readouterr().err


def test_sample_without_answer_needs_majority_labels(tmp_path, capsys):
    part = tmp_path / "samples" / "correctness" / "ds" / "part-00000.jsonl"
    _write(part, _samples(0, _boxed("1"), answer="1") + _samples(1, _boxed("1")))
    assert (
        main(["pairs", "--data-dir", str(tmp_path / "samples"), "--save-dir", str(tmp_path / "out"), "--workers", "1"])
        == 1
    )
    assert (
        f"{part}:2: missing key 'answer' (a prompt set without answers is sampled with labels: majority)"
        in capsys.readouterr().err
    )
    (part.parent / "run.json").write_bytes(b'{"labels": "vote"}')
    with pytest.raises(InputError, match="'labels' must be one of"):
        build_pairs(PairsConfig(tmp_path / "samples", tmp_path / "out"))


def test_prompt_rows_without_answer_are_read_only_where_the_dataset_says_so(tmp_path, models_dir):
    prompts = tmp_path / "open.jsonl"
    _write(prompts, [{"question": "What is 2 + 2?"}, {"question": "What is 3 + 3?", "answer": "6"}])
    model = EngineConfig(str(models_dir / "smollm2-135m-instruct"))
    majority = CorrectnessConfig(str(prompts), model, labels="majority")
    assert majority.prompt_kind == "correctness-majority" and majority.stage_settings()["labels"] == "majority"
    items = list(PromptReader(prompts, majority.prompt_kind, "open"))
    assert [i.answer for i in items] == [None, "6"]
    with pytest.raises(InputError, match=r"open.jsonl:1: missing key 'answer'"):
        list(PromptReader(prompts, CorrectnessConfig(str(prompts), model).prompt_kind, "open"))
    assert main(["validate", str(prompts), "--kind", "correctness-majority"]) == 0


@pytest.mark.engine
@pytest.mark.ray
def test_unanswered_prompts_sampled_and_paired_by_majority(tmp_path, models_dir, ray_local):
    from mpo_data.records.shards import stage_dir
    from mpo_data.sampling.stage_config import SamplingConfig
    from mpo_data.sampling.stages import run_stage

    prompts = tmp_path / "open.jsonl"
    _write(prompts, [{"question": f"What is {a} + {b}?"} for a, b in ((2, 3), (4, 4), (1, 6))])
    config = CorrectnessConfig(
        str(prompts),
        EngineConfig(str(models_dir / "smollm2-135m-instruct")),
        SamplingConfig(n=6, temperature=0.3, max_new_tokens=48),
        out_dir=str(tmp_path / "out"),
        prompt_version="en",
        labels="majority",
    )
    assert run_stage(config)["samples_out"] == 18
    folder = stage_dir(config.out_dir, "correctness", "open")
    assert orjson.loads((folder / "run.json").read_bytes())["labels"] == "majority"
    counts = build_pairs(PairsConfig(tmp_path / "out", tmp_path / "pairs", judge=JudgeConfig(workers=1)))[
        "correctness/open"
    ]
    assert counts["samples"] == 18
    votes = ("items_majority_labelled", "items_below_majority_threshold", "items_majority_tied")
    assert sum(counts.get(k, 0) for k in votes) == 3
    positives = _read(tmp_path / "pairs" / "pos_items" / "open.jsonl")
    assert len({p["item_id"] for p in positives}) == counts.get("items_majority_labelled", 0)
    for p in positives:  # each chosen-side sample voted for its item's label, which half the samples gave at least
        assert p["is_correct"] and p["majority_share"] >= 0.5 and "answer" not in p
    for path in tmp_path.glob("pairs/open_pairs_vqa_*_rules.jsonl"):
        assert {p["provenance"]["label_source"] for p in _read(path)} == {"majority"}
