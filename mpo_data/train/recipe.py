"""MPO training with TRL's DPOTrainer (loss_type sigmoid + bco_pair + sft), then the before/after evaluation.

The trainer is `MPOTrainer` (mpo_data/train/mpo_trainer.py): TRL's DPOTrainer with the paper's bco_pair (delta).

The recipe is deliberately thin: TRL loads the model (and the reference copy for full fine-tuning), peft
adds LoRA/DoRA, bitsandbytes quantizes for QLoRA, accelerate handles devices and launchers. What lives
here is what TRL does not do: turning meta.json mixtures into rows, the held-out split, the length filter
with counts, and the run folder (adapter or model, processor, config, data summary, eval.json).
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import time
from pathlib import Path
from typing import Any

import yaml

from mpo_data.errors import InputError
from mpo_data.train.config import RUN_CONFIG, TrainConfig
from mpo_data.train.data import PairLoader, summary


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def dpo_config(config: TrainConfig, cuda: bool):
    """trl.DPOConfig from the YAML; its own validation errors come back naming the file."""
    from trl import DPOConfig

    try:
        return DPOConfig(**config.dpo_kwargs(cuda))
    except (ValueError, TypeError) as e:
        raise InputError(f"{config.source}: dpo: {e}") from None


def peft_config(config: TrainConfig):
    """LoraConfig for lora / qlora, DoRA with use_dora (the cookbook's settings), None for full fine-tuning."""
    m = config.model
    if m.finetune == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=m.lora_r,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        target_modules=m.target_modules,
        use_dora=m.use_dora,
        init_lora_weights="gaussian",
        task_type="CAUSAL_LM",
    )


def quantization_config(config: TrainConfig, cuda: bool):
    """4-bit NF4 for QLoRA; bitsandbytes 4-bit kernels need CUDA, so CPU runs are refused up front."""
    if config.model.finetune != "qlora":
        return None
    if not cuda:
        raise InputError(
            f"{config.source}: model.finetune: qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora on CPU"
        )
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InputError(f"{config.source}: model.finetune: qlora needs bitsandbytes (pip install '.[gpu]')") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_processing_class(path: str):
    """The model's processor (VLM) or tokenizer (text LM), padding on the left as TRL requires."""
    from transformers import AutoProcessor

    try:
        processing_class = AutoProcessor.from_pretrained(path)
    except OSError as e:
        raise InputError(f"model.path: cannot load a processor or tokenizer from '{path}': {e}") from None
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processing_class


def is_vlm(processing_class) -> bool:
    from transformers import ProcessorMixin

    return isinstance(processing_class, ProcessorMixin)


def split_by_source(
    rows: list[dict], sources: list[str], eval_size: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Held-out rows by source line, so that repeat_time copies of a pair never sit on both sides."""
    unique = sorted(set(sources))
    random.Random(seed).shuffle(unique)
    n_eval = int(eval_size) if eval_size >= 1 else max(1, round(len(unique) * eval_size))
    if n_eval >= len(unique):
        raise InputError(
            f"data.eval_size={eval_size} holds out all {len(unique)} distinct pairs; nothing left to train on"
        )
    held = set(unique[:n_eval])
    first = {}
    for row, src in zip(rows, sources):
        if src in held:
            first.setdefault(src, row)
    train = [row for row, src in zip(rows, sources) if src not in held]
    return train, [first[s] for s in unique[:n_eval]]


def prepare_rows(config: TrainConfig, processing_class, max_length: int | None) -> tuple[list, list, dict]:
    """(train rows, held-out rows, data summary) from the meta.json or data set the config names."""
    from mpo_data.train import preference_eval  # torch/TRL: imported only when training or evaluating

    out = Path(config.output_dir)
    loader = PairLoader(
        config.data.on_error,
        out / "quarantine.jsonl",
        text_only=not is_vlm(processing_class),
        images_only=config.data.images_only,
    )
    if config.data.meta:
        loader.read_meta(config.data.meta, config.data.seed)
    else:
        loader.read_dataset(config.data.dataset, config.data.image_root)
    if max_length is not None:
        lengths = [preference_eval.pair_length(row, processing_class) for row in loader.out.rows]
        loader.drop_too_long(lengths, max_length)
    rows = loader.close()
    if not rows.rows:
        raise InputError(
            f"{config.data.meta or config.data.dataset}: no usable pairs (skipped: {dict(rows.quarantine.counts)})"
        )
    train, held = split_by_source(rows.rows, rows.sources, config.data.eval_size, config.data.seed)
    if config.data.max_train_pairs is not None:
        random.Random(config.data.seed).shuffle(train)
        train = train[: config.data.max_train_pairs]
    info = {**summary(rows), "train_rows": len(train), "eval_rows": len(held)}
    return train, held, info


def to_dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


def train(config: TrainConfig) -> dict[str, Any]:
    """Train, save adapter or model plus processor, evaluate; returns the run summary (also in summary.json)."""
    from mpo_data.train import preference_eval  # torch/TRL: imported only when training or evaluating
    from mpo_data.train.mpo_trainer import MPOTrainer

    cuda = cuda_available()
    args = dpo_config(config, cuda)
    quant = quantization_config(config, cuda)
    processing_class = load_processing_class(config.model.path)
    train_rows, held, data_info = prepare_rows(config, processing_class, args.max_length)
    print(f"pairs: {data_info['train_rows']} train, {data_info['eval_rows']} held out; skipped {data_info['skipped']}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in dataclasses.asdict(config).items() if k != "source"}
    (out / RUN_CONFIG).write_text(yaml.safe_dump(saved, sort_keys=False))

    trainer = MPOTrainer(
        model=config.model.path,
        args=args,
        train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(held) if args.eval_strategy != "no" else None,
        processing_class=processing_class,
        peft_config=peft_config(config),
        quantization_config=quant,
        bco_delta=config.bco_delta,
    )
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model()  # the adapter (PEFT) or the whole model
    if not trainer.accelerator.is_main_process:  # under a multi-GPU launch, one process evaluates and writes
        return {}
    processing_class.save_pretrained(out)

    policy = trainer.accelerator.unwrap_model(trainer.model)
    report = preference_eval.evaluate_preferences(
        policy, trainer.ref_model, processing_class, held, args.beta, config.eval
    )
    run = {
        "output_dir": str(out),
        "finetune": config.model.finetune,
        "model": config.model.path,
        "device": "cuda" if cuda else "cpu",
        "processes": trainer.accelerator.num_processes,
        "steps": result.global_step,
        "train_seconds": round(seconds, 2),
        "steps_per_second": round(result.global_step / seconds, 4),
        "train_loss": result.training_loss,
        "data": data_info,
        "bco_delta": trainer.delta.mean if trainer.quality_weight is not None else None,  # None: no shifted bco_pair
        "peak_rss_gib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
        ),  # ru_maxrss is KiB on Linux
    }
    if cuda:
        import torch

        run["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    preference_eval.write(out / "eval.json", {**report, "run": run})
    preference_eval.write(out / "summary.json", run)
    return run


def load_run(run_dir: str | Path, config: TrainConfig):
    """(policy, reference, processing_class) of a finished run folder trained with `config`."""
    import torch
    from trl.trainer.utils import create_model_from_path

    run_dir = Path(run_dir)
    dtype = torch.bfloat16 if cuda_available() else torch.float32
    processing_class = load_processing_class(str(run_dir))
    if (run_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        base = create_model_from_path(config.model.path, dtype=dtype)
        return PeftModel.from_pretrained(base, run_dir).eval(), None, processing_class
    policy = create_model_from_path(str(run_dir), dtype=dtype).eval()
    reference = create_model_from_path(config.model.path, dtype=dtype).eval()
    return policy, reference, processing_class


def rescore_run(run_dir: str | Path, config: TrainConfig) -> Path:
    """Rebuild the same held-out split and score the saved run's pairs again; returns RUN/eval.json."""
    from mpo_data.train import preference_eval  # torch/TRL: imported only when training or evaluating

    policy, reference, processing_class = load_run(run_dir, config)
    args = dpo_config(config, cuda_available())
    _, held, _ = prepare_rows(config, processing_class, args.max_length)
    report = preference_eval.evaluate_preferences(policy, reference, processing_class, held, args.beta, config.eval)
    path = Path(run_dir) / "eval.json"
    kept = (
        {k: v for k, v in json.loads(path.read_text()).items() if k in ("run", "answer_accuracy")}
        if path.is_file()
        else {}
    )
    return preference_eval.write(path, {**report, **kept})  # the run summary and answer accuracy stay
