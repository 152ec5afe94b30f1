"""Node loss on a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster): one engine per node,
the worker node is killed mid-run; the run must end (finished, or a clear error without a traceback), and a
rerun must leave every sample exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from mpo_data.records.jsonl import read_jsonl
from mpo_data.records.shards import stage_dir

ITEMS, PER_ITEM = 12, 2


def last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


@pytest.mark.engine
@pytest.mark.ray
def test_worker_node_killed_mid_run_then_rerun_exactly_once(tmp_path, demo_dir, models_dir, monkeypatch):
    from ray.cluster_utils import Cluster

    # A loopback-only test cluster without tokens: this process's Ray client fixed its auth mode when ray was
    # first imported (collection), and the nodes it starts must match it; the driver is told the same.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    run = None
    try:
        worker = cluster.add_node(num_cpus=1)  # one CPU a node: the two engine actors land one on each
        out = tmp_path / "out"
        cmd = [
            sys.executable,
            "-m",
            "mpo_data",
            "correctness",
            "--address",
            cluster.address,
            "--checkpoint",
            str(models_dir / "tiny-smolvlm"),
            "--prompt-path",
            str(demo_dir / "arithmetic.jsonl"),
            "--out-dir",
            str(out),
            "--sample-max-num",
            str(ITEMS),
            "--num-return-sequences",
            str(PER_ITEM),
            "--max-new-tokens",
            "48",
            "--batch-size",
            "1",
        ]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
        folder = stage_dir(out, "correctness", "arithmetic")
        run = subprocess.Popen(
            cmd + ["--num-engines", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 300
        while not list(folder.glob("part-*.jsonl")):
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-3000:]
            time.sleep(0.05)
        cluster.remove_node(worker, allow_graceful=False)  # SIGKILL the node's raylet and its workers
        parts_at_kill = len(list(folder.glob("part-*.jsonl")))
        # the kill landed before the end: the run was still going and had not written every part (one per item)
        assert run.poll() is None and parts_at_kill < ITEMS, f"the run ended before the kill ({parts_at_kill} parts)"
        _, stderr = run.communicate(timeout=300)  # it must end: no wait for an engine that cannot come back
        print(f"node killed after {parts_at_kill} part(s); first run exit {run.returncode}: {last_line(stderr)}")
        assert "Traceback" not in stderr
        if run.returncode:
            assert "an engine or node was lost" in stderr and "rerun to resume" in stderr

        again = subprocess.run(cmd + ["--num-engines", "1"], env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        print(f"rerun on the head node: {last_line(again.stderr)}")
    finally:
        if run is not None and run.poll() is None:  # it hung: end the driver before the cluster goes
            run.kill()
            run.wait()
        cluster.shutdown()
    keys = Counter(
        (row["item_id"], row["sample_index"])
        for part in sorted(folder.glob("part-*.jsonl"))
        for _, row in read_jsonl(part)
    )
    assert len(keys) == ITEMS * PER_ITEM and set(keys.values()) == {1}
