"""`mpo-data train --config YAML [KEY=VALUE ...]`: MPO training (TRL DPOTrainer, sigmoid+bco_pair+sft) on a
meta.json mixture; also the body of training/train_mpo.py, for launchers."""

from __future__ import annotations

from pathlib import Path

from mpo_data.errors import InputError


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="training YAML, e.g. training/configs/smollm2_lora_cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. dpo.max_steps=2 model.finetune=full")


def main(args) -> int:
    from mpo_data.train.config import load
    from mpo_data.train.recipe import train

    config = load(args.config, args.overrides)
    for key, path in (
        ("eval.answers.questions", config.eval.answers.questions),
        ("eval.descriptions.prompts", config.eval.descriptions.prompts),
    ):
        if path and not Path(path).exists():  # found out now, not after the training
            raise InputError(f"{args.config}: {key}: {path}: no such file (make demo-data builds the demo's)")
    run = train(config)
    if not run:
        return 0
    out = Path(run["output_dir"])
    what = "model" if config.model.finetune == "full" else "adapter"
    print(f"{what}: {out}\nevaluation: {out / 'eval.json'}\ntensorboard: {out / 'runs'}")
    if config.eval.answers.questions or config.eval.descriptions.prompts:  # after the trainer: vLLM gets its memory
        from mpo_data.train.answer_accuracy import evaluate_run, report_lines

        print(report_lines(evaluate_run(out, config)))
    return 0
