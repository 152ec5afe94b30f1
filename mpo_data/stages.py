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
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from mpo_data import images as image_io
from mpo_data import ray_logs
from mpo_data.engine import Completion, Engine, GenerationRequest
from mpo_data.errors import ClusterError
from mpo_data.formats import PromptItem, Sample, image_list, strip_placeholders
from mpo_data.inputs import PromptReader
from mpo_data.prompts import user_prompt
from mpo_data.runlock import holds
from mpo_data.shards import ShardStore, missing_indices, quarantine_path, select_range, stage_dir
from mpo_data.stage_config import CorrectnessConfig, DropoutNTPConfig, StageConfig


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
    pipeline = config.engine.pipeline_parallel_size
    devices = config.engine.tensor_parallel_size * pipeline
    if not cluster_gpus:
        return {"num_cpus": 1}
    if devices == 1:
        return {"num_gpus": 1}
    return {"num_gpus": 0, "ray_remote_args_fn": partial(_placement_group, devices, pipeline > 1)}


LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE = "RAY_AUTH_MODE"


def connect_ray(address: str | None) -> bool:
    """Join `address`, or start a private local Ray without dashboard, on loopback; True if we started one."""
    if not address:
        # With this switch off, Ray takes 127.0.0.1 as the node address instead of the host's routable
        # one, so a private instance never listens on or talks to a network address. Read at import.
        os.environ.setdefault(LOOPBACK_ONLY, "0")
        os.environ.setdefault(AUTH_MODE, "token")  # token auth on by our choice: Ray warns when it is left unset
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray_logs.init(address=address, log_to_driver=False)
        return False
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
            max_restarts=0,  # a lost engine ends the run with a clear error (a rerun resumes), not a wait for
            **actor_resources(config, ray.cluster_resources().get("GPU", 0)),  # a restart that may never place
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
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
        raise ClusterError(
            f"{config.stage} {config.dataset_name}: an engine or node was lost ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}); the {tally.parts} part(s) written are kept: rerun to resume"
        ) from None
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
    engine = replace(config.engine, model=os.path.abspath(config.engine.model))
    return replace(config, engine=engine, image_root=os.path.abspath(image_root))


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


def read_prompts(config: StageConfig) -> tuple[StageConfig, PromptReader, list[PromptItem], int]:
    """(config, reader, selected items, repeats skipped). Images embedded in the prompt source are written
    once to OUT/images/<dataset>/, which becomes the config's image root (the engine actors load from it)."""
    dataset = config.dataset_name
    quarantine = quarantine_path(config.out_dir, config.stage, dataset) if config.on_error == "skip" else None
    images_dir = Path(config.out_dir) / "images" / dataset
    reader = PromptReader(config.prompt_path, config.stage, dataset, config.image_root, config.on_error, quarantine, images_dir)
    items, repeats = read_items(config, reader)
    return replace(config, image_root=str(reader.image_root)), reader, items, repeats


@holds("out_dir")
def run_stage(config: StageConfig) -> dict[str, Any]:
    """Sample one prompt set into `<out>/samples/<stage>/<dataset>/`, resuming; returns the summary."""
    began = time.monotonic()
    config.check()
    config = _resolved(config)
    dataset = config.dataset_name
    store = ShardStore(stage_dir(config.out_dir, config.stage, dataset))
    store.check_settings(config.stage_settings(), config.force)
    config, reader, items, repeats = read_prompts(config)
    done = store.done()
    work = plan_work(items, done, config.sampling.n)
    generated_from = time.monotonic()
    tally = generate(config, work, store) if work else Tally()
    generation_s = time.monotonic() - generated_from
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
        "items_sampled": len(tally.items),
        "samples_requested": sum(len(w["indices"]) for w in work),
        "samples_out": tally.kept,
        "dropped": dict(tally.dropped),
        "quarantined": {"total": reader.quarantine.total, "reasons": dict(reader.quarantine.counts),
                        "file": str(reader.quarantine.path) if reader.quarantine.path else None},
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
        "ray_logs": ray_logs.folder(),
    }
    summary["summary_file"] = str(store.write_summary(summary))
    return summary
