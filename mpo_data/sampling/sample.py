"""`mpo-data sample`: plain sampling over a prompt file, one engine in this process; smoke-tests a model and
the engine. `item_request` is also the answer evaluation's request."""

from __future__ import annotations

import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator

from mpo_data.errors import InputError
from mpo_data.records import images as image_io
from mpo_data.records.formats import PromptItem
from mpo_data.records.inputs import PromptReader
from mpo_data.records.jsonl import write_jsonl
from mpo_data.sampling.engine import Engine, GenerationRequest
from mpo_data.sampling.stage_config import SampleConfig, SamplingConfig


def item_request(item: PromptItem, image_root: str | Path) -> GenerationRequest:
    """The plain request for one prompt item: its question as the user turn, its images decoded."""
    try:
        pil = [image_io.load(image_root, rel) for rel in item.images]
    except image_io.ImageError as e:
        raise InputError(f"{item.source}: {e}") from None
    return GenerationRequest(messages=[{"role": "user", "content": item.question}], images=pil)


def batches(items: Iterable[PromptItem], size: int) -> Iterator[list[PromptItem]]:
    batch: list[PromptItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def generate_rows(
    batches: Iterable[list[PromptItem]], image_root: str | Path, engine: Engine, sampling: SamplingConfig
) -> Iterator[dict[str, Any]]:
    """Output rows: each item with its samples and provenance (model, sampling settings)."""
    for batch in batches:
        requests = [item_request(item, image_root) for item in batch]
        for item, result in zip(batch, engine.generate(requests, sampling)):
            yield {
                **item.to_dict(),
                "item_id": item.item_id,
                "prompt_tokens": result.prompt_tokens,
                "samples": [asdict(c) for c in result.completions],
                "model": engine.config.model,
                "sampling": sampling.as_dict(),
            }


def sample_file(config: SampleConfig) -> tuple[int, PromptReader]:
    """Write each valid prompt item with its samples to `config.out`; returns (rows written, the reader)."""
    reader = PromptReader(
        config.prompts,
        config.kind,
        Path(config.prompts).stem,
        config.image_root,
        config.on_error,
        config.quarantine_path,
    )
    todo = batches(reader, config.batch_size)
    first = next(todo, [])  # a bad first line fails here, before the ~40 s engine start
    if not first:  # nothing valid to sample: an empty output, and no engine start
        return write_jsonl(config.out, []), reader
    engine = Engine(config.engine)
    try:
        rows = generate_rows(itertools.chain([first], todo), reader.image_root, engine, config.sampling)
        return write_jsonl(config.out, rows), reader
    finally:
        engine.close()
