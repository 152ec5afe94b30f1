"""Sample shards of one (stage, dataset): atomic part files, the run's settings, and what is already done.

Layout under ``<out>/samples/<stage>/<dataset>/``:
  part-NNNNN.jsonl           kept sample lines, one file per finished chunk of items, each written atomically
  gNNNN/part-NNNNNNN.jsonl   parts from number 10,000 on, 10,000 to a folder (no folder grows past that)
  dropped/...                the same layout for samples generated but dropped (with the reason), so a
                             rerun does not redo them
  run.json                   the settings the samples were drawn with (a rerun must match them), and the
                             engine seed of every run
  runs.jsonl                 every run's summary, one line per run, appended (the history)
  summary.json               counts of the last run, and `totals`: the folder's contents and sums over all runs

  damaged/...                parts a resume found damaged, byte for byte as found (`part-NNNNN.jsonl.damaged`)

A part appears whole or not at all (temp file, fsync, rename), so after a crash the folder holds only
complete lines, and (item_id, sample_index) keys tell a rerun exactly which samples are still missing.
A part damaged anyway (a copy cut short, a disk that filled under another writer, a hand edit) counts only
its whole lines that parse: resume moves the part as found to damaged/, keeps its good lines in place,
says which lines it lost, and their samples are generated again.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

from mpo_data.errors import InputError, output_error
from mpo_data.records.jsonl import atomic_write_bytes, dumps, make_dir, read_jsonl, write_jsonl

PART_RE = re.compile(r"^part-(\d+)\.jsonl$")
GROUP_RE = re.compile(r"^g(\d+)$")
HISTORY = "runs.jsonl"  # every run's summary, appended
DROPPED = "dropped"  # sub-folder of a shard folder holding the samples a stage dropped, with their reason
PARTS_PER_FOLDER = 10_000  # parts 0..9,999 in the shard folder itself (the original flat layout), then gNNNN/
DAMAGED = "damaged"  # sub-folder of a shard folder holding the parts a resume found damaged, as found
RUN_KEYS = ("engine_seeds",)  # run.json entries that record runs, not settings: reruns may differ in them


def samples_root(out_dir: str | Path) -> Path:
    """The folder holding every stage's shard folders, `<out>/samples/`."""
    return Path(out_dir) / "samples"


def stage_dir(out_dir: str | Path, stage: str, dataset: str) -> Path:
    """Where the sample shards of `dataset` for `stage` live."""
    return samples_root(out_dir) / stage / dataset


def shard_folders(out_dir: str | Path) -> list[tuple[str, str, Path]]:
    """(stage, dataset, folder) of every shard folder of a run, in name order."""
    return [(f.parent.name, f.name, f) for f in sorted(samples_root(out_dir).glob("*/*")) if f.is_dir()]


def shard_folder(part: Path) -> Path:
    """The (stage, dataset) folder a part file belongs to, whether it lies in it or in one of its gNNNN/ groups."""
    return part.parent.parent if GROUP_RE.match(part.parent.name) else part.parent


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


def sample_group(item_id: str, max_num: int | None) -> str:
    """The key of one item's samples at one tile count (`max_num`; None: the processor's own): what a rerun tops
    up to the quota and what `pairs` pairs within. The item's own id when no tile count is set."""
    return item_id if max_num is None else f"{item_id}@{max_num}"


def _keys_first(row: dict[str, Any]) -> dict[str, Any]:
    """The row with item_id and sample_index as its first keys, so a sample is found by its key at a glance."""
    return {"item_id": row["item_id"], "sample_index": row["sample_index"], **row}


def read_part(path: Path) -> tuple[list[tuple[str, int, int | None]], dict[int, str]]:
    """((item_id, sample_index, max_num) of each whole sample line, {line number: why it is damaged}) of one part."""
    keys, damaged = [], {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError:
                damaged[number] = "not JSON (corrupt)" if raw.endswith(b"\n") else "cut short (no line end)"
                continue
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("item_id"), str)
                or type(row.get("sample_index")) is not int
            ):
                damaged[number] = "not a sample line (needs item_id and sample_index)"
                continue
            if row.get("max_num") is not None and type(row["max_num"]) is not int:
                damaged[number] = "max_num (the tile count) is not an integer"
                continue
            keys.append((row["item_id"], row["sample_index"], row.get("max_num")))
    return keys, damaged


def settings_diff(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`key: recorded -> wanted` for every setting that differs between two runs."""
    keys = sorted(set(recorded) | set(wanted))
    return [f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in keys if recorded.get(k) != wanted.get(k)]


class ShardStore:
    """The shard folder of one (stage, dataset) run: read what is done, add parts, guard the settings."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

        self._next: int | None = None  # the next part number, found by one listing at the first write
        self.damaged: list[dict[str, Any]] = []  # parts `done` found damaged and set aside, for the summary

    def _parts(self, folder: Path) -> list[tuple[int, Path]]:
        """(number, path) of every part in `folder` and its gNNNN/ groups, in number order."""
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            if PART_RE.match(entry.name):
                found.append((int(PART_RE.match(entry.name).group(1)), entry))
            elif GROUP_RE.match(entry.name) and entry.is_dir():
                found += [(int(m.group(1)), p) for p in entry.iterdir() if (m := PART_RE.match(p.name))]
        return sorted(found)

    def part_paths(self, dropped: bool = False) -> list[Path]:
        """Kept-sample parts (or the dropped ones) in write order; temp files of a crashed write are not parts."""
        return [p for _, p in self._parts(self.root / DROPPED if dropped else self.root)]

    def done(self) -> dict[str, set[int]]:
        """Sample indices already generated per item and tile count (`sample_group`), kept or dropped: only
        whole lines that parse count.

        A part with damaged lines is set aside first (`set_aside`), so the samples it lost are missing here
        and the rerun generates exactly those again."""
        done: dict[str, set[int]] = defaultdict(set)
        for path in [*self.part_paths(), *self.part_paths(dropped=True)]:
            keys, damaged = read_part(path)
            if damaged:
                self.set_aside(path, damaged)
            for item_id, index, max_num in keys:
                done[sample_group(item_id, max_num)].add(index)
        return done

    def set_aside(self, path: Path, damaged: dict[int, str]) -> None:
        """Move the part as found to damaged/ (never deleted), keep its whole lines in place, and say so."""
        found = path.read_bytes()
        target = self.root / DAMAGED / f"{path.relative_to(self.root)}.damaged"
        copies = 1
        while target.exists():  # damaged again after an earlier repair: keep every copy
            copies += 1
            target = target.with_name(f"{path.name}.{copies}.damaged")
        make_dir(target.parent)
        atomic_write_bytes(target, found)
        lines = found.splitlines(keepends=True)
        atomic_write_bytes(path, b"".join(raw for number, raw in enumerate(lines, 1) if number not in damaged))
        kept = sum(1 for number, raw in enumerate(lines, 1) if number not in damaged and raw.strip())
        record = {
            "part": str(path),
            "lines": sorted(damaged),
            "reasons": sorted(set(damaged.values())),
            "kept_lines": kept,
            "moved_to": str(target),
        }
        self.damaged.append(record)
        print(
            f"warning: {path}: line(s) {', '.join(map(str, sorted(damaged)))} damaged ({'; '.join(record['reasons'])}); "
            f"the part as found is kept at {target}, its {kept} whole line(s) stay, and the samples of the "
            "damaged lines are generated again",
            file=sys.stderr,
        )

    def totals(self) -> dict[str, Any]:
        """Everything in the folder, over all runs: kept samples, dropped ones by reason, items touched."""
        samples, items = 0, set()
        for path in self.part_paths():
            keys, _ = read_part(path)
            samples += len(keys)
            items.update(item_id for item_id, _, _ in keys)
        dropped = Counter(row.get("reason") for path in self.part_paths(dropped=True) for _, row in read_jsonl(path))
        return {"samples": samples, "dropped": dict(dropped), "items": len(items), "parts": len(self.part_paths())}

    def missing_parts(self) -> int:
        """Kept-sample parts the last run's summary counted that are gone now (deleted, lost in a copy)."""
        path = self.root / "summary.json"
        if not path.exists():
            return 0
        recorded = orjson.loads(path.read_bytes()).get("totals", {}).get("parts")
        return max(0, recorded - len(self.part_paths())) if isinstance(recorded, int) else 0

    def _next_name(self) -> str:
        """Relative path of the next part: one listing per store, then a counter (O(1) per write)."""
        if self._next is None:
            numbers = [n for folder in (self.root, self.root / DROPPED) for n, _ in self._parts(folder)]
            self._next = max(numbers, default=-1) + 1
        number, self._next = self._next, self._next + 1
        if number < PARTS_PER_FOLDER:
            return f"part-{number:05d}.jsonl"
        return f"g{number // PARTS_PER_FOLDER:04d}/part-{number:07d}.jsonl"

    def write_part(self, kept: list[dict[str, Any]], dropped: list[dict[str, Any]]) -> Path:
        """Add one chunk as the next part; drops first, so a crash in between only costs a redo of kept ones."""
        name = self._next_name()
        if dropped:
            write_jsonl(self.root / DROPPED / name, map(_keys_first, dropped))
        path = self.root / name
        if kept:
            write_jsonl(path, map(_keys_first, kept))
        return path

    def check_settings(self, settings: dict[str, Any], force: bool = False) -> None:
        """Record the run's settings; refuse a rerun with other ones (mixed samples) unless `force`."""
        path = self.root / "run.json"
        if path.exists() and not force:
            recorded = {k: v for k, v in orjson.loads(path.read_bytes()).items() if k not in RUN_KEYS}
            diff = settings_diff(recorded, settings)
            if diff:
                raise InputError(
                    f"{path}: the samples here were drawn with other settings ({'; '.join(diff)}). "
                    "Use another --out-dir or --dataset, or --force to add samples with the new settings."
                )
        runs = {k: v for k, v in orjson.loads(path.read_bytes()).items() if k in RUN_KEYS} if path.exists() else {}
        self._write_run({**settings, **runs})

    def next_engine_seed(self, base: int) -> int:
        """This run's engine seed, recorded in run.json: derived from `base` (--seed) and the run's number, so
        each run samples from its own stream (a top-up never repeats a sample) and a rerun of the same history
        draws the same samples."""
        run = orjson.loads((self.root / "run.json").read_bytes())
        seeds = run.get("engine_seeds", [])
        seed = zlib.crc32(f"{base}:{len(seeds)}".encode()) & 0x7FFFFFFF
        self._write_run({**run, "engine_seeds": [*seeds, seed]})
        return seed

    def _write_run(self, run: dict[str, Any]) -> None:
        make_dir(self.root)
        atomic_write_bytes(
            self.root / "run.json", orjson.dumps(run, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Append this run to runs.jsonl (kept for good), then write summary.json: this run, and in
        `totals` the folder's contents plus the sums over every run (a no-op rerun keeps the tokens)."""
        path, history = self.root / "summary.json", self.root / HISTORY
        if not history.exists() and path.exists():  # a folder from before the history: its last run starts it
            history.write_bytes(dumps({k: v for k, v in orjson.loads(path.read_bytes()).items() if k != "totals"}))
        size = history.stat().st_size if history.exists() else 0
        try:
            with history.open("ab") as handle:  # one write of one line: a crash leaves the history whole
                handle.write(dumps({k: v for k, v in summary.items() if k != "totals"}))
        except OSError as e:  # a disk that filled mid-line: cut the history back to its whole lines
            with contextlib.suppress(OSError):
                os.truncate(history, size)
            raise output_error(e if e.filename else OSError(e.errno, e.strerror, str(history))) from None
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
