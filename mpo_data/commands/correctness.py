"""`mpo-data correctness`: n chain-of-thought answers per item (InternVL's mmpr_data_pipeline_correctness.py)."""

from __future__ import annotations

from mpo_data.commands._stage import add_stage_arguments, run_stage_command
from mpo_data.sampling.stage_config import CorrectnessConfig


def add_arguments(parser) -> None:
    add_stage_arguments(parser, CorrectnessConfig)


def main(args) -> int:
    return run_stage_command(CorrectnessConfig, args)
