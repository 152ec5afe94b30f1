"""`mpo-data demo-data`: the offline demo prompt sets (arithmetic, easy-VQA)."""

from __future__ import annotations

from mpo_data.config import add_config_arguments, config_from_args
from mpo_data.tools.demo import DemoConfig, build


def add_arguments(parser) -> None:
    add_config_arguments(parser, DemoConfig)


def main(args) -> int:
    config = config_from_args(DemoConfig, args)
    counts = build(config)
    print(f"demo prompt sets under {config.out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0
