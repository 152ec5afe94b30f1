"""`mpo-data ablate --config YAML [--variants ...] [--seeds ...] [--questions ...] [KEY=VALUE ...]`: loss
ablations (sft, dpo, rpo, mpo, mpo_trl) on the same pairs and budget over seeds, one table of held-out answer
accuracy with paired intervals against sft. Resumable: rerun the same command to continue."""

from __future__ import annotations

import sys

from mpo_data.config import add_config_arguments, config_from_args


def add_arguments(parser) -> None:
    from mpo_data.train.ablate import AblationConfig

    add_config_arguments(parser, AblationConfig)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of the training config for every run, e.g. dpo.max_steps=12",
    )


def main(args) -> int:
    from mpo_data.train.ablate import AblationConfig, ablate, describe

    config = config_from_args(AblationConfig, args)
    result = ablate(config, args.overrides)
    print(describe(result))
    print(f"ablation: {config.out}/ablation.json", file=sys.stderr)
    return 0
