"""`make bench-pairs`: throughput and peak memory of `mpo-data pairs` on a generated 500k-line sample file.

Prints lines/s of the full command, the peak RSS of it and its children, and the ratio of its time to
the time it takes just to read and parse the same file (measured side by side in this run).
Targets on a 2-core machine: >= 10k lines/s, < 1 GB peak.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil  # comes with ray

from mpo_data.records.formats import make_item_id

SHAPES = ["triangle", "rectangle", "circle", "square"]


def _answer_and_response(rng: random.Random, index: int) -> tuple[str, str, str]:
    """(question, answer, response): numbers, options, fractions; correct, wrong or malformed."""
    kind = index % 4
    if kind == 0:
        answer = str(rng.randint(2, 3000))
        wrong = str(int(answer) + rng.choice([-1, 1, 100]))
        question = f"How many dots are there? ({index})"
    elif kind == 1:
        answer = rng.choice("ABCD")
        wrong = rng.choice([c for c in "ABCD" if c != answer])
        question = f"Which shape? ({index})\n" + "\n".join(f"{c}. {s}" for c, s in zip("ABCD", SHAPES))
    elif kind == 2:
        a, b = rng.randint(1, 9), rng.randint(2, 9)
        answer, wrong = f"\\frac{{{a}}}{{{b}}}", f"\\frac{{{a + 1}}}{{{b}}}"
        question = f"What fraction is shaded? ({index})"
    else:
        answer = f"{rng.randint(1, 99)}%"
        wrong = f"{rng.randint(100, 200)}%"
        question = f"What share is red? ({index})"
    return question, answer, wrong


def _response(rng: random.Random, answer: str, wrong: str) -> tuple[str, str]:
    reasoning = " ".join(
        rng.choice(["First", "we", "count", "the", "parts", "carefully", "then", "add", "them."]) for _ in range(60)
    )
    roll = rng.random()
    if roll < 0.4:
        return f"{reasoning}\nSo the answer is \\boxed{{{answer}}}.", "stop"
    if roll < 0.8:
        return f"{reasoning}\nSo the answer is \\boxed{{{wrong}}}.", "stop"
    if roll < 0.9:
        return f"{reasoning}\nSo the answer is {answer}.", "stop"
    return f"{reasoning}\nSo the answer is \\boxed{{{answer}", "length"


def generate(path: Path, lines: int, samples_per_item: int = 8, seed: int = 0) -> None:
    """A realistic correctness part file: `samples_per_item` responses per item, grouped by item."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for index in range(lines // samples_per_item):
            question, answer, wrong = _answer_and_response(rng, index)
            item_id = make_item_id("bench", f"img/{index}.png", question, answer)
            for sample_index in range(samples_per_item):
                response, finish = _response(rng, answer, wrong)
                row = {
                    "image": f"img/{index}.png",
                    "question": question,
                    "answer": answer,
                    "item_id": item_id,
                    "sample_index": sample_index,
                    "response": response,
                    "finish_reason": finish,
                    "prompt_tokens": 120,
                    "output_tokens": 90,
                    "prompt_version": "en_v2",
                    "model": "bench",
                    "sampling": {"temperature": 1.0, "top_k": 50},
                }
                out.write(orjson.dumps(row) + b"\n")


def read_only(path: Path) -> float:
    """Seconds to read and parse every line, nothing else: the floor for any pairs implementation."""
    start = time.perf_counter()
    with path.open("rb") as handle:
        for raw in handle:
            orjson.loads(raw)
    return time.perf_counter() - start


def run_with_peak_rss(cli: list[str]) -> tuple[float, int]:
    """(seconds, peak bytes) of a command; RSS summed over it and all its children, polled every 0.1 s."""
    start = time.perf_counter()
    proc = subprocess.Popen(cli)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:  # a child exited between listing and reading
            pass
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"mpo-data pairs failed with exit code {proc.returncode}")
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=500_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pairs-") as tmp:
        part = Path(tmp) / "samples" / "correctness" / "bench" / "part-00000.jsonl"
        generate(part, args.lines)
        lines = sum(1 for _ in part.open("rb"))
        parse_s = read_only(part)
        cli = [
            sys.executable,
            "-m",
            "mpo_data",
            "pairs",
            "--data-dir",
            str(part.parent.parent.parent),
            "--save-dir",
            str(Path(tmp) / "pairs"),
            "--max-lines",
            str(lines),
        ]
        pairs_s, peak = run_with_peak_rss(cli)
        summary = orjson.loads((Path(tmp) / "pairs" / "pairs_summary.json").read_bytes())
    print(f"lines={lines} file={part.name} summary={summary['correctness/bench']}")
    print(f"read+parse only: {parse_s:.1f} s ({lines / parse_s:,.0f} lines/s)")
    print(
        f"mpo-data pairs:  {pairs_s:.1f} s ({lines / pairs_s:,.0f} lines/s), peak RSS incl. children {peak / 2**20:.0f} MiB"
    )
    print(f"ratio pairs / read+parse: {pairs_s / parse_s:.1f}x")


if __name__ == "__main__":
    main()
