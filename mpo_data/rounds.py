"""`mpo-data rounds`: sample -> pairs -> meta -> train, then sample again with the trained model, K times.

Iterative RPO (arXiv 2404.19733) repeats the loop with the model it just trained; so does this, on the
pipeline and training YAMLs `mpo-data run` and `mpo-data train` take. Round k lives in OUT/round-k/ with the
pipeline's own layout (samples/, pairs/, pipeline.json, meta.json) and the training run (train/). Round 1
samples with the training YAML's model.path (the base); round k > 1 samples the same prompt sets with round
k-1's model merged into full weights (train/merged: vLLM loads it like any model folder). Datasets sampled
by another model (a VLM beside a text model) keep their own. Round k trains from the base or from round
k-1's model (`init`).

Resume: a round whose round.json exists is done and skipped; a round without one resumes through the
pipeline's own resume (stages, pairs fingerprint), a finished training run (train/summary.json) is not
redone, and the merge and the held-out answers are cached in their folders.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import orjson

from mpo_data.errors import InputError
from mpo_data.records.jsonl import atomic_write_bytes, read_jsonl, write_jsonl
from mpo_data.runlock import holds

RECORD = "round.json"  # written last in a round folder: the round is done


@dataclass
class RoundsConfig:
    """`mpo-data rounds`: K rounds of sampling and training, each sampling with the previous round's model."""

    pipeline: str = field(
        metadata={"help": "Pipeline YAML (`mpo-data run`); its out_dir and meta.out are set per round."}
    )
    train: str = field(
        metadata={
            "help": "Training YAML (`mpo-data train`); its model.path is the base, output_dir and data.meta are set per round."
        }
    )
    out_dir: str = field(
        default="out/rounds",
        metadata={"help": "Rounds folder: round-1/, round-2/, ..., base/ (the base's held-out answers), rounds.json."},
    )
    rounds: int = field(
        default=2,
        metadata={"help": "How many rounds (K); a rerun with a larger K adds rounds after the finished ones."},
    )
    init: Literal["base", "previous"] = field(
        default="previous",
        metadata={
            "help": "What round k > 1 trains from: previous (round k-1's merged model, also the DPO reference, as "
            "Iterative RPO) or base (the base model every round, on pairs sampled by round k-1's model)."
        },
    )
    pipeline_set: list[str] = field(
        default_factory=list,
        metadata={"help": "KEY=VALUE override of the pipeline YAML (repeat), as `mpo-data run` takes."},
    )
    train_set: list[str] = field(
        default_factory=list,
        metadata={"help": "KEY=VALUE override of the training YAML (repeat), as `mpo-data train` takes."},
    )

    def round_dir(self, k: int) -> Path:
        return Path(self.out_dir) / f"round-{k}"


def load_round(config: RoundsConfig, k: int, previous: dict[str, Any] | None):
    """Round k's pipeline, stage configs and training config, given round k-1's record (None for round 1)."""
    from mpo_data.pipeline import load_pipeline
    from mpo_data.train.config import load

    folder = config.round_dir(k)
    init = (previous["model"] if config.init == "previous" else previous["base"]) if previous else None
    train_config = load(
        config.train,
        [
            *config.train_set,
            f"output_dir={folder / 'train'}",
            f"data.meta={folder / 'meta.json'}",
            *([f"model.path={init}"] if init else []),
        ],
    )
    pipeline, stages = load_pipeline(
        config.pipeline, [*config.pipeline_set, f"out_dir={folder}", f"meta.out={folder / 'meta.json'}"]
    )
    if previous:
        stages = [swap_model(s, previous["base"], previous["model"]) for s in stages]
    return pipeline, stages, train_config


def swap_model(stage, base: str, model: str):
    """The stage config sampling with `model` where it sampled with `base`; other models stay."""
    if os.path.realpath(stage.engine.model) != os.path.realpath(base):
        return stage
    return replace(stage, engine=replace(stage.engine, model=str(model)))


def check_settings(config: RoundsConfig) -> dict[str, Any]:
    """Record the settings in OUT/rounds.json; a rerun with others (other rounds mixed in) is refused. K may grow."""
    path = Path(config.out_dir) / "rounds.json"
    settings = {k: v for k, v in asdict(config).items() if k not in ("out_dir", "rounds")}
    if path.is_file():
        recorded = orjson.loads(path.read_bytes())
        diff = sorted(k for k in settings if recorded.get(k) != settings[k])
        if diff:
            raise InputError(
                f"{path}: these rounds were run with other settings ({', '.join(f'{k}: {recorded.get(k)!r}' for k in diff)}); "
                "use another --out-dir"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, orjson.dumps(settings, option=orjson.OPT_INDENT_2) + b"\n")
    return settings


def held_out(model: str | Path, args, folder: Path) -> list[bool]:
    """`model`'s verdicts on the held-out questions, answered and judged as `mpo-data eval` does; kept in
    FOLDER/answers.jsonl and read back from there on a rerun."""
    from mpo_data.train.answer_accuracy import answer, judge, read_questions

    path = folder / "answers.jsonl"
    if path.is_file():
        return [row["correct"] for _, row in read_jsonl(path)]
    items = read_questions(args.questions, args.max_questions)
    responses = answer(model, items, args, Path(args.questions).parent)
    verdicts = judge(items, responses, args.prompt_version)
    write_jsonl(
        path,
        (
            {
                "question": i.question,
                "answer": i.answer,
                "source": i.source,
                "model": str(model),
                "response": r,
                "correct": v,
            }
            for i, r, v in zip(items, responses, verdicts)
        ),
    )
    return verdicts


def disconnect_ray() -> None:
    """Leave the Ray the pipeline joined or started, so that training and vLLM get its memory."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def run_round(
    config: RoundsConfig, k: int, previous: dict[str, Any] | None, base_verdicts: list[bool] | None
) -> dict[str, Any]:
    """One round: the pipeline sampled with the previous round's model, training, merge, held-out answers."""
    from mpo_data.pipeline import run_pipeline
    from mpo_data.train.answer_accuracy import summarize, trained_model
    from mpo_data.train.recipe import train

    folder = config.round_dir(k)
    if (folder / RECORD).is_file():
        print(f"round {k}: done ({folder / RECORD}), skipped", file=sys.stderr)
        return orjson.loads((folder / RECORD).read_bytes())
    began = time.monotonic()
    pipeline, stages, train_config = load_round(config, k, previous)
    print(
        f"round {k}/{config.rounds}: sampling with {previous['model'] if previous else train_config.model.path}",
        file=sys.stderr,
    )
    run_pipeline(pipeline, stages)
    disconnect_ray()
    run_dir = Path(train_config.output_dir)
    if not (run_dir / "summary.json").is_file():  # written at the end of a training run
        print(f"round {k}/{config.rounds}: training from {train_config.model.path}", file=sys.stderr)
        train(train_config)
    model = trained_model(run_dir, train_config.model.path)
    answers = train_config.eval.answers
    record = {
        "round": k,
        "base": previous["base"] if previous else train_config.model.path,
        "sampled_with": {s.dataset: s.engine.model for s in stages},
        "trained_from": train_config.model.path,
        "run_dir": str(run_dir),
        "model": str(model),
        "meta": str(pipeline.meta.out),
        "answer_accuracy": summarize(base_verdicts, held_out(model, answers, folder)) if answers.questions else None,
    }
    record["wall_s"] = round(
        time.monotonic() - began, 1
    )  # this run's time on the round (a resumed one: its last run's)
    atomic_write_bytes(folder / RECORD, orjson.dumps(record, option=orjson.OPT_INDENT_2) + b"\n")
    return record


@holds("out_dir")
def run_rounds(config: RoundsConfig) -> list[dict[str, Any]]:
    """All K rounds in order, finished ones skipped; returns each round's record (round.json)."""
    if config.rounds < 1:
        raise InputError(f"--rounds must be >= 1, got {config.rounds}")
    _, stages, train_config = load_round(config, 1, None)  # every setting checked before anything runs
    base = os.path.realpath(train_config.model.path)
    if not any(os.path.realpath(s.engine.model) == base for s in stages):
        raise InputError(
            f"{config.pipeline}: no dataset samples with {config.train}'s model.path ({train_config.model.path}): "
            "later rounds would not sample with the trained model"
        )
    answers = train_config.eval.answers
    if answers.questions and not Path(answers.questions).is_file():
        raise InputError(f"{config.train}: eval.answers.questions: {answers.questions}: no such file")
    check_settings(config)
    base_verdicts = (
        held_out(train_config.model.path, answers, Path(config.out_dir) / "base") if answers.questions else None
    )
    records: list[dict[str, Any]] = []
    for k in range(1, config.rounds + 1):
        records.append(run_round(config, k, records[-1] if records else None, base_verdicts))
    return records


def table(records: list[dict[str, Any]]) -> str:
    """Round, model, held-out accuracy with its Wilson interval, and the paired difference to the base."""
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    ci = lambda pair: f"[{pct(pair[0])}, {pct(pair[1])}]"  # noqa: E731
    first = records[0]["answer_accuracy"]
    rows = [("round", "model", "held-out accuracy", "vs base (paired)")]
    if first:
        rows.append(("0", records[0]["base"], f"{pct(first['before'])} {ci(first['before_ci'])}", ""))
    for r in records:
        acc = r["answer_accuracy"]
        if acc:
            diff = f"{100 * (acc['after'] - acc['before']):+.1f} points {ci(acc['diff_ci'])}"
            rows.append((str(r["round"]), r["model"], f"{pct(acc['after'])} {ci(acc['after_ci'])}", diff))
        else:
            rows.append((str(r["round"]), r["model"], "- (no eval.answers.questions)", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    n = f" on {first['questions']} held-out questions" if first else ""
    return f"rounds{n}:\n" + "\n".join(lines)
