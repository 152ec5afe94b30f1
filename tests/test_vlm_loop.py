"""The VLM loop (training/configs/easyvqa_vlm_cpu.yaml): image pairs only, evaluation sets from easy-VQA's test
split, the description hallucination summary (pure logic), then one real run: MPO steps on the easy-VQA VLM,
vLLM answers and descriptions with the images, our judge and the hallucination rule, before and after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpo_data.records.formats import MetaEntry, write_meta
from mpo_data.records.jsonl import read_jsonl, write_jsonl
from mpo_data.stats import paired_difference_ci, wilson
from mpo_data.train import ablate, description_eval
from mpo_data.train.config import load
from mpo_data.train.data import PairLoader

ROOT = Path(__file__).resolve().parents[1]
VLM_CONFIG = ROOT / "training" / "configs" / "easyvqa_vlm_cpu.yaml"


def test_images_only_skips_and_counts_the_text_pairs(pairs):
    loader = PairLoader("skip", pairs / "quarantine.jsonl", images_only=True)
    rows = loader.read_meta(pairs / "meta.json", seed=0)
    loader.close()
    assert len(rows.rows) == 5 and all(row["images"] for row in rows.rows)
    assert dict(rows.quarantine.counts) == {"text row, images_only": 3}
    config = load(VLM_CONFIG)
    assert config.data.images_only and config.model.finetune == "full" and config.bco_delta
    assert config.eval.descriptions.prompts.endswith("easy_vqa_describe_heldout.jsonl")


def test_answers_lose_the_leading_space_of_vllm_completions():
    from mpo_data.train.data import assistant_turn

    assert assistant_turn(" The image shows a red circle.\nFinal answer: red")[0]["content"][0]["text"].startswith(
        "The"
    )


def test_evaluation_sets_come_from_the_test_split_on_disjoint_images(tmp_path):
    from mpo_data.preference.hallucination import truth
    from mpo_data.tools import demo

    counts = demo.easy_vqa_test_sets(tmp_path, seed=0, heldout=12, tune=8, describe_share=0.5)
    assert counts == {
        "easy_vqa_heldout": 12,
        "easy_vqa_describe_heldout": 6,
        "easy_vqa_tune": 8,
        "easy_vqa_describe_tune": 4,
    }
    images = {name: {row["image"] for _, row in read_jsonl(tmp_path / f"{name}.jsonl")} for name in counts}
    assert not images["easy_vqa_heldout"] & images["easy_vqa_tune"]  # tuning never sees a reported image
    assert images["easy_vqa_describe_heldout"] <= images["easy_vqa_heldout"]
    assert all(image.startswith("images/easy_vqa_test/") for names in images.values() for image in names)
    for _, row in read_jsonl(tmp_path / "easy_vqa_describe_heldout.jsonl"):
        assert truth(row["chosen"]) is not None and (tmp_path / row["image"]).is_file()


def test_hallucination_summary_is_paired_over_the_same_images():
    before = ["hallucination", "hallucination", "faithful", "no_claim", "hallucination", "faithful"]
    after = ["faithful", "hallucination", "faithful", "faithful", "no_claim", "hallucination"]
    summary = description_eval.summarize(before, after)
    assert (summary["images"], summary["before"], summary["after"]) == (6, 0.5, round(2 / 6, 4))
    assert (summary["gained"], summary["lost"]) == (1, 2)  # newly hallucinated / no longer
    flags = lambda vs: [v == "hallucination" for v in vs]  # noqa: E731
    assert summary["diff_ci"] == pytest.approx(paired_difference_ci(flags(before), flags(after)), abs=1e-4)
    assert summary["before_ci"] == pytest.approx(wilson(3, 6), abs=1e-4)
    assert summary["before_claims"]["rate"] == 0.6 and summary["after_claims"]["no_claim"] == 1
    assert "on 6 held-out images" in description_eval.describe(summary)


def test_ablation_table_reports_the_hallucination_of_each_variant(tmp_path):
    verdicts = {
        "base": ["hallucination", "faithful"],
        "sft-s0": ["hallucination", "hallucination"],
        "mpo-s0": ["faithful", "faithful"],
    }
    for folder, vs in verdicts.items():
        write_jsonl(ablate.descriptions_path(tmp_path / folder, "sets/held.jsonl"), ({"verdict": v} for v in vs))
    data = ablate.hallucination_data(tmp_path, ["sft", "mpo"], [0], "sets/held.jsonl")
    assert (data["sft"]["before"], data["sft"]["after"], data["mpo"]["after"]) == (0.5, 1.0, 0.0)
    table = ablate.describe({"seeds": [0], "baseline": "sft", "sets": {}, "hallucination": data})
    assert "| mpo | 50.0 -> 0.0 (2) | -50.0 [" in table


@pytest.mark.train
@pytest.mark.engine
def test_vlm_run_trains_on_image_pairs_and_evaluates_answers_and_descriptions(
    models_dir, demo_dir, tmp_path, torch_threads
):
    """Real: 2 MPO steps of full fine-tuning on the easy-VQA VLM (text pairs of the mixture skipped), then
    vLLM with the images answers 6 test questions and describes 4 test images before and after."""
    from mpo_data import cli
    from mpo_data.preference.hallucination import truth
    from mpo_data.tools import demo, model_folders

    model_folders.build_all(models_dir, [model_folders.TINY_VLM_EASYVQA])
    sets = tmp_path / "sets"
    demo.easy_vqa_test_sets(sets, seed=0, heldout=6, tune=0, describe_share=0.67)
    pairs = []  # a faithful description (train images) against the same one with another colour
    for _, row in read_jsonl(demo_dir / "easy_vqa_describe.jsonl"):
        colour = truth(row["chosen"])[1]
        pairs.append({**row, "rejected": row["chosen"].replace(colour, "red" if colour == "teal" else "teal")})
    pairs = pairs[:6]
    pairs += [{"question": "What is 2 + 3?", "chosen": "Final answer: 5", "rejected": "Final answer: 6"}]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    write_meta(
        tmp_path / "meta.json",
        {"mix": MetaEntry(str(demo_dir / "images"), str(tmp_path / "pairs.jsonl"), 1.0, len(pairs))},
    )
    out = tmp_path / "run"
    argv = [
        "train",
        "--config",
        str(VLM_CONFIG),
        f"model.path={models_dir / model_folders.TINY_VLM_EASYVQA}",
        f"data.meta={tmp_path / 'meta.json'}",
        "data.eval_size=2",
        f"output_dir={out}",
        "dpo.max_steps=2",
        "dpo.per_device_train_batch_size=2",
        "eval.pairs=2",
        "eval.generations=0",
        f"eval.answers.questions={sets / 'easy_vqa_heldout.jsonl'}",
        f"eval.descriptions.prompts={sets / 'easy_vqa_describe_heldout.jsonl'}",
    ]
    assert cli.main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["run"]["steps"] == 2 and report["run"]["data"]["skipped"] == {"text row, images_only": 1}
    assert report["run"]["data"]["train_rows"] == 4
    assert report["answer_accuracy"]["questions"] == 6 and len(report["answer_accuracy"]["diff_ci"]) == 2
    hallucination = report["hallucination"]
    assert hallucination["images"] == 4 and len(hallucination["diff_ci"]) == 2
    rows = [row for _, row in read_jsonl(out / "descriptions.jsonl")]
    assert len(rows) == 4 and all(row["before_verdict"] in ("faithful", "hallucination", "no_claim") for row in rows)
    assert all(row["before_description"].strip() for row in rows)  # the VLM describes what it sees
