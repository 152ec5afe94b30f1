"""Steps/s and peak memory of the MPO training stage, per fine-tuning method, on generated image pairs.

Each method runs as its own `mpo-data train` process (fresh memory counters, the real CLI) over the same
meta.json of generated pairs (coloured shapes, one or two images a pair, some text-only), then the
before/after evaluation; the table comes from each run's summary.json. On CUDA the runs are bf16 with
gradient checkpointing, as `training/configs/qwen2_5_vl_3b_qlora.yaml`; QLoRA runs only there.

    make bench-train                                            # CPU: tiny SmolVLM, full and LoRA
    python benchmarks/bench_train.py --model models/random-qwen2.5-vl-3b --methods lora,qlora,full --steps 20
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from mpo_data.records.formats import MetaEntry, write_meta
from mpo_data.records.jsonl import write_jsonl

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square"]


def make_pairs(folder: Path, count: int, image_size: int, seed: int = 0) -> Path:
    """`count` MMPR pairs over generated images (every 4th with two images, every 5th text-only) and their meta.json."""
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        wrong = rng.choice([c for c in COLOURS if c != colour])
        if i % 5 == 4:
            rows.append(
                {
                    "question": f"What colour do you get by naming {colour}?",
                    "chosen": f"It is {colour}.",
                    "rejected": f"It is {wrong}.",
                }
            )
            continue
        picture = Image.new("RGB", (image_size, image_size), "white")
        box = [image_size // 5, image_size // 5, 4 * image_size // 5, 4 * image_size // 5]
        draw = ImageDraw.Draw(picture)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        picture.save(images / f"{i}.png")
        image = [f"{i}.png", f"{i}.png"] if i % 4 == 3 else f"{i}.png"
        rows.append(
            {
                "image": image,
                "question": "Describe the shape in the image and its colour.",
                "chosen": f"The image shows a {colour} {shape} in the middle of a white background.",
                "rejected": f"The image shows a {wrong} triangle next to a small {colour} star in the corner.",
            }
        )
    write_jsonl(folder / "pairs.jsonl", rows)
    write_meta(folder / "meta.json", {"bench": MetaEntry(str(images), str(folder / "pairs.jsonl"), 1.0, len(rows))})
    return folder / "meta.json"


def train_config(model: str, meta: Path, method: str, args: argparse.Namespace, out: Path) -> dict:
    return {
        # dora: LoRA with weight decomposition (model.use_dora), the cookbook's choice
        "model": {"path": model, "finetune": "lora" if method == "dora" else method, "use_dora": method == "dora"},
        "data": {"meta": str(meta), "eval_size": 8, "seed": 0},
        "output_dir": str(out / method),
        "eval": {"pairs": 8, "generations": 1, "max_new_tokens": 8, "batch_size": 4},
        "dpo": {
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch_size,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-5 if method == "full" else 1e-4,
            "gradient_checkpointing": args.gradient_checkpointing == "on",
            "max_length": None,
            "logging_steps": max(1, args.steps // 5),
            "save_strategy": "no",
            "eval_strategy": "no",
            "dataloader_num_workers": 0,
            "seed": 0,
        },
    }


def run_method(config: dict, folder: Path) -> dict:
    """One `mpo-data train` process; its summary.json, or why it failed."""
    path = folder / f"{Path(config['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "mpo_data", "train", "--config", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()
        return {"error": output[-1][:300] if output else f"exit status {done.returncode}, no output"}
    return json.loads((Path(config["output_dir"]) / "summary.json").read_text())


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="models/tiny-smolvlm", help="VLM folder (make models; Qwen2.5-VL ones with --model on GPU)"
    )
    parser.add_argument(
        "--methods",
        default="full,lora,qlora" if cuda else "full,lora",
        help="comma-separated: full, lora, dora, qlora",
    )
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per device per step")
    parser.add_argument("--pairs", type=int, default=64, help="generated pairs in the mixture")
    parser.add_argument("--image-size", type=int, default=224, help="side of the generated images, in pixels")
    parser.add_argument(
        "--gradient-checkpointing",
        choices=["on", "off"],
        default="on" if cuda else "off",
        help="recompute activations in the backward pass (default: on with CUDA, as the GPU recipe)",
    )
    parser.add_argument("--out", default=None, help="keep the run folders here (default: a temp folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        folder = Path(args.out or tmp)
        meta = make_pairs(folder / "data", args.pairs, args.image_size)
        device = torch.cuda.get_device_name() if cuda else "cpu"
        print(
            f"model {args.model} on {device}; {args.steps} steps x {args.batch_size} pairs, {args.pairs} pairs of "
            f"{args.image_size} px images; gradient checkpointing {args.gradient_checkpointing}"
        )
        memory = "GPU GiB" if cuda else "RSS GiB"  # peak allocated on the GPU, else the process's peak resident set
        print(f"{'method':8} {'steps':>5} {'steps/s':>8} {memory:>9} {'loss':>8}")
        for method in args.methods.split(","):
            run = run_method(train_config(args.model, meta, method, args, folder / "runs"), folder)
            if "error" in run:
                print(f"{method:8} failed: {run['error']}")
                continue
            peak = run["peak_memory_gib"] if cuda else run["peak_rss_gib"]
            print(
                f"{method:8} {run['steps']:>5} {run['steps_per_second']:>8.3f} {peak:>9.3f} {run['train_loss']:>8.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
