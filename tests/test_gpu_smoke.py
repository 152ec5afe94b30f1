"""The GPU smoke test's CPU-side logic: its plan of commands (valid for our own CLI), the table, skipping
tp=2 with fewer than 2 GPUs, failure reporting, and a clear refusal on a machine without a GPU."""

from __future__ import annotations

import orjson
import pytest
import torch

from mpo_data import cli
from mpo_data.config import config_from_args
from mpo_data.sampling.stage_config import CorrectnessConfig, DropoutNTPConfig
from mpo_data.tools import gpu_smoke
from mpo_data.tools.gpu_smoke import Outcome, Step
from mpo_data.tools.model_folders import TINY_INTERNVL, TINY_QWEN


def stage_runs(steps: list[Step]) -> list[tuple[str, str, int]]:
    return [(s.name, s.model, s.tp) for s in steps if s.name in gpu_smoke.STAGES]


def test_one_gpu_runs_both_stages_of_both_models_at_tp1_and_says_tp2_is_skipped(tmp_path):
    steps, skipped = gpu_smoke.plan(tmp_path / "out", tmp_path / "models", gpus=1)
    assert [s.name for s in steps][0] == "models" and [s.name for s in steps][-3:] == ["pairs", "meta", "train"]
    assert stage_runs(steps) == [
        (stage, model, 1) for model in (TINY_QWEN, TINY_INTERNVL) for stage in gpu_smoke.STAGES
    ]
    assert skipped == ["tp=2 skipped: 1 GPU(s) visible, it needs 2"]


def test_two_gpus_add_tp2_runs(tmp_path):
    steps, skipped = gpu_smoke.plan(tmp_path / "out", tmp_path / "models", gpus=2)
    assert {tp for _, _, tp in stage_runs(steps)} == {1, 2} and len(stage_runs(steps)) == 8
    assert skipped == []


def test_skip_stages_keeps_models_meta_and_train_and_lists_the_stage_rows_as_skipped(tmp_path):
    steps, skipped = gpu_smoke.plan(tmp_path / "out", tmp_path / "models", gpus=1, skip_stages=True)
    assert [s.name for s in steps] == ["models", "meta", "train"]
    assert skipped == [
        f"{stage} {model} tp=1 skipped: --skip-stages"
        for model in (TINY_QWEN, TINY_INTERNVL)
        for stage in gpu_smoke.STAGES
    ] + ["pairs skipped: --skip-stages, no samples"]
    meta = cli.build_parser("meta").parse_args(steps[1].argv)
    assert meta.pairs_dir == str(tmp_path / "out" / "pairs")  # where write_prompts puts the hand-made pairs
    assert len(gpu_smoke.plan(tmp_path / "out", tmp_path / "models", gpus=2, skip_stages=True)[1]) == 9


def test_every_planned_command_is_valid_for_our_cli(tmp_path):
    steps, _ = gpu_smoke.plan(tmp_path / "out", tmp_path / "models", gpus=2)
    parsed = {(s.name, s.model, s.tp): cli.build_parser(s.argv[0]).parse_args(s.argv) for s in steps}
    internvl = config_from_args(CorrectnessConfig, parsed[("correctness", TINY_INTERNVL, 2)]).engine
    assert (internvl.max_num, internvl.dynamic, internvl.tensor_parallel_size) == ([6], True, 2)
    assert config_from_args(DropoutNTPConfig, parsed[("dropout-ntp", TINY_QWEN, 1)]).sampling.n == 2
    assert parsed[("models", "", None)].model == [TINY_QWEN, TINY_INTERNVL]


def test_the_prompts_and_pairs_are_valid_files(tmp_path, capsys):
    gpu_smoke.write_prompts(tmp_path, tmp_path / "pairs")
    files = [(tmp_path / f"{stage}.jsonl", stage) for stage in gpu_smoke.STAGES] + [
        (tmp_path / "pairs" / "smoke_colours.jsonl", "pairs")
    ]
    for path, kind in files:
        assert cli.main(["validate", str(path), "--kind", kind, "--image-root", str(tmp_path)]) == 0
        assert len(path.read_text().splitlines()) == gpu_smoke.ITEMS


def test_table_shows_speed_failures_and_the_verdict(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_bytes(orjson.dumps({"output_tokens_per_s": 1234.567}))
    stage = Step("correctness", [], TINY_QWEN, 2, summary)
    assert gpu_smoke.speed(stage) == "1234.6 tok/s"
    outcomes = [
        Outcome(stage, True, 12.34, gpu_smoke.speed(stage), ""),
        Outcome(Step("train", [], TINY_QWEN), False, 3.0, "", "exit 1: CUDA out of memory"),
    ]
    text = gpu_smoke.table(outcomes, ["tp=2 skipped: 1 GPU(s) visible, it needs 2"])
    header, ok, failed, skipped, verdict = text.splitlines()
    assert ok.split() == ["correctness", TINY_QWEN, "2", "pass", "1234.6", "tok/s", "12.3"]
    assert failed.split()[:4] == ["train", TINY_QWEN, "FAIL", "3.0"] and failed.endswith("exit 1: CUDA out of memory")
    assert skipped.startswith("tp=2 skipped") and verdict == "gpu-smoke: FAIL (1 of 2 steps)"
    assert gpu_smoke.table(outcomes[:1], []).endswith("gpu-smoke: PASS")


def test_a_failing_step_reports_its_exit_status_and_last_line(tmp_path):
    step = Step("pairs", ["pairs", "--data-dir", str(tmp_path / "missing"), "--save-dir", str(tmp_path / "pairs")])
    outcome = gpu_smoke.run_step(step, timeout=120)
    assert not outcome.ok and outcome.note.startswith("exit 1: ") and "missing" in outcome.note


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the smoke test would run")
def test_without_a_gpu_it_says_why_instead_of_crashing(tmp_path, capsys):
    assert cli.main(["gpu-smoke", "--out", str(tmp_path / "out"), "--models", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU visible" in err and "need torchvision" in err
    assert not (tmp_path / "models").exists()
