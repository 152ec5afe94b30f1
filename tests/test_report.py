"""`mpo-data report` renders a run folder; headless Chromium checks the overview comes first, numbers match
the summaries, and images load."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html import unescape

import orjson
import pytest
from PIL import Image

from mpo_data.records.formats import MetaEntry, Pair, write_meta
from mpo_data.records.jsonl import write_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

STAGE_SUMMARY = {
    "stage": "correctness",
    "dataset": "shapes",
    "model": "tiny-vlm",
    "items_selected": 3,
    "samples_out": 0,
    "output_tokens": 0,
    "output_tokens_per_s": 0.0,
    "wall_s": 4.5,  # this run was a no-op rerun
    "dropped": {},
    "quarantined": {"total": 1, "reasons": {"image corrupt": 1}, "file": "q.jsonl"},
    "totals": {
        "samples": 12,
        "items": 3,
        "dropped": {"max_tokens": 2},
        "runs": 2,
        "output_tokens": 480,
        "output_tokens_per_s": 96.5,
    },
}
PAIRS_SUMMARY = {
    "correctness/shapes": {
        "samples": 12,
        "correct": 3,
        "format_failures": 2,
        "judge_errors": 1,
        "correctness_rate": 0.25,
        "pairs_correctness": 4,
        "pairs_format": 1,
        "filtered_duplicate": 1,
        "quarantined_schema": 2,
    }
}


def make_run(tmp_path):
    """A run folder as the stages write it: a summary, a pair summary, a pair file with images, a meta.json."""
    out, root = tmp_path / "run", tmp_path / "images"
    root.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 30), colour).save(root / f"{i}.png")
    (out / "samples" / "correctness" / "shapes").mkdir(parents=True)
    (out / "samples" / "correctness" / "shapes" / "summary.json").write_bytes(orjson.dumps(STAGE_SUMMARY))
    history = [
        {"output_tokens": 480, "output_tokens_per_s": 96.5, "engine_output_tokens_per_s": 140.2},
        {k: v for k, v in STAGE_SUMMARY.items() if k != "totals"},
    ]  # the run that generated, then the no-op rerun
    write_jsonl(out / "samples" / "correctness" / "shapes" / "runs.jsonl", history)
    pairs = [
        Pair(
            question=("<image><image>" if i == 3 else "") + f"What colour is image {i}?",
            chosen=f"It is colour {i}. " * (i + 1),
            rejected="No idea.",
            image=f"{i}.png" if i < 3 else ["0.png", "1.png"],
        )
        for i in range(4)
    ]
    pair_file = out / "pairs" / "shapes_pairs_vqa_correctness_rules.jsonl"
    write_jsonl(pair_file, [p.to_dict() for p in pairs])
    (out / "pairs" / "pairs_summary.json").write_bytes(orjson.dumps(PAIRS_SUMMARY))
    meta = tmp_path / "meta.json"
    write_meta(meta, {"shapes": MetaEntry(str(root), str(pair_file), 1.0, 4)})
    (out / "pipeline.json").write_bytes(orjson.dumps({"meta": str(meta)}))
    return out


def overview_cells(html: str) -> dict[str, str]:
    table = re.search(r'<table id="overview">(.*?)</table>', html, re.S).group(1)
    row = re.search(r'<tr data-row="correctness/shapes">(.*?)</tr>', table, re.S).group(1)
    return {
        k: " ".join(re.sub(r"<[^>]+>", "", unescape(v)).split())
        for k, v in re.findall(r'data-col="([^"]+)">(.*?)</td>', row, re.S)
    }


def check_page(html: str) -> None:
    headings = re.findall(r"<h2>([^<]*)</h2>", html)
    assert [h.split(" ")[0] for h in headings] == ["Overview", "Lengths", "Judge", "Sample", "Raw"]
    assert html.index('<table id="overview">') < html.index("<table", html.index("</table>"))  # the first table
    cells = overview_cells(html)
    assert cells == {
        "dataset": "shapes",
        "stage": "correctness",
        "model": "tiny-vlm",
        "items": "3",
        "samples": "12",
        "correct_rate": "25.0%",
        "pairs": "correctness 4, format 1",
        "dropped": "duplicate 1, max_tokens 2",
        "quarantined": "image corrupt 1, schema 2",
        "output_tokens": "480",
        "tokens_per_s": "96.5",
        "engine_tokens_per_s": "140.2",
    }  # tokens and tokens/s of the run that generated them, not the no-op rerun's 0
    verdicts = dict(re.findall(r'data-col="(correct|wrong|no answer found|judge error)">([^<]*)<', html))
    assert verdicts == {
        "correct": "3 (25.0%)",
        "wrong": "6 (50.0%)",
        "no answer found": "2 (16.7%)",
        "judge error": "1 (8.3%)",
    }
    assert 'data-hist="shapes_pairs_vqa_correctness_rules"' in html


def test_report_overview_first_numbers_and_images_in_chromium(tmp_path):
    out = make_run(tmp_path)
    page = tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "mpo_data", "report", str(out), "--html", str(page)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    check_page(text)
    assert text.count("<img ") == 5 and 'data-pairs="4"' in text
    assert text.index("Sample pairs") < text.index('data-key="totals / output_tokens"')  # raw details last
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'ud'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-images-loaded="5"' in body and 'data-images-broken="0"' in body
    check_page(dom)  # what the browser built from the page shows the same numbers


def test_report_marks_missing_image_and_bad_folder(tmp_path):
    out = make_run(tmp_path)
    (tmp_path / "images" / "2.png").unlink()
    from mpo_data.tools.report import build_report

    text = build_report(out)
    assert text.count("<img ") == 4 and "image &#39;2.png&#39; not found" in text
    result = subprocess.run(
        [sys.executable, "-m", "mpo_data", "report", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert result.returncode == 1 and "no such run folder" in result.stderr and "Traceback" not in result.stderr
