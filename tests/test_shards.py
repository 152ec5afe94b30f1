"""Run history of a shard folder: every run's summary is kept, and totals cover all runs."""

from __future__ import annotations

import orjson

from mpo_data.records.jsonl import read_jsonl
from mpo_data.records.shards import ShardStore


def run(output_tokens: float, generation_s: float, samples: int) -> dict:
    return {
        "samples_out": samples,
        "output_tokens": output_tokens,
        "prompt_tokens": 10,
        "generation_s": generation_s,
        "totals": {"samples": 99},
    }


def test_no_op_rerun_keeps_tokens_and_rate(tmp_path):
    store = ShardStore(tmp_path)
    store.write_summary(run(400, 4.0, 8))
    store.write_summary(run(100, 2.0, 2))
    last = run(0, 0.0, 0)
    store.write_summary(last)
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["output_tokens"] == 0 and summary == last  # this run, and totals over all three
    assert summary["totals"] == {
        "samples": 99,
        "runs": 3,
        "samples_generated": 10,
        "prompt_tokens": 30,
        "output_tokens": 500,
        "generation_s": 6.0,
        "output_tokens_per_s": 83.33,
    }
    history = [row for _, row in read_jsonl(tmp_path / "runs.jsonl")]
    assert [r["output_tokens"] for r in history] == [400, 100, 0] and all("totals" not in r for r in history)


def test_folder_from_before_the_history_keeps_its_last_run(tmp_path):
    (tmp_path / "summary.json").write_bytes(orjson.dumps(run(300, 3.0, 6)))
    ShardStore(tmp_path).write_summary(run(0, 0.0, 0))
    totals = orjson.loads((tmp_path / "summary.json").read_bytes())["totals"]
    assert totals["runs"] == 2 and totals["output_tokens"] == 300 and totals["output_tokens_per_s"] == 100.0
