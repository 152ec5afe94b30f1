"""`mpo-data eval RUN`: preference accuracy and answers of a training run, before vs after, again."""

from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    parser.add_argument("run", help="the run folder (output_dir of `mpo-data train`)")


def main(args) -> int:
    from mpo_data.train import eval_run

    path = eval_run(args.run)
    result = json.loads(path.read_text())
    for when in ("before", "after"):
        print(f"{when}: {result.get(when)}")
    print(f"evaluation: {path}", file=sys.stderr)
    return 0
