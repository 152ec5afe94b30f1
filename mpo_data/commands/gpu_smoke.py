"""`mpo-data gpu-smoke`: tiny Qwen2.5-VL and InternVL-hf through both stages (tp=1, tp=2 with 2+ GPUs), pairs,
meta and 2 training steps, each as its own `mpo-data` process; prints a pass/fail table with tokens/s.
`--skip-stages`: models, meta and train only (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="out/gpu-smoke", help="where prompts, samples, pairs and the training run go")
    parser.add_argument("--models", default="models", help="where the tiny models are built (cached)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one step may take")
    parser.add_argument(
        "--skip-stages",
        action="store_true",
        help="leave out the sampling stages and pairs, for a machine without vLLM, e.g. to check the "
        "training side alone (meta and train run on hand-made pairs); the stage rows are listed as skipped",
    )


def main(args) -> int:
    from mpo_data.tools.gpu_smoke import run

    return run(Path(args.out), Path(args.models), args.timeout, args.skip_stages)
