"""Loss ablations on one training config: the same pairs, split and budget, one loss mix per run, several seeds.

Each (variant, seed) is one run folder OUT/<variant>-s<seed> trained by `mpo_data.train.recipe.train` with the
variant's `dpo.loss_type` / `dpo.loss_weights` / `bco_delta` and `dpo.seed=<seed>`; `data.seed` stays the
config's, so every run sees the same pairs and held-out split (the seed moves the adapter init and batch order).
Then the trained model answers every question set (vLLM, greedy, our judge; answer_accuracy.py), written to
OUT/<run>/answers_<set>.jsonl; the base model's answers go to OUT/base. Each of those files is written when its
step is done, so a stopped ablation continues where it stopped. The table compares each variant with `sft`
on the same questions and seeds: Newcombe's paired interval over all (question, seed) pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpo_data.errors import InputError
from mpo_data.records.jsonl import atomic_write_bytes
from mpo_data.train.config import MPO_DEFAULTS

# variant -> (loss_type, loss_weights, bco_delta). InternVL's mix (loss_type sigmoid,bco_pair at 0.8/0.2 with
# rpo_alpha=1 NLL, a token mean, and RunningMoments delta) is `mpo` term for term; `mpo_trl` is TRL's bco_pair.
VARIANTS: dict[str, tuple[list[str], list[float], bool]] = {
    "sft": (["sft"], [1.0], False),
    "dpo": (["sigmoid"], [1.0], False),
    "rpo": (["sigmoid", "sft"], [1.0, 1.0], False),
    "mpo": (MPO_DEFAULTS["loss_type"], MPO_DEFAULTS["loss_weights"], True),
    "mpo_trl": (MPO_DEFAULTS["loss_type"], MPO_DEFAULTS["loss_weights"], False),
}
BASELINE = "sft"


@dataclass
class AblationConfig:
    """`mpo-data ablate`: loss variants x seeds on one training config, one table of held-out answer accuracy."""

    config: str = field(
        metadata={"help": "The training YAML every run starts from (e.g. training/configs/smollm2_lora_cpu.yaml)."}
    )
    out: str = field(
        default="runs/ablate", metadata={"help": "Folder of the run folders, the base answers and ablation.json."}
    )
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS),
        metadata={
            "help": f"Loss mixes to train, of {', '.join(VARIANTS)} (sft is always trained: it is the baseline)."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1], metadata={"help": "dpo.seed of each run (the pairs stay the same)."}
    )
    questions: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Question sets to answer (correctness prompt files); default: the config's eval.answers.questions."
        },
    )
    max_questions: int | None = field(
        default=None, metadata={"help": "Only the first N questions of each set (None: all)."}
    )


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def variant_overrides(variant: str, seed: int, out: Path) -> list[str]:
    """The `key=value` overrides that turn the base config into one run of the ablation."""
    loss_type, weights, bco_delta = VARIANTS[variant]
    return [
        f"output_dir={out / run_name(variant, seed)}",
        f"dpo.loss_type={json.dumps(loss_type)}",
        f"dpo.loss_weights={json.dumps(weights)}",
        f"bco_delta={str(bco_delta).lower()}",
        f"dpo.seed={seed}",
        "eval.answers.questions=null",
        "eval.descriptions.prompts=null",
    ]  # answered and described here, once per set, with one engine per model


def check(config: AblationConfig) -> list[str]:
    """The variants in training order (sft first); unknown names are an error listing the known ones."""
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown:
        raise InputError(f"ablate: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if not config.seeds:
        raise InputError("ablate: give at least one seed")
    return [BASELINE] + [v for v in dict.fromkeys(config.variants) if v != BASELINE]


def answers_path(folder: Path, question_set: str) -> Path:
    return folder / f"answers_{Path(question_set).stem}.jsonl"


def descriptions_path(folder: Path, prompts: str) -> Path:
    """A run folder's (or OUT/base's) scored descriptions of the eval.descriptions prompt set."""
    return folder / f"descriptions_{Path(prompts).stem}.jsonl"


def answer_sets(model, question_sets: list[str], folder: Path, args, descriptions=None) -> None:
    """Answer and judge every set not yet answered in `folder`, and describe the held-out images of
    `descriptions` (eval.descriptions, when its prompts are set) unless done, with one vLLM engine for `model`."""
    from dataclasses import replace

    from mpo_data.records.jsonl import write_jsonl
    from mpo_data.train import answer_accuracy as aa
    from mpo_data.train import description_eval

    todo = [q for q in question_sets if not answers_path(folder, q).is_file()]
    to_describe = (
        descriptions is not None
        and descriptions.prompts
        and not descriptions_path(folder, descriptions.prompts).is_file()
    )
    if not todo and not to_describe:
        return
    engine, _ = aa.running_engine(model)
    try:
        for question_set in todo:
            set_args = replace(args, questions=question_set)
            items = aa.read_questions(question_set, set_args.max_questions)
            responses = aa.answer(engine, items, set_args, Path(question_set).parent)
            verdicts = aa.judge(items, responses, set_args.prompt_version)
            write_jsonl(
                answers_path(folder, question_set),
                (  # written whole (atomically): a resume point
                    {"question": i.question, "answer": i.answer, "response": r, "correct": v}
                    for i, r, v in zip(items, responses, verdicts)
                ),
            )
        if to_describe:
            prompts = description_eval.read_prompts(descriptions.prompts, descriptions.max_images)
            texts = description_eval.describe_images(engine, prompts, descriptions, Path(descriptions.prompts).parent)
            write_jsonl(
                descriptions_path(folder, descriptions.prompts),
                (
                    {"image": i.image, "truth": i.chosen, "description": t, "verdict": v}
                    for i, t, v in zip(prompts, texts, description_eval.verdicts(prompts, texts))
                ),
            )
    finally:
        engine.close()


def verdicts(folder: Path, question_set: str) -> list[bool]:
    from mpo_data.records.jsonl import read_jsonl

    return [row["correct"] for _, row in read_jsonl(answers_path(folder, question_set))]


def ablate(config: AblationConfig, overrides: list[str] = ()) -> dict[str, Any]:
    """Train what is missing, answer what is missing, return (and write to OUT/ablation.json) the table data."""
    from dataclasses import replace

    from mpo_data.train import answer_accuracy as aa
    from mpo_data.train.config import load
    from mpo_data.train.recipe import train

    variants = check(config)
    out = Path(config.out)
    base = load(config.config, list(overrides))
    question_sets = config.questions or ([base.eval.answers.questions] if base.eval.answers.questions else [])
    if not question_sets:
        raise InputError(f"{config.config}: no question sets: give --questions or set eval.answers.questions")
    for q in question_sets:
        if not Path(q).is_file():
            raise InputError(f"ablate: question set {q}: no such file")
    args = replace(base.eval.answers, max_questions=config.max_questions or base.eval.answers.max_questions)
    answer_sets(base.model.path, question_sets, out / "base", args, base.eval.descriptions)
    for variant in variants:
        for seed in config.seeds:
            run_config = load(config.config, [*overrides, *variant_overrides(variant, seed, out)])
            run_dir = Path(run_config.output_dir)
            if not (run_dir / "summary.json").is_file():  # a run without its summary did not finish: train again
                print(f"ablate: training {run_name(variant, seed)}", flush=True)
                train(run_config)
            answer_sets(
                aa.trained_model(run_dir, base.model.path), question_sets, run_dir, args, base.eval.descriptions
            )
    result = table_data(out, variants, config.seeds, question_sets)
    if base.eval.descriptions.prompts:
        result["hallucination"] = hallucination_data(out, variants, config.seeds, base.eval.descriptions.prompts)
    atomic_write_bytes(out / "ablation.json", json.dumps(result, indent=2).encode() + b"\n")
    return result


def logp_changes(out: Path, variant: str, seeds: list[int]) -> dict[str, float | None]:
    """Mean change (after - before training) of the summed log-prob of chosen and of rejected on the run's
    held-out pairs (eval.json), averaged over seeds; None where the runs scored no pairs (eval.pairs: 0)."""
    evals = [json.loads((out / run_name(variant, s) / "eval.json").read_text()) for s in seeds]
    if any("before" not in e for e in evals):
        return {"chosen_logp_change": None, "rejected_logp_change": None, "logp_pairs": 0}
    change = lambda key: round(sum(e["after"][key] - e["before"][key] for e in evals) / len(evals), 2)  # noqa: E731
    return {
        "chosen_logp_change": change("mean_chosen_logp"),
        "rejected_logp_change": change("mean_rejected_logp"),
        "logp_pairs": evals[0]["pairs"],
    }


def table_data(out: Path, variants: list[str], seeds: list[int], question_sets: list[str]) -> dict[str, Any]:
    """Per set: base accuracy; per variant, accuracy per seed and the paired difference to sft over all seeds,
    and how training moved the chosen and rejected log-probs (`logp_changes`)."""
    from mpo_data.stats import paired_difference_ci

    changes = {variant: logp_changes(out, variant, seeds) for variant in variants}
    sets = {}
    for q in question_sets:
        base = verdicts(out / "base", q)
        baseline = {s: verdicts(out / run_name(BASELINE, s), q) for s in seeds}
        rows = {}
        for variant in variants:
            runs = {s: verdicts(out / run_name(variant, s), q) for s in seeds}
            pooled = [v for s in seeds for v in runs[s]]
            pooled_baseline = [v for s in seeds for v in baseline[s]]
            summary = json.loads((out / run_name(variant, seeds[0]) / "summary.json").read_text())
            rows[variant] = {
                "accuracy": {str(s): round(sum(runs[s]) / len(runs[s]), 4) for s in seeds},
                "mean": round(sum(pooled) / len(pooled), 4),
                "diff_vs_sft": round((sum(pooled) - sum(pooled_baseline)) / len(pooled), 4),
                "diff_vs_sft_ci": [round(x, 4) for x in paired_difference_ci(pooled_baseline, pooled)],
                "train_seconds": summary["train_seconds"],
                "steps": summary["steps"],
                **changes[variant],
            }
        sets[Path(q).stem] = {"questions": len(base), "base": round(sum(base) / len(base), 4), "variants": rows}
    return {"seeds": seeds, "baseline": BASELINE, "sets": sets}


def hallucination_data(out: Path, variants: list[str], seeds: list[int], prompts: str) -> dict[str, Any]:
    """Description hallucination rate (with the image) of the base model and each run, and per variant the
    paired difference to the base model over all (image, seed) pairs (description_eval.summarize)."""
    from mpo_data.records.jsonl import read_jsonl
    from mpo_data.train import description_eval

    def scored(folder: Path) -> list[str]:
        return [row["verdict"] for _, row in read_jsonl(descriptions_path(folder, prompts))]

    base = scored(out / "base")
    return {
        variant: description_eval.summarize(
            base * len(seeds), [v for s in seeds for v in scored(out / run_name(variant, s))]
        )
        for variant in variants
    }


def describe(result: dict[str, Any]) -> str:
    """One Markdown table: every set and variant, accuracy per seed, mean, the paired difference to sft, and
    the change of the chosen / rejected log-probs on the held-out pairs (train s: seed 0's training time)."""
    seeds = result["seeds"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    nats = lambda x: "n/a" if x is None else f"{x:+.1f}"  # noqa: E731
    lines = [
        (
            f"| set (questions) | variant | {' | '.join(f'seed {s}' for s in seeds)} | mean | vs sft, points [95% paired] | "
            "Δ logp chosen / rejected | steps, train s |"
        ),
        "| --- | --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- | --- |",
    ]
    for name, data in result["sets"].items():
        lines.append(
            f"| {name} ({data['questions']}) | base | {' | '.join(pct(data['base']) for _ in seeds)} | {pct(data['base'])} | | | |"
        )
        for variant, row in data["variants"].items():
            low, high = row["diff_vs_sft_ci"]
            diff = (
                "" if variant == result["baseline"] else f"{100 * row['diff_vs_sft']:+.1f} [{pct(low)}, {pct(high)}]"
            )
            lines.append(
                f"| {name} | {variant} | {' | '.join(pct(row['accuracy'][str(s)]) for s in seeds)} | "
                f"{pct(row['mean'])} | {diff} | {nats(row['chosen_logp_change'])} / {nats(row['rejected_logp_change'])} | "
                f"{row['steps']}, {row['train_seconds']:.0f} |"
            )
    if "hallucination" in result:
        lines += [
            "",
            "| variant | description hallucination, base -> after (images x seeds) | after - base, points [95% paired] |",
            "| --- | --- | --- |",
        ]
        for variant, h in result["hallucination"].items():
            low, high = h["diff_ci"]
            lines.append(
                f"| {variant} | {pct(h['before'])} -> {pct(h['after'])} ({h['images']}) | "
                f"{100 * (h['after'] - h['before']):+.1f} [{pct(low)}, {pct(high)}] |"
            )
    return "\n".join(lines)
