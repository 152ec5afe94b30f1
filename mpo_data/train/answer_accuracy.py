"""Answer accuracy on held-out questions, before vs after training: the number preference data is judged by.

Both models answer every held-out question with vLLM (one answer each, greedy by default, so that a
difference comes from the weights and not from the sampler), and our judge marks each answer exactly as
correctness sampling does. Accuracies get 95% Wilson intervals. Since both models answer the same
questions, the difference is paired: its interval is Newcombe's (1998, method 10), which combines the two
Wilson intervals with the correlation of the verdicts, and `gained` / `lost` count the questions answered
right only after / only before training.

A LoRA run is merged into a float32 model folder (`RUN/merged`) first: vLLM loads it like any model, and
float32 keeps the small adapter deltas that a bf16 merge would round away.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mpo_data.errors import InputError
from mpo_data.stats import paired_difference_ci, wilson
from mpo_data.train.config import AnswerEvalArgs, EvalArgs, TrainConfig

# ------------------------------------------------------------------------------------------ the summary


def summarize(before: list[bool], after: list[bool]) -> dict[str, Any]:
    """The `answer_accuracy` body of eval.json from per-question verdicts (same questions, same order)."""
    if len(before) != len(after) or not before:
        raise ValueError(
            f"need the same non-zero number of verdicts before and after, got {len(before)} and {len(after)}"
        )
    n = len(before)
    rounded = lambda pair: [round(x, 4) for x in pair]  # noqa: E731
    return {
        "questions": n,
        "before": round(sum(before) / n, 4),
        "after": round(sum(after) / n, 4),
        "before_ci": rounded(wilson(sum(before), n)),
        "after_ci": rounded(wilson(sum(after), n)),
        "diff_ci": rounded(paired_difference_ci(before, after)),
        "gained": sum(a and not b for a, b in zip(after, before)),
        "lost": sum(b and not a for a, b in zip(after, before)),
    }


def paired_lines(summary: dict[str, Any], title: str, gained: str, lost: str) -> str:
    """Three lines for people from a `summarize` body: the title, both rates with intervals, the difference
    with its interval and the gained / lost counts (named by `gained` and `lost`)."""
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    ci = lambda pair: f"[{pct(pair[0])}, {pct(pair[1])}]"  # noqa: E731
    diff = summary["after"] - summary["before"]
    return (
        f"{title}\n"
        f"  before {pct(summary['before'])} {ci(summary['before_ci'])}   "
        f"after {pct(summary['after'])} {ci(summary['after_ci'])}\n"
        f"  after - before {100 * diff:+.1f} points {ci(summary['diff_ci'])}; "
        f"{summary['gained']} {gained}, {summary['lost']} {lost}"
    )


def describe(acc: dict[str, Any]) -> str:
    """Three lines for people: both accuracies with intervals, the difference with its interval."""
    return paired_lines(acc, f"answer accuracy on {acc['questions']} held-out questions:", "questions gained", "lost")


def write_side_by_side(path: Path, items: list, fields: Any, columns: dict[str, dict[str, list]]) -> None:
    """One JSONL line per item: `fields(item)`, then each model's `{model}_{column}` values (column -> model ->
    per-item values), model by model, so before and after read side by side."""
    from mpo_data.records.jsonl import write_jsonl

    models = next(iter(columns.values()))
    write_jsonl(
        path,
        (
            {**fields(item), **{f"{name}_{col}": columns[col][name][i] for name in models for col in columns}}
            for i, item in enumerate(items)
        ),
    )


def report_lines(report: dict[str, Any]) -> str:
    """The answer accuracy and description hallucination lines of an eval.json (those it has)."""
    from mpo_data.train import description_eval

    lines = [describe(report["answer_accuracy"])] if "answer_accuracy" in report else []
    return "\n".join(
        lines + ([description_eval.describe(report["hallucination"])] if "hallucination" in report else [])
    )


# ------------------------------------------------------------------------------------ answering, judging


def read_questions(path: str | Path, limit: int | None) -> list:
    """The held-out items; a bad line fails naming FILE:LINE (an evaluation set must be clean)."""
    from mpo_data.records.inputs import PromptReader

    reader = PromptReader(path, "correctness", Path(path).stem)
    items = list(reader)[:limit]
    if not items:
        raise InputError(f"{path}: no questions to evaluate on")
    return items


def running_engine(model: str | Path | Any):
    """(engine, whether to close it): a running `Engine` as it is, else one started for the model folder."""
    from mpo_data.sampling.engine import Engine
    from mpo_data.sampling.stage_config import EngineConfig

    return (model, False) if isinstance(model, Engine) else (Engine(EngineConfig(model=str(model))), True)


def answer(model: str | Path | Any, items: list, args: AnswerEvalArgs, image_root: str | Path) -> list[str]:
    """One answer per item, with the prompts correctness sampling uses, from a model folder (an engine is
    started and closed here) or from a running `Engine`."""
    from dataclasses import replace

    from mpo_data.sampling.prompts import user_prompt
    from mpo_data.sampling.sample import item_request
    from mpo_data.sampling.stage_config import SamplingConfig

    prompts = [replace(i, question=user_prompt(i.question, len(i.images), args.prompt_version)) for i in items]
    requests = [item_request(item, image_root) for item in prompts]
    sampling = SamplingConfig(n=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    engine, owned = running_engine(model)
    try:
        return [result.completions[0].text for result in engine.generate(requests, sampling)]
    finally:
        if owned:
            engine.close()


def judge(items: list, responses: list[str], prompt_version: str) -> list[bool]:
    """Our judge's verdict per answer; a judge error (timeout) counts as wrong and is reported on stderr."""
    from mpo_data.preference.judge import Judge, JudgeItem, modes_for_dataset

    rows = [
        JudgeItem(i, r, item.answer, item.question, prompt_version, modes_for_dataset(item.dataset))
        for i, (item, r) in enumerate(zip(items, responses))
    ]
    with Judge() as j:
        verdicts = [v for _, v in j.judge_many(rows)]
    errors = sum(v.judge_error is not None for v in verdicts)
    if errors:
        print(f"warning: {errors} answer(s) could not be judged (counted as wrong)", file=sys.stderr)
    return [v.is_correct for v in verdicts]


def evaluate_models(
    base: str | Path | Any, trained: str | Path | Any, evaluation: EvalArgs, out_dir: str | Path
) -> dict[str, Any]:
    """Both models (folders or running engines; one engine at a time) answer the held-out questions
    (`eval.answers`, judged) and describe the held-out images (`eval.descriptions`, scored for hallucination),
    as far as those are set; writes OUT/answers.jsonl and OUT/descriptions.jsonl (every item with both
    models' outputs and verdicts); returns {"answer_accuracy": ..., "hallucination": ...} for what was set."""
    from mpo_data.train import description_eval

    args, described = evaluation.answers, evaluation.descriptions
    if not args.questions and not described.prompts:
        raise InputError(
            "nothing to evaluate: set eval.answers.questions (a correctness prompt file) or eval.descriptions.prompts"
        )
    items = read_questions(args.questions, args.max_questions) if args.questions else []
    prompts = description_eval.read_prompts(described.prompts, described.max_images) if described.prompts else []
    responses: dict[str, list[str]] = {}
    texts: dict[str, list[str]] = {}
    for name, model in (("before", base), ("after", trained)):
        engine, owned = running_engine(model)
        try:
            if items:
                responses[name] = answer(engine, items, args, Path(args.questions).parent)
            if prompts:
                texts[name] = description_eval.describe_images(
                    engine, prompts, described, Path(described.prompts).parent
                )
        finally:
            if owned:
                engine.close()
    report = {}
    if items:
        verdicts = {name: judge(items, r, args.prompt_version) for name, r in responses.items()}
        write_side_by_side(
            Path(out_dir) / "answers.jsonl",
            items,
            lambda item: {"question": item.question, "answer": item.answer, "source": item.source},
            {"response": responses, "correct": verdicts},
        )
        report["answer_accuracy"] = summarize(verdicts["before"], verdicts["after"])
    if prompts:
        scored = {name: description_eval.verdicts(prompts, t) for name, t in texts.items()}
        write_side_by_side(
            Path(out_dir) / "descriptions.jsonl",
            prompts,
            lambda item: {"image": item.image, "truth": item.chosen, "source": item.source},
            {"description": texts, "verdict": scored},
        )
        report["hallucination"] = description_eval.summarize(scored["before"], scored["after"])
    return report


def trained_model(run_dir: str | Path, base: str) -> Path:
    """A folder vLLM can load: the run itself (full fine-tuning) or RUN/merged, the adapter merged in float32."""
    run_dir = Path(run_dir)
    if not (run_dir / "adapter_config.json").is_file():
        return run_dir
    merged = run_dir / "merged"
    if (merged / "config.json").is_file() and (merged / "config.json").stat().st_mtime >= (
        run_dir / "adapter_config.json"
    ).stat().st_mtime:
        return merged
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoProcessor
    from trl.trainer.utils import create_model_from_path

    model = PeftModel.from_pretrained(create_model_from_path(base, dtype=torch.float32), run_dir).merge_and_unload()
    partial = run_dir / "merged.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoProcessor.from_pretrained(run_dir).save_pretrained(partial)
    shutil.rmtree(merged, ignore_errors=True)
    partial.rename(merged)  # a folder with config.json is always complete
    return merged


def evaluate_run(run_dir: str | Path, config: TrainConfig) -> dict[str, Any]:
    """Base vs trained model of a training run (`mpo-data train` and `eval`); adds `answer_accuracy` and
    `hallucination` (as far as the config sets them) to RUN/eval.json and returns them."""
    import json

    from mpo_data.records.jsonl import atomic_write_bytes

    run_dir = Path(run_dir)
    results = evaluate_models(config.model.path, trained_model(run_dir, config.model.path), config.eval, run_dir)
    path = run_dir / "eval.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_bytes(path, json.dumps({**report, **results}, indent=2, ensure_ascii=False).encode() + b"\n")
    return results
