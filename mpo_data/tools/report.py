"""`mpo-data report`: one static HTML page summarising a run, for a person to read.

It reads what the stages already wrote (summary.json files, pairs_summary.json, pair files, the meta.json),
puts first one overview table (a row per dataset and stage), then the length histograms, the judge's
verdicts, sample pairs with their images embedded as data URIs (one file to copy off a cluster), and the raw
summaries last. The page itself is the Jinja2 template `templates/report.html.j2`.
"""

from __future__ import annotations

import base64
import io
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import orjson
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from mpo_data.errors import InputError
from mpo_data.records import images
from mpo_data.records.formats import image_list, iter_pairs, read_meta
from mpo_data.records.jsonl import read_jsonl
from mpo_data.records.shards import HISTORY, shard_folders

HIST_BINS = 12
SAMPLE_PAIRS = 20
TEMPLATES = Path(__file__).parent / "templates"


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON: {e}") from None


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Scalar leaves of a nested summary as ("a / b", value), in file order."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{name} / ")
        elif not isinstance(value, list):
            yield name, value


def _by_reason(*counts: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = defaultdict(int)
    for count in counts:
        for reason, n in count.items():
            if n:
                merged[reason] += n
    return dict(sorted(merged.items()))


def last_engine_rate(folder: Path) -> float | None:
    """engine_output_tokens_per_s of the latest run into `folder` that generated tokens (runs.jsonl), or None."""
    history = folder / HISTORY
    runs = [run for _, run in read_jsonl(history)] if history.exists() else []
    return next((run.get("engine_output_tokens_per_s") for run in reversed(runs) if run.get("output_tokens")), None)


def overview_row(
    key: str, stage: dict[str, Any], pairs: dict[str, Any], engine_rate: float | None = None
) -> dict[str, Any]:
    """One line of the overview: a (stage, dataset)'s counts over all its runs, and what pairs made of it."""
    totals = stage.get("totals", {})
    prefixed = lambda prefix: {k.removeprefix(prefix): v for k, v in pairs.items() if k.startswith(prefix)}  # noqa: E731
    return {
        "key": key,
        "dataset": stage.get("dataset", key.split("/")[-1]),
        "stage": stage.get("stage", key.split("/")[0]),
        "model": stage.get("model"),
        "items": totals.get("items", stage.get("items_selected")),
        "samples": totals.get("samples", stage.get("samples_out")),
        "correct_rate": pairs.get("correctness_rate") if "samples" in pairs else None,
        "pairs": prefixed("pairs_"),
        "dropped": _by_reason(totals.get("dropped", stage.get("dropped", {})), prefixed("filtered_")),
        "quarantined": _by_reason(stage.get("quarantined", {}).get("reasons", {}), prefixed("quarantined_")),
        "output_tokens": totals.get("output_tokens", stage.get("output_tokens")),
        "tokens_per_s": totals.get("output_tokens_per_s", stage.get("output_tokens_per_s")),
        "engine_tokens_per_s": engine_rate,
    }


def verdict_row(key: str, pairs: dict[str, Any]) -> dict[str, Any]:
    """Correct / wrong / no answer found / judge error of one correctness dataset's samples."""
    samples = pairs.get("samples", 0)
    counts = {
        "correct": pairs.get("correct", 0),
        "no answer found": pairs.get("format_failures", 0),
        "judge error": pairs.get("judge_errors", 0),
    }
    counts["wrong"] = samples - sum(counts.values())
    order = ("correct", "wrong", "no answer found", "judge error")
    return {
        "key": key,
        "samples": samples,
        "counts": [(name, counts[name], counts[name] / samples if samples else 0) for name in order],
    }


def histogram(chosen: list[int], rejected: list[int]) -> dict[str, Any]:
    """Word-length bins of chosen and rejected answers, with bar heights scaled to the tallest (0..1)."""
    top = max(chosen + rejected)
    width = max(1, -(-top // HIST_BINS))
    counts = {name: [0] * HIST_BINS for name in ("chosen", "rejected")}
    for name, lengths in (("chosen", chosen), ("rejected", rejected)):
        for n in lengths:
            counts[name][min(n // width, HIST_BINS - 1)] += 1
    peak = max(max(c) for c in counts.values())
    bins = [
        {
            "start": i * width,
            "end": (i + 1) * width - 1,
            "bars": [(name, counts[name][i], counts[name][i] / peak) for name in ("chosen", "rejected")],
        }
        for i in range(HIST_BINS)
    ]
    return {"pairs": len(chosen), "bins": bins}


def image_data(root: str | None, rel: str) -> dict[str, str | None]:
    """A thumbnail as a data URI, or why the image could not be shown."""
    try:
        if root is None:
            raise images.ImageError("image missing", "no image root for this pair file")
        image = images.load(root, rel)
    except images.ImageError as e:
        return {"rel": rel, "src": None, "error": str(e)}
    image.thumbnail((256, 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"rel": rel, "src": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), "error": None}


def _roots_by_annotation(meta_path: Path | None) -> dict[Path, str]:
    if meta_path is None:
        return {}
    return {Path(e.annotation).resolve(): e.root for e in read_meta(meta_path).values()}


def _pair_files(out: Path, roots: dict[Path, str], seed: int) -> tuple[list[dict], list[dict], int]:
    """(histogram per pair file, a seeded reservoir of sample pairs with images, pairs seen)."""
    rng = random.Random(seed)
    histograms, reservoir, seen = [], [], 0
    for path in sorted((out / "pairs").glob("*.jsonl")):
        root = roots.get(path.resolve())
        chosen, rejected = [], []
        for pair in iter_pairs(path):
            chosen.append(len(pair.chosen.split()))
            rejected.append(len(pair.rejected.split()))
            seen += 1
            slot = len(reservoir) if len(reservoir) < SAMPLE_PAIRS else rng.randrange(seen)
            if slot < SAMPLE_PAIRS:
                reservoir[slot : slot + 1] = [(path.stem, pair, root)]
        if chosen:
            histograms.append({"name": path.stem, **histogram(chosen, rejected)})
    cards = [
        {"name": name, "pair": pair, "images": [image_data(root, rel) for rel in image_list(pair.image)]}
        for name, pair, root in reservoir
    ]
    return histograms, cards, seen


def build_report(out_dir: str | Path, meta_path: str | Path | None = None, seed: int = 0) -> str:
    """The HTML page for run folder `out_dir` (stage summaries, pair summary, pair files)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise InputError(f"{out}: no such run folder")
    if meta_path is None and (out / "pipeline.json").exists():
        meta_path = _load_json(out / "pipeline.json").get("meta")
    summaries = [(f"{stage}/{dataset}", folder / "summary.json") for stage, dataset, folder in shard_folders(out)]
    stages = {key: (path, _load_json(path)) for key, path in summaries if path.exists()}
    pairs_path = out / "pairs" / "pairs_summary.json"
    pairs = _load_json(pairs_path) if pairs_path.exists() else {}
    keys = sorted(set(stages) | set(pairs))
    histograms, cards, seen = _pair_files(out, _roots_by_annotation(Path(meta_path) if meta_path else None), seed)
    raw = [(key, str(stages[key][0]), list(_flatten(stages[key][1]))) for key in keys if key in stages]
    if pairs:
        raw.append(("pairs and filters", str(pairs_path), list(_flatten(pairs))))
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined)
    return env.get_template("report.html.j2").render(
        title=str(out),
        overview=[
            overview_row(
                k,
                stages.get(k, (None, {}))[1],
                pairs.get(k, {}),
                last_engine_rate(stages[k][0].parent) if k in stages else None,
            )
            for k in keys
        ],
        verdicts=[verdict_row(k, pairs[k]) for k in keys if "samples" in pairs.get(k, {})],
        hallucinations=[{"key": k, **pairs[k]["hallucination"]} for k in keys if "hallucination" in pairs.get(k, {})],
        histograms=histograms,
        cards=cards,
        total_pairs=seen,
        raw=raw,
        ray_logs=sorted({s.get("ray_logs") for _, s in stages.values() if s.get("ray_logs")}),
    )
