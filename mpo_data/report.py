"""`mpo-data report`: one static HTML page summarising a run, for a person to read.

It reads what the stages already wrote (summary.json files, pair files, the meta.json) and embeds the
sample images as data URIs, so the page is a single file that can be copied off a cluster.
"""

from __future__ import annotations

import base64
import html
import io
import random
from pathlib import Path
from typing import Any, Iterator

import orjson

from mpo_data import images
from mpo_data.errors import InputError
from mpo_data.formats import image_list, iter_pairs, read_meta

HIST_BINS = 12
SAMPLE_PAIRS = 20


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


def _summary_table(title: str, source: Path, data: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr><td>{html.escape(k)}</td><td class="num" data-key="{html.escape(k)}">{html.escape(_fmt(v))}</td></tr>'
        for k, v in _flatten(data)
    )
    return (
        f'<section class="summary" data-source="{html.escape(str(source))}"><h3>{html.escape(title)}</h3>'
        f"<table>{rows}</table></section>"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _histogram_svg(chosen: list[int], rejected: list[int]) -> str:
    """Word-length histograms of chosen and rejected side by side, as inline SVG bars."""
    if not chosen:
        return "<p>no pairs</p>"
    top = max(chosen + rejected)
    width = max(1, -(-top // HIST_BINS))
    counts = {name: [0] * HIST_BINS for name in ("chosen", "rejected")}
    for name, lengths in (("chosen", chosen), ("rejected", rejected)):
        for n in lengths:
            counts[name][min(n // width, HIST_BINS - 1)] += 1
    peak = max(max(c) for c in counts.values())
    bars = []
    for i in range(HIST_BINS):
        for j, (name, colour) in enumerate((("chosen", "#2a7"), ("rejected", "#c44"))):
            h = 120 * counts[name][i] / peak
            bars.append(
                f'<rect x="{i * 44 + j * 18 + 30}" y="{140 - h:.1f}" width="16" height="{h:.1f}" fill="{colour}">'
                f"<title>{name} {i * width}-{(i + 1) * width - 1} words: {counts[name][i]}</title></rect>"
            )
        bars.append(f'<text x="{i * 44 + 30}" y="156" font-size="9">{i * width}</text>')
    return (
        f'<svg width="{HIST_BINS * 44 + 40}" height="170" role="img" aria-label="length histogram">{"".join(bars)}'
        '<text x="30" y="12" font-size="11" fill="#2a7">chosen</text>'
        '<text x="90" y="12" font-size="11" fill="#c44">rejected</text></svg>'
    )


def _image_tag(root: str | None, rel: str) -> str:
    try:
        if root is None:
            raise images.ImageError("image missing", "no image root for this pair file")
        image = images.load(root, rel)
    except images.ImageError as e:
        return f'<span class="missing">{html.escape(str(e))}</span>'
    image.thumbnail((256, 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(rel)}" src="data:image/png;base64,{data}">'


def _pair_card(name: str, pair, root: str | None) -> str:
    pictures = "".join(_image_tag(root, rel) for rel in image_list(pair.image))
    return (
        f'<div class="pair"><div class="images">{pictures}</div><div class="texts">'
        f"<p class=\"ds\">{html.escape(name)}</p><p><b>Q:</b> {html.escape(pair.question)}</p>"
        f'<p class="chosen"><b>chosen:</b> {html.escape(pair.chosen)}</p>'
        f'<p class="rejected"><b>rejected:</b> {html.escape(pair.rejected)}</p></div></div>'
    )


def _roots_by_annotation(meta_path: Path | None) -> dict[Path, str]:
    if meta_path is None:
        return {}
    return {Path(e.annotation).resolve(): e.root for e in read_meta(meta_path).values()}


def build_report(out_dir: str | Path, meta_path: str | Path | None = None, seed: int = 0) -> str:
    """The HTML page for run folder `out_dir` (stage summaries, pair summary, pair files)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise InputError(f"{out}: no such run folder")
    if meta_path is None and (out / "pipeline.json").exists():
        meta_path = _load_json(out / "pipeline.json").get("meta")
    roots = _roots_by_annotation(Path(meta_path) if meta_path else None)

    sections = []
    for path in sorted(out.glob("samples/*/*/summary.json")):
        stage, dataset = path.parent.parent.name, path.parent.name
        sections.append(_summary_table(f"{stage} / {dataset}", path, _load_json(path)))
    pair_summary = out / "pairs" / "pairs_summary.json"
    if pair_summary.exists():
        sections.append(_summary_table("pairs and filters", pair_summary, _load_json(pair_summary)))

    rng = random.Random(seed)
    chosen_len, rejected_len, reservoir, seen = [], [], [], 0
    for path in sorted((out / "pairs").glob("*.jsonl")):
        root = roots.get(path.resolve())
        for pair in iter_pairs(path):
            chosen_len.append(len(pair.chosen.split()))
            rejected_len.append(len(pair.rejected.split()))
            seen += 1
            slot = len(reservoir) if len(reservoir) < SAMPLE_PAIRS else rng.randrange(seen)
            if slot < SAMPLE_PAIRS:
                entry = (path.stem, pair, root)
                reservoir[slot:slot + 1] = [entry]
    cards = "".join(_pair_card(*entry) for entry in reservoir)
    return _PAGE.format(
        title=html.escape(str(out)),
        summaries="".join(sections) or "<p>no summaries found</p>",
        total=seen,
        histogram=_histogram_svg(chosen_len, rejected_len),
        cards=cards or "<p>no pairs</p>",
    )


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>mpo-data report: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td {{ border: 1px solid #ddd; padding: 2px 8px; }} td.num {{ text-align: right; }}
.summary {{ display: inline-block; vertical-align: top; margin-right: 2em; }}
.pair {{ display: flex; gap: 1em; border-top: 1px solid #ddd; padding: .5em 0; }}
.pair img {{ max-width: 256px; margin-right: .5em; }} .chosen {{ color: #175; }} .rejected {{ color: #a22; }}
.ds {{ color: #888; font-size: small; }} .missing {{ color: #a22; font-size: small; }}
</style></head>
<body data-pairs="{total}">
<h1>mpo-data run: {title}</h1>
<h2>Counts per stage and filter</h2>{summaries}
<h2>Lengths (words) of chosen and rejected, {total} pairs</h2>{histogram}
<h2>Sample pairs</h2>{cards}
<script>
// Marks on <body> how many images decoded, so a broken page is visible to people and to tests.
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok;
  document.body.dataset.imagesBroken = imgs.length - ok;
}});
</script>
</body></html>
"""
