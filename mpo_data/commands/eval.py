"""`mpo-data eval RUN [KEY=VALUE ...]`: a training run's evaluation again, before vs after: preference accuracy
on the held-out pairs, then, when the run's config sets eval.answers.questions, answer accuracy on held-out
questions (vLLM answers, our judge, Wilson and paired intervals). Everything goes into RUN/eval.json."""

from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    parser.add_argument("run", help="the run folder (output_dir of `mpo-data train`)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="the run's config, e.g. eval.pairs=32 or eval.answers.max_questions=50",
    )


def main(args) -> int:
    from mpo_data.train.answer_accuracy import evaluate_run, report_lines
    from mpo_data.train.config import load_run_config
    from mpo_data.train.recipe import rescore_run

    config = load_run_config(args.run, args.overrides)
    path = rescore_run(args.run, config)  # first: vLLM then gets the memory its models held
    if config.eval.answers.questions or config.eval.descriptions.prompts:
        evaluate_run(args.run, config)
    report = json.loads(path.read_text())
    for when in ("before", "after"):
        print(f"{when}: {report.get(when)}")
    if "answer_accuracy" in report or "hallucination" in report:
        print(report_lines(report))
    print(f"evaluation: {path}", file=sys.stderr)
    return 0
