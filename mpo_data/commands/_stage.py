"""What the two sampling-stage commands share: flags from the stage config, InternVL's extra flags, the summary line."""

from __future__ import annotations

import argparse
import sys

from mpo_data.commands import internvl
from mpo_data.config import add_config_arguments, config_from_args
from mpo_data.sampling.stage_config import StageConfig


def add_stage_arguments(parser: argparse.ArgumentParser, cls: type[StageConfig]) -> None:
    parser.description = cls.__doc__
    add_config_arguments(parser, cls)
    internvl.add_flags(parser, internvl.SAMPLING_FLAGS)


def run_stage_command(cls: type[StageConfig], args: argparse.Namespace) -> int:
    from mpo_data.sampling.stages import run_stage  # Ray Data machinery: only once the command really runs

    internvl.report_given(args, internvl.SAMPLING_FLAGS)
    summary = run_stage(config_from_args(cls, args))
    dropped = ", ".join(f"{n} {reason}" for reason, n in summary["dropped"].items()) or "none"
    print(
        f"{summary['stage']} {summary['dataset']}: {summary['samples_out']} sample(s) written, dropped: {dropped}, "
        f"{summary['samples_already_done']} already there, {summary['quarantined']['total']} line(s) quarantined; "
        f"{summary['engine_output_tokens_per_s'] or '-'} tok/s in engine time, {summary['run_output_tokens_per_s']} over the "
        f"whole stage; summary: {summary['summary_file']}",
        file=sys.stderr,
    )
    return 0
