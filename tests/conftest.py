"""Shared fixtures. Heavy real components (vLLM engine, Ray) are session-scoped: one start per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every Ray the tests start (in-process, in CLI subprocesses, `ray start` under the Slurm stand-ins)
# stays on 127.0.0.1; Ray reads this before any test imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo prompt sets (`make test` builds them first; built here if missing)."""
    if not (DEMO / "easy_vqa_describe.jsonl").exists():
        from mpo_data import demo

        demo.build(DEMO)
    return DEMO


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The local models (`make test` builds them first; built here if missing, cached otherwise)."""
    from mpo_data import models

    models.build_all(MODELS)
    return MODELS


def _engine(model: Path):
    from mpo_data.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model=str(model), max_model_len=2048))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def text_engine(models_dir: Path):
    """One real vLLM engine on SmolLM2-135M-Instruct for the whole session."""
    yield from _engine(models_dir / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def vlm_engine(models_dir: Path):
    """One real vLLM engine on the tiny SmolVLM for the whole session."""
    yield from _engine(models_dir / "tiny-smolvlm")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (2 CPUs, no dashboard); stage runs join it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
