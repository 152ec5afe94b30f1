"""`mpo-data judge`: add answer_pred, format_ok, is_correct to each response line (the judge contract)."""

from __future__ import annotations

import sys
from pathlib import Path

from mpo_data.config import add_config_arguments, config_from_args
from mpo_data.preference.judge import JudgeConfig, judge_file


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, help="JSONL with response, answer, question?, prompt_version?")
    parser.add_argument("--output", required=True, help="JSONL: the input plus answer_pred, format_ok, is_correct")
    parser.add_argument(
        "--dataset", default=None, help="dataset name that picks the modes (default: the input file's stem)"
    )
    add_config_arguments(parser, JudgeConfig)


def main(args) -> int:
    counts = judge_file(Path(args.input), Path(args.output), config_from_args(JudgeConfig, args), args.dataset)
    print(
        f"judged {counts['lines']} lines: {counts['correct']} correct, {counts['format_failures']} format failures, "
        f"{counts['judge_errors']} judge errors -> {args.output}",
        file=sys.stderr,
    )
    return 0
