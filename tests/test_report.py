"""`mpo-data report` renders a run folder; headless Chromium checks images load and numbers match."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html import unescape

import orjson
import pytest
from PIL import Image

from mpo_data.formats import MetaEntry, Pair, write_meta
from mpo_data.jsonl import write_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def make_run(tmp_path):
    """A run folder as the stages write it: summaries, a pair file with images, a meta.json."""
    out, root = tmp_path / "run", tmp_path / "images"
    root.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 30), colour).save(root / f"{i}.png")
    stage_summary = {"items_in": 3, "samples_out": 12, "dropped": {"empty": 1, "length": 2}, "tokens": 480, "wall_s": 4.5}
    (out / "samples" / "correctness" / "shapes").mkdir(parents=True)
    (out / "samples" / "correctness" / "shapes" / "summary.json").write_bytes(orjson.dumps(stage_summary))
    pairs = [
        Pair(question=("<image><image>" if i == 3 else "") + f"What colour is image {i}?", chosen=f"It is colour {i}. " * (i + 1), rejected="No idea.",
             image=f"{i}.png" if i < 3 else ["0.png", "1.png"])
        for i in range(4)
    ]
    pair_file = out / "pairs" / "shapes_pairs_vqa_correctness_rules.jsonl"
    write_jsonl(pair_file, [p.to_dict() for p in pairs])
    (out / "pairs" / "pairs_summary.json").write_bytes(orjson.dumps({"shapes": {"pairs": 4, "correctness_rate": 0.25}}))
    meta = tmp_path / "meta.json"
    write_meta(meta, {"shapes": MetaEntry(str(root), str(pair_file), 1.0, 4)})
    (out / "pipeline.json").write_bytes(orjson.dumps({"meta": str(meta)}))
    return out, stage_summary


def test_report_numbers_and_images_in_chromium(tmp_path):
    out, stage_summary = make_run(tmp_path)
    page = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-m", "mpo_data", "report", str(out), "--html", str(page)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    cells = dict(re.findall(r'data-key="([^"]+)">([^<]*)<', text))
    assert cells["items_in"] == "3" and cells["dropped / length"] == "2" and cells["wall_s"] == "4.5"
    assert cells["shapes / correctness_rate"] == "0.25"
    assert text.count("<img ") == 5 and 'data-pairs="4"' in text
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-images-loaded="5"' in body and 'data-images-broken="0"' in body
    shown = {unescape(k): v for k, v in re.findall(r'data-key="([^"]+)">([^<]*)<', dom)}
    assert shown["samples_out"] == str(stage_summary["samples_out"]) and shown["tokens"] == "480"


def test_report_marks_missing_image_and_bad_folder(tmp_path):
    out, _ = make_run(tmp_path)
    (tmp_path / "images" / "2.png").unlink()
    from mpo_data.report import build_report

    text = build_report(out)
    assert text.count("<img ") == 4 and "image &#x27;2.png&#x27; not found" in text
    result = subprocess.run([sys.executable, "-m", "mpo_data", "report", str(tmp_path / "nope")], capture_output=True, text=True)
    assert result.returncode == 1 and "no such run folder" in result.stderr and "Traceback" not in result.stderr
