"""`mpo-data pairs` on real sample shards: pairing invariants, filters counted, determinism, bad input."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from mpo_data.cli import main
from mpo_data.preference.judge import JudgeConfig
from mpo_data.preference.pairs import PairsConfig, build_pairs, is_degenerate
from mpo_data.records.formats import pair_problems
from mpo_data.sampling.prompts import user_prompt

N_PAIRS = 3


def _sample(item: int, index: int, response: str, finish: str = "stop", answer: str = "19") -> dict:
    question = f"How many? ({item})"
    return {
        "image": f"img/{item}.png",
        "question": question,
        "answer": answer,
        "note": "extra",
        "item_id": f"item{item}",
        "sample_index": index,
        "prompt": f"<image>\nTEMPLATE {question}",
        "response": response,
        "finish_reason": finish,
        "prompt_tokens": 10,
        "output_tokens": 20,
        "prompt_version": "en_v2",
        "model": "m",
        "sampling": {"n": 8},
    }


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def _read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def samples(tmp_path) -> Path:
    root = tmp_path / "samples"
    good = [f"Reason {i}. So \\boxed{{19}}" for i in range(4)]
    bad = [f"Reason {i}. So \\boxed{{119}}" for i in range(4)]
    rows = [_sample(0, i, r) for i, r in enumerate(good + bad + ["So 19", "So \\boxed{19"])]
    rows += [
        _sample(1, 0, "Counted. \\boxed{19}", finish="length"),  # correct but cut: never chosen
        _sample(1, 1, "word " * 200 + "\\boxed{19}"),  # correct but looping: never chosen
        _sample(1, 2, "Counted. \\boxed{20}"),
        _sample(2, 0, "Nope \\boxed{7}"),  # item 2: never correct -> neg_items
        _sample(2, 1, "Nope \\boxed{8}"),
    ]
    _write(root / "correctness" / "toy" / "part-00000.jsonl", rows[:6])
    _write(root / "correctness" / "toy" / "part-00001.jsonl", rows[6:])
    (root / "correctness" / "toy" / ".part-00002.jsonl.123.tmp").write_bytes(b"{half a line")
    ntp = {
        "question": "Describe.",
        "chosen": "A red square.",
        "provenance": {"model": "m", "stage": "dropout-ntp", "start_ratio": 0.5, "load_image": False, "sampling": {}},
        "finish_reason": "stop",
        "output_tokens": 3,
    }
    _write(
        root / "dropout-ntp" / "desc" / "part-00000.jsonl",
        [
            {**ntp, "item_id": "d0", "sample_index": 0, "rejected": "A red circle."},
            {**ntp, "item_id": "d0", "sample_index": 1, "rejected": "A red circle."},  # duplicate pair
            {**ntp, "item_id": "d1", "sample_index": 0, "rejected": "A red square."},  # same text
        ],
    )
    # what the stages dropped (cut at max tokens, ...) sits beside the parts and is never pair input
    _write(
        root / "correctness" / "toy" / "dropped" / "part-00002.jsonl",
        [{**_sample(3, 0, "\\boxed{19}"), "reason": "length"}],
    )
    _write(
        root / "dropout-ntp" / "desc" / "dropped" / "part-00001.jsonl",
        [{**ntp, "item_id": "d2", "sample_index": 0, "rejected": "A red", "reason": "truncated"}],
    )
    return root


def _config(data_dir: Path, save_dir: Path, **kw) -> PairsConfig:
    return PairsConfig(
        data_dir=data_dir,
        save_dir=save_dir,
        num_pairs_per_key=N_PAIRS,
        judge=JudgeConfig(workers=1),
        bucket_bytes=512,
        **kw,
    )


def test_pairs_invariants_and_counts(samples, tmp_path):
    out = tmp_path / "pairs"
    summary = build_pairs(_config(samples, out))
    pairs = _read(out / "toy_pairs_vqa_correctness_rules.jsonl")
    assert len(pairs) == N_PAIRS  # 4 x 4 candidates, capped per item
    for pair in pairs:
        assert pair["chosen"].endswith("\\boxed{19}") and pair["rejected"].endswith("\\boxed{119}")
        assert pair["chosen_meta"]["item_id"] == "item0" and pair["answer_gt"] == "19"
        assert pair["image"] == "img/0.png" and pair["provenance"]["rule"] == "correctness"
        # the prompt the answers were sampled for, and the prompt set's question beside it (as InternVL)
        assert (pair["question"], pair["question_orig"]) == ("<image>\nTEMPLATE How many? (0)", "How many? (0)")
    formats = _read(out / "toy_pairs_vqa_format_rules.jsonl")
    assert {p["rejected"] for p in formats} == {"So 19", "So \\boxed{19"}
    counts = summary["correctness/toy"]
    assert counts["samples"] == 15 and counts["correct"] == 6 and counts["correctness_rate"] == 0.4
    assert counts["filtered_chosen_truncated"] == 1 and counts["filtered_chosen_repetitive"] == 1
    assert counts["items_never_correct"] == 1 and counts["judge_errors"] == 0
    assert "toy_pairs_vqa_correctness_rules" not in {p.stem for p in out.glob("item1*")}
    assert [r["question"] for r in _read(out / "neg_items" / "toy.jsonl")] == ["How many? (2)"]
    assert _read(out / "neg_items" / "toy.jsonl")[0] == {
        "image": "img/2.png",
        "question": "How many? (2)",
        "answer": "19",
        "note": "extra",
    }
    assert len(_read(out / "pos_items" / "toy.jsonl")) == 6
    ntp = _read(out / "desc_prefix_pair_sr0.5_wo_image.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in ntp] == [("A red square.", "A red circle.")]
    assert (
        summary["dropout-ntp/desc"]["filtered_duplicate"] == 1
        and summary["dropout-ntp/desc"]["filtered_same_text"] == 1
    )
    assert orjson.loads((out / "pairs_summary.json").read_bytes()) == summary


def test_same_seed_same_output_other_seed_other_pick(samples, tmp_path):
    outputs = []
    for seed, name in [(0, "a"), (0, "b"), (7, "c")]:
        build_pairs(_config(samples / "correctness" / "toy", tmp_path / name, seed=seed))
        outputs.append((tmp_path / name / "toy_pairs_vqa_correctness_rules.jsonl").read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_answer_fix_and_max_lines(samples, tmp_path):
    rows = [_sample(5, 0, "Think.\nFinal answer: **19 apples**"), _sample(5, 1, "Think.\nFinal answer: 20")]
    for r in rows:
        r["prompt_version"] = "en"
    _write(tmp_path / "s" / "correctness" / "fix" / "part-00000.jsonl", rows)
    summary = build_pairs(_config(tmp_path / "s", tmp_path / "p", answer_fix=True))
    assert (
        _read(tmp_path / "p" / "fix_pairs_vqa_correctness_rules.jsonl")[0]["chosen"] == "Think.\nFinal answer: **19**"
    )
    capped = build_pairs(_config(samples / "correctness", tmp_path / "q", max_lines=4))
    assert capped["correctness/toy"]["lines"] == 4 and capped["correctness/toy"]["lines_over_max_lines"] == 11
    assert summary["correctness/fix"]["pairs_correctness"] == 1


@pytest.mark.parametrize(
    "bounds, outside, pairs",
    [
        ((0.5, 0.8), 1, 0),  # item 0 (4 of 10 correct) is out; item 1 (2 of 3) is in but has no usable chosen
        ((0.4, 0.4), 1, N_PAIRS),  # inclusive: item 0 is in, item 1 is out
        (None, 0, N_PAIRS),  # off
    ],
)
def test_accuracy_range_keeps_items_by_sampled_accuracy(samples, tmp_path, bounds, outside, pairs):
    out = tmp_path / "pairs"
    counts = build_pairs(_config(samples / "correctness", out, accuracy_range=bounds))["correctness/toy"]
    assert counts.get("items_outside_accuracy_range", 0) == outside and counts.get("pairs_correctness", 0) == pairs
    assert counts.get("pairs_format", 0) == pairs  # both rules, 4 chosen x 4 wrong or x 2 malformed, capped
    assert counts["items_never_correct"] == 1  # the never-correct item is counted as before, not as out of range
    assert len(_read(out / "pos_items" / "toy.jsonl")) == 6  # correct samples are kept whatever the range


def test_cli_accuracy_range_two_values_checked(samples, tmp_path, capsys):
    args = ["pairs", "--data-dir", str(samples / "correctness"), "--save-dir", str(tmp_path / "o"), "--workers", "1"]
    assert main([*args, "--accuracy-range", "0.8", "0.2"]) == 1
    assert "--accuracy-range must be LO HI with 0 <= LO <= HI <= 1, got [0.8, 0.2]" in capsys.readouterr().err
    assert main([*args, "--accuracy-range", "0.5", "0.8"]) == 0
    summary = orjson.loads((tmp_path / "o" / "pairs_summary.json").read_bytes())
    assert summary["correctness/toy"]["items_outside_accuracy_range"] == 1


def test_degenerate_repetition():
    assert is_degenerate("Let me check again. " * 60)
    assert is_degenerate("The answer is " + "1" * 900)
    assert not is_degenerate(" ".join(f"step {i} adds {i * 7} to the total" for i in range(80)))


@pytest.mark.parametrize(
    "line, message",
    [
        (
            {"item_id": "x", "sample_index": 0, "question": "q", "answer": "1", "finish_reason": "stop"},
            "missing key 'response'",
        ),
        (
            {
                "item_id": "x",
                "sample_index": "0",
                "question": "q",
                "answer": "1",
                "response": "r",
                "finish_reason": "stop",
            },
            "'sample_index' must be int",
        ),
        (
            {
                "item_id": "x",
                "sample_index": 0,
                "question": "q",
                "answer": "1",
                "response": "r",
                "finish_reason": "eos",
            },
            "'finish_reason' must be",
        ),
    ],
)
def test_cli_bad_sample_names_file_and_line(tmp_path, capsys, line, message):
    part = tmp_path / "samples" / "correctness" / "ds" / "part-00000.jsonl"
    _write(part, [_sample(0, 0, "\\boxed{19}"), line])
    code = main(
        ["pairs", "--data-dir", str(tmp_path / "samples"), "--save-dir", str(tmp_path / "out"), "--workers", "1"]
    )
    err = capsys.readouterr().err
    assert code == 1 and f"{part}:2: " in err and message in err
    assert not list((tmp_path / "out").glob("*.jsonl"))  # nothing half-written


def test_skip_quarantines_bad_lines_with_reasons_and_counts(samples, tmp_path):
    part = samples / "correctness" / "toy" / "part-00001.jsonl"
    part.write_bytes(part.read_bytes() + b'{"item_id": "x", "sample_index": 0}\n{not json\n')
    bad_ntp = samples / "dropout-ntp" / "desc" / "part-00000.jsonl"
    bad_ntp.write_bytes(
        bad_ntp.read_bytes()
        + b'{"item_id": "d9", "question": "q", "chosen": "a", "rejected": "b", "provenance": {}}\n'
    )
    summary = build_pairs(_config(samples, tmp_path / "out", on_error="skip"))
    quarantined = _read(tmp_path / "out" / "quarantine" / "correctness_toy.jsonl")
    assert [q["loc"] for q in quarantined] == [f"{part}:10", f"{part}:11"]
    assert "missing key 'question'" in quarantined[0]["reasons"][0] and "invalid JSON" in quarantined[1]["reasons"][0]
    assert quarantined[0]["line"] == {"item_id": "x", "sample_index": 0}
    toy, desc = summary["correctness/toy"], summary["dropout-ntp/desc"]
    assert toy["quarantined_schema"] == 1 and toy["quarantined_invalid JSON"] == 1 and toy["samples"] == 15
    assert desc["quarantined_schema"] == 1 and desc["pairs_dropout_ntp"] == 1
    ntp = _read(tmp_path / "out" / "quarantine" / "dropout-ntp_desc.jsonl")
    assert "start_ratio" in ntp[0]["reasons"][0]
    # every line read is either judged or quarantined; the good ones pair as in a clean run
    assert toy["lines"] == 17 and toy["correct"] == 6 and toy["pairs_correctness"] == N_PAIRS


def test_cli_unknown_stage_folder(tmp_path, capsys):
    _write(tmp_path / "x" / "weird" / "ds" / "part-00000.jsonl", [_sample(0, 0, "r")])
    assert main(["pairs", "--data-dir", str(tmp_path / "x"), "--save-dir", str(tmp_path / "o")]) == 1
    assert "stage in" in capsys.readouterr().err


def test_multi_image_pairs_carry_one_placeholder_per_image(tmp_path):
    two = {"image": ["a.png", "b.png"], "answer": "19"}
    rows = [{**_sample(0, i, r), **two} for i, r in enumerate(["\\boxed{19}", "\\boxed{18}"])]
    for row in rows:  # a shard from before samples kept their prompt: rebuilt from the template
        del row["prompt"]
    ntp = {
        "image": ["a.png", "b.png"],
        "question": "Compare them.",
        "chosen": "Both red.",
        "rejected": "Both blue.",
        "item_id": "d0",
        "sample_index": 0,
        "provenance": {"start_ratio": 0.5, "load_image": False},
    }
    _write(tmp_path / "s" / "correctness" / "two" / "part-00000.jsonl", rows)
    _write(tmp_path / "s" / "dropout-ntp" / "two" / "part-00000.jsonl", [ntp])
    build_pairs(_config(tmp_path / "s", tmp_path / "p"))
    [pair] = _read(tmp_path / "p" / "two_pairs_vqa_correctness_rules.jsonl")
    assert pair["question"] == user_prompt("How many? (0)", 2, "en_v2")
    assert (
        pair["question"].startswith("Image-1: <image>\nImage-2: <image>\n") and pair["question"].count("<image>") == 2
    )
    [drop] = _read(tmp_path / "p" / "two_prefix_pair_sr0.5_wo_image.jsonl")
    assert drop["question"] == "Image-1: <image>\nImage-2: <image>\nCompare them."
    assert pair_problems(pair) == pair_problems(drop) == []


def test_wrong_placeholder_count_names_file_and_line(tmp_path, capsys):
    part = tmp_path / "samples" / "correctness" / "ds" / "part-00000.jsonl"
    three = {**_sample(0, 1, "\\boxed{19}"), "image": ["a.png", "b.png"], "question": "<image> <image> <image> Same?"}
    _write(part, [_sample(0, 0, "\\boxed{19}"), three])
    code = main(
        ["pairs", "--data-dir", str(tmp_path / "samples"), "--save-dir", str(tmp_path / "out"), "--workers", "1"]
    )
    err = capsys.readouterr().err
    assert code == 1 and f"{part}:2: 'question' has 3 <image> placeholder(s) for 2 image(s)" in err


def test_dropout_continuations_get_a_hallucination_rate(tmp_path):
    ntp = {
        "question": "Describe.",
        "chosen": "A red circle on a plain background.",
        "finish_reason": "stop",
        "output_tokens": 4,
        "provenance": {"model": "m", "stage": "dropout-ntp", "start_ratio": 0.5, "load_image": False, "sampling": {}},
    }
    continuations = [" on a blue background.", " on a plain red background.", " in a box.", " and a green triangle."]
    _write(
        tmp_path / "s" / "dropout-ntp" / "shapes" / "part-00000.jsonl",
        [
            {**ntp, "item_id": f"d{i}", "sample_index": 0, "rejected": "A red circle" + text}
            for i, text in enumerate(continuations)
        ],
    )
    scored = build_pairs(_config(tmp_path / "s", tmp_path / "out"))["dropout-ntp/shapes"]["hallucination"]
    assert (scored["hallucination"], scored["faithful"], scored["no_claim"]) == (2, 1, 1)
    assert scored["rate"] == round(2 / 3, 4) and scored["load_image"] == [False]
    assert scored["ci"][0] < 2 / 3 < scored["ci"][1]
