"""`make bench-scale`: what a million-prompt run costs the driver (the stage's speed next to its peers: `make bench-peers`).

One run writes out/bench/scale.json with
  plan          read + validate + plan N JSONL prompts (10% with generated 448-px JPEGs): seconds, peak RSS
  resume        resume planning over synthetic done shards (items x samples): seconds, peak RSS
  part_write_ms one part write with 100 and with 100,000 parts already in the folder
Plan and resume run in their own processes, so each peak RSS is that step's alone. Goals on a 2-core
machine: plan <= 90 s and <= 2 GiB; resume <= 90 s and <= 3 GiB; a write at 100,000 parts <= 3x one at
100. The figures are printed; nothing is asserted (tests check behaviour).

    make bench-scale                     # or: python benchmarks/bench_scale.py --help
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def make_prompts(folder: Path, prompts: int, distinct_images: int) -> Path:
    """`prompts` correctness lines, every tenth with one of `distinct_images` 448-px JPEGs."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(distinct_images):
        Image.new("RGB", (448, 448), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(
            images / f"{i}.jpg", quality=85
        )
    path = folder / "prompts.jsonl"
    with path.open("wb") as f:
        for i in range(prompts):
            line = {
                "question": f"Question {i}: how many objects are there in the picture, counted carefully?",
                "answer": str(i % 97),
            }
            if i % 10 == 0:
                line["image"] = f"{(i // 10) % distinct_images}.jpg"
            f.write(orjson.dumps(line) + b"\n")
    return path


def plan_step(prompts: Path) -> dict:
    """What run_stage does before any engine starts: read and check every line, select, plan the work."""
    from mpo_data.records.inputs import PromptReader
    from mpo_data.sampling.stage_config import CorrectnessConfig, EngineConfig
    from mpo_data.sampling.stages import plan_work, read_items

    began = time.perf_counter()
    config = CorrectnessConfig(str(prompts), EngineConfig(str(ROOT)), image_root=str(prompts.parent / "images"))
    reader = PromptReader(prompts, "correctness", "bench", config.image_root, verify_images=False)
    items, _ = read_items(config, reader)
    work = plan_work(items, {}, 4)
    return {
        "prompts": reader.read,
        "image_prompts": sum(1 for i in items if i.images),
        "work_rows": len(work),
        "seconds": round(time.perf_counter() - began, 2),
        "peak_rss_mib": _peak_rss_mib(),
    }


def make_shards(folder: Path, items: int, samples_per_item: int, lines_per_part: int = 4000) -> list:
    """A shard folder holding items x samples_per_item sample lines, as write_part writes them."""
    from mpo_data.records.formats import PromptItem
    from mpo_data.records.shards import ShardStore

    store = ShardStore(folder)
    prompts = [PromptItem(dataset="bench", question=f"Question {i}?", answer=str(i % 97)) for i in range(items)]
    rows = []
    for item in prompts:
        for index in range(samples_per_item):
            rows.append(
                {
                    "item_id": item.item_id,
                    "sample_index": index,
                    "question": item.question,
                    "answer": item.answer,
                    "response": "We count the objects one by one. So the answer is \\boxed{12}.",
                    "finish_reason": "stop",
                }
            )
            if len(rows) == lines_per_part:
                store.write_part(rows, [])
                rows = []
    store.write_part(rows, [])
    return prompts


def resume_step(folder: Path, items: int, samples_per_item: int) -> dict:
    from mpo_data.records.formats import PromptItem
    from mpo_data.records.shards import ShardStore
    from mpo_data.sampling.stages import plan_work

    prompts = [PromptItem(dataset="bench", question=f"Question {i}?", answer=str(i % 97)) for i in range(items)]
    began = time.perf_counter()
    done = ShardStore(folder).done()
    work = plan_work(prompts, done, samples_per_item + 1)  # a top-up by one sample an item
    return {
        "items": items,
        "done_samples": sum(map(len, done.values())),
        "work_rows": len(work),
        "seconds": round(time.perf_counter() - began, 2),
        "peak_rss_mib": _peak_rss_mib(),
    }


def part_write_ms(folder: Path, present: int, writes: int = 1000) -> float:
    """Mean ms of a part write (its first one lists the folder) with `present` parts already there."""
    from mpo_data.records.shards import ShardStore

    store = ShardStore(folder)
    for i in range(present):  # the files only need to exist, with the names write_part gives them
        path = folder / store._next_name()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    store = ShardStore(folder)  # a fresh store, as a resumed run has
    row = [{"item_id": "x", "sample_index": 0, "response": "r"}]
    began = time.perf_counter()
    for _ in range(writes):
        store.write_part(row, [])
    return round((time.perf_counter() - began) * 1000 / writes, 3)


def _in_child(step: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--step", step, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=1_000_000, help="prompt lines to plan")
    p.add_argument("--distinct-images", type=int, default=3000, help="distinct JPEG files behind the image prompts")
    p.add_argument("--resume-items", type=int, default=1_000_000, help="items in the resume plan")
    p.add_argument("--done-per-item", type=int, default=4, help="done samples an item in the synthetic shards")
    p.add_argument("--large-parts", type=int, default=100_000, help="parts present for the second write timing")
    p.add_argument("--out", default=str(ROOT / "out" / "bench" / "scale.json"))
    p.add_argument("--step", choices=["plan", "resume"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step == "plan":
        return print(json.dumps(plan_step(Path(args.path))))
    if args.step == "resume":
        return print(json.dumps(resume_step(Path(args.path), args.resume_items, args.done_per_item)))
    with tempfile.TemporaryDirectory(dir=ROOT / "out" if (ROOT / "out").is_dir() else None) as tmp:
        tmp = Path(tmp)
        figures = {
            "plan": _in_child("plan", "--path", str(make_prompts(tmp / "prompts", args.prompts, args.distinct_images)))
        }
        print("plan:", figures["plan"], flush=True)
        make_shards(tmp / "shards", args.resume_items, args.done_per_item)
        figures["resume"] = _in_child(
            "resume",
            "--path",
            str(tmp / "shards"),
            "--resume-items",
            str(args.resume_items),
            "--done-per-item",
            str(args.done_per_item),
        )
        print("resume:", figures["resume"], flush=True)
        figures["part_write_ms"] = {
            "at_100": part_write_ms(tmp / "p100", 100),
            "at_100000": part_write_ms(tmp / "p100k", args.large_parts),
        }
        print("part writes (ms):", figures["part_write_ms"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
