"""`mpo-data demo-data`: the offline demo prompt sets (arithmetic, easy-VQA)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="data/demo", help="output folder")
    parser.add_argument(
        "--num-arithmetic", type=int, default=48, help="arithmetic questions sampled for pairs (correctness, text)"
    )
    parser.add_argument(
        "--num-heldout", type=int, default=256, help="held-out arithmetic questions, never sampled (answer accuracy)"
    )
    parser.add_argument("--num-vqa", type=int, default=24, help="easy-VQA questions (correctness, image)")
    parser.add_argument("--num-describe", type=int, default=24, help="easy-VQA descriptions (dropout-ntp)")
    parser.add_argument("--seed", type=int, default=0, help="fixed seed: the same sets every time")


def main(args) -> int:
    from mpo_data.tools.demo import build

    counts = build(args.out, args.num_arithmetic, args.num_vqa, args.num_describe, args.seed, args.num_heldout)
    print(f"demo prompt sets under {args.out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0
