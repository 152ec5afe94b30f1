"""`mpo-data validate FILE --kind K`: every problem of a prompt, pair or meta file as FILE:LINE: reason."""

from __future__ import annotations

import sys

from mpo_data.records.formats import PROMPT_KINDS
from mpo_data.records.inputs import validate_file


def add_arguments(parser) -> None:
    parser.add_argument("file", help="JSONL, Parquet or saved HF dataset folder (or a meta.json with --kind meta)")
    parser.add_argument("--kind", required=True, choices=[*PROMPT_KINDS, "pairs", "meta"])
    parser.add_argument(
        "--image-root", default=None, help="root that image paths are relative to (default: the file's folder)"
    )


def main(args) -> int:
    rows, problems = validate_file(args.file, args.kind, args.image_root)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.file}: {len(problems)} problem(s) in {rows} row(s)", file=sys.stderr)
        return 1
    print(f"{args.file}: {rows} row(s) OK ({args.kind})")
    return 0
