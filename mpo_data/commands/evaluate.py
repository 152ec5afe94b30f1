"""`mpo-data evaluate RUN [KEY=VALUE ...]`: answer accuracy on held-out questions, base vs trained model of a
run (vLLM answers, our judge, Wilson and paired intervals), into RUN/eval.json under `answer_accuracy`."""

from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("run", help="the run folder (output_dir of `mpo-data train`)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="the run's config, e.g. eval.answers.max_questions=50 (fields of AnswerEvalArgs)")


def main(args) -> int:
    from mpo_data.answer_accuracy import describe, evaluate_run

    print(describe(evaluate_run(args.run, args.overrides)))
    print(f"evaluation: {Path(args.run) / 'eval.json'}, answers: {Path(args.run) / 'answers.jsonl'}", file=sys.stderr)
    return 0
