"""`make bench-peers`'s table on its own (the benchmark itself runs engines and is not a test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "bench_peers", Path(__file__).parents[1] / "benchmarks" / "bench_peers.py"
)
bench_peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_peers)


def run(engine_tok_s: float, wall_s: float, idle_s: float) -> dict:
    return {
        "engine_tok_s": engine_tok_s,
        "wall_s": wall_s,
        "command_tok_s": 1000 / wall_s,
        "ready_to_first_request_s": idle_s,
    }


def test_table_gives_ratios_of_means_and_the_idle_seconds_without_one():
    results = {
        "n4": {
            "ours": [run(600, 50, 0.05), run(400, 50, 0.07)],
            "raw": [run(400, 60, 0.0)],
            "ray-data": [run(500, 75, 0.02), {"error": "exit 1"}],  # a failed run stays out of the means
        }
    }
    lines = bench_peers.table(results).splitlines()
    assert lines[0] == "n=4, mean of 2 ours, 1 raw, 1 ray-data run(s):"
    engine, command, idle = (
        next(line for line in lines if line.strip().startswith(label))
        for label in ("engine tok/s", "command s", "idle s")
    )
    assert engine.split()[2:7] == ["500.0", "400.0", "500.0", "1.25x", "1.00x"]  # ours / peer of speeds
    assert command.split()[2:7] == ["50.0", "60.0", "75.0", "1.20x", "1.50x"]  # peer / ours of seconds
    assert idle.split()[2:6] == ["0.06", "0.00", "0.02", "ours"]  # no ratio: in neither window
    assert "ours 0.05, 0.07" in idle


def test_save_writes_the_table_next_to_the_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    results = {"n1": {"ours": [run(500, 50, 0.1)], "raw": [run(250, 55, 0.0)]}}
    out = tmp_path / "peers.json"
    bench_peers.save(out, {"n1": "8 prompts"}, results)
    saved = json.loads(out.read_text())
    assert saved["runs"] == results and saved["table"] == bench_peers.table(results).splitlines()
