"""`mpo-data export --meta META --out DIR [--format hf|parquet]`: a mixture as a TRL-ready preference set."""

from __future__ import annotations

import sys

from mpo_data.config import add_config_arguments, config_from_args
from mpo_data.train.export import PARQUET_FILE, ExportConfig


def add_arguments(parser) -> None:
    add_config_arguments(parser, ExportConfig)


def main(args) -> int:
    from mpo_data.train.export import export

    config = config_from_args(ExportConfig, args)
    summary = export(config)
    where = summary["out"] if config.format == "hf" else f"{summary['out']}/{PARQUET_FILE}"
    print(
        f"{summary['rows']} rows -> {where}; per entry {summary['datasets']}; skipped {summary['skipped']}",
        file=sys.stderr,
    )
    return 0
