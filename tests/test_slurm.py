"""The Slurm scripts under stand-in srun/scontrol, each "node" a local process: data.sbatch brings up two Ray
nodes and runs the real pipeline, stops Ray and exits with the pipeline's status; train.sbatch runs two-node
data-parallel MPO training. The job logic itself (teardown, head address, GPU count) is also tested with fake
`ray`/`ip`/`getent` tools, in seconds."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from mpo_data.records.formats import read_meta

ROOT = Path(__file__).resolve().parents[1]
STANDINS = ROOT / "tests" / "slurm_standins"
BIN = Path(sys.executable).parent  # the venv's tools
JOB_IDS = itertools.count(1)


def run_sbatch(script: str, timeout: int, tmp_path: Path, **settings: str) -> tuple[subprocess.CompletedProcess, str]:
    """The job's result and its log (the script writes it under LOG_DIR, which it creates)."""
    env = sbatch_env(LOG_DIR=str(tmp_path / "logs"), **settings)
    result = subprocess.run(
        ["bash", str(ROOT / "pipelines" / "slurm" / script)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    logs = list((tmp_path / "logs").glob("*.out"))
    return result, logs[0].read_text() if len(logs) == 1 else f"{len(logs)} job logs; stdout: {result.stdout}"


def sbatch_env(**settings: str) -> dict[str, str]:
    """The job's environment under the stand-ins: loopback nodes, one CPU each, the venv's tools."""
    env = dict(
        os.environ,
        PATH=f"{STANDINS}:{os.environ['PATH']}",
        HEAD_IP="127.0.0.1",
        GPUS_PER_NODE="0",
        CPUS_PER_NODE="1",
        WAIT_S="120",
        MPO_DATA=str(BIN / "mpo-data"),
        RAY=str(BIN / "ray"),
        PYTHON=str(BIN / "python"),
        SLURM_JOB_ID=f"{os.getpid()}{next(JOB_IDS):03d}",
    )
    for name in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    env.update(settings)
    # conftest's loopback-only switch also makes `ray start --address` refuse to join as a worker node;
    # the script's nodes get their loopback address from --node-ip-address instead.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


def fake_tools(tmp_path: Path, **tools: str) -> Path:
    """A folder of executable bash stand-ins, NAME -> body."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


# A `ray start --block` that records its node and arguments and blocks until a signal ends it, a Python that
# reports the started nodes as joined, and a pipeline that exits with FAKE_STATUS.
FAKE_RAY = """echo "$SLURMD_NODENAME start $*" >> "$FAKE_LOG"
trap 'echo "$SLURMD_NODENAME stopped" >> "$FAKE_LOG"; exit 0' TERM
while true; do sleep 0.2; done"""
FAKE_PYTHON = 'echo "$(grep -c " start " "$FAKE_LOG") 0"'
FAKE_MPO_DATA = 'echo "pipeline ran: $*"; exit "$FAKE_STATUS"'


def run_fake_data_job(tmp_path: Path, status: int, **settings: str) -> tuple[subprocess.CompletedProcess, str, str]:
    bin_dir = fake_tools(tmp_path, ray=FAKE_RAY, python=FAKE_PYTHON, **{"mpo-data": FAKE_MPO_DATA})
    fake_log = tmp_path / "nodes.log"
    fake_log.touch()
    result, log = run_sbatch(
        "data.sbatch",
        60,
        tmp_path,
        SLURM_JOB_NODELIST="node[1-2]",
        RAY=str(bin_dir / "ray"),
        PYTHON=str(bin_dir / "python"),
        MPO_DATA=str(bin_dir / "mpo-data"),
        RAY_AUTH_MODE="disabled",
        FAKE_LOG=str(fake_log),
        FAKE_STATUS=str(status),
        **settings,
    )
    return result, log, fake_log.read_text()


@pytest.mark.parametrize("status", [0, 3])
def test_data_sbatch_stops_the_node_steps_and_exits_with_the_pipeline_status(tmp_path, status):
    result, log, nodes = run_fake_data_job(tmp_path, status)
    assert result.returncode == status, log
    # The node steps are signalled, not joined by a `ray stop` step, which Slurm refuses while they run.
    assert "Requested nodes are busy" not in log + result.stderr
    assert sorted(line for line in nodes.splitlines() if line.endswith("stopped")) == [
        "node1 stopped",
        "node2 stopped",
    ]
    assert log.index(f"pipeline exited with {status}") < log.index(f"Ray stopped on 2 node(s); exiting with {status}")
    assert "job log in" in result.stdout  # Slurm's own output file points to the log


def test_data_sbatch_advertises_the_gpus_slurm_gave_each_node(tmp_path):
    _, log, nodes = run_fake_data_job(tmp_path, 0, GPUS_PER_NODE="", SLURM_GPUS_ON_NODE="4")
    assert [line.count("--num-gpus=4") for line in nodes.splitlines() if " start " in line] == [1, 1], log
    _, log, nodes = run_fake_data_job(tmp_path / "cvd", 0, GPUS_PER_NODE="", CUDA_VISIBLE_DEVICES="0,1,2")
    assert [line.count("--num-gpus=3") for line in nodes.splitlines() if " start " in line] == [1, 1], log


def head_address(tmp_path: Path, route_source: str, **settings: str) -> subprocess.CompletedProcess:
    """head_address node1 node2 on a fake network: node2 resolves to 10.1.0.2, reached from ROUTE_SOURCE."""
    bin_dir = fake_tools(
        tmp_path,
        getent='[ "$1 $2" = "ahostsv4 node2" ] && echo "10.1.0.2        STREAM node2"',
        ip=f'[ "$1 $2 $3 $4" = "-4 route get 10.1.0.2" ] && echo "10.1.0.2 dev ib0 src {route_source} uid 0"',
        hostname='echo "127.0.1.1 10.1.0.1"',  # what `hostname --ip-address` gives on such nodes
    )
    env = sbatch_env(SLURM_JOB_NODELIST="node[1-2]", PATH=f"{bin_dir}:{STANDINS}:{os.environ['PATH']}", HEAD_IP="")
    env.update(settings)
    return subprocess.run(
        ["bash", "-c", "source pipelines/slurm/cluster.sh && head_address node1 node2"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_head_address_is_the_source_of_the_route_to_the_other_nodes(tmp_path):
    assert head_address(tmp_path, "10.1.0.1").stdout.strip() == "10.1.0.1"
    assert head_address(tmp_path, "10.1.0.1", HEAD_IP="192.168.7.7").stdout.strip() == "192.168.7.7"  # the user's wins
    loopback = head_address(tmp_path, "127.0.0.1")
    assert (
        loopback.returncode == 1
        and "routes to node2 from loopback" in loopback.stderr
        and "set HEAD_IP" in loopback.stderr
    )
    not_ipv4 = head_address(tmp_path, "10.1.0.1", HEAD_IP="fe80::1")
    assert not_ipv4.returncode == 1 and "no IPv4 address" in not_ipv4.stderr


def test_train_sbatch_without_gpus_says_so_in_its_log(tmp_path):
    result, log = run_sbatch("train.sbatch", 60, tmp_path, SLURM_JOB_NODELIST="node[1-2]", GPUS_PER_NODE="")
    assert result.returncode == 1
    assert "no GPUs in SLURM_GPUS_ON_NODE or CUDA_VISIBLE_DEVICES" in log  # logs/ did not exist before


@pytest.mark.ray
@pytest.mark.engine
def test_data_sbatch_brings_up_two_nodes_and_runs_pipeline(tmp_path, demo_dir):
    prompts = tmp_path / "arith.jsonl"
    prompts.write_text("".join((demo_dir / "arithmetic.jsonl").read_text().splitlines(True)[:2]))
    config = {
        "out_dir": str(tmp_path / "out"),
        "defaults": {
            "engine": {"model": str(ROOT / "models" / "smollm2-135m-instruct")},
            "sampling": {"n": 2, "max_new_tokens": 16},
        },
        "datasets": [
            {"name": "arith", "stage": "correctness", "settings": {"prompt_path": str(prompts)}},
            {
                "name": "describe",
                "stage": "dropout-ntp",
                "settings": {
                    "prompt_path": str(demo_dir / "easy_vqa_describe.jsonl"),
                    "image_root": str(demo_dir / "images"),
                    "sample_max_num": 2,
                    "sampling": {"n": 1, "max_new_tokens": 128},
                },
            },
        ],
        "meta": {"out": str(tmp_path / "meta.json")},
    }
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(config))
    result, log = run_sbatch(
        "data.sbatch",
        900,
        tmp_path,
        SLURM_JOB_NODELIST="node[1-2]",
        CONFIG=str(tmp_path / "pipe.yaml"),
        RAY_PORT="6391",
        NODE_IP="127.0.0.1",
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    assert result.returncode == 0, log[-6000:]
    assert "Ray cluster up with 2 nodes" in log
    summary = orjson.loads((tmp_path / "out" / "samples" / "correctness" / "arith" / "summary.json").read_bytes())
    assert summary["samples_out"] == 4
    assert any(name.startswith("describe_prefix_pair") for name in read_meta(tmp_path / "meta.json"))


@pytest.mark.ray
def test_data_sbatch_failing_engine_reaches_the_log_and_the_exit_status(tmp_path, demo_dir):
    # A stage that refuses its settings once the driver has joined the cluster (no room for a prompt).
    prompts = tmp_path / "arith.jsonl"
    prompts.write_text((demo_dir / "arithmetic.jsonl").read_text().splitlines(True)[0])
    config = {
        "out_dir": str(tmp_path / "out"),
        "defaults": {
            "engine": {"model": str(ROOT / "models" / "smollm2-135m-instruct"), "max_model_len": 64},
            "sampling": {"max_new_tokens": 64},
        },
        "datasets": [{"name": "arith", "stage": "correctness", "settings": {"prompt_path": str(prompts)}}],
        "meta": {"out": str(tmp_path / "meta.json")},
    }
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(config))
    result, log = run_sbatch(
        "data.sbatch",
        300,
        tmp_path,
        SLURM_JOB_NODELIST="node[1-2]",
        CONFIG=str(tmp_path / "pipe.yaml"),
        RAY_PORT="6392",
        NODE_IP="127.0.0.1",
        GPUS_PER_NODE="",
        SLURM_GPUS_ON_NODE="2",
    )
    assert "Ray cluster up with 2 nodes, 4 GPUs" in log
    assert result.returncode not in (0, None) and f"pipeline exited with {result.returncode}" in log, log[-6000:]
    assert "leaves no room for the prompt in max_model_len 64" in log, log[-6000:]
    assert log.index("pipeline exited with") < log.index("Ray stopped on 2 node(s)")
    with pytest.raises(ConnectionRefusedError):  # the head is gone, not left running past the job
        socket.create_connection(("127.0.0.1", 6392), timeout=5).close()


@pytest.mark.train
def test_train_sbatch_trains_data_parallel_over_two_nodes(pairs, tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"data.meta={pairs / 'meta.json'}",
        f"output_dir={out}",
        "model.finetune=lora",
        "data.eval_size=2",
        "eval.pairs=2",
        "eval.generations=1",
    ]
    result, log = run_sbatch(
        "train.sbatch",
        600,
        tmp_path,
        SLURM_JOB_NODELIST="node[1-2]",
        GPUS_PER_NODE="1",
        MASTER_PORT="29531",
        CONFIG=str(ROOT / "training" / "configs" / "tiny_vlm_full_cpu.yaml"),
        OVERRIDES=" ".join(overrides),
        ACCELERATE=str(BIN / "accelerate"),
        OMP_NUM_THREADS="1",
    )
    assert result.returncode == 0, log[-6000:]
    assert "processes=2" in log and "training exited with 0" in log
    run = orjson.loads((out / "summary.json").read_bytes())
    assert run["processes"] == 2 and run["steps"] == 2  # one DDP group across both "nodes", not two lone runs
    assert log.count("adapter: ") == 1  # only rank 0 saves and evaluates
    assert (out / "adapter_model.safetensors").is_file() and (out / "eval.json").is_file()
