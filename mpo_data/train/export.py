"""`mpo-data export`: a meta.json mixture as a TRL-ready preference data set (save_to_disk folder or Parquet).

The active rows are drawn exactly as InternVL's loader and `mpo-data train` draw them (`repeat_time`,
seeded), then written in TRL's conversational vision form: `prompt`, `chosen`, `rejected` as messages,
`images` as a list with the image bytes embedded (`datasets` gives them back as PIL images), and where each
row came from (`dataset`, `item_id`, `source`). `DPOTrainer` takes the result unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from mpo_data.errors import InputError
from mpo_data.records import images as image_io
from mpo_data.records.formats import image_list
from mpo_data.train.data import MixtureLine, PairLoader, assistant_turn, user_turn

EXPORT_FORMATS = ("hf", "parquet")
PARQUET_FILE = "train.parquet"


@dataclass
class ExportConfig:
    """Which mixture to export, where, and in which layout."""

    meta: str = field(metadata={"help": "meta.json mixture (ours or MMPR's); each entry drawn by its repeat_time."})
    out: str = field(metadata={"help": "Output folder: a save_to_disk data set (hf) or OUT/train.parquet (parquet)."})
    format: Literal["hf", "parquet"] = field(
        default="hf", metadata={"help": "hf: datasets.load_from_disk(OUT); parquet: load_dataset('parquet', ...)."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the repeat_time draw (the same seed as training's data.seed)."}
    )
    on_error: Literal["fail", "skip"] = field(
        default="fail",
        metadata={"help": "Bad pair line: fail naming FILE:LINE, or skip it into OUT.quarantine.jsonl."},
    )


def features():
    """The columns: TRL conversational messages (content parts), embedded images, provenance."""
    from datasets import Features, Image, List, Value

    messages = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
    return Features(
        {
            "prompt": messages,
            "chosen": messages,
            "rejected": messages,
            "images": List(Image()),
            "dataset": Value("string"),
            "item_id": Value("string"),
            "source": Value("string"),
        }
    )


def item_id(pair: dict[str, Any]) -> str | None:
    """The prompt item a pair line came from, when our stages wrote it (MMPR's own lines carry none)."""
    for key in ("chosen_meta", "rejected_meta"):
        meta = pair.get(key)
        if isinstance(meta, dict) and isinstance(meta.get("item_id"), str):
            return meta["item_id"]
    return None


def _with_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every content part with a `text` key (None on image parts), as one Arrow struct type needs."""
    return [{**m, "content": [{"type": p["type"], "text": p.get("text")} for p in m["content"]]} for m in messages]


def export_row(m: MixtureLine) -> dict[str, Any]:
    """One TRL row; images as their file bytes (no re-encoding), read under the entry's root."""
    pair = m.line.value
    paths = image_list(pair.get("image"))
    return {
        "prompt": _with_text(user_turn(pair["question"], len(paths))),
        "chosen": _with_text(assistant_turn(pair["chosen"])),
        "rejected": _with_text(assistant_turn(pair["rejected"])),
        "images": [{"bytes": image_io.resolve(m.root, p).read_bytes(), "path": p} for p in paths],
        "dataset": m.dataset,
        "item_id": item_id(pair),
        "source": m.line.loc,
    }


def export(config: ExportConfig) -> dict[str, Any]:
    """Write the mixture's active rows to `config.out`; returns the counts (per entry, skipped, rows)."""
    import datasets

    if config.format not in EXPORT_FORMATS:
        raise InputError(f"--format must be one of {EXPORT_FORMATS}, got {config.format!r}")
    out = Path(config.out)
    quarantine = Path(f"{out}.quarantine.jsonl") if config.on_error == "skip" else None
    loader = PairLoader(config.on_error, quarantine)
    lines = loader.meta_lines(config.meta, config.seed)
    rows = loader.close()
    if not lines:
        raise InputError(f"{config.meta}: the mixture has no active rows (skipped: {dict(rows.quarantine.counts)})")

    def generate() -> Iterator[dict[str, Any]]:
        yield from (export_row(m) for m in lines)

    data = datasets.Dataset.from_generator(generate, features=features())
    if config.format == "hf":
        data.save_to_disk(str(out))
    else:
        out.mkdir(parents=True, exist_ok=True)
        data.to_parquet(str(out / PARQUET_FILE))
    return {"rows": len(data), "datasets": rows.counts, "skipped": dict(rows.quarantine.counts), "out": str(out)}
