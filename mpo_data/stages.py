"""`mpo-data dropout-ntp` and `mpo-data correctness`: sampling with vLLM engines on Ray Data, into resumable shards.

The two stages share all the machinery (prompt reading, InternVL's item selection, resume bookkeeping,
Ray Data engine actors, atomic parts, progress, summary) and differ only in a small stage object: how an
item becomes a `GenerationRequest`, and how a completion becomes an output line (or a counted drop).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson
from tqdm import tqdm

from mpo_data import images as image_io
from mpo_data.engine import Completion, Engine, EngineConfig, GenerationRequest, SamplingConfig
from mpo_data.errors import InputError
from mpo_data.formats import PromptItem, Sample, image_list, strip_placeholders
from mpo_data.inputs import PromptReader
from mpo_data.prompts import PROMPT_TEMPLATES, user_prompt
from mpo_data.shards import ShardStore, missing_indices, quarantine_path, select_range, stage_dir


@dataclass
class StageConfig:
    """Settings shared by both sampling stages; flag names and meanings follow InternVL's scripts."""

    stage: ClassVar[str]  # also the prompt line schema it reads (mpo_data.formats.PROMPT_KINDS)
    own_settings: ClassVar[tuple[str, ...]] = ()  # stage fields that change what a sample is

    checkpoint: str = field(metadata={"help": "Model folder (HF layout) that generates the samples."})
    prompt_path: str = field(metadata={"help": "Prompt set: JSONL, Parquet or a saved HF dataset folder."})
    out_dir: str = field(default="out", metadata={"help": "Output root; samples go to OUT/samples/<stage>/<dataset>/."})
    dataset: str | None = field(default=None, metadata={"help": "Dataset name in paths and item ids (default: prompt file stem)."})
    image_root: str | None = field(default=None, metadata={"help": "Root of the image paths (default: the prompt file's folder)."})
    on_error: Literal["fail", "skip"] = field(
        default="fail", metadata={"help": "Bad prompt line: fail naming FILE:LINE, or skip it into OUT/quarantine/."}
    )
    num_return_sequences: int = field(default=1, metadata={"help": "Samples per item (the per-item quota a rerun tops up to)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=50, metadata={"help": "Top-k cut-off; 0 or -1 turns it off."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Most new tokens per sample."})
    sample_start_idx: int = field(default=0, metadata={"help": "First prompt row to use (InternVL semantics)."})
    sample_max_num: int | None = field(
        default=None, metadata={"help": "Most items; over it, rows are taken at an even stride across the file (as InternVL)."}
    )
    max_num: int | None = field(default=None, metadata={"help": "Most image tiles with dynamic resolution (InternVL models)."})
    dynamic: bool = field(default=False, metadata={"help": "Dynamic-resolution tiling (InternVL models)."})
    batch_size: int = field(default=8, metadata={"help": "Items per engine call; each finished batch becomes one part file."})
    tp: int = field(default=1, metadata={"help": "Tensor-parallel degree of each engine (GPUs per pipeline stage)."})
    pp: int = field(default=1, metadata={"help": "Pipeline-parallel degree of each engine."})
    num_engines: int = field(default=1, metadata={"help": "vLLM engine actors running at once (each takes tp x pp GPUs)."})
    address: str | None = field(
        default=None, metadata={"help": "Ray cluster to join ('auto' or HOST:PORT); default: start a private local Ray (no dashboard)."}
    )
    force: bool = field(default=False, metadata={"help": "Add samples even if OUT already holds samples drawn with other settings."})

    @property
    def dataset_name(self) -> str:
        return self.dataset or Path(self.prompt_path).stem

    @property
    def model_name(self) -> str:
        return os.path.basename(os.path.normpath(self.checkpoint))

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.checkpoint,
            tensor_parallel_size=self.tp,
            pipeline_parallel_size=self.pp,
            max_num=self.max_num,
            dynamic=self.dynamic,
        )

    def sampling_config(self, n: int | None = None) -> SamplingConfig:
        return SamplingConfig(
            n=self.num_return_sequences if n is None else n,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
        )

    def stage_settings(self) -> dict[str, Any]:
        """Settings that change what a sample is (what run.json guards)."""
        sampling = self.sampling_config().as_dict()
        del sampling["n"]  # the quota, not how a sample is drawn: raising it tops items up
        own = {name: getattr(self, name) for name in self.own_settings}
        return {"model": self.model_name, "max_num": self.max_num, "dynamic": self.dynamic, "sampling": sampling, **own}

    def check(self) -> None:
        """Refuse nonsense settings up front, before any reading or engine start."""
        positive = ("num_return_sequences", "max_new_tokens", "batch_size", "tp", "pp", "num_engines")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise InputError(f"need 0 < --top-p <= 1 and --temperature >= 0 (got {self.top_p}, {self.temperature})")
        if not Path(self.checkpoint).is_dir():
            raise InputError(f"{self.checkpoint}: no such model folder (--checkpoint)")


@dataclass
class DropoutNTPConfig(StageConfig):
    """DropoutNTP: the model continues the first `start_ratio` of `chosen` without the image -> `rejected`."""

    stage: ClassVar[str] = "dropout-ntp"
    own_settings: ClassVar[tuple[str, ...]] = ("start_ratio", "load_image")

    start_ratio: float = field(default=0.5, metadata={"help": "Share of the words of `chosen` kept as the prefix to continue."})
    load_image: bool = field(default=False, metadata={"help": "Show the image while continuing (default: without it, as DropoutNTP)."})

    def check(self) -> None:
        super().check()
        if not 0 <= self.start_ratio <= 1:
            raise InputError(f"--start-ratio must be within [0, 1], got {self.start_ratio}")


@dataclass
class CorrectnessConfig(StageConfig):
    """Correctness sampling: n chain-of-thought answers per item, judged against the ground truth later."""

    stage: ClassVar[str] = "correctness"
    own_settings: ClassVar[tuple[str, ...]] = ("prompt_version",)

    num_return_sequences: int = field(default=8, metadata={"help": "Samples per item (the per-item quota a rerun tops up to)."})
    prompt_version: Literal["en", "en_v2", "r1"] = field(
        default="en_v2", metadata={"help": "Answer-format template of mpo_data.prompts (the judge checks that format)."}
    )

    def check(self) -> None:
        super().check()
        if self.prompt_version not in PROMPT_TEMPLATES:
            raise InputError(f"--prompt-version must be one of {sorted(PROMPT_TEMPLATES)}, got {self.prompt_version!r}")


# ---- what differs between the stages: requests in, lines out ----


def normalize(text: str) -> str:
    """Whitespace-insensitive form of a text, for comparing continuations."""
    return " ".join(text.split())


def cut_prefix(chosen: str, start_ratio: float) -> tuple[str, str]:
    """(prefix, rest) with prefix + rest == chosen: the cut falls after the first int(words x ratio) words,
    so the prefix is chosen's own text byte for byte (newlines, list markup, double spaces kept) and ends
    on a word, and the rest starts with the whitespace that followed it."""
    ends = [m.end() for m in re.finditer(r"\S+", chosen)]
    keep = int(len(ends) * start_ratio)
    cut = ends[keep - 1] if keep else 0
    return chosen[:cut], chosen[cut:]


def join_continuation(prefix: str, continuation: str) -> str:
    """`rejected` text. The prefix ends on a word with no trailing space (a trailing space would make the
    model start on a lone-space token), so the continuation carries its own leading space, as decoded."""
    return prefix + continuation if prefix else continuation.lstrip()


def drop_reason(completion: Completion, rest: str) -> str | None:
    """Why a DropoutNTP continuation makes no usable `rejected`, or None if it does."""
    if not completion.text.strip():
        return "empty"
    if completion.finish_reason == "length":
        return "max_tokens"
    if normalize(completion.text) == normalize(rest):
        return "same_as_chosen"
    return None


class DropoutNTPStage:
    """Requests continue a prefix of `chosen`; continuations become `rejected` or counted drops."""

    def __init__(self, config: DropoutNTPConfig):
        self.config = config
        self.wants_images = config.load_image
        self.provenance = {
            "model": config.model_name,
            "stage": config.stage,
            "start_ratio": config.start_ratio,
            "load_image": config.load_image,
            "sampling": config.sampling_config().as_dict(),
        }

    def request(self, item: dict[str, Any], pil: list) -> GenerationRequest:
        prefix, _ = cut_prefix(item["chosen"], self.config.start_ratio)
        # without the image its placeholders go too: a VLM tokenizer reads `<image>` as an image token
        question = item["question"] if self.config.load_image else strip_placeholders(item["question"])
        # an empty prefix is a plain answer: continuing an empty assistant turn is template-dependent
        return GenerationRequest([{"role": "user", "content": question}], pil, prefix or None)

    def outcome(self, item: dict[str, Any], key: dict[str, Any], completion: Completion, prompt_tokens: int) -> tuple[dict, str | None]:
        prefix, rest = cut_prefix(item["chosen"], self.config.start_ratio)
        reason = drop_reason(completion, rest)
        if reason:
            return {**key, "reason": reason, "finish_reason": completion.finish_reason, "text": completion.text}, reason
        line = {
            **item,
            **key,
            "rejected": join_continuation(prefix, completion.text),
            "finish_reason": completion.finish_reason,
            "output_tokens": completion.output_tokens,
            "provenance": self.provenance,
        }
        return line, None


class CorrectnessStage:
    """Requests ask the templated question with the images; every sample is kept (the judge decides)."""

    def __init__(self, config: CorrectnessConfig):
        self.config = config
        self.wants_images = True
        self.sampling = config.sampling_config().as_dict()

    def user_text(self, item: dict[str, Any]) -> str:
        """The user turn exactly as sampled (stored in each sample as `prompt`)."""
        return user_prompt(item["question"], len(image_list(item.get("image"))), self.config.prompt_version)

    def request(self, item: dict[str, Any], pil: list) -> GenerationRequest:
        return GenerationRequest([{"role": "user", "content": self.user_text(item)}], pil)

    def outcome(self, item: dict[str, Any], key: dict[str, Any], completion: Completion, prompt_tokens: int) -> tuple[dict, str | None]:
        sample = Sample(
            item_id=key["item_id"],
            sample_index=key["sample_index"],
            item=item,
            prompt=self.user_text(item),
            response=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=prompt_tokens,
            output_tokens=completion.output_tokens,
            prompt_version=self.config.prompt_version,
            model=self.config.model_name,
            sampling=self.sampling,
        )
        return sample.to_dict(), None


def make_stage(config: StageConfig) -> DropoutNTPStage | CorrectnessStage:
    return DropoutNTPStage(config) if isinstance(config, DropoutNTPConfig) else CorrectnessStage(config)


# ---- the shared machinery: engine actors on Ray Data ----

OUTPUT_COLUMNS = ("record", "dropped", "output_tokens", "prompt_tokens")


class GenerateBatch:
    """Ray Data callable class: one vLLM engine per actor; work rows in, one row per sample out.

    Work and records travel as JSON strings: prompt lines carry arbitrary extra keys that Arrow could not
    give one schema. Images travel as paths and are decoded here, not shipped through the object store.
    """

    def __init__(self, config: StageConfig):
        self.config = config
        self.stage = make_stage(config)
        self.engine = Engine(config.engine_config())

    def _images(self, item: dict[str, Any]) -> list:
        if not self.stage.wants_images:
            return []
        return [image_io.load(self.config.image_root, rel) for rel in image_list(item.get("image"))]

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
        works = sorted((orjson.loads(w) for w in batch["work"]), key=lambda w: len(w["indices"]))
        for n, group in groupby(works, key=lambda w: len(w["indices"])):  # one engine call per quota gap
            group = list(group)
            requests = [self.stage.request(w["item"], self._images(w["item"])) for w in group]
            results = self.engine.generate(requests, self.config.sampling_config(n))
            for work, result in zip(group, results):
                for position, (index, completion) in enumerate(zip(work["indices"], result.completions)):
                    key = {"item_id": work["item_id"], "sample_index": index}
                    record, reason = self.stage.outcome(work["item"], key, completion, result.prompt_tokens)
                    out["record"].append(orjson.dumps(record).decode())
                    out["dropped"].append(reason or "")
                    out["output_tokens"].append(completion.output_tokens)
                    out["prompt_tokens"].append(result.prompt_tokens if position == 0 else 0)  # once per request
        return out


def _placement_group(devices: int, pipeline: bool) -> dict[str, Any]:
    """One bundle per GPU for an engine's vLLM workers (Ray's recipe for tp x pp > 1 under Ray Data)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # tensor parallel wants one node; pipeline stages may span nodes
    group = ray.util.placement_group([{"GPU": 1, "CPU": 1}] * devices, strategy="PACK" if pipeline else "STRICT_PACK")
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def actor_resources(config: StageConfig, cluster_gpus: float) -> dict[str, Any]:
    """map_batches resources of one engine actor: tp x pp GPUs, or one CPU on a CPU-only cluster."""
    devices = config.tp * config.pp
    if not cluster_gpus:
        return {"num_cpus": 1}
    if devices == 1:
        return {"num_gpus": 1}
    return {"num_gpus": 0, "ray_remote_args_fn": partial(_placement_group, devices, config.pp > 1)}


LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect_ray(address: str | None) -> bool:
    """Join `address`, or start a private local Ray without dashboard, on loopback; True if we started one."""
    if not address:
        # With this switch off, Ray takes 127.0.0.1 as the node address instead of the host's routable
        # one, so a private instance never listens on or talks to a network address. Read at import.
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return True


@dataclass
class Tally:
    """What this run generated, for the progress bar and the summary."""

    items: set = field(default_factory=set)  # item_ids that got samples this run
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    output_tokens: int = 0
    prompt_tokens: int = 0
    parts: int = 0
    first_part_s: float | None = None  # engine start + first batch: the fixed cost of a run
    first_part_tokens: int = 0
    last_part_s: float = 0.0

    def steady_tokens_per_s(self) -> float | None:
        """Output tokens/s after the first part (sampling without engine start-up); None until 1 s of it."""
        span = self.last_part_s - (self.first_part_s or 0.0)
        return round((self.output_tokens - self.first_part_tokens) / span, 2) if span >= 1.0 else None


def generate(config: StageConfig, work: list[dict[str, Any]], store: ShardStore) -> Tally:
    """Run `work` through engine actors, writing one atomic part per finished batch as it arrives."""
    import ray

    tally = Tally()
    started_ray = connect_ray(config.address)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours is the tqdm bar below
        ds = ray.data.from_items([{"work": orjson.dumps(w).decode()} for w in work])
        ds = ds.map_batches(
            GenerateBatch,
            fn_constructor_kwargs={"config": config},
            batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=config.num_engines),
            **actor_resources(config, ray.cluster_resources().get("GPU", 0)),
        )
        total = sum(len(w["indices"]) for w in work)
        with tqdm(total=total, unit="sample", desc=f"{config.stage} {config.dataset_name}", file=sys.stderr) as bar:
            began = time.monotonic()
            for batch in ds.iter_batches(batch_size=None, batch_format="default"):
                _write_batch(batch, store, tally)
                tally.last_part_s = time.monotonic() - began
                if tally.first_part_s is None:
                    tally.first_part_s, tally.first_part_tokens = tally.last_part_s, tally.output_tokens
                bar.update(len(batch["record"]))
                bar.set_postfix(items=len(tally.items), kept=tally.kept, dropped=sum(tally.dropped.values()), tok_s=tally.steady_tokens_per_s() or "-")
    finally:
        if started_ray:
            ray.shutdown()
    return tally


def _write_batch(batch: dict[str, Any], store: ShardStore, tally: Tally) -> None:
    kept, dropped = [], []
    for record, reason in zip(batch["record"], batch["dropped"]):
        row = orjson.loads(record)
        (dropped if reason else kept).append(row)
        tally.items.add(row["item_id"])
        if reason:
            tally.dropped[str(reason)] += 1
    store.write_part(kept, dropped)
    tally.parts += 1
    tally.kept += len(kept)
    tally.output_tokens += int(sum(batch["output_tokens"]))
    tally.prompt_tokens += int(sum(batch["prompt_tokens"]))


# ---- the stage run: read, select, resume, generate, summarise ----


def _resolved(config: StageConfig) -> StageConfig:
    """Absolute model and image paths: Ray workers need not share the driver's working directory."""
    image_root = config.image_root or str(Path(config.prompt_path).parent)
    return replace(config, checkpoint=os.path.abspath(config.checkpoint), image_root=os.path.abspath(image_root))


def read_items(config: StageConfig, reader: PromptReader) -> tuple[list[PromptItem], int]:
    """The selected valid items, first occurrence of each item_id, and how many repeats were skipped."""
    rows = [(reader.read - 1, item) for item in reader]  # reader.read counts the row just yielded
    wanted = set(select_range(reader.read, config.sample_start_idx, config.sample_max_num))
    items: dict[str, PromptItem] = {}
    repeats = 0
    for position, item in rows:
        if position in wanted:
            repeats += item.item_id in items
            items.setdefault(item.item_id, item)
    return list(items.values()), repeats


def plan_work(items: list[PromptItem], done: dict[str, set[int]], quota: int) -> list[dict[str, Any]]:
    """One work row per item that lacks samples, naming exactly the missing sample indices."""
    work = []
    for item in items:
        indices = missing_indices(done.get(item.item_id, set()), quota)
        if indices:
            work.append({"item_id": item.item_id, "item": item.to_dict(), "indices": indices})
    return work


def run_stage(config: StageConfig) -> dict[str, Any]:
    """Sample one prompt set into `<out>/samples/<stage>/<dataset>/`, resuming; returns the summary."""
    began = time.monotonic()
    config.check()
    config = _resolved(config)
    dataset = config.dataset_name
    store = ShardStore(stage_dir(config.out_dir, config.stage, dataset))
    store.check_settings(config.stage_settings(), config.force)
    quarantine = quarantine_path(config.out_dir, config.stage, dataset) if config.on_error == "skip" else None
    images_dir = Path(config.out_dir) / "images" / dataset  # where images embedded in the prompt source go
    reader = PromptReader(config.prompt_path, config.stage, dataset, config.image_root, config.on_error, quarantine, images_dir)
    items, repeats = read_items(config, reader)
    config = replace(config, image_root=str(reader.image_root))  # images_dir for a source with embedded images
    done = store.done()
    work = plan_work(items, done, config.num_return_sequences)
    generated_from = time.monotonic()
    tally = generate(config, work, store) if work else Tally()
    generation_s = time.monotonic() - generated_from
    summary = {
        "stage": config.stage,
        "dataset": dataset,
        "model": config.model_name,
        "prompt_path": str(config.prompt_path),
        "images_dir": str(images_dir) if Path(reader.image_root) == images_dir else None,  # embedded images went here
        "rows_read": reader.read,
        "items_selected": len(items),
        "repeated_items_skipped": repeats,
        "quota_per_item": config.num_return_sequences,
        "samples_already_done": sum(len(done.get(i.item_id, ())) for i in items),
        "items_sampled": len(tally.items),
        "samples_requested": sum(len(w["indices"]) for w in work),
        "samples_out": tally.kept,
        "dropped": dict(tally.dropped),
        "quarantined": {"total": reader.quarantine.total, "reasons": dict(reader.quarantine.counts), "file": str(quarantine) if quarantine else None},
        "parts_written": tally.parts,
        "prompt_tokens": tally.prompt_tokens,
        "output_tokens": tally.output_tokens,
        "generation_s": round(generation_s, 2),
        "output_tokens_per_s": round(tally.output_tokens / generation_s, 2) if tally.output_tokens else 0.0,
        "first_part_s": round(tally.first_part_s, 2) if tally.first_part_s is not None else None,
        "steady_output_tokens_per_s": tally.steady_tokens_per_s(),
        "wall_s": round(time.monotonic() - began, 2),
        "totals": store.totals(),
        "settings": config.stage_settings(),
    }
    summary["summary_file"] = str(store.write_summary(summary))
    return summary


# ---- command line ----


def _main(args: Any) -> int:
    cls = args.config_class
    summary = run_stage(cls(**{f.name: getattr(args, f.name) for f in fields(cls)}))
    dropped = ", ".join(f"{n} {reason}" for reason, n in summary["dropped"].items()) or "none"
    print(
        f"{summary['stage']} {summary['dataset']}: {summary['samples_out']} sample(s) written, dropped: {dropped}, "
        f"{summary['samples_already_done']} already there, {summary['quarantined']['total']} line(s) quarantined; "
        f"{summary['output_tokens_per_s']} tok/s; summary: {summary['summary_file']}",
        file=sys.stderr,
    )
    return 0


def add_cli(sub: Any) -> None:
    from transformers import HfArgumentParser  # dataclass fields + help metadata -> flags (InternVL's names)

    helps = {
        DropoutNTPConfig: "DropoutNTP: continue half of `chosen` without the image -> rejected (resumable, on Ray)",
        CorrectnessConfig: "correctness sampling: n reasoning answers per item (resumable, on Ray)",
    }
    for cls, help_text in helps.items():
        flags = HfArgumentParser(cls, add_help=False)
        p = sub.add_parser(cls.stage, parents=[flags], help=help_text, description=cls.__doc__)
        p.set_defaults(func=_main, config_class=cls)
