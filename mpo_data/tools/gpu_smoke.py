"""GPU smoke test, the first thing to run on a new cluster: `make gpu-smoke` or `mpo-data gpu-smoke`.

It builds a tiny random Qwen2.5-VL and a tiny HF-format InternVL offline, runs both sampling stages on 4
items each at tp=1 (and tp=2 with 2+ GPUs), then pairs, meta and 2 training steps, each as the `mpo-data`
command a user would type, in its own process so one failure does not hide the others. It prints one
pass/fail row per step with tokens/s. The models are noise by design: this checks the plumbing (CUDA vLLM,
both InternVL tiling names, tensor parallel, TRL on GPU), not answer quality. `--skip-stages` leaves out the
sampling stages and pairs (no vLLM needed): meta and training then run on the hand-made pairs alone.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from PIL import Image

from mpo_data.records.shards import samples_root, stage_dir
from mpo_data.sampling.stage_config import STAGE_CONFIGS
from mpo_data.tools.model_folders import TINY_INTERNVL, TINY_QWEN

MODELS = (TINY_QWEN, TINY_INTERNVL)
STAGES = tuple(STAGE_CONFIGS)
ITEMS = 4
SAMPLING = ["--num-return-sequences", "2", "--max-new-tokens", "16"]
TRAIN_CONFIG = "training/configs/tiny_vlm_full_cpu.yaml"


@dataclass
class Step:
    """One `mpo-data` command of the smoke test; `summary` is the JSON file its speed is read from."""

    name: str
    argv: list[str]
    model: str = ""
    tp: int | None = None
    summary: Path | None = None


@dataclass
class Outcome:
    step: Step
    ok: bool
    seconds: float
    speed: str  # "123.4 tok/s", "0.52 steps/s" or ""
    note: str  # why it failed (the last line the command printed), or a count


def plan(out: Path, models_dir: Path, gpus: int, skip_stages: bool = False) -> tuple[list[Step], list[str]]:
    """The steps for a machine with `gpus` GPUs, and the notes on what is skipped there. `skip_stages` (a
    machine without vLLM) lists the stage rows and pairs as skipped: meta reads write_prompts' pairs alone."""
    tps = [1, 2] if gpus >= 2 else [1]
    skipped = [] if gpus >= 2 or skip_stages else [f"tp=2 skipped: {gpus} GPU(s) visible, it needs 2"]
    build = [f"--model={name}" for name in MODELS]
    steps = [Step("models", ["models", "--out", str(models_dir), *build])]
    stages = [stage_step(out, models_dir / model, stage, tp) for model in MODELS for tp in tps for stage in STAGES]
    samples, pairs, meta = samples_root(out), out / "pairs", out / "meta.json"
    pairs_step = Step(
        "pairs", ["pairs", "--data-dir", str(samples), "--save-dir", str(pairs)], summary=pairs / "pairs_summary.json"
    )
    if skip_stages:
        skipped += [f"{s.name} {s.model} tp={s.tp} skipped: --skip-stages" for s in stages] + [
            "pairs skipped: --skip-stages, no samples"
        ]
    else:
        steps += [*stages, pairs_step]
    steps.append(
        Step("meta", ["meta", "--pairs-dir", str(pairs), "--image-root", str(out / "prompts"), "--out", str(meta)])
    )
    train_out = out / "train"
    overrides = [
        f"model.path={models_dir / TINY_QWEN}",
        f"data.meta={meta}",
        f"output_dir={train_out}",
        "dpo.max_steps=2",
        "data.eval_size=2",
        "eval.pairs=2",
    ]
    steps.append(
        Step("train", ["train", "--config", TRAIN_CONFIG, *overrides], TINY_QWEN, summary=train_out / "summary.json")
    )
    return steps, skipped


def stage_step(out: Path, model: Path, stage: str, tp: int) -> Step:
    dataset = f"{model.name}-tp{tp}"
    prompts = out / "prompts" / f"{stage}.jsonl"
    argv = [
        stage,
        "--checkpoint",
        str(model),
        "--prompt-path",
        str(prompts),
        "--image-root",
        str(out / "prompts"),
        "--out-dir",
        str(out),
        "--dataset",
        dataset,
        "--tp",
        str(tp),
        *SAMPLING,
    ]
    if model.name == TINY_INTERNVL:
        argv += ["--max-num", "6", "--dynamic"]  # InternVL tiling under the HF processor's names
    return Step(stage, argv, model.name, tp, stage_dir(out, stage, dataset) / "summary.json")


def write_prompts(folder: Path, pairs_dir: Path) -> None:
    """ITEMS prompts with an image for each stage (coloured squares, as the easy-VQA demo), and as many
    hand-made pairs in `pairs_dir`: random weights rarely end an answer, so DropoutNTP drops their cut
    continuations and no answer is right; these pairs give meta and training rows whatever was sampled."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow"][:ITEMS]
    correctness, dropout = [], []
    for colour in colours:
        Image.new("RGB", (64, 48), colour).save(folder / f"{colour}.png")
        question = "What colour is the image?"
        correctness.append({"image": f"{colour}.png", "question": question, "answer": colour})
        dropout.append(
            {
                "image": f"{colour}.png",
                "question": question,
                "chosen": f"The image is plain {colour}, one colour all over.",
                "rejected": None,
            }
        )
    pairs = [
        {**row, "rejected": f"The image is plain {other}."} for row, other in zip(dropout, colours[1:] + colours[:1])
    ]
    pairs_dir.mkdir(parents=True, exist_ok=True)
    for path, rows in (
        (folder / "correctness.jsonl", correctness),
        (folder / "dropout-ntp.jsonl", dropout),
        (pairs_dir / "smoke_colours.jsonl", pairs),
    ):
        path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))


def speed(step: Step) -> str:
    """tokens/s of a stage, steps/s of training, from the summary the command wrote."""
    if step.summary is None or not step.summary.is_file():
        return ""
    summary = orjson.loads(step.summary.read_bytes())
    if "output_tokens_per_s" in summary:
        return f"{summary['output_tokens_per_s']:.1f} tok/s"
    if "steps_per_second" in summary:
        return f"{summary['steps_per_second']:.2f} steps/s"
    return ""


def run_step(step: Step, timeout: float) -> Outcome:
    start = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mpo_data", *step.argv], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return Outcome(step, False, time.monotonic() - start, "", f"no result in {timeout:.0f} s")
    lines = (done.stderr + done.stdout).strip().splitlines()
    note = "" if done.returncode == 0 else f"exit {done.returncode}: {lines[-1] if lines else 'no output'}"
    return Outcome(step, done.returncode == 0, time.monotonic() - start, speed(step), note)


def table(outcomes: list[Outcome], skipped: list[str]) -> str:
    """The pass/fail table, then what was skipped and the verdict."""
    rows = [("step", "model", "tp", "result", "speed", "seconds", "note")]
    for o in outcomes:
        rows.append(
            (
                o.step.name,
                o.step.model,
                str(o.step.tp or ""),
                "pass" if o.ok else "FAIL",
                o.speed,
                f"{o.seconds:.1f}",
                o.note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    failed = sum(not o.ok for o in outcomes)
    lines += skipped + [f"gpu-smoke: {'PASS' if not failed else f'FAIL ({failed} of {len(outcomes)} steps)'}"]
    return "\n".join(line.rstrip() for line in lines)


def gpu_problem() -> str | None:
    """Why this machine cannot run the smoke test, or None."""
    import torch

    if not torch.cuda.is_available():
        return (
            "no CUDA GPU visible: the GPU smoke test runs on a GPU node (srun --gpus=2 ... or inside an allocation). "
            "On a CPU machine vLLM cannot even load its models: Qwen2.5-VL and InternVL need torchvision, "
            "which the CPU install removes"
        )
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is missing: Qwen2.5-VL's and InternVL's processors need it (pip install -e '.[gpu,train]')"
    return None


def run(out: Path, models_dir: Path, timeout: float, skip_stages: bool = False) -> int:
    problem = gpu_problem()
    if problem:
        print(f"gpu-smoke: {problem}", file=sys.stderr)
        return 2
    import torch

    write_prompts(out / "prompts", out / "pairs")
    steps, skipped = plan(out, models_dir, torch.cuda.device_count(), skip_stages)
    outcomes = []
    for step in steps:
        outcomes.append(run_step(step, timeout))
        print(
            f"gpu-smoke: {step.name} {step.model} {'pass' if outcomes[-1].ok else 'FAIL'}", file=sys.stderr, flush=True
        )
    print(table(outcomes, skipped))
    return 0 if all(o.ok for o in outcomes) else 1
