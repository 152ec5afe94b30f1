"""`mpo-data` command line: each subcommand lives beside the code it drives, as `add_cli(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from mpo_data.errors import InputError

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = [
    "mpo_data.inputs",
    "mpo_data.demo",
    "mpo_data.models",
    "mpo_data.engine",
    "mpo_data.stages",
    "mpo_data.pipeline",
    "mpo_data.report",
    "mpo_data.train",
    "mpo_data.answer_accuracy",
    "mpo_data.judge",
    "mpo_data.pairs",
    "mpo_data.meta",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpo-data",
        description="Build multimodal MPO preference data with vLLM on Ray, and train on it with TRL.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
