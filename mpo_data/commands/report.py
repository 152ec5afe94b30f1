"""`mpo-data report OUT_DIR`: one static HTML page of a run (counts, correctness rates, lengths, sample pairs)."""

from __future__ import annotations

from pathlib import Path

from mpo_data.records.jsonl import atomic_write_bytes
from mpo_data.tools.report import build_report


def add_arguments(parser) -> None:
    parser.add_argument("out_dir", help="a run folder (the out_dir of a pipeline or stage)")
    parser.add_argument("--html", default=None, help="where to write the page (default OUT_DIR/report.html)")
    parser.add_argument(
        "--meta", default=None, help="meta.json giving image roots (default: the one the pipeline recorded)"
    )
    parser.add_argument("--seed", type=int, default=0, help="which sample pairs are shown")


def main(args) -> int:
    page = build_report(args.out_dir, args.meta, args.seed)
    target = Path(args.html or Path(args.out_dir) / "report.html")
    atomic_write_bytes(target, page.encode())
    print(f"report: {target}")
    return 0
