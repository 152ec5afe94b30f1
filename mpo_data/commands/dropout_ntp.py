"""`mpo-data dropout-ntp`: continue half of `chosen` without the image (InternVL's mmpr_data_pipeline_dropout_ntp.py)."""

from __future__ import annotations

from mpo_data.commands._stage import add_stage_arguments, run_stage_command
from mpo_data.sampling.stage_config import DropoutNTPConfig


def add_arguments(parser) -> None:
    add_stage_arguments(parser, DropoutNTPConfig)


def main(args) -> int:
    return run_stage_command(DropoutNTPConfig, args)
