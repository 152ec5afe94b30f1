"""Preference pairs for training: a meta.json mixture or a TRL-style data set, as TRL vision preference rows.

Rows come out in TRL's conversational form (`prompt`, `chosen`, `rejected`, `images`), so `DPOTrainer` takes
them unchanged. Every row that cannot be used is reported by FILE:LINE: it fails the run, or with
on_error="skip" goes to the quarantine file and the counts; nothing disappears silently.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpo_data.errors import ON_ERROR, InputError
from mpo_data.records import images
from mpo_data.records.formats import TRL_ROW_SCHEMA, content_parts, image_list, read_meta
from mpo_data.records.inputs import Problem, Quarantine, iter_records, record_problems
from mpo_data.records.jsonl import Line


def repeat_indices(length: int, repeat_time: float, rng: random.Random) -> list[int]:
    """Row indices for one meta.json entry, by InternVL's loader rule (`mpo_data.preference.meta.active_rows`).

    Below 1: a seeded random `int(length * r)` rows without replacement; from 1 up: `int(r)` whole
    copies (1.5 -> one copy, as InternVL reads it; `mpo-data meta` writes such shares as two entries).
    """
    if repeat_time < 1:
        return sorted(rng.sample(range(length), int(length * repeat_time)))
    return list(range(length)) * int(repeat_time)


def user_turn(question: str, n_images: int) -> list[dict[str, Any]]:
    """The prompt as one user message: each `<image>` of an MMPR question becomes an image part at its
    place (no literal placeholder text is left for the tokenizer); without placeholders the images go first."""
    return [{"role": "user", "content": content_parts(question, n_images)}]


def assistant_turn(text: str) -> list[dict[str, Any]]:
    """The answer as one assistant message, leading whitespace dropped: vLLM's completions after a template's
    "Assistant:" start with the space that the template itself puts before the content (Idefics3 would train
    on "Assistant:  The image ...", two spaces, which its own answers never have)."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text.lstrip()}]}]


def as_text_only(row: dict[str, Any]) -> dict[str, Any]:
    """A text row for a plain tokenizer: string contents (text chat templates do not take content parts)."""

    def flat(messages):
        return [{"role": m["role"], "content": _text(m["content"])} for m in messages]

    return {"prompt": flat(row["prompt"]), "chosen": flat(row["chosen"]), "rejected": flat(row["rejected"])}


@dataclass
class MixtureLine:
    """One active line of a meta.json mixture: the entry it was drawn for, its image root, the line."""

    dataset: str
    root: Path
    line: Line


@dataclass
class PairRows:
    """TRL rows plus the bookkeeping a run report needs."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # FILE:LINE of each row
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per data set: lines, sampled
    quarantine: Quarantine = field(default_factory=lambda: Quarantine(None))

    def add(self, row: dict[str, Any], source: str) -> None:
        self.rows.append(row)
        self.sources.append(source)


class PairLoader:
    """Reads pair sources into `PairRows`; `on_error` decides what a bad line does."""

    def __init__(
        self,
        on_error: str = "fail",
        quarantine: str | Path | None = None,
        text_only: bool = False,
        images_only: bool = False,
    ):
        if on_error not in ON_ERROR:
            raise InputError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if text_only and images_only:
            raise InputError("data.images_only: a text-only model cannot train on image pairs only")
        self.on_error = on_error
        self.text_only, self.images_only = text_only, images_only
        self.out = PairRows(quarantine=Quarantine(Path(quarantine) if quarantine else None))

    def reject(self, problems: list[Problem], value: Any) -> None:
        if self.on_error == "fail":
            raise InputError("\n".join(map(str, problems)) + "\n(set data.on_error=skip to quarantine bad rows)")
        self.out.quarantine.add(problems, value)

    def _row(
        self, line: Line, root: Path, prompt: str | list, chosen: str | list, rejected: str | list, pics: list
    ) -> dict | None:
        """One TRL row; images are paths under `root` or already decoded PIL images."""
        if self.text_only and pics:
            self.reject(
                [Problem(line.loc, "image row, text-only model", "has images but the model is text-only")], None
            )
            return None
        if self.images_only and not pics:
            self.reject([Problem(line.loc, "text row, images_only", "has no image (data.images_only is set)")], None)
            return None
        try:
            loaded = [_image(root, p) for p in pics]
        except images.ImageError as e:
            self.reject([Problem(line.loc, e.category, str(e))], line.value)
            return None
        row = {
            "prompt": user_turn(prompt, len(loaded)) if isinstance(prompt, str) else prompt,
            "chosen": assistant_turn(chosen) if isinstance(chosen, str) else chosen,
            "rejected": assistant_turn(rejected) if isinstance(rejected, str) else rejected,
        }
        return as_text_only(row) if self.text_only else {**row, "images": loaded}

    def meta_lines(self, meta_path: str | Path, seed: int) -> list[MixtureLine]:
        """The mixture's active lines: each entry's valid lines (schema, placeholders, images checked), picked
        by its repeat_time with one seeded generator per entry; whole copies appear as repeated lines."""
        picked_all: list[MixtureLine] = []
        for name, entry in read_meta(meta_path).items():
            annotation = _resolve(meta_path, name, "annotation", entry.annotation)
            root = _resolve(meta_path, name, "root", entry.root)
            valid: list[Line] = []
            lines = 0
            for line in iter_records(annotation):
                lines += 1
                problems = record_problems(line, "pairs", root)
                if not problems and self.text_only and line.value.get("image"):
                    problems = [
                        Problem(line.loc, "image row, text-only model", "has images but the model is text-only")
                    ]
                if not problems and self.images_only and not line.value.get("image"):
                    problems = [Problem(line.loc, "text row, images_only", "has no image (data.images_only is set)")]
                if problems:
                    self.reject(problems, line.value if line.error is None else None)
                    continue
                valid.append(line)
            picked = repeat_indices(len(valid), entry.repeat_time, random.Random(f"{seed}:{name}"))
            picked_all += [MixtureLine(name, root, valid[i]) for i in picked]
            self.out.counts[name] = {"lines": lines, "valid": len(valid), "sampled": len(picked)}
        return picked_all

    def read_meta(self, meta_path: str | Path, seed: int) -> PairRows:
        """Every entry of a meta.json as TRL rows, each sampled by its repeat_time (see `meta_lines`)."""
        built: dict[str, dict | None] = {}  # copies of a line share one row (and its decoded images)
        for m in self.meta_lines(meta_path, seed):
            if m.line.loc not in built:
                v = m.line.value
                built[m.line.loc] = self._row(
                    m.line, m.root, v["question"], v["chosen"], v["rejected"], image_list(v.get("image"))
                )
            if built[m.line.loc] is not None:
                self.out.add(built[m.line.loc], m.line.loc)
        return self.out

    def read_dataset(self, path: str | Path, image_root: str | Path | None = None) -> PairRows:
        """A TRL-style preference set (save_to_disk folder, JSONL or Parquet): prompt/chosen/rejected/images.

        prompt, chosen and rejected may be strings or conversations; images may be PIL images (a saved HF
        data set) or paths under `image_root` (default: the file's folder).
        """
        path = Path(path)
        root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
        lines = 0
        for line in iter_records(path):
            lines += 1
            problem = _trl_row_problem(line)
            if problem:
                self.reject([Problem(line.loc, "schema", problem)], line.value if line.error is None else None)
                continue
            v = line.value
            row = self._row(line, root, v["prompt"], v["chosen"], v["rejected"], v.get("images") or [])
            if row is not None:
                self.out.add(row, line.loc)
        self.out.counts[path.name] = {"lines": lines, "valid": len(self.out.rows), "sampled": len(self.out.rows)}
        return self.out

    def drop_too_long(self, lengths: list[int], max_length: int) -> int:
        """Drop rows over max_length tokens (TRL cannot cut image tokens): counted and quarantined by FILE:LINE."""
        rows = self.out
        keep = [i for i, n in enumerate(lengths) if n <= max_length]
        for i, n in enumerate(lengths):
            if n > max_length:
                message = f"{n} tokens, over max_length={max_length}"
                rows.quarantine.add([Problem(rows.sources[i], "too long", message)], None)
        dropped = len(rows.rows) - len(keep)
        rows.rows, rows.sources = [rows.rows[i] for i in keep], [rows.sources[i] for i in keep]
        return dropped

    def close(self) -> PairRows:
        self.out.quarantine.close()
        return self.out


def _image(root: Path, value: Any):
    """A PIL image from a path under `root`, a decoded image (saved `datasets` set), or the `{bytes, path}`
    struct that `datasets` writes for Image columns in Parquet (bytes win; a path alone is under `root`)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return images.decode(value["bytes"], value.get("path") or "embedded image")
        value = value.get("path")
    if isinstance(value, str):
        return images.load(root, value)
    return images.to_rgb(value)


def _text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "".join(p.get("text") or "" for p in content)


def _trl_row_problem(line: Line) -> str | None:
    if line.error:
        return line.error
    problems = TRL_ROW_SCHEMA.problems(line.value)
    return problems[0] if problems else None


def _resolve(meta_path: str | Path, name: str, key: str, rel: str) -> Path:
    """A meta.json path: as written (InternVL reads it from the working directory), else beside the meta file."""
    path = Path(rel)
    if path.is_absolute() or path.exists():
        return path
    beside = Path(meta_path).parent / path
    if beside.exists():
        return beside
    raise InputError(
        f"{meta_path}: entry '{name}': {key} '{rel}' not found (looked in the working directory and beside the meta file)"
    )


def summary(rows: PairRows) -> dict[str, Any]:
    """Counts for the run report: per data set, and what was skipped and why."""
    return {"datasets": rows.counts, "rows": len(rows.rows), "skipped": dict(Counter(rows.quarantine.counts))}
