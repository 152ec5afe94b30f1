"""The driver SIGKILLed during `pairs` or `meta`: a rerun writes byte-identical pair files and meta.json."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from mpo_data.preference.judge import JudgeConfig
from mpo_data.preference.meta import MetaConfig, build_meta
from mpo_data.preference.pairs import PairsConfig, build_pairs
from mpo_data.records.formats import write_meta

MPO = [sys.executable, "-m", "mpo_data"]


def make_samples(root: Path, items: int = 1500, per_item: int = 6) -> None:
    """Correctness samples: per item some right, some wrong, one without a final answer."""
    folder = root / "correctness" / "count"
    folder.mkdir(parents=True)
    rows = []
    for item in range(items):
        for index in range(per_item):
            last = [f"Final answer: {item}", f"Final answer: {item + 1}", "I am not sure."][index % 3]
            rows.append(
                {
                    "question": f"How many in box {item}?",
                    "answer": str(item),
                    "item_id": f"i{item}",
                    "sample_index": index,
                    "response": f"I count them one by one ({index}).\n{last}",
                    "finish_reason": "stop",
                    "prompt_version": "en",
                    "model": "m",
                }
            )
    half = len(rows) // 2
    for number, chunk in enumerate((rows[:half], rows[half:])):
        (folder / f"part-{number:05d}.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in chunk))


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every visible file (temp files of a killed write are hidden and not output)."""
    return {
        str(p): p.read_bytes()
        for f in folders
        for p in sorted(f.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(f).parts)
    }


def kill_when(cmd: list[str], ready, timeout: float = 120) -> None:
    """Start `cmd`, SIGKILL it (and its judge workers) the moment `ready(pid)` holds; it must still be running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready(proc.pid):
            assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def has_open(folder: Path, suffix: str):
    """True once process `pid` has a file open under `folder` whose name ends with `suffix`."""

    def check(pid: int) -> bool:
        try:
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # a descriptor closed while we looked
            return False
        return any(t.startswith(str(folder)) and t.endswith(suffix) for t in targets)

    return check


def test_driver_killed_during_pairs_or_meta_rerun_is_byte_identical(tmp_path):
    samples, pairs, meta = tmp_path / "samples", tmp_path / "pairs", tmp_path / "meta.json"
    make_samples(samples)
    config = PairsConfig(data_dir=samples, save_dir=pairs, judge=JudgeConfig(workers=1))
    meta_config = MetaConfig(pairs_dir=pairs, image_root=".", out=meta, target_total=999)

    def rerun() -> dict[str, bytes]:  # the rerun in-process (the same code as the CLI, without its start-up)
        build_pairs(config)
        write_meta(meta, build_meta(meta_config))
        return snapshot(pairs) | {str(meta): meta.read_bytes()}

    reference = rerun()
    assert any("pairs_vqa_correctness_rules" in name for name in reference)
    pairs_cmd = MPO + ["pairs", "--data-dir", str(samples), "--save-dir", str(pairs), "--workers", "1"]
    for path in reference:
        Path(path).unlink()
    kill_when(pairs_cmd, has_open(pairs, ".tmp"))  # writing the pair files, samples still in their buckets
    assert not (pairs / "pairs_summary.json").exists()  # killed before anything was committed
    assert [p for p in pairs.rglob(".*") if p.name != ".mpo-data.lock"]  # it left temp files and buckets
    assert rerun() == reference
    assert not [p for p in pairs.rglob(".*") if p.name != ".mpo-data.lock"]  # the rerun removed them

    meta.unlink()
    meta_cmd = MPO + [
        "meta",
        "--pairs-dir",
        str(pairs),
        "--image-root",
        ".",
        "--out",
        str(meta),
        "--target-total",
        "999",
    ]
    kill_when(meta_cmd, has_open(pairs, "_rules.jsonl"))  # counting and checking the pair files
    assert not meta.exists()
    assert rerun() == reference
