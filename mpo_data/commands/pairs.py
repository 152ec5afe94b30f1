"""`mpo-data pairs`: sample shards -> MMPR preference pairs (InternVL's mmpr_data_pipeline_correctness_postprocess.py,
plus the DropoutNTP lines)."""

from __future__ import annotations

import sys

from mpo_data.commands import internvl
from mpo_data.config import add_config_arguments, config_from_args
from mpo_data.preference.pairs import PairsConfig, build_pairs


def add_arguments(parser) -> None:
    add_config_arguments(parser, PairsConfig)
    internvl.add_flags(parser, internvl.POSTPROCESS_FLAGS)


def main(args) -> int:
    internvl.report_given(args, internvl.POSTPROCESS_FLAGS)
    config = config_from_args(PairsConfig, args)
    summary = build_pairs(config)
    for name, counts in summary.items():
        made = {k: v for k, v in counts.items() if k.startswith("pairs_")}
        print(f"{name}: {counts.get('lines', 0)} lines -> {made}", file=sys.stderr)
    print(f"summary: {config.save_dir / 'pairs_summary.json'}", file=sys.stderr)
    return 0
