"""`mpo-data meta`: a meta.json mixture over pair files, with repeat ratios that hit a target size."""

from __future__ import annotations

import sys

from mpo_data.config import add_config_arguments, config_from_args
from mpo_data.preference.meta import MetaConfig, active_rows, build_meta
from mpo_data.records.formats import internvl_reading, write_meta


def add_arguments(parser) -> None:
    add_config_arguments(parser, MetaConfig)


def main(args) -> int:
    config = config_from_args(MetaConfig, args)
    entries = build_meta(config)
    write_meta(config.out, entries)
    total = sum(active_rows(e.length, e.repeat_time) for e in entries.values())
    print(f"{len(entries)} entries, {total} active rows -> {config.out}", file=sys.stderr)
    for name, entry in entries.items():
        note = internvl_reading(name, entry.repeat_time)
        if note:
            print(f"warning: {note}", file=sys.stderr)
    return 0
