"""`mpo-data rounds --pipeline PIPELINE.yaml --train TRAIN.yaml [--rounds K]`: Iterative RPO's loop, each round
sampled with the previous round's merged model, resumable; prints the held-out answer table per round."""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    from mpo_data.config import add_config_arguments
    from mpo_data.rounds import RoundsConfig

    add_config_arguments(parser, RoundsConfig)


def main(args) -> int:
    from mpo_data.config import config_from_args
    from mpo_data.rounds import RoundsConfig, run_rounds, table

    config = config_from_args(RoundsConfig, args)
    records = run_rounds(config)
    print(table(records))
    print(f"rounds: {config.out_dir} (round-k/round.json per round)", file=sys.stderr)
    return 0
