"""The MPO training recipe's config: one YAML file -> `TrainConfig`, with every DPOConfig field reachable.

Like TRL's `*_config.py` files, each field carries its help text. The `dpo:` section is passed through to
`trl.DPOConfig` unchanged (a key DPOConfig does not know is an error naming it and the file); the recipe only
fills in the MPO defaults and the device-dependent precision.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpo_data.config import apply_overrides, build, load_yaml
from mpo_data.errors import InputError, OnError
from mpo_data.sampling.prompts import PROMPT_VERSIONS

# The MPO paper's loss mix, as the TRL cookbook sets it: preference (sigmoid), quality (bco_pair), generation (sft);
# `TrainConfig.bco_delta` makes bco_pair the paper's (reward shift delta, mpo_data/train/mpo_trainer.py).
MPO_DEFAULTS: dict[str, Any] = {
    "loss_type": ["sigmoid", "bco_pair", "sft"],
    "loss_weights": [0.8, 0.2, 1.0],
    "beta": 0.1,
    "report_to": "tensorboard",
}
FINETUNE_METHODS = ("full", "lora", "qlora")
COOKBOOK_TARGETS = ["down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj", "v_proj"]


@dataclass
class AnswerEvalArgs:
    """The `eval.answers` section of a training YAML; also what `mpo-data eval RUN` reads and overrides."""

    questions: str | None = field(
        default=None,
        metadata={
            "help": "Held-out prompt file (correctness format, never sampled for pairs); None: no answer evaluation."
        },
    )
    prompt_version: str = field(
        default="en", metadata={"help": "Prompt template and answer format the judge expects."}
    )
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature of the answers; 0 is greedy."})
    max_new_tokens: int = field(
        default=256, metadata={"help": "Longest answer; a cut answer has no final answer and counts as wrong."}
    )
    max_questions: int | None = field(default=None, metadata={"help": "Use only the first N questions (None: all)."})


@dataclass
class DescriptionEvalArgs:
    """The `eval.descriptions` section: a VLM describes held-out images (with the image, greedy) before and after
    training, and the shape/colour rule of mpo_data/preference/hallucination.py scores each description."""

    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Held-out description prompts (dropout-ntp format: a faithful `chosen` names the image's shape "
            "and colour; never sampled for pairs); None: no description evaluation."
        },
    )
    max_images: int | None = field(default=None, metadata={"help": "Use only the first N prompts (None: all)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Longest description."})


@dataclass
class ModelArgs:
    path: str = field(
        metadata={"help": "Local model folder (a causal LM or a vision-language model with its processor)."}
    )
    finetune: str = field(
        default="lora",
        metadata={"help": "full: all weights; lora: a PEFT adapter; qlora: LoRA over a 4-bit base (CUDA only)."},
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "DoRA: LoRA/QLoRA adapters with weight decomposition (the TRL cookbook's QLoRA recipe turns it on)."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "Adapter rank."})
    lora_alpha: int = field(default=8, metadata={"help": "Adapter scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] = field(
        default_factory=lambda: list(COOKBOOK_TARGETS),
        metadata={"help": "Modules that get an adapter; the cookbook's attention and MLP projections by default."},
    )


@dataclass
class DataArgs:
    meta: str | None = field(
        default=None, metadata={"help": "A meta.json mixture (ours or MMPR's); each entry sampled by its repeat_time."}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Instead of meta: a TRL-style preference set (save_to_disk folder, JSONL or Parquet)."},
    )
    image_root: str | None = field(
        default=None,
        metadata={"help": "Root for image paths in `dataset` (default: beside it); meta entries have their own."},
    )
    eval_size: float = field(
        default=0.1, metadata={"help": "Held-out pairs: a fraction (< 1) or a count (>= 1) of the sampled rows."}
    )
    images_only: bool = field(
        default=False,
        metadata={
            "help": "Train on image pairs only: text rows of the mixture are skipped and counted (a VLM's own loop)."
        },
    )
    max_train_pairs: int | None = field(
        default=None, metadata={"help": "Cap on training pairs after the split, for bounded runs (None: all)."}
    )
    on_error: OnError = field(
        default="fail",
        metadata={"help": "fail: stop at the first bad row (FILE:LINE); skip: quarantine and count it."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of repeat_time sampling and of the split."})


@dataclass
class EvalArgs:
    pairs: int = field(default=64, metadata={"help": "Held-out pairs scored for preference accuracy (at most)."})
    generations: int = field(default=3, metadata={"help": "Held-out prompts answered before and after training."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length cap of those answers (greedy decoding)."})
    batch_size: int = field(default=4, metadata={"help": "Pairs per forward pass while scoring."})
    answers: AnswerEvalArgs = field(
        default_factory=AnswerEvalArgs,
        metadata={
            "help": "Answer accuracy on held-out questions, base vs trained model (vLLM + judge), after training."
        },
    )
    descriptions: DescriptionEvalArgs = field(
        default_factory=DescriptionEvalArgs,
        metadata={"help": "Description hallucination rate on held-out images, base vs trained VLM, after training."},
    )


@dataclass
class TrainConfig:
    model: ModelArgs = field(metadata={"help": "What to train and how (full, LoRA, DoRA, QLoRA)."})
    data: DataArgs = field(metadata={"help": "Where the pairs come from and how they are split."})
    output_dir: str = field(metadata={"help": "Run folder: adapter or model, processor, tensorboard logs, eval.json."})
    eval: EvalArgs = field(
        default_factory=EvalArgs, metadata={"help": "Evaluation after training (and `mpo-data eval`)."}
    )
    dpo: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Any trl.DPOConfig field; MPO loss mix, beta 0.1 and tensorboard unless set here."},
    )
    bco_delta: bool = field(
        default=True,
        metadata={
            "help": "bco_pair as the MPO paper, InternVL and ms-swift have it: rewards shifted by delta, their "
            "running mean over training (logged as bco_pair/delta); false: TRL's bco_pair, no shift."
        },
    )
    source: str = field(default="", init=False, metadata={"help": "The YAML file this came from, for messages."})

    def dpo_kwargs(self, cuda: bool) -> dict[str, Any]:
        """DPOConfig arguments: MPO defaults < YAML `dpo:`; bf16 on CUDA, float32 on CPU unless the YAML says."""
        kwargs = {**MPO_DEFAULTS, "bf16": cuda, "use_cpu": not cuda, **self.dpo, "output_dir": self.output_dir}
        kwargs.setdefault("model_init_kwargs", {})
        kwargs["model_init_kwargs"] = {
            "dtype": "bfloat16" if kwargs["bf16"] else "float32",
            **kwargs["model_init_kwargs"],
        }
        return kwargs


def check(config: TrainConfig) -> TrainConfig:
    """Cross-field rules that a dataclass cannot express; messages name the file and key."""
    from trl import DPOConfig

    where = config.source
    known = {f.name for f in dataclasses.fields(DPOConfig) if f.init}
    for key in config.dpo:
        if key not in known:
            raise InputError(f"{where}: dpo: unknown key '{key}' (not a trl.DPOConfig field)")
        if key == "output_dir":
            raise InputError(f"{where}: dpo: set 'output_dir' at the top level, not under dpo")
    if config.model.finetune not in FINETUNE_METHODS:
        hint = " (DoRA is model.finetune: lora with model.use_dora: true)" if config.model.finetune == "dora" else ""
        raise InputError(
            f"{where}: model.finetune: '{config.model.finetune}' is not one of {', '.join(FINETUNE_METHODS)}{hint}"
        )
    if config.model.use_dora and config.model.finetune == "full":
        raise InputError(f"{where}: model.use_dora: DoRA is an adapter method; set model.finetune to lora or qlora")
    if (config.data.meta is None) == (config.data.dataset is None):
        raise InputError(f"{where}: data: set exactly one of 'meta' and 'dataset'")
    if not config.data.eval_size > 0:
        raise InputError(f"{where}: data.eval_size: must be > 0 (the evaluation needs held-out pairs)")
    if config.eval.answers.prompt_version not in PROMPT_VERSIONS:
        raise InputError(
            f"{where}: eval.answers.prompt_version: '{config.eval.answers.prompt_version}' is not one of {', '.join(PROMPT_VERSIONS)}"
        )
    return config


def load(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a training YAML, apply `key.sub=value` overrides, validate everything."""
    config = build(TrainConfig, apply_overrides(load_yaml(path), list(overrides)), str(path))
    config.source = str(path)
    return check(config)


RUN_CONFIG = "train_config.yaml"  # the config a run folder was trained with, as `mpo-data train` saved it


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """The config a run folder was trained with, `key.sub=value` overrides applied."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise InputError(f"{run_dir}: not a training run folder (no {RUN_CONFIG})")
    return load(run_dir / RUN_CONFIG, list(overrides))
