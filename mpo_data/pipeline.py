"""`mpo-data run PIPELINE.yaml`: sampling stages -> pairs -> meta.json, each step resumable.

One YAML names the model settings shared by every dataset (`defaults`), the datasets (stage, prompt
file, stage settings, mixture weight), the pair settings and the meta target. Everything underneath
is the stages' own dataclasses, so a key the stages do not know is an error naming it and the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from mpo_data.config import apply_overrides, at, build, canonical, load_yaml, merge, unknown_keys
from mpo_data.errors import InputError
from mpo_data.preference.meta import MetaConfig, build_meta, count_pairs
from mpo_data.preference.pairs import PairsConfig, build_pairs
from mpo_data.records.formats import write_meta
from mpo_data.records.inputs import validate_file
from mpo_data.records.jsonl import atomic_write_bytes, writable_problem
from mpo_data.records.shards import ShardStore, samples_root, shard_folders
from mpo_data.runlock import holds
from mpo_data.sampling.stage_config import STAGE_CONFIGS, StageConfig
from mpo_data.sampling.stages import check_context, connect_ray, run_stage


@dataclass
class DatasetSpec:
    """One prompt set and how it is sampled."""

    name: str = field(metadata={"help": "Dataset name: sample folder, pair file prefix, meta entry prefix."})
    stage: str = field(metadata={"help": "Which sampling stage builds its pairs.", "choices": tuple(STAGE_CONFIGS)})
    settings: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Stage settings (fields of CorrectnessConfig/DropoutNTPConfig, engine: and sampling: "
            "sections included), merged over `defaults` section by section."
        },
    )
    weight: float = field(
        default=1.0, metadata={"help": "Relative share in the mixture when meta.target_total is set."}
    )


@dataclass
class PipelineConfig:
    out_dir: str = field(metadata={"help": "Run folder: samples/, pairs/, quarantine/, pipeline.json."})
    datasets: list[DatasetSpec] = field(metadata={"help": "Prompt sets, sampled in this order."})
    meta: MetaConfig = field(
        metadata={"help": "The meta.json mixture (`mpo-data meta` settings; pairs_dir and image_root are the run's)."}
    )
    pairs: PairsConfig = field(
        metadata={"help": "Pair building (`mpo-data pairs` settings; data_dir and save_dir are the run's)."}
    )
    defaults: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Stage settings shared by every dataset (engine: {model: ..., tensor_parallel_size: 4}, ...)."
        },
    )
    address: str | None = field(
        default=None, metadata={"help": "Ray cluster to join; None: a local Ray on 127.0.0.1."}
    )


def _set_by_pipeline(data: dict[str, Any], section: str, values: dict[str, Any], source: str) -> None:
    """Fill the keys of `section` that the run folder decides; a YAML that sets one is refused."""
    given = data.setdefault(section, {})
    if not isinstance(given, dict):
        raise InputError(f"{source}: {section}: expected a mapping, got {type(given).__name__}")
    clash = sorted(set(given) & set(values))
    if clash:
        raise InputError(f"{source}: {section}: '{clash[0]}' is set by the pipeline (from out_dir), not in the YAML")
    given.update(values)


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> tuple[PipelineConfig, list[StageConfig]]:
    """The pipeline and each dataset's stage config, all checked before anything runs."""
    source = str(path)
    data = apply_overrides(load_yaml(path), list(overrides))
    out = Path(str(data.get("out_dir", "")))
    _set_by_pipeline(data, "pairs", {"data_dir": str(samples_root(out)), "save_dir": str(out / "pairs")}, source)
    _set_by_pipeline(data, "meta", {"pairs_dir": str(out / "pairs"), "image_root": "."}, source)
    config = build(PipelineConfig, data, source)
    names = [d.name for d in config.datasets]
    if len(set(names)) != len(names):
        raise InputError(f"{source}: datasets: names must be unique, got {names}")
    # every unknown key at once: the shared defaults' once, then each dataset's own
    problems = unknown_keys(
        StageConfig, config.defaults, source, "defaults", tuple({STAGE_CONFIGS[d.stage]: 0 for d in config.datasets})
    )
    for i, spec in enumerate(config.datasets):
        problems += unknown_keys(STAGE_CONFIGS[spec.stage], spec.settings, source, f"datasets[{i}].settings")
    if problems:
        raise InputError("\n".join(problems))
    stages = []
    for i, spec in enumerate(config.datasets):  # every dataset's problems, not only the first one's
        cls, fixed = (
            STAGE_CONFIGS[spec.stage],
            {"out_dir": config.out_dir, "dataset": spec.name, "address": config.address},
        )
        try:
            given = merge(
                canonical(cls, config.defaults, source, "defaults"),
                canonical(cls, spec.settings, source, f"datasets[{i}].settings"),
            )
            clash = sorted(set(given) & set(fixed))
            if clash:
                raise InputError(
                    f"{at(source, given, clash[0])}: datasets[{i}]: '{clash[0]}' is set by the pipeline, not per dataset"
                )
            stages.append(build(cls, merge(given, fixed), source, f"datasets[{i}].settings"))
        except InputError as e:
            problems.append(str(e))
    if problems:
        raise InputError("\n".join(problems))
    return config, stages


MAX_PROBLEMS_PER_FILE = 20  # a prompt file bad throughout is summarised, `mpo-data validate` lists every line


def input_problems(config: PipelineConfig, stages: list[StageConfig]) -> list[str]:
    """Everything a run would stop on, found before its first engine starts: the output folder, each
    dataset's settings and model folder, its prompt file (every bad line, unless on_error skips them) and
    images. The same checks the stages and `mpo-data validate` run, only all of them at once."""
    problems = [f"out_dir: {p}" for p in [writable_problem(config.out_dir)] if p]
    for i, stage in enumerate(stages):
        label = f"datasets[{i}] ({stage.dataset})"
        try:
            stage.check()
            check_context(stage)
        except InputError as e:
            problems.append(f"{label}: {e}")
        image_root = stage.image_root or Path(stage.prompt_path).parent
        if not Path(image_root).is_dir():
            problems.append(f"{label}: image_root {image_root}: no such folder")
            continue
        try:
            rows, bad = validate_file(
                stage.prompt_path,
                stage.stage,
                image_root,
                verify_images=False,
                images_dir=Path(config.out_dir) / "images" / stage.dataset_name,
            )
        except InputError as e:
            problems.append(f"{label}: {e}")
            continue
        if stage.on_error == "fail" and bad:
            more = len(bad) - MAX_PROBLEMS_PER_FILE
            problems += bad[:MAX_PROBLEMS_PER_FILE] + (
                [
                    f"... and {more} more in {stage.prompt_path} "
                    f"(mpo-data validate {stage.prompt_path} --kind {stage.stage})"
                ]
                if more > 0
                else []
            )
            problems.append(
                f"{label}: {len(bad)} bad line(s) in {stage.prompt_path} (on_error: skip quarantines them)"
            )
        elif rows == len(bad) and rows:
            problems.append(f"{label}: every one of the {rows} line(s) of {stage.prompt_path} is bad")
        elif not rows:
            problems.append(f"{label}: {stage.prompt_path} holds no rows")
    return problems


def _fingerprint(out: Path, settings: Any) -> str:
    """Changes whenever a sample part or the pair settings change, so unchanged pairs are not rebuilt."""
    digest = hashlib.sha1(repr(settings).encode())
    for part in (p for _, _, folder in shard_folders(out) for p in ShardStore(folder).part_paths()):
        stat = part.stat()
        digest.update(f"{part}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def owner(pair_name: str, stages: list):
    """The stage config whose dataset a pair file belongs to (longest dataset-name prefix)."""
    return max((s for s in stages if pair_name.startswith(f"{s.dataset}_")), key=lambda s: len(s.dataset))


@holds("out_dir")
def run_pipeline(config: PipelineConfig, stages: list) -> dict[str, Any]:
    """Stages, pairs, meta in order; returns what pipeline.json records."""
    out = Path(config.out_dir)
    record_path = out / "pipeline.json"
    record = orjson.loads(record_path.read_bytes()) if record_path.exists() else {}
    problems = input_problems(config, stages)
    if problems:
        raise InputError(
            "\n".join(problems) + f"\n{len(problems)} problem(s) found before any engine started; nothing was run"
        )
    connect_ray(config.address)
    summaries = {f"{s.stage}/{s.dataset}": run_stage(s) for s in stages}

    fingerprint = _fingerprint(out, config.pairs)
    if record.get("pairs_fingerprint") != fingerprint or not (out / "pairs" / "pairs_summary.json").exists():
        build_pairs(config.pairs)
        pairs_rebuilt = True
    else:
        pairs_rebuilt = False

    weights = {spec.name: spec.weight for spec in config.datasets}
    files = sorted((out / "pairs").glob("*.jsonl"))
    if not files and not config.meta.base:
        raise InputError(f"{out / 'pairs'}: the samples gave no pairs (see {out / 'pairs' / 'pairs_summary.json'})")
    # a dataset's weight scales the default share of each of its files (its rows); meta.weights names entries
    shares = {f.stem: count_pairs(f) * weights[owner(f.stem, stages).dataset] for f in files}
    entries = build_meta(replace(config.meta, weights={**shares, **config.meta.weights}))
    for entry in entries.values():  # NAME and its NAME_rest entry share the file, hence the root
        if Path(entry.annotation) in files:
            stage = owner(Path(entry.annotation).stem, stages)
            extracted = summaries[f"{stage.stage}/{stage.dataset}"]["images_dir"]  # images embedded in the source
            entry.root = extracted or str(stage.image_root or Path(stage.prompt_path).parent)
    write_meta(config.meta.out, entries)

    record = {
        "meta": str(config.meta.out),
        "pairs_dir": str(out / "pairs"),
        "pairs_fingerprint": fingerprint,
        "pairs_rebuilt": pairs_rebuilt,
        "stages": {k: v["summary_file"] for k, v in summaries.items()},
    }
    atomic_write_bytes(record_path, orjson.dumps(record, option=orjson.OPT_INDENT_2) + b"\n")
    return record
