"""`mpo-data models`: build the local models offline (SmolLM2 from GGUF, a tiny SmolVLM, optional Qwen2.5-VL)."""

from __future__ import annotations

from mpo_data.tools.model_folders import BUILDERS, DEFAULT_MODELS, build_all


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="models", help="folder to build them in (cached: complete ones are kept)")
    parser.add_argument(
        "--model",
        action="append",
        choices=sorted(BUILDERS),
        help=f"model to build (repeatable; default: {', '.join(DEFAULT_MODELS)}); the Qwen2.5-VL ones need torchvision (GPU machines)",
    )


def main(args) -> int:
    for name, path in build_all(args.out, args.model or DEFAULT_MODELS).items():
        print(f"{name}: {path}")
    return 0
