"""Sample shards of one (stage, dataset): atomic part files, the run's settings, and what is already done.

Layout under ``<out>/samples/<stage>/<dataset>/``:
  part-NNNNN.jsonl           kept sample lines, one file per finished batch, each written atomically
  dropped/part-NNNNN.jsonl   samples generated but dropped (with the reason), so a rerun does not redo them
  run.json                   the settings the samples were drawn with; a rerun must match them
  runs.jsonl                 every run's summary, one line per run, appended (the history)
  summary.json               counts of the last run, and `totals`: the folder's contents and sums over all runs

A part appears whole or not at all (temp file, fsync, rename), so after a crash the folder holds only
complete lines, and (item_id, sample_index) keys tell a rerun exactly which samples are still missing.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

from mpo_data.errors import InputError
from mpo_data.jsonl import atomic_write_bytes, dumps, read_jsonl, write_jsonl

PART_RE = re.compile(r"^part-(\d+)\.jsonl$")
HISTORY = "runs.jsonl"  # every run's summary, appended
DROPPED = "dropped"  # sub-folder of a shard folder holding the samples a stage dropped, with their reason


def stage_dir(out_dir: str | Path, stage: str, dataset: str) -> Path:
    """Where the sample shards of `dataset` for `stage` live."""
    return Path(out_dir) / "samples" / stage / dataset


def quarantine_path(out_dir: str | Path, stage: str, dataset: str) -> Path:
    """Where `--on-error skip` puts the bad prompt lines of `dataset` for `stage`."""
    return Path(out_dir) / "quarantine" / stage / f"{dataset}.jsonl"


def select_range(count: int, start: int = 0, max_num: int | None = None) -> range:
    """Positions of the prompt rows to use, as InternVL's ``--sample-start-idx/--sample-max-num`` pick them.

    Over the limit, InternVL strides through the whole file (step = count // max_num) from `start` so
    the subset spans it; under it, every row from `start` on (InternVL ignores `start` there; we honour it).
    """
    if start < 0 or (max_num is not None and max_num < 0):
        raise InputError(f"--sample-start-idx and --sample-max-num must be >= 0 (got {start}, {max_num})")
    step = max(count // max_num, 1) if max_num is not None and count > max_num else 1
    rows = range(start, count, step)
    return rows if max_num is None else rows[:max_num]


def missing_indices(done: set[int], quota: int) -> list[int]:
    """Sample indices below `quota` that have no sample yet (a partly sampled item gets only these)."""
    return [i for i in range(quota) if i not in done]


def settings_diff(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`key: recorded -> wanted` for every setting that differs between two runs."""
    keys = sorted(set(recorded) | set(wanted))
    return [f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in keys if recorded.get(k) != wanted.get(k)]


class ShardStore:
    """The shard folder of one (stage, dataset) run: read what is done, add parts, guard the settings."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _parts(self, folder: Path) -> list[tuple[int, Path]]:
        if not folder.is_dir():
            return []
        found = ((PART_RE.match(p.name), p) for p in folder.iterdir())
        return sorted((int(m.group(1)), p) for m, p in found if m)

    def part_paths(self) -> list[Path]:
        """Kept-sample parts in write order (temp files of a crashed write are not parts)."""
        return [p for _, p in self._parts(self.root)]

    def done(self) -> dict[str, set[int]]:
        """Sample indices already generated per item_id, kept or dropped."""
        done: dict[str, set[int]] = defaultdict(set)
        for folder in (self.root, self.root / DROPPED):
            for _, path in self._parts(folder):
                for loc, row in read_jsonl(path):
                    try:
                        done[row["item_id"]].add(int(row["sample_index"]))
                    except (TypeError, KeyError, ValueError):
                        raise InputError(f"{loc}: not a sample line (needs item_id and sample_index)") from None
        return done

    def totals(self) -> dict[str, Any]:
        """Everything in the folder, over all runs: kept samples, dropped ones by reason, items touched."""
        samples, items = 0, set()
        for path in self.part_paths():
            for _, row in read_jsonl(path):
                samples += 1
                items.add(row["item_id"])
        dropped = Counter(row.get("reason") for _, path in self._parts(self.root / DROPPED) for _, row in read_jsonl(path))
        return {"samples": samples, "dropped": dict(dropped), "items": len(items)}

    def write_part(self, kept: list[dict[str, Any]], dropped: list[dict[str, Any]]) -> Path:
        """Add one batch as the next part; drops first, so a crash in between only costs a redo of kept ones."""
        numbers = [n for folder in (self.root, self.root / DROPPED) for n, _ in self._parts(folder)]
        name = f"part-{max(numbers, default=-1) + 1:05d}.jsonl"
        if dropped:
            write_jsonl(self.root / DROPPED / name, dropped)
        path = self.root / name
        if kept:
            write_jsonl(path, kept)
        return path

    def check_settings(self, settings: dict[str, Any], force: bool = False) -> None:
        """Record the run's settings; refuse a rerun with other ones (mixed samples) unless `force`."""
        path = self.root / "run.json"
        if path.exists() and not force:
            recorded = orjson.loads(path.read_bytes())
            diff = settings_diff(recorded, settings)
            if diff:
                raise InputError(
                    f"{path}: the samples here were drawn with other settings ({'; '.join(diff)}). "
                    "Use another --out-dir or --dataset, or --force to add samples with the new settings."
                )
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, orjson.dumps(settings, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Append this run to runs.jsonl (kept for good), then write summary.json: this run, and in
        `totals` the folder's contents plus the sums over every run (a no-op rerun keeps the tokens)."""
        path, history = self.root / "summary.json", self.root / HISTORY
        if not history.exists() and path.exists():  # a folder from before the history: its last run starts it
            history.write_bytes(dumps({k: v for k, v in orjson.loads(path.read_bytes()).items() if k != "totals"}))
        with history.open("ab") as handle:  # one write of one line: a crash leaves the history whole
            handle.write(dumps({k: v for k, v in summary.items() if k != "totals"}))
        summary["totals"] = {**summary.get("totals", {}), **run_totals([row for _, row in read_jsonl(history)])}
        atomic_write_bytes(path, orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
        return path


def run_totals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums over every run's summary; tokens/s over the runs that generated something (not diluted by no-ops)."""
    def total(key: str) -> float:
        return sum(run.get(key) or 0 for run in runs)

    busy = sum(run.get("generation_s") or 0 for run in runs if run.get("output_tokens"))
    return {
        "runs": len(runs),
        "samples_generated": total("samples_out"),
        "prompt_tokens": total("prompt_tokens"),
        "output_tokens": total("output_tokens"),
        "generation_s": round(total("generation_s"), 2),
        "output_tokens_per_s": round(total("output_tokens") / busy, 2) if busy else None,
    }
