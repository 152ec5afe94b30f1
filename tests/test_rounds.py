"""`mpo-data rounds`: each round samples with the previous round's merged model, and a rerun does nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from mpo_data.errors import InputError
from mpo_data.rounds import RoundsConfig, check_settings, run_rounds, swap_model, table
from mpo_data.sampling.stage_config import DropoutNTPConfig, EngineConfig

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = ROOT / "models" / "smollm2-135m-instruct"
TRAIN = ROOT / "training" / "configs" / "smollm2_lora_cpu.yaml"
TEXTS = [  # DropoutNTP on text: most items give a pair (a continuation cut at max_new_tokens is dropped)
    (
        "Describe a red circle.",
        "The picture shows one red circle on a light background, filled with a single flat colour.",
    ),
    (
        "Describe a blue square.",
        "The picture shows one blue square on a light background, with straight edges and no text.",
    ),
    (
        "Describe a green triangle.",
        "The picture shows one green triangle on a light background, pointing upwards, alone.",
    ),
    (
        "Describe a black circle.",
        "The picture shows one black circle on a light background, with no pattern or shading.",
    ),
    (
        "Describe a yellow square.",
        "The picture shows one yellow square on a light background, drawn in a single colour.",
    ),
    ("Describe a red triangle.", "The picture shows one red triangle on a light background, with sharp corners."),
    ("Describe a blue circle.", "The picture shows one blue circle on a light background, and nothing else."),
    ("Describe a green square.", "The picture shows one green square on a light background, centred in the frame."),
]


def tiny_setup(tmp_path: Path, demo_dir: Path) -> RoundsConfig:
    prompts = tmp_path / "describe.jsonl"
    prompts.write_text("".join(orjson.dumps({"question": q, "chosen": c}).decode() + "\n" for q, c in TEXTS))
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "out_dir": "set-per-round",
                "defaults": {"engine": {"model": str(SMOLLM), "max_model_len": 1024}},
                "datasets": [
                    {
                        "name": "describe",
                        "stage": "dropout-ntp",
                        "settings": {"prompt_path": str(prompts), "sampling": {"max_new_tokens": 96}},
                    }
                ],
                "pairs": {"seed": 0},
                "meta": {"out": "set-per-round"},
            }
        )
    )
    train = [
        f"eval.answers.questions={demo_dir / 'arithmetic_heldout.jsonl'}",
        "eval.answers.max_questions=4",
        "eval.answers.max_new_tokens=16",
        "dpo.max_steps=1",
        "dpo.eval_steps=1",
        "dpo.max_length=256",
        "data.eval_size=1",
        "eval.pairs=1",
        "eval.generations=0",
    ]
    return RoundsConfig(pipeline=str(pipeline), train=str(TRAIN), out_dir=str(tmp_path / "rounds"), train_set=train)


def test_swap_model_only_replaces_the_base(tmp_path):
    other = tmp_path / "other"
    stage = DropoutNTPConfig(prompt_path="p.jsonl", engine=EngineConfig(model=str(other)))
    assert swap_model(stage, str(SMOLLM), "merged").engine.model == str(other)
    base = DropoutNTPConfig(prompt_path="p.jsonl", engine=EngineConfig(model=str(SMOLLM)))
    assert swap_model(base, str(SMOLLM / "."), "merged").engine.model == "merged"


def test_settings_are_recorded_and_a_changed_rerun_is_refused(tmp_path):
    config = RoundsConfig(pipeline="p.yaml", train="t.yaml", out_dir=str(tmp_path))
    check_settings(config)
    check_settings(RoundsConfig(pipeline="p.yaml", train="t.yaml", out_dir=str(tmp_path), rounds=4))  # K may grow
    with pytest.raises(
        InputError, match=r"rounds.json: these rounds were run with other settings \(init: 'previous'\)"
    ):
        check_settings(RoundsConfig(pipeline="p.yaml", train="t.yaml", out_dir=str(tmp_path), init="base"))


def test_a_pipeline_that_never_samples_with_the_base_is_refused(tmp_path, demo_dir):
    config = tiny_setup(tmp_path, demo_dir)
    config.pipeline_set = [f"defaults.engine.model={ROOT / 'models' / 'tiny-smolvlm'}"]
    with pytest.raises(InputError, match="pipe.yaml: no dataset samples with .*smollm2_lora_cpu.yaml's model.path"):
        run_rounds(config)
    assert not (tmp_path / "rounds" / "round-1").exists()


def test_table_rows_base_then_rounds():
    acc = {
        "questions": 4,
        "before": 0.25,
        "after": 0.5,
        "before_ci": [0.05, 0.7],
        "after_ci": [0.15, 0.85],
        "diff_ci": [-0.2, 0.6],
        "gained": 1,
        "lost": 0,
    }
    text = table([{"round": 1, "base": "models/base", "model": "r1/train/merged", "answer_accuracy": acc}])
    lines = text.splitlines()
    assert lines[0] == "rounds on 4 held-out questions:"
    assert lines[2].split() == ["0", "models/base", "25.0%", "[5.0%,", "70.0%]"]
    assert lines[3].split() == [
        "1",
        "r1/train/merged",
        "50.0%",
        "[15.0%,",
        "85.0%]",
        "+25.0",
        "points",
        "[-20.0%,",
        "60.0%]",
    ]


@pytest.mark.engine
@pytest.mark.ray
@pytest.mark.train
def test_two_rounds_sample_with_the_merged_model_and_a_rerun_does_nothing(tmp_path, demo_dir, models_dir):
    config = tiny_setup(tmp_path, demo_dir)
    cmd = [
        sys.executable,
        "-m",
        "mpo_data",
        "rounds",
        "--pipeline",
        config.pipeline,
        "--train",
        config.train,
        "--out-dir",
        config.out_dir,
        "--rounds",
        "2",
        *(f"--train-set={s}" for s in config.train_set),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    out = Path(config.out_dir)
    one, two = (orjson.loads((out / f"round-{k}" / "round.json").read_bytes()) for k in (1, 2))
    merged = out / "round-1" / "train" / "merged"
    assert one["model"] == str(merged) and one["sampled_with"] == {"describe": str(SMOLLM)}
    # round 2 sampled with round 1's merged model (vLLM loaded it: its samples are there), and trained from it
    assert two["sampled_with"] == {"describe": str(merged)}
    run2 = orjson.loads((out / "round-2" / "samples" / "dropout-ntp" / "describe" / "run.json").read_bytes())
    assert run2["model"] == "merged"
    summary2 = orjson.loads((out / "round-2" / "samples" / "dropout-ntp" / "describe" / "summary.json").read_bytes())
    assert summary2["samples_out"] >= 2 and summary2["samples_out"] + sum(summary2["dropped"].values()) == len(TEXTS)
    assert yaml.safe_load((out / "round-2" / "train" / "train_config.yaml").read_text())["model"]["path"] == str(
        merged
    )
    assert (out / "round-2" / "train" / "merged" / "config.json").is_file()
    assert (merged / "tokenizer_config.json").is_file()
    # each round keeps the pipeline's own layout and its training run
    for k in (1, 2):
        assert {"samples", "pairs", "pipeline.json", "meta.json", "train", "answers.jsonl", "round.json"} <= {
            p.name for p in (out / f"round-{k}").iterdir()
        }
    assert sum(1 for _ in open(out / "base" / "answers.jsonl")) == 4
    assert two["answer_accuracy"]["questions"] == 4
    shown = first.stdout[first.stdout.index("rounds on 4 held-out questions:\n") :]  # training printed before it
    print(shown)
    assert [line.split()[0] for line in shown.splitlines()[2:]] == ["0", "1", "2"]

    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".mpo-data.lock"}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "round 1: done" in second.stderr and "round 2: done" in second.stderr
    assert second.stdout == shown  # only the table: no training ran
    again = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".mpo-data.lock"}
    assert again == written  # nothing sampled, trained, merged or answered again

    (out / "round-2" / "round.json").unlink()  # a round cut short after its last step: resumes, redoes nothing
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert third.returncode == 0, third.stderr[-4000:]
    redone = orjson.loads((out / "round-2" / "round.json").read_bytes())
    assert redone["wall_s"] < two["wall_s"] and {**redone, "wall_s": two["wall_s"]} == two  # only its own time differs
    assert orjson.loads((out / "round-2" / "pipeline.json").read_bytes())["pairs_rebuilt"] is False
    resumed = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".mpo-data.lock"}
    changed = sorted(str(p.relative_to(out)) for p in resumed if resumed[p] != written.get(p))
    assert all(
        c.startswith("round-2/") and not c.startswith(("round-2/train/", "round-2/answers")) for c in changed
    ), changed
    assert third.stdout == shown
