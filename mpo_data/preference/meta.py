"""`mpo-data meta`: a meta.json mixture over pair files, with repeat ratios that hit a target size.

How training turns `repeat_time` into rows is InternVL's MPO loader rule (`internvl_chat_mpo.py`,
LazySupervisedDataset): below 1 it takes `int(length * r)` random rows, above 1 `int(r)` whole copies
(it truncates first, so 1.5 means one copy and its int assert never fires). Our TRL loader applies the
same rule (`active_rows`), so both train on the mixture computed here.

A share that is not a whole number of copies (say 1.5 x length rows) is therefore written as two entries
over the same annotation: `NAME` with the whole copies and `NAME_rest` with a repeat below 1 for the
remaining rows. `--target-total N` makes the active rows sum to N exactly: rows are shared out by the
weights (largest remainder), then each r < 1 is the smallest number with `decimals` digits giving its rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

from mpo_data.errors import InputError
from mpo_data.records.formats import REST_SUFFIX, MetaEntry, internvl_reading, pair_problems, read_meta
from mpo_data.records.jsonl import iter_lines


def active_rows(length: int, repeat_time: float) -> int:
    """Rows training draws from a dataset: the rule InternVL's loader applies (and ours)."""
    return int(length * repeat_time) if repeat_time < 1 else length * int(repeat_time)


@dataclass
class MetaConfig:
    """Which pair files make the mixture and how large each share is."""

    pairs_dir: Path = field(metadata={"help": "Folder whose *.jsonl pair files become entries (name = file stem)."})
    image_root: str = field(metadata={"help": "The 'root' image paths are relative to."})
    out: Path = field(metadata={"help": "meta.json to write, e.g. meta/NAME.json."})
    target_total: int | None = field(
        default=None, metadata={"help": "Active rows of the whole mixture (None: every row once)."}
    )
    weights: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Relative share of an entry, NAME=W (default: its rows).", "aliases": ["--weight"]},
    )
    repeats: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Fixed repeat_time of an entry, NAME=R.", "aliases": ["--repeat"]}
    )
    base: Path | None = field(
        default=None, metadata={"help": "Existing meta.json (e.g. MMPR's) the new entries join."}
    )
    max_dynamic_patch: int = field(default=12, metadata={"help": "InternVL's max tiles per image."})


def count_pairs(path: Path) -> int:
    """Lines of a pair file, each checked; a bad one raises InputError with FILE:LINE."""
    count = 0
    for line in iter_lines(path):
        problems = [line.error] if line.error else pair_problems(line.value)
        if problems:
            raise InputError(f"{line.loc}: {problems[0]}")
        count += 1
    return count


def scan_pairs(pairs_dir: Path, image_root: str, max_dynamic_patch: int) -> dict[str, MetaEntry]:
    """One entry per pair file directly in `pairs_dir`, with its true length."""
    files = sorted(pairs_dir.glob("*.jsonl")) if pairs_dir.is_dir() else []
    if not files:
        raise InputError(f"{pairs_dir}: no *.jsonl pair files in this folder")
    return {
        f.stem: MetaEntry(
            root=image_root, annotation=str(f), length=count_pairs(f), max_dynamic_patch=max_dynamic_patch
        )
        for f in files
    }


def share_rows(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` rows in proportion to `weights`, integers summing exactly to `total`."""
    weight_sum = sum(Fraction(w) for w in weights.values())
    exact = {name: total * Fraction(w) / weight_sum for name, w in weights.items()}
    rows = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda n: (exact[n] - rows[n], n), reverse=True)
    for name in by_remainder[: total - sum(rows.values())]:
        rows[name] += 1
    return rows


def repeat_for(length: int, rows: int) -> float | int:
    """The shortest decimal r > 0 with int(length * r) == rows < length, or the whole copies rows // length."""
    if rows % length == 0 and rows:
        return rows // length
    if rows > length:
        raise ValueError(f"{rows} rows of {length} is not a whole number of copies: use split_share")
    decimals = len(str(length)) + 1  # a step of 10**-decimals moves length * r by less than one row
    step = 10**decimals
    if rows == 0:
        return 1 / step
    r = max(1, math.ceil(Fraction(rows, length) * step))
    while active_rows(length, r / step) < rows:  # float rounding: nudge up to the exact row count
        r += 1
    value = round(r / step, decimals)
    if active_rows(length, value) != rows:
        raise AssertionError(f"no repeat_time for {rows} of {length} rows")  # cannot happen: step < 1/length
    return value


def split_share(name: str, entry: MetaEntry, rows: int) -> dict[str, MetaEntry]:
    """`rows` active rows of one file as InternVL reads them: whole copies, plus a NAME_rest entry below 1."""
    length = entry.length
    whole, rest = divmod(rows, length) if length else (0, 0)
    if not whole or not rest:
        return {name: replace(entry, repeat_time=repeat_for(length, rows) if length else entry.repeat_time)}
    return {
        name: replace(entry, repeat_time=whole),
        name + REST_SUFFIX: replace(entry, repeat_time=repeat_for(length, rest)),
    }


def _check_names(option: str, names: dict, entries: dict) -> None:
    unknown = sorted(set(names) - set(entries))
    if unknown:
        raise InputError(f"{option}: unknown entries {unknown}; known: {sorted(entries)}")


def _with_shares(entries: dict[str, MetaEntry], rows: dict[str, int]) -> dict[str, MetaEntry]:
    """`entries` in order, each named in `rows` replaced by the entries that give it exactly those rows."""
    out: dict[str, MetaEntry] = {}
    for name, entry in entries.items():
        parts = split_share(name, entry, rows[name]) if name in rows else {name: entry}
        clash = sorted(set(parts) & (set(out) | set(entries)) - {name})
        if clash:
            raise InputError(f"entry '{name}': its remainder entry {clash[0]} is taken by another entry")
        out.update(parts)
    return out


def build_meta(config: MetaConfig) -> dict[str, MetaEntry]:
    """The mixture: base entries (if any) plus one per pair file, with repeat times set."""
    entries = read_meta(config.base) if config.base else {}
    base_rows = {name: active_rows(e.length, e.repeat_time) for name, e in entries.items()}
    new = scan_pairs(config.pairs_dir, config.image_root, config.max_dynamic_patch)
    entries.update(new)
    _check_names("--weight", config.weights, entries)
    _check_names("--repeat", config.repeats, entries)
    for name, r in config.repeats.items():
        if not r > 0:
            raise InputError(f"--repeat {name}={r}: repeat must be > 0")
        entries[name].repeat_time = r
    # a fixed fractional repeat above 1 means r x length rows: written as whole copies + NAME_rest
    fixed = {n: int(entries[n].length * r) for n, r in config.repeats.items() if internvl_reading(n, r)}
    if config.target_total is None:
        return _with_shares(entries, fixed)
    fixed_total = sum(active_rows(entries[n].length, r) for n, r in config.repeats.items() if n not in fixed)
    fixed_total += sum(fixed.values())
    free = {n: e for n, e in entries.items() if n not in config.repeats and e.length > 0}
    left = config.target_total - fixed_total
    if left < 0 or (left > 0 and not free):
        raise InputError(
            f"--target-total {config.target_total}: the fixed repeats give {fixed_total} rows, nothing left to share"
        )
    # default weight: the rows an entry has now (base entries keep their mixture, new ones equal repeat)
    weights = {n: config.weights.get(n, e.length if n in new else base_rows[n]) for n, e in free.items()}
    if any(w <= 0 for w in weights.values()):
        raise InputError("--weight: weights must be > 0")
    return _with_shares(entries, {**fixed, **share_rows(left, weights)})
