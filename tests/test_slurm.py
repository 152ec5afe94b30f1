"""The Slurm scripts under stand-in srun/scontrol, each "node" a local process: data.sbatch brings up two Ray
nodes and runs the real pipeline; train.sbatch runs two-node data-parallel MPO training."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest
import yaml

from mpo_data.formats import read_meta

ROOT = Path(__file__).resolve().parents[1]
STANDINS = ROOT / "tests" / "slurm_standins"

def run_sbatch(script: str, timeout: int, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "pipelines" / "slurm" / script)], env=sbatch_env(**settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def sbatch_env(**settings: str) -> dict[str, str]:
    """The job's environment under the stand-ins: loopback nodes, one CPU each, the venv's tools."""
    env = dict(os.environ, PATH=f"{STANDINS}:{os.environ['PATH']}", HEAD_IP="127.0.0.1", GPUS_PER_NODE="0",
               CPUS_PER_NODE="1", WAIT_S="120", MPO_DATA=str(ROOT / ".venv" / "bin" / "mpo-data"),
               RAY=str(ROOT / ".venv" / "bin" / "ray"), PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    env.update(settings)
    # conftest's loopback-only switch also makes `ray start --address` refuse to join as a worker node;
    # the script's nodes get their loopback address from --node-ip-address instead.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


@pytest.mark.ray
@pytest.mark.engine
def test_data_sbatch_brings_up_two_nodes_and_runs_pipeline(tmp_path, demo_dir):
    prompts = tmp_path / "arith.jsonl"
    prompts.write_text("".join((demo_dir / "arithmetic.jsonl").read_text().splitlines(True)[:2]))
    config = {
        "out_dir": str(tmp_path / "out"),
        "defaults": {"engine": {"model": str(ROOT / "models" / "smollm2-135m-instruct")},
                     "sampling": {"n": 2, "max_new_tokens": 16}},
        "datasets": [
            {"name": "arith", "stage": "correctness", "settings": {"prompt_path": str(prompts)}},
            {"name": "describe", "stage": "dropout-ntp",
             "settings": {"prompt_path": str(demo_dir / "easy_vqa_describe.jsonl"), "image_root": str(demo_dir / "images"),
                          "sample_max_num": 2, "sampling": {"n": 1, "max_new_tokens": 128}}},
        ],
        "meta": {"out": str(tmp_path / "meta.json")},
    }
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(config))
    result = run_sbatch("data.sbatch", 900, SLURM_JOB_NODELIST="node[1-2]", CONFIG=str(tmp_path / "pipe.yaml"),
                        RAY_PORT="6391", NODE_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Ray cluster up with 2 nodes" in result.stdout
    summary = orjson.loads((tmp_path / "out" / "samples" / "correctness" / "arith" / "summary.json").read_bytes())
    assert summary["samples_out"] == 4
    assert any(name.startswith("describe_prefix_pair") for name in read_meta(tmp_path / "meta.json"))


@pytest.mark.ray
def test_data_sbatch_fails_with_pipeline_status(tmp_path):
    result = run_sbatch("data.sbatch", 300, SLURM_JOB_NODELIST="node1", CONFIG=str(tmp_path / "missing.yaml"),
                        RAY_PORT="6392")
    assert result.returncode == 1
    assert "missing.yaml" in result.stderr and "pipeline exited with 1" in result.stdout


@pytest.mark.train
def test_train_sbatch_trains_data_parallel_over_two_nodes(pairs, tmp_path):
    out = tmp_path / "run"
    overrides = [f"data.meta={pairs / 'meta.json'}", f"output_dir={out}", "model.finetune=lora", "data.eval_size=2",
                 "eval.pairs=2", "eval.generations=1"]
    result = run_sbatch("train.sbatch", 600, SLURM_JOB_NODELIST="node[1-2]", GPUS_PER_NODE="1", MASTER_PORT="29531",
                        CONFIG=str(ROOT / "training" / "configs" / "tiny_vlm_full_cpu.yaml"), OVERRIDES=" ".join(overrides),
                        ACCELERATE=str(ROOT / ".venv" / "bin" / "accelerate"), OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "processes=2" in result.stdout and "training exited with 0" in result.stdout
    run = orjson.loads((out / "summary.json").read_bytes())
    assert run["processes"] == 2 and run["steps"] == 2  # one DDP group across both "nodes", not two lone runs
    assert result.stdout.count("adapter: ") == 1  # only rank 0 saves and evaluates
    assert (out / "adapter_model.safetensors").is_file() and (out / "eval.json").is_file()
