"""`mpo-data run PIPELINE.yaml`: sampling stages -> pairs -> meta.json, each step resumable."""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("config", help="pipeline YAML, e.g. pipelines/demo.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="KEY=VALUE overrides of the YAML, e.g. out_dir=out/x defaults.engine.max_model_len=8192",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join ('auto' or HOST:PORT); the YAML's `address`"
    )


def main(args) -> int:
    from mpo_data.pipeline import load_pipeline, run_pipeline

    overrides = [
        *args.overrides,
        *([f"address='{args.address}'"] if args.address else []),
    ]  # quoted: HOST:PORT stays a string
    config, stages = load_pipeline(args.config, overrides)
    record = run_pipeline(config, stages)
    print(
        f"pairs: {record['pairs_dir']}\nmeta:  {record['meta']}\nreport: mpo-data report {config.out_dir}",
        file=sys.stderr,
    )
    return 0
