"""`mpo-data dropout-ntp` and `mpo-data correctness`: sampling with vLLM engines on Ray Data, into resumable shards.

The two stages share all the machinery (prompt reading, InternVL's item selection, resume bookkeeping,
Ray Data engine actors, atomic parts, progress, summary) and differ only in a small stage object: how an
item becomes a `GenerationRequest`, and how a completion becomes an output line (or a counted drop).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson
import pyarrow as pa
from tqdm import tqdm

from mpo_data import images as image_io
from mpo_data.engine import (
    Completion,
    EngineConfig,
    EngineFeeder,
    GenerationRequest,
    GenerationResult,
    SamplingConfig,
    request_seed,
    start_engine,
)
from mpo_data.errors import InputError
from mpo_data.formats import PromptItem, Sample, image_list
from mpo_data.inputs import Problem, PromptReader, Quarantine
from mpo_data.prompts import PROMPT_TEMPLATES, render
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
    batch_size: int = field(
        default=8, metadata={"help": "Items per part file (the unit of progress and of loss after a kill); engine concurrency is --max-in-flight."}
    )
    max_in_flight: int = field(
        default=256, metadata={"help": "Most requests inside each engine at once (n samples each); the engine refills as they finish."}
    )
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
        positive = ("num_return_sequences", "max_new_tokens", "batch_size", "max_in_flight", "tp", "pp", "num_engines")
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
    """(prefix, rest): the first int(words x ratio) words of `chosen`, and the remaining words."""
    words = chosen.split()
    keep = int(len(words) * start_ratio)
    return " ".join(words[:keep]), " ".join(words[keep:])


def join_continuation(prefix: str, continuation: str) -> str:
    """`rejected` text. The prefix ends on a word with no trailing space (a trailing space would make the
    model start on a lone-space token), so the continuation carries its own leading space, as decoded."""
    return prefix + continuation if prefix else continuation.lstrip()


def drop_reason(completion: Completion, rest: str) -> str | None:
    """Why a DropoutNTP continuation makes no usable `rejected`, or None if it does."""
    if not completion.text.strip():
        return "empty"
    if completion.finish_reason in ("length", "context"):  # cut at max_new_tokens or by a full context
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
        # an empty prefix is a plain answer: continuing an empty assistant turn is template-dependent
        return GenerationRequest([{"role": "user", "content": item["question"]}], pil, prefix or None)

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

    def request(self, item: dict[str, Any], pil: list) -> GenerationRequest:
        return GenerationRequest([{"role": "user", "content": render(item["question"], self.config.prompt_version)}], pil)

    def outcome(self, item: dict[str, Any], key: dict[str, Any], completion: Completion, prompt_tokens: int) -> tuple[dict, str | None]:
        sample = Sample(
            item_id=key["item_id"],
            sample_index=key["sample_index"],
            item=item,
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

# One work row per item that lacks samples. The prompt line stays JSON text: its extra keys are arbitrary.
WORK_SCHEMA = pa.schema([("item_id", pa.string()), ("loc", pa.string()), ("indices", pa.list_(pa.int64())), ("item", pa.string())])
WORK_COLUMNS = tuple(WORK_SCHEMA.names)
# One output row per sample, or one per item that could not be sampled (`problem` says why; `loc` is its FILE:LINE).
OUTPUT_COLUMNS = ("record", "dropped", "problem", "loc", "output_tokens", "prompt_tokens", "engine_ready", "peak_in_flight")


class GenerateBatch:
    """Ray Data async callable class: one vLLM engine per actor, fed continuously across calls.

    Ray Data runs several calls at once on each actor (`calls_per_actor`); every call hands its items'
    requests to the engine's feeder and returns when they are done, so one call is one part file while
    the engine keeps up to `max_in_flight` requests running. Images travel as paths and are decoded here.
    """

    def __init__(self, config: StageConfig, engine_seed: int, cpu_shares: Any = None):
        import ray

        self.config = config
        self.stage = make_stage(config)
        share = ray.get(cpu_shares.claim.remote()) if cpu_shares is not None else (0, 1)
        self.engine = start_engine(replace(config.engine_config(), seed=engine_seed), cpu_share=share)
        self.feeder = EngineFeeder(self.engine, config.max_in_flight)
        self.ready = time.time()  # wall clock: the driver times sampling from the first engine ready

    def _submit(self, work: dict[str, Any]) -> Future:
        """The future result of one work row's request; an image that fails to decode resolves it as refused."""
        try:
            paths = image_list(work["item"].get("image")) if self.stage.wants_images else []
            images = [image_io.load(self.config.image_root, rel) for rel in paths]
        except image_io.ImageError as e:
            future: Future = Future()
            future.set_result(GenerationResult(0, [], refused=f"{e.category}: {e}"))
            return future
        request = self.stage.request(work["item"], images)
        seed = request_seed(work["item_id"], work["indices"][0])
        return self.feeder.submit(request, self.config.sampling_config(len(work["indices"])), seed)

    async def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        works = [{**dict(zip(WORK_COLUMNS, row)), "item": orjson.loads(row[3])} for row in zip(*(batch[c] for c in WORK_COLUMNS))]
        results = await asyncio.gather(*(asyncio.wrap_future(self._submit(work)) for work in works))
        out: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
        for work, result in zip(works, results):
            ready, peak = self.ready, self.feeder.peak_in_flight
            if result.refused:
                _add_row(out, orjson.dumps(work["item"]).decode(), "", result.refused, work["loc"], 0, 0, ready, peak)
            for position, (index, completion) in enumerate(zip(work["indices"], result.completions)):
                key = {"item_id": work["item_id"], "sample_index": int(index)}
                record, reason = self.stage.outcome(work["item"], key, completion, result.prompt_tokens)
                prompt_tokens = result.prompt_tokens if position == 0 else 0  # once per request
                row = (orjson.dumps(record).decode(), reason or "", "", work["loc"], completion.output_tokens, prompt_tokens, ready, peak)
                _add_row(out, *row)
        return out


def _add_row(out: dict[str, list], *values: Any) -> None:
    for name, value in zip(OUTPUT_COLUMNS, values):
        out[name].append(value)


class CpuShares:
    """Hands each engine actor on a CPU-only cluster its own share of the cores (index, count)."""

    def __init__(self, count: int):
        self.count, self.next = count, 0

    def claim(self) -> tuple[int, int]:
        share, self.next = self.next % self.count, self.next + 1
        return share, self.count


class PlacementGroups:
    """One placement group per engine actor (tp x pp > 1), made as Ray Data starts the actor; all removed at the end.

    Ray Data removes none of them (ray-project/ray#64035): without `release`, the next stage in the same
    driver would wait forever for GPUs the finished one still holds.
    """

    _made: ClassVar[dict[str, list]] = {}  # token -> groups: Ray Data may copy the callable it is given

    def __init__(self, devices: int, pipeline: bool):
        self.devices, self.pipeline = devices, pipeline
        self.token = os.urandom(8).hex()

    @property
    def groups(self) -> list:
        return self._made.setdefault(self.token, [])

    def __call__(self) -> dict[str, Any]:
        """Ray Data's ray_remote_args_fn: one bundle per GPU for the engine's vLLM workers."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # tensor parallel wants one node; pipeline stages may span nodes
        group = ray.util.placement_group([{"GPU": 1, "CPU": 1}] * self.devices, strategy="PACK" if self.pipeline else "STRICT_PACK")
        self.groups.append(group)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}

    def release(self) -> None:
        import ray

        for group in self._made.pop(self.token, []):
            ray.util.remove_placement_group(group)


def actor_resources(config: StageConfig, cluster_gpus: float, groups: PlacementGroups | None = None) -> dict[str, Any]:
    """map_batches resources of one engine actor: tp x pp GPUs (from `groups` when > 1), or one CPU on a CPU-only cluster."""
    if not cluster_gpus:
        return {"num_cpus": 1}
    if config.tp * config.pp == 1:
        return {"num_gpus": 1}
    return {"num_gpus": 0, "ray_remote_args_fn": groups}


def check_context(config: StageConfig) -> None:
    """Before any engine starts: max_model_len must hold max_new_tokens and still leave room for a prompt."""
    max_model_len = config.engine_config().max_model_len
    if max_model_len is not None and config.max_new_tokens >= max_model_len:
        raise InputError(
            f"--max-new-tokens {config.max_new_tokens} leaves no room for the prompt in max_model_len {max_model_len}: "
            "lower it or raise max_model_len (a sample cut by a full context gets finish_reason 'context')"
        )


def calls_per_actor(config: StageConfig) -> int:
    """Concurrent calls per engine actor: enough parts to fill max_in_flight, and one more waiting to enter."""
    return -(-config.max_in_flight // config.batch_size) + 1


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
    peak_in_flight: int = 0  # most requests one engine held at once
    engine_ready: float | None = None  # wall clock when the first engine was ready
    last_part_at: float = 0.0  # wall clock of the last part

    def engine_tokens_per_s(self) -> float | None:
        """Output tokens/s from the first engine ready to the last part: sampling without engine start-up."""
        span = self.last_part_at - (self.engine_ready or self.last_part_at)
        return round(self.output_tokens / span, 2) if span > 0 else None

    def steady_tokens_per_s(self) -> float | None:
        """Output tokens/s after the first part (sampling without engine start-up); None until 1 s of it."""
        span = self.last_part_s - (self.first_part_s or 0.0)
        return round((self.output_tokens - self.first_part_tokens) / span, 2) if span >= 1.0 else None


def work_dataset(work: list[dict[str, Any]], batch_size: int) -> Any:
    """The work rows as a Ray dataset of `batch_size`-row blocks: one block per Ray Data call, one call per part."""
    import pyarrow as pa
    import ray

    table = pa.Table.from_pylist([{**w, "item": orjson.dumps(w["item"]).decode()} for w in work], schema=WORK_SCHEMA)
    return ray.data.from_arrow([table.slice(i, batch_size) for i in range(0, len(table), batch_size)])


def generate(config: StageConfig, work: list[dict[str, Any]], store: ShardStore, quarantine: Quarantine) -> Tally:
    """Run `work` through engine actors, writing one atomic part per finished chunk of items as it arrives."""
    import ray

    tally = Tally()
    started_ray = connect_ray(config.address)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    groups = PlacementGroups(config.tp * config.pp, config.pp > 1)
    engine_seed = int.from_bytes(os.urandom(4), "little") >> 1
    store.record_engine_seed(engine_seed)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours is the tqdm bar below
        shares = None if cluster_gpus or config.num_engines == 1 else ray.remote(CpuShares).remote(config.num_engines)
        calls = calls_per_actor(config)
        ds = work_dataset(work, config.batch_size).map_batches(
            GenerateBatch,
            fn_constructor_kwargs={"config": config, "engine_seed": engine_seed, "cpu_shares": shares},
            batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=config.num_engines, max_tasks_in_flight_per_actor=calls, max_concurrent_calls_per_actor=calls),
            **actor_resources(config, cluster_gpus, groups),
        )
        total = sum(len(w["indices"]) for w in work)
        with tqdm(total=total, unit="sample", desc=f"{config.stage} {config.dataset_name}", file=sys.stderr) as bar:
            began = time.monotonic()
            for batch in ds.iter_batches(batch_size=None, batch_format="default"):
                _write_batch(batch, store, tally, quarantine, config.on_error)
                tally.last_part_s = time.monotonic() - began
                if tally.first_part_s is None:
                    tally.first_part_s, tally.first_part_tokens = tally.last_part_s, tally.output_tokens
                bar.update(sum(1 for problem in batch["problem"] if not problem))
                bar.set_postfix(items=len(tally.items), kept=tally.kept, dropped=sum(tally.dropped.values()), tok_s=tally.steady_tokens_per_s() or "-")
    finally:
        groups.release()
        if started_ray:
            ray.shutdown()
    return tally


def _write_batch(batch: dict[str, Any], store: ShardStore, tally: Tally, quarantine: Quarantine, on_error: str) -> None:
    """One part from one finished call; items that could not be sampled fail the run or go to quarantine."""
    kept, dropped = [], []
    for record, reason, problem, loc in zip(batch["record"], batch["dropped"], batch["problem"], batch["loc"]):
        if problem:
            if on_error == "fail":
                raise InputError(f"{loc}: {problem}\n(use --on-error skip to quarantine such lines)")
            quarantine.add([Problem(loc, problem.split(":")[0], problem)], orjson.loads(record))
            continue
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
    tally.engine_ready = min(float(min(batch["engine_ready"])), tally.engine_ready or float("inf"))
    tally.last_part_at = time.time()
    tally.peak_in_flight = max(tally.peak_in_flight, int(max(batch["peak_in_flight"])))


# ---- the stage run: read, select, resume, generate, summarise ----


def _resolved(config: StageConfig) -> StageConfig:
    """Absolute model and image paths: Ray workers need not share the driver's working directory."""
    image_root = config.image_root or str(Path(config.prompt_path).parent)
    return replace(config, checkpoint=os.path.abspath(config.checkpoint), image_root=os.path.abspath(image_root))


def read_items(config: StageConfig, reader: PromptReader) -> tuple[list[PromptItem], int]:
    """The selected valid items, first occurrence of each item_id, and how many repeats were skipped."""
    rows = [(reader.read - 1, item) for item in reader]  # reader.read counts the row just yielded
    wanted = select_range(reader.read, config.sample_start_idx, config.sample_max_num)  # a range: O(1) membership
    items: dict[str, PromptItem] = {}
    repeats = 0
    for position, item in rows:
        if position in wanted:
            item_id = item.item_id  # a hash of the line: computed once
            repeats += item_id in items
            items.setdefault(item_id, item)
    return list(items.values()), repeats


def plan_work(items: list[PromptItem], done: dict[str, set[int]], quota: int) -> list[dict[str, Any]]:
    """One work row per item that lacks samples, naming exactly the missing sample indices."""
    work, nothing_done = [], set()
    for item in items:
        item_id = item.item_id
        indices = missing_indices(done.get(item_id, nothing_done), quota)
        if indices:
            work.append({"item_id": item_id, "loc": item.source, "item": item.to_dict(), "indices": indices})
    return work


def run_stage(config: StageConfig) -> dict[str, Any]:
    """Sample one prompt set into `<out>/samples/<stage>/<dataset>/`, resuming; returns the summary."""
    began = time.monotonic()
    config.check()
    check_context(config)
    config = _resolved(config)
    dataset = config.dataset_name
    store = ShardStore(stage_dir(config.out_dir, config.stage, dataset))
    store.check_settings(config.stage_settings(), config.force)
    quarantine = quarantine_path(config.out_dir, config.stage, dataset) if config.on_error == "skip" else None
    reader = PromptReader(config.prompt_path, config.stage, dataset, config.image_root, config.on_error, quarantine, verify_images=False)
    items, repeats = read_items(config, reader)
    done = store.done()
    work = plan_work(items, done, config.num_return_sequences)
    generated_from = time.monotonic()
    try:
        tally = generate(config, work, store, reader.quarantine) if work else Tally()
    finally:
        reader.quarantine.close()
    generation_s = time.monotonic() - generated_from
    summary = {
        "stage": config.stage,
        "dataset": dataset,
        "model": config.model_name,
        "prompt_path": str(config.prompt_path),
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
        "peak_requests_in_flight": tally.peak_in_flight,
        "prompt_tokens": tally.prompt_tokens,
        "output_tokens": tally.output_tokens,
        "generation_s": round(generation_s, 2),
        "output_tokens_per_s": round(tally.output_tokens / generation_s, 2) if tally.output_tokens else 0.0,
        "first_part_s": round(tally.first_part_s, 2) if tally.first_part_s is not None else None,
        "steady_output_tokens_per_s": tally.steady_tokens_per_s(),
        "engine_output_tokens_per_s": tally.engine_tokens_per_s(),
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
