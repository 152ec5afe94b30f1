"""`mpo-data dropout-ntp` and `mpo-data correctness`: sampling with vLLM engines on Ray Data, into resumable shards.

The two stages share all the machinery here (prompt reading, InternVL's item selection, resume bookkeeping,
Ray Data engine actors, atomic parts, progress, summary) and differ only in a small stage object, one module
each (dropout_ntp.py, correctness.py): how an item becomes a `GenerationRequest`, and how a completion becomes
an output line (or a counted drop).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import orjson
import pyarrow as pa

from mpo_data.errors import ClusterError, InputError
from mpo_data.records import images as image_io
from mpo_data.records.formats import PromptItem, image_list
from mpo_data.records.inputs import Problem, PromptReader, Quarantine
from mpo_data.records.shards import ShardStore, missing_indices, quarantine_path, sample_group, select_range, stage_dir
from mpo_data.runlock import holds
from mpo_data.sampling import ray_logs, watchdog
from mpo_data.sampling.correctness import CorrectnessStage
from mpo_data.sampling.dropout_ntp import DropoutNTPStage
from mpo_data.sampling.engine import (
    Completion,
    EngineFeeder,
    GenerationRequest,
    GenerationResult,
    request_seed,
    start_engine,
)
from mpo_data.sampling.progress import EngineProgress, Snapshot, StageProgress, start_counter
from mpo_data.sampling.stage_config import CorrectnessConfig, DropoutNTPConfig, StageConfig


class StageStrategy(Protocol):
    """What one stage adds to the shared machinery below (one module each: dropout_ntp.py, correctness.py)."""

    wants_images: bool  # whether requests carry the item's images (decoded on the engine actor)

    def request(self, item: dict[str, Any], pil: list) -> GenerationRequest:
        """The generation request for one prompt line (`pil`: its decoded images, or [])."""
        ...

    def outcome(
        self, item: dict[str, Any], key: dict[str, Any], completion: Completion, prompt_tokens: int
    ) -> tuple[dict, str | None]:
        """(the output line, None) for a kept sample, or (the dropped line, why) for a counted drop."""
        ...


# stage name (STAGE_CONFIGS) -> its strategy, built from the stage's config
STRATEGIES: dict[str, Callable[[Any], StageStrategy]] = {
    CorrectnessConfig.stage: CorrectnessStage,
    DropoutNTPConfig.stage: DropoutNTPStage,
}


def make_stage(config: StageConfig) -> StageStrategy:
    return STRATEGIES[config.stage](config)


# ---- the shared machinery: engine actors on Ray Data ----

# One work row per (item, tile count) that lacks samples (max_num 0: the processor's own tiling; Ray Data's
# numpy batches would turn a null into NaN). The prompt line stays JSON text: its extra keys are arbitrary.
WORK_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("loc", pa.string()),
        ("indices", pa.list_(pa.int64())),
        ("item", pa.string()),
        ("max_num", pa.int64()),
    ]
)
WORK_COLUMNS = tuple(WORK_SCHEMA.names)
# One output row per sample, or one per item that could not be sampled (`problem` says why; `loc` is its FILE:LINE).
OUTPUT_COLUMNS = ("record", "dropped", "problem", "loc", "output_tokens", "prompt_tokens", "peak_in_flight")


class GenerateBatch:
    """Ray Data async callable class: one vLLM engine per actor, fed continuously across calls.

    Ray Data runs several calls at once on each actor (`calls_per_actor`); every call hands its items'
    requests to the engine's feeder and returns when they are done, so one call is one part file while
    the engine keeps up to `max_in_flight` requests running. Images travel as paths and are decoded here.
    Finished requests are counted for the driver's bar as they finish (`progress`, a ProgressCounter).
    """

    def __init__(self, config: StageConfig, engine_seed: int, progress: Any, cpu_shares: Any = None):
        import ray

        self.config = config
        self.stage = make_stage(config)
        share = ray.get(cpu_shares.claim.remote()) if cpu_shares is not None else (0, 1)
        self.engine = start_engine(replace(config.engine_config(), seed=engine_seed), cpu_share=share)
        self.feeder = EngineFeeder(self.engine, config.max_in_flight)
        self.progress = EngineProgress(progress)  # also the driver's watchdog's sign of life

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
        if work["max_num"] is not None:  # this tile count's processor settings, for this request only
            request.processor_kwargs = self.config.engine.tiling_kwargs(work["max_num"])
        seed = request_seed(sample_group(work["item_id"], work["max_num"]), work["indices"][0])
        submitted_at = self.progress.submitted()
        future = self.feeder.submit(request, self.config.sampling_config(len(work["indices"])), seed)
        future.add_done_callback(lambda done: self.progress.finished(done, submitted_at))
        return future

    async def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        works = work_rows(batch)
        results = await asyncio.gather(*(asyncio.wrap_future(self._submit(work)) for work in works))
        out: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
        for work, result in zip(works, results):
            peak = self.feeder.peak_in_flight
            if result.refused:
                _add_row(out, orjson.dumps(work["item"]).decode(), "", result.refused, work["loc"], 0, 0, peak)
            for position, (index, completion) in enumerate(zip(work["indices"], result.completions)):
                key = {"item_id": work["item_id"], "sample_index": int(index)}
                if work["max_num"] is not None:
                    key["max_num"] = work["max_num"]
                record, reason = self.stage.outcome(work["item"], key, completion, result.prompt_tokens)
                prompt_tokens = result.prompt_tokens if position == 0 else 0  # once per request
                row = (
                    orjson.dumps(record).decode(),
                    reason or "",
                    "",
                    work["loc"],
                    completion.output_tokens,
                    prompt_tokens,
                    peak,
                )
                _add_row(out, *row)
        if (pushed := self.progress.push()) is not None:
            await pushed  # the counter holds this call's samples before the driver sees its part
        return out


def work_table(work: list[dict[str, Any]]) -> pa.Table:
    """The planned work rows as WORK_SCHEMA's table (the prompt line as JSON text, no tile count as 0)."""
    rows = [{**w, "item": orjson.dumps(w["item"]).decode(), "max_num": w["max_num"] or 0} for w in work]
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def work_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The work rows of one Ray Data batch (columns of numpy values), as `plan_work` made them."""
    works = [dict(zip(WORK_COLUMNS, row)) for row in zip(*(batch[c] for c in WORK_COLUMNS))]
    for work in works:
        work.update(item=orjson.loads(work["item"]), max_num=int(work["max_num"]) or None)
    return works


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
    """The engines' placement groups (tp x pp GPUs each): made and placed before any actor starts, all removed at the end.

    Ray Data calls `ray_remote_args_fn` for every actor it starts, but also where it only reads the args
    (its memory issue detector, at start and then periodically): a function that made a group per call
    left stray groups holding GPUs, and an engine actor could wait behind them forever. So the groups are
    a fixed pool, one per engine, handed out in turn; they are placed (or the run fails saying what the
    cluster lacks) before Ray Data starts, and `release` removes them: Ray Data removes none
    (ray-project/ray#64035), and the next stage in the same driver needs the GPUs.
    """

    _pools: ClassVar[dict[str, list]] = {}  # token -> groups: Ray Data may copy the callable it is given

    def __init__(self, engines: int, devices: int, pipeline: bool):
        self.engines, self.devices, self.pipeline = engines, devices, pipeline
        self.token = os.urandom(8).hex()
        self.handed = 0

    @property
    def groups(self) -> list:
        return self._pools.get(self.token, [])

    def place(self, timeout_s: float) -> bool:
        """Make one group per engine and wait until all are placed; False if the cluster cannot within `timeout_s`."""
        import ray

        # tensor parallel wants one node; pipeline stages may span nodes
        strategy = "PACK" if self.pipeline else "STRICT_PACK"
        bundles = [{"GPU": 1, "CPU": 1}] * self.devices
        self._pools[self.token] = [ray.util.placement_group(bundles, strategy=strategy) for _ in range(self.engines)]
        try:
            ray.get([group.ready() for group in self.groups], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            return False
        return True

    def __call__(self) -> dict[str, Any]:
        """Ray Data's ray_remote_args_fn: the next group of the pool, whose bundles vLLM's workers take."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group, self.handed = self.groups[self.handed % len(self.groups)], self.handed + 1
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        }

    def release(self, wait_s: float = 30.0) -> None:
        """Remove every group and wait (up to `wait_s`) until Ray has freed them: removal is asynchronous, and
        the next stage should see the GPUs free."""
        import ray

        groups = self._pools.pop(self.token, [])
        for group in groups:
            ray.util.remove_placement_group(group)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(
            ray.util.placement_group_table(g)["state"] != "REMOVED" for g in groups
        ):
            time.sleep(0.1)


def actor_resources(config: StageConfig, cluster_gpus: float, groups: PlacementGroups | None = None) -> dict[str, Any]:
    """map_batches resources of one engine actor: tp x pp GPUs (from `groups` when > 1), or one CPU on a CPU-only cluster."""
    if not cluster_gpus:
        return {"num_cpus": 1}
    if config.engine.devices == 1:
        return {"num_gpus": 1}
    return {"num_gpus": 0, "ray_remote_args_fn": groups}


def cpu_shortfall(config: StageConfig, groups: PlacementGroups, cluster: dict[str, float]) -> str | None:
    """Why the engines' groups can never be placed on a cluster with enough GPUs but too few CPUs (each bundle
    takes a CPU beside its GPU, for vLLM's worker), or None: Ray itself would wait for them without a word."""
    need, cpus = groups.engines * groups.devices, cluster.get("CPU", 0)
    if cluster.get("GPU", 0) < need or cpus >= need:
        return None
    return (
        f"{config.stage} {config.dataset_name}: {groups.engines} engine(s) x {groups.devices} GPUs (tp x pp) take "
        f"{need} CPUs in their placement groups (one beside each GPU) and the cluster has {cpus:g}: start Ray with "
        f"--num-cpus >= {need} (Slurm: --cpus-per-task), or lower --num-engines or tp"
    )


def place_groups(config: StageConfig, groups: PlacementGroups) -> None:
    """Place every engine's group before Ray Data starts, or fail saying what the cluster has (never wait forever).

    The work dataset is built before (ray.data.from_arrow runs a task that needs a free CPU, and the groups may
    hold every CPU of the cluster): from then on Ray Data needs no CPU outside the groups."""
    import ray

    shortfall = cpu_shortfall(config, groups, ray.cluster_resources())
    if shortfall:
        raise ClusterError(shortfall)
    total, free = ray.cluster_resources().get("GPU", 0), ray.available_resources().get("GPU", 0)
    if not groups.place(config.placement_timeout_s):
        raise ClusterError(
            f"{config.stage} {config.dataset_name}: {groups.engines} engine(s) x {groups.devices} GPUs "
            f"(tp x pp) not placed within {config.placement_timeout_s:g} s; the cluster has {total:g} GPUs, "
            f"{free:g} free: lower --num-engines or tp, or add nodes"
        )


def check_context(config: StageConfig) -> None:
    """Before any engine starts: max_model_len must hold max_new_tokens and still leave room for a prompt."""
    max_model_len, max_new_tokens = config.engine.context_length(), config.sampling.max_new_tokens
    if max_model_len is not None and max_new_tokens >= max_model_len:
        raise InputError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in max_model_len {max_model_len}: "
            "lower it or raise max_model_len (a sample cut by a full context gets finish_reason 'context')"
        )


def calls_per_actor(config: StageConfig) -> int:
    """Concurrent calls per engine actor: enough parts to fill max_in_flight, and one more waiting to enter."""
    return -(-config.max_in_flight // config.batch_size) + 1


LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE = "RAY_AUTH_MODE"
# Our private local Ray shares the node's cores with the engine it hosts (on a CPU node, the very cores the
# model's OpenMP threads are bound to, where a thread that loses its core stalls the step for all of them):
# Ray's own periodic work is cut to what the stage needs. Environment defaults (a user's setting wins), read
# by every Ray process it starts; a cluster the stage joins (--address) keeps its own settings.
PRIVATE_RAY_ENV = {
    # Ray runs its workers at nice 15, and the engine's processes inherit it: on a shared node they then
    # yield to every other process, where raw vLLM runs at 0.
    "RAY_worker_niceness": "0",
    # every Ray process records metrics and exports them to the dashboard agent each 10 s, and the agent
    # scans every process with psutil each 5 s (REPORTER_UPDATE_INTERVAL_MS): for a dashboard we never start
    "RAY_enable_metrics_collection": "false",
    "REPORTER_UPDATE_INTERVAL_MS": "3600000",
    # per-handler timing of every event in Ray's C++ event loops, for its debug dumps
    "RAY_event_stats": "false",
    # each worker sends its task events (for the state API, which needs the dashboard) to the GCS each second
    "RAY_task_events_report_interval_ms": "60000",
}


def connect_ray(address: str | None) -> bool:
    """Join `address`, or start a private local Ray without dashboard, on loopback; True if we started one."""
    if not address and "ray" not in sys.modules:
        # Both are read when ray is imported (a caller that imported vLLM or ray first keeps Ray's defaults:
        # setting the auth mode after import would start a GCS that wants a token this driver never sends).
        # With this switch off, Ray takes 127.0.0.1 as the node address instead of the host's routable
        # one, so a private instance never listens on or talks to a network address.
        os.environ.setdefault(LOOPBACK_ONLY, "0")
        os.environ.setdefault(AUTH_MODE, "token")  # token auth on by our choice: Ray warns when it is left unset
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray_logs.init(address=address, log_to_driver=False)
        return False
    for name, value in PRIVATE_RAY_ENV.items():
        os.environ.setdefault(name, value)
    ray_logs.init(address="local", include_dashboard=False, log_to_driver=False)
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
    peak_in_flight: int = 0  # most requests one engine held at once
    engine: Snapshot = field(default_factory=Snapshot)  # what the engines reported finishing, with its times


def work_dataset(work: list[dict[str, Any]], batch_size: int) -> Any:
    """The work rows as a Ray dataset of `batch_size`-row blocks: one block per Ray Data call, one call per part."""
    import ray

    table = work_table(work)
    return ray.data.from_arrow([table.slice(i, batch_size) for i in range(0, len(table), batch_size)])


def generate_on_ray(
    config: StageConfig, work: list[dict[str, Any]], store: ShardStore, quarantine: Quarantine
) -> Tally:
    """Run `work` through engine actors, writing one atomic part per finished chunk of items as it arrives."""
    import ray

    tally = Tally()
    started_ray = connect_ray(config.address)
    watchdog.install_signal_handlers()
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    groups = PlacementGroups(config.num_engines, config.engine.devices, config.engine.pipeline_parallel_size > 1)
    engine_seed = store.next_engine_seed(config.engine.seed)
    counter = start_counter()  # the engines' progress, read by the bar and the watchdog
    dog = watchdog.Watchdog(
        f"{config.stage} {config.dataset_name}", config.watchdog_report_s, config.watchdog_timeout_s, counter
    ).start()
    try:
        work_ds = work_dataset(work, config.batch_size)  # before the groups, which may take every CPU (place_groups)
        resources = actor_resources(config, cluster_gpus, groups)
        if "ray_remote_args_fn" in resources:
            place_groups(config, groups)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours is StageProgress's below
        shares = None if cluster_gpus or config.num_engines == 1 else ray.remote(CpuShares).remote(config.num_engines)
        calls = calls_per_actor(config)
        with warnings.catch_warnings():  # Ray 2.60 deprecates these kwargs but names no parameter for them yet
            warnings.filterwarnings("ignore", message="`ray_remote_args", category=DeprecationWarning)
            ds = work_ds.map_batches(
                GenerateBatch,
                fn_constructor_kwargs={
                    "config": config,
                    "engine_seed": engine_seed,
                    "cpu_shares": shares,
                    "progress": counter,
                },
                batch_size=config.batch_size,
                compute=ray.data.ActorPoolStrategy(
                    size=config.num_engines, max_tasks_in_flight_per_actor=calls, max_concurrent_calls_per_actor=calls
                ),
                max_restarts=0,  # a lost engine ends the run with a clear error (a rerun resumes), not a wait for
                **resources,  # a restart that may never place
            )
        progress = StageProgress(
            counter, sum(len(w["indices"]) for w in work), f"{config.stage} {config.dataset_name}"
        )
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="default"):
                progress.sync()
                with watchdog.uninterrupted():  # a signal takes effect once this part is written
                    _write_batch(batch, store, tally, quarantine, config.on_error)
                dog.progress()
                progress.written(tally.parts, len(tally.items), tally.kept, sum(tally.dropped.values()))
        finally:
            tally.engine = progress.close()
    except KeyboardInterrupt:  # a signal (its line printed as it came) or the watchdog's interrupt
        if dog.stalled:
            raise ClusterError(f"{dog.stalled}; the {tally.parts} part(s) written are kept: rerun to resume") from None
        raise
    except (
        ray.exceptions.RayActorError,
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.OutOfMemoryError,
    ) as e:  # OOM: Ray's memory monitor killed the engine's workers
        raise ClusterError(
            f"{config.stage} {config.dataset_name}: an engine or node was lost ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}); the {tally.parts} part(s) written are kept: rerun to resume"
        ) from None
    finally:
        dog.stop()
        groups.release()
        if started_ray:
            ray.shutdown()
    return tally


def _write_batch(
    batch: dict[str, Any], store: ShardStore, tally: Tally, quarantine: Quarantine, on_error: str
) -> None:
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
    tally.peak_in_flight = max(tally.peak_in_flight, int(max(batch["peak_in_flight"])))


# ---- the stage run: read, select, resume, generate, summarise ----


def _resolved(config: StageConfig) -> StageConfig:
    """Absolute model and image paths: Ray workers need not share the driver's working directory."""
    image_root = config.image_root or str(Path(config.prompt_path).parent)
    engine = replace(config.engine, model=os.path.abspath(config.engine.model))
    return replace(config, engine=engine, image_root=os.path.abspath(image_root))


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


def plan_work(
    items: list[PromptItem],
    done: dict[str, set[int]],
    quota: int,
    tile_counts: tuple[int | None, ...] | list[int | None] = (None,),
) -> list[dict[str, Any]]:
    """One work row per item and tile count that lacks samples, naming exactly the missing sample indices.

    An item with images is sampled at each of `tile_counts` (`done` is keyed by `sample_group`); one without
    is sampled once, with no tile count: tiling does not change a text prompt."""
    work, nothing_done = [], set()
    for item in items:
        item_id = item.item_id
        for tiles in tile_counts if item.images else [None]:
            indices = missing_indices(done.get(sample_group(item_id, tiles), nothing_done), quota)
            if indices:
                work.append(
                    {
                        "item_id": item_id,
                        "loc": item.source,
                        "item": item.to_dict(),
                        "indices": indices,
                        "max_num": tiles,
                    }
                )
    return work


def check_tile_counts(config: StageConfig, items: list[PromptItem]) -> None:
    """Several --max-num values need items whose images the engine sees: otherwise every tile count would
    draw the same text-only samples."""
    tiles = config.engine.tile_counts()
    if len(tiles) > 1 and not (config.shows_images() and any(item.images for item in items)):
        why = (
            "its images are not shown (--load-image)" if not config.shows_images() else "no selected item has an image"
        )
        raise InputError(
            f"{config.prompt_path}: --max-num {tiles}: {why}, so its samples would not differ by tile "
            "count: give one value or none"
        )


def read_prompts(config: StageConfig) -> tuple[StageConfig, PromptReader, list[PromptItem], int]:
    """(config, reader, selected items, repeats skipped). Images embedded in the prompt source are written
    once to OUT/images/<dataset>/, which becomes the config's image root (the engine actors load from it)."""
    dataset = config.dataset_name
    quarantine = quarantine_path(config.out_dir, config.stage, dataset) if config.on_error == "skip" else None
    images_dir = Path(config.out_dir) / "images" / dataset
    reader = PromptReader(
        config.prompt_path,
        config.prompt_kind,
        dataset,
        config.image_root,
        config.on_error,
        quarantine,
        images_dir,
        verify_images=False,
    )
    items, repeats = read_items(config, reader)
    return replace(config, image_root=str(reader.image_root)), reader, items, repeats


def timings(tally: Tally, began_at: float, generated_from_at: float, wall_s: float) -> dict[str, Any]:
    """The summary's speed figures besides output_tokens_per_s (over generation_s: Ray start, engine start,
    sampling and part writes). Engine time runs from the first request handed to an engine to the last sample
    finished, as the engines reported them; None where nothing was generated."""
    engine, tokens = tally.engine, tally.output_tokens

    def since(at: float | None, start: float) -> float | None:
        return round(at - start, 2) if at is not None else None

    engine_s = engine.engine_s()
    return {
        "engine_start_s": since(engine.engine_ready_at, generated_from_at),  # Ray and the first engine starting
        "first_request_s": since(engine.first_request_at, generated_from_at),  # and Ray Data's first call on it
        "time_to_first_sample_s": since(engine.first_sample_at, began_at),  # from the stage's start
        "engine_s": round(engine_s, 2) if engine_s is not None else None,
        "engine_output_tokens_per_s": round(tokens / engine_s, 2) if tokens and engine_s else None,
        "run_output_tokens_per_s": round(tokens / wall_s, 2) if tokens else 0.0,  # over wall_s: the whole stage
    }


@holds("out_dir")
def run_stage(config: StageConfig) -> dict[str, Any]:
    """Sample one prompt set into `<out>/samples/<stage>/<dataset>/`, resuming; returns the summary."""
    began, began_at = time.monotonic(), time.time()
    config.check()
    check_context(config)
    config = _resolved(config)
    dataset = config.dataset_name
    store = ShardStore(stage_dir(config.out_dir, config.stage, dataset))
    store.check_settings(config.stage_settings(), config.force)
    config, reader, items, repeats = read_prompts(config)
    check_tile_counts(config, items)
    done = store.done()
    work = plan_work(items, done, config.sampling.n, config.tile_counts())
    generated_from, generated_from_at = time.monotonic(), time.time()
    try:
        tally = generate_on_ray(config, work, store, reader.quarantine) if work else Tally()
    finally:
        reader.quarantine.close()
    generation_s = time.monotonic() - generated_from
    wall_s = time.monotonic() - began
    summary = {
        "stage": config.stage,
        "dataset": dataset,
        "model": config.model_name,
        "prompt_path": str(config.prompt_path),
        "images_dir": str(reader.images_dir) if reader.extracted else None,  # where embedded images were written
        "rows_read": reader.read,
        "items_selected": len(items),
        "repeated_items_skipped": repeats,
        "quota_per_item": config.sampling.n,
        "samples_already_done": sum(len(done.get(i.item_id, ())) for i in items),
        "damaged_parts": store.damaged,  # parts resume found damaged: which lines, where the part as found went
        "items_sampled": len(tally.items),
        "samples_requested": sum(len(w["indices"]) for w in work),
        "samples_out": tally.kept,
        "dropped": dict(tally.dropped),
        "quarantined": {
            "total": reader.quarantine.total,
            "reasons": dict(reader.quarantine.counts),
            "file": str(reader.quarantine.path) if reader.quarantine.path else None,
        },
        "parts_written": tally.parts,
        "peak_requests_in_flight": tally.peak_in_flight,
        "prompt_tokens": tally.prompt_tokens,
        "output_tokens": tally.output_tokens,
        "generation_s": round(generation_s, 2),
        "output_tokens_per_s": round(tally.output_tokens / generation_s, 2) if tally.output_tokens else 0.0,
        **timings(tally, began_at, generated_from_at, wall_s),
        "wall_s": round(wall_s, 2),
        "totals": store.totals(),
        "settings": config.stage_settings(),
        "ray_logs": ray_logs.folder(),
    }
    summary["summary_file"] = str(store.write_summary(summary))
    return summary
