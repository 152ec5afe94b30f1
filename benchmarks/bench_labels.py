"""Self-consistency labels against hidden ground truth, on one correctness samples folder whose rows have answers.

The same samples are paired twice, side by side: with their ground truth (labels: answer), and with the
answers hidden (run.json says labels: majority, so `pairs` labels each item by its samples' vote). Prints,
per --majority-threshold: how many items got a label, how often that label is right (judge equality against
the hidden answer), and the share of pairs whose chosen is really correct (and rejected really wrong), next
to the ground-truth pairs.

    python benchmarks/bench_labels.py OUT/samples/correctness/arithmetic --thresholds 0.3 0.5 0.75
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import orjson

from mpo_data.preference.judge import JudgeConfig, answers_match, modes_for_dataset
from mpo_data.preference.pairs import PairsConfig, build_pairs
from mpo_data.records.jsonl import iter_lines


def _lines(path: Path) -> list[dict]:
    return [line.value for line in iter_lines(path)] if path.exists() else []


def _copy(dataset_dir: Path, root: Path, labels: str) -> Path:
    """The dataset's part files under root/correctness/<name>/, with a run.json naming `labels`."""
    folder = root / "correctness" / dataset_dir.name
    folder.mkdir(parents=True)
    for part in sorted(dataset_dir.glob("part-*.jsonl")):
        shutil.copy(part, folder / part.name)
    (folder / "run.json").write_bytes(orjson.dumps({"labels": labels}))
    return root


def _pairs(root: Path, save: Path, threshold: float) -> tuple[list[dict], dict, list[dict]]:
    """(correctness-rule pairs, the dataset's pairs_summary counts, pos_items) of `pairs` on root's one dataset."""
    summary = build_pairs(PairsConfig(root, save, majority_threshold=threshold, judge=JudgeConfig(workers=2)))
    [(key, counts)] = summary.items()
    name = key.split("/", 1)[1]
    return (
        _lines(save / f"{name}_pairs_vqa_correctness_rules.jsonl"),
        counts,
        _lines(save / "pos_items" / f"{name}.jsonl"),
    )


def _share(hits: int, total: int) -> str:
    return f"{hits}/{total} = {hits / total:.1%}" if total else "0/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dataset_dir", type=Path, help="a correctness samples folder: OUT/samples/correctness/<dataset>"
    )
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.5], help="--majority-threshold values to try"
    )
    args = parser.parse_args()
    samples = [row for part in sorted(args.dataset_dir.glob("part-*.jsonl")) for row in _lines(part)]
    truth = {row["item_id"]: str(row["answer"]) for row in samples}
    modes = modes_for_dataset(args.dataset_dir.name)

    def right(answer: str | None, item_id: str) -> bool:
        return answer is not None and answers_match(answer, truth[item_id], modes)

    def pair_figures(pairs: list[dict]) -> str:
        chosen = sum(right(p["chosen_meta"]["answer_pred"], p["chosen_meta"]["item_id"]) for p in pairs)
        rejected = sum(not right(p["rejected_meta"]["answer_pred"], p["rejected_meta"]["item_id"]) for p in pairs)
        items = len({p["chosen_meta"]["item_id"] for p in pairs})
        return f"{len(pairs)} pairs over {items} items; chosen correct {_share(chosen, len(pairs))}, rejected wrong {_share(rejected, len(pairs))}"

    print(f"{args.dataset_dir}: {len(samples)} samples, {len(truth)} items")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gt_pairs, gt_counts, _ = _pairs(_copy(args.dataset_dir, tmp / "gt", "answer"), tmp / "gt-pairs", 0.5)
        print(f"ground truth: correctness rate {gt_counts['correctness_rate']:.1%}; {pair_figures(gt_pairs)}")
        voted = _copy(args.dataset_dir, tmp / "vote", "majority")
        for threshold in args.thresholds:
            pairs, counts, positives = _pairs(voted, tmp / f"vote-pairs-{threshold}", threshold)
            labels = {row["item_id"]: row["majority_answer"] for row in positives}
            correct = sum(right(label, item_id) for item_id, label in labels.items())
            print(
                f"majority >= {threshold:g}: labelled {_share(len(labels), len(truth))} items "
                f"(under threshold {counts.get('items_below_majority_threshold', 0)}, tied {counts.get('items_majority_tied', 0)}); "
                f"label right {_share(correct, len(labels))}; {pair_figures(pairs)}"
            )


if __name__ == "__main__":
    main()
