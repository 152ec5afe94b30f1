"""`mpo-data sample`: plain vLLM answers to a prompt file, to smoke-test a model and the engine settings."""

from __future__ import annotations

import sys

from mpo_data.config import add_config_arguments, config_from_args
from mpo_data.sampling.stage_config import SampleConfig


def add_arguments(parser) -> None:
    add_config_arguments(parser, SampleConfig)


def main(args) -> int:
    from mpo_data.sampling.sample import sample_file

    config = config_from_args(SampleConfig, args)
    count, reader = sample_file(config)
    print(f"{config.out}: {count} row(s) from {reader.read} read", file=sys.stderr)
    if reader.quarantine.total:
        counts = ", ".join(f"{n} {category}" for category, n in reader.quarantine.counts.items())
        print(f"skipped lines went to {config.quarantine_path} ({counts})", file=sys.stderr)
    return 0
