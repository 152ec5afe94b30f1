"""`mpo-data run PIPELINE.yaml`: sampling stages -> pairs -> meta.json, each step resumable.

One YAML names the model settings shared by every dataset (`defaults`), the datasets (stage, prompt
file, stage settings, mixture weight), the pair settings and the meta target. Everything underneath
is the stages' own dataclasses, so a key the stages do not know is an error naming it and the file.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from mpo_data.config import apply_overrides, build, load_yaml
from mpo_data.errors import InputError
from mpo_data.formats import write_meta
from mpo_data.jsonl import atomic_write_bytes
from mpo_data.judge import JudgeConfig
from mpo_data.meta import MetaConfig, build_meta, count_pairs
from mpo_data.pairs import PairsConfig, build_pairs
from mpo_data.stages import CorrectnessConfig, DropoutNTPConfig, connect_ray, run_stage

STAGES = {"correctness": CorrectnessConfig, "dropout-ntp": DropoutNTPConfig}


@dataclass
class DatasetSpec:
    """One prompt set and how it is sampled."""

    name: str = field(metadata={"help": "Dataset name: sample folder, pair file prefix, meta entry prefix."})
    stage: Literal["correctness", "dropout-ntp"] = field(metadata={"help": "Which sampling stage builds its pairs."})
    settings: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Stage settings (fields of CorrectnessConfig/DropoutNTPConfig), over `defaults`."}
    )
    weight: float = field(default=1.0, metadata={"help": "Relative share in the mixture when meta.target_total is set."})


@dataclass
class PairsSection:
    num_pairs_per_key: int = field(default=15, metadata={"help": "At most this many pairs per item and rule."})
    max_lines: int = field(default=1_200_000, metadata={"help": "Lines read per dataset at most."})
    answer_fix: bool = field(default=False, metadata={"help": "Rewrite the chosen's final answer to the ground truth."})
    seed: int = field(default=0, metadata={"help": "Seed of pair sampling."})
    on_error: Literal["fail", "skip"] = field(
        default="fail", metadata={"help": "Bad sample lines: fail naming FILE:LINE, or skip to pairs/quarantine/."}
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "Matching modes, workers, timeout."})


@dataclass
class MetaSection:
    out: str = field(metadata={"help": "meta.json to write (e.g. meta/NAME.json)."})
    target_total: int | None = field(default=None, metadata={"help": "Active rows of the whole mixture (None: every row once)."})
    base: str | None = field(default=None, metadata={"help": "Existing meta.json (e.g. MMPR's) the new entries join."})
    max_dynamic_patch: int = field(default=12, metadata={"help": "InternVL's max tiles per image."})


@dataclass
class PipelineConfig:
    out_dir: str = field(metadata={"help": "Run folder: samples/, pairs/, quarantine/, pipeline.json."})
    datasets: list[DatasetSpec] = field(metadata={"help": "Prompt sets, sampled in this order."})
    meta: MetaSection = field(metadata={"help": "Where meta.json goes and its target size."})
    defaults: dict[str, Any] = field(default_factory=dict, metadata={"help": "Stage settings shared by every dataset (checkpoint, tp, ...)."})
    pairs: PairsSection = field(default_factory=PairsSection, metadata={"help": "Pair building settings."})
    address: str | None = field(default=None, metadata={"help": "Ray cluster to join; None: a local Ray on 127.0.0.1."})


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> tuple[PipelineConfig, list]:
    """The pipeline and each dataset's stage config, all checked before anything runs."""
    source = str(path)
    config = build(PipelineConfig, apply_overrides(load_yaml(path), list(overrides)), source)
    names = [d.name for d in config.datasets]
    if len(set(names)) != len(names):
        raise InputError(f"{source}: datasets: names must be unique, got {names}")
    stages = []
    for i, spec in enumerate(config.datasets):
        given = {**config.defaults, **spec.settings}
        fixed = {"out_dir": config.out_dir, "dataset": spec.name, "address": config.address}
        clash = sorted(set(given) & set(fixed))
        if clash:
            raise InputError(f"{source}: datasets[{i}]: '{clash[0]}' is set by the pipeline, not per dataset")
        stages.append(build(STAGES[spec.stage], {**given, **fixed}, source, f"datasets[{i}].settings"))
    return config, stages


def _fingerprint(folder: Path, settings: Any) -> str:
    """Changes whenever a sample part or the pair settings change, so unchanged pairs are not rebuilt."""
    digest = hashlib.sha1(repr(settings).encode())
    for part in sorted([*folder.glob("*/*/part-*.jsonl"), *folder.glob("*/*/g[0-9]*/part-*.jsonl")]):
        stat = part.stat()
        digest.update(f"{part}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def owner(pair_name: str, stages: list):
    """The stage config whose dataset a pair file belongs to (longest dataset-name prefix)."""
    return max((s for s in stages if pair_name.startswith(f"{s.dataset}_")), key=lambda s: len(s.dataset))


def run_pipeline(config: PipelineConfig, stages: list) -> dict[str, Any]:
    """Stages, pairs, meta in order; returns what pipeline.json records."""
    out = Path(config.out_dir)
    record_path = out / "pipeline.json"
    record = orjson.loads(record_path.read_bytes()) if record_path.exists() else {}
    connect_ray(config.address)
    summaries = {f"{s.stage}/{s.dataset}": run_stage(s) for s in stages}

    section = config.pairs
    fingerprint = _fingerprint(out / "samples", section)
    if record.get("pairs_fingerprint") != fingerprint or not (out / "pairs" / "pairs_summary.json").exists():
        build_pairs(PairsConfig(
            data_dir=out / "samples", save_dir=out / "pairs", num_pairs_per_key=section.num_pairs_per_key,
            max_lines=section.max_lines, answer_fix=section.answer_fix, seed=section.seed, on_error=section.on_error,
            judge=section.judge,
        ))
        pairs_rebuilt = True
    else:
        pairs_rebuilt = False

    weights = {spec.name: spec.weight for spec in config.datasets}
    files = sorted((out / "pairs").glob("*.jsonl"))
    if not files and not config.meta.base:
        raise InputError(f"{out / 'pairs'}: the samples gave no pairs (see {out / 'pairs' / 'pairs_summary.json'})")
    entries = build_meta(MetaConfig(
        pairs_dir=out / "pairs", image_root=".", out=Path(config.meta.out), target_total=config.meta.target_total,
        # a dataset's weight scales the default share of each of its files (its rows)
        weights={f.stem: count_pairs(f) * weights[owner(f.stem, stages).dataset] for f in files},
        base=Path(config.meta.base) if config.meta.base else None, max_dynamic_patch=config.meta.max_dynamic_patch,
    ))
    for f in files:
        stage = owner(f.stem, stages)
        entries[f.stem].root = str(stage.image_root or Path(stage.prompt_path).parent)
    write_meta(config.meta.out, entries)

    record = {
        "meta": config.meta.out,
        "pairs_dir": str(out / "pairs"),
        "pairs_fingerprint": fingerprint,
        "pairs_rebuilt": pairs_rebuilt,
        "stages": {k: v["summary_file"] for k, v in summaries.items()},
    }
    atomic_write_bytes(record_path, orjson.dumps(record, option=orjson.OPT_INDENT_2) + b"\n")
    return record


def _main(args) -> int:
    config, stages = load_pipeline(args.config, args.overrides)
    if args.address:
        config.address = args.address
        for stage in stages:
            stage.address = args.address
    record = run_pipeline(config, stages)
    print(f"pairs: {record['pairs_dir']}\nmeta:  {record['meta']}\nreport: mpo-data report {config.out_dir}", file=sys.stderr)
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("run", help="run a pipeline YAML: sampling stages -> pairs -> meta.json (resumable)")
    p.add_argument("config", help="pipeline YAML, e.g. pipelines/demo.yaml")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the YAML, e.g. out_dir=out/x")
    p.add_argument("--address", default=None, help="Ray cluster to join ('auto' or HOST:PORT)")
    p.set_defaults(func=_main)
