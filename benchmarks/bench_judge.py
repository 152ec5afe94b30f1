"""`make bench-judge`: the judge's accuracy on the labelled case file tests/judge_cases.jsonl.

Each case is a full response in one prompt version's format with its ground truth, modes and the verdict
a careful grader gives. Runs the real judge (worker pool, time bounds) and prints the agreement overall,
by category and by error kind: wrong_called_right (a wrong answer that would become a `chosen`),
right_called_wrong (a right one that would become a `rejected`), judge_error. `--show N` lists misses.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson

from mpo_data.preference.judge import Judge, JudgeConfig, JudgeItem

CASES = Path(__file__).resolve().parent.parent / "tests" / "judge_cases.jsonl"


def judge_cases(path: Path, workers: int = 2) -> list[tuple[dict, bool, str | None]]:
    """(case, is_correct, judge_error) for every case, judged as `mpo-data judge` would (a generous time
    bound: verdicts are measured here, not speed, and a loaded machine must not turn them into errors)."""
    cases = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    items = (
        JudgeItem(c, c["response"], c["answer"], c.get("question"), c["prompt_version"], tuple(c["modes"]))
        for c in cases
    )
    with Judge(JudgeConfig(workers=workers, timeout=30.0)) as judge:
        return [(case, v.is_correct, v.judge_error) for case, v in judge.judge_many(items)]


def error_kind(case: dict, is_correct: bool, judge_error: str | None) -> str | None:
    """None when the verdict agrees with the label; else what kind of miss it is."""
    if judge_error:
        return "judge_error"
    if is_correct == case["expected"]:
        return None
    return "wrong_called_right" if is_correct else "right_called_wrong"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, default=CASES)
    parser.add_argument("--show", type=int, default=10, help="misses to print")
    args = parser.parse_args()
    start = time.perf_counter()
    results = judge_cases(args.cases)
    seconds = time.perf_counter() - start
    kinds: Counter = Counter()
    by_category: dict[str, Counter] = defaultdict(Counter)
    misses = []
    for case, is_correct, judge_error in results:
        kind = error_kind(case, is_correct, judge_error)
        by_category[case["category"]].update(cases=1, agree=kind is None)
        if kind:
            kinds[kind] += 1
            by_category[case["category"]][kind] += 1
            misses.append((kind, case))
    total, agree = len(results), sum(c["agree"] for c in by_category.values())
    print(f"judge agreement on {args.cases.name}: {agree}/{total} = {agree / total:.3f} ({seconds:.1f} s)")
    print(
        "errors: " + ", ".join(f"{k}={kinds[k]}" for k in ("wrong_called_right", "right_called_wrong", "judge_error"))
    )
    print(f"{'category':<22}{'cases':>6}{'agree':>8}  misses")
    for name, c in sorted(by_category.items()):
        detail = ", ".join(f"{k}={c[k]}" for k in ("wrong_called_right", "right_called_wrong", "judge_error") if c[k])
        print(f"{name:<22}{c['cases']:>6}{c['agree'] / c['cases']:>8.3f}  {detail}")
    for kind, case in misses[: args.show]:
        print(
            f"  {kind}: [{case['id']} {case['prompt_version']} {case['source']}] answer={case['answer']!r} "
            f"response={case['response'][-60:]!r}"
        )


if __name__ == "__main__":
    main()
