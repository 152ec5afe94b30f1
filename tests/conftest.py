"""Shared fixtures. Heavy real components (vLLM engine, Ray) are session-scoped: one start per run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mpo_data.records.formats import MetaEntry, write_meta

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
        from mpo_data.tools import demo

        demo.build(demo.DemoConfig(out=str(DEMO)))
    return DEMO


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The local models (`make test` builds them first; built here if missing, cached otherwise)."""
    from mpo_data.tools import model_folders

    model_folders.build_all(MODELS)
    return MODELS


def _engine(model: Path):
    from mpo_data.sampling.engine import Engine, EngineConfig

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


@pytest.fixture
def torch_threads():
    """torch on 2 threads: the suite runs on a shared 2-core machine (the training tests ask for it)."""
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (2 CPUs, no dashboard); stage runs join it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def pairs(tmp_path) -> Path:
    """A meta.json over 8 hand-made pairs: 5 with an image (one with two), 3 text-only."""
    img = tmp_path / "img"
    img.mkdir()
    for name, colour in (("red.png", "red"), ("blue.png", "blue")):
        Image.new("RGB", (40, 30), colour).save(img / name)
    lines = [
        {"image": "red.png", "question": "What colour is it?", "chosen": "Red.", "rejected": "Blue."},
        {"image": "blue.png", "question": "What colour is it?", "chosen": "Blue.", "rejected": "Green."},
        {
            "image": ["red.png", "blue.png"],
            "question": "<image><image>Same colour?",
            "chosen": "No.",
            "rejected": "Yes.",
        },
        {"image": "red.png", "question": "Is it red?", "chosen": "Yes.", "rejected": "No."},
        {"image": "blue.png", "question": "Is it red?", "chosen": "No.", "rejected": "Yes, it is red."},
        {"question": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
        {"question": "What is 4 * 2?", "chosen": "8", "rejected": "6"},
        {"question": "Name a primary colour.", "chosen": "Red.", "rejected": "Pink."},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    write_meta(tmp_path / "meta.json", {"mix": MetaEntry(str(img), str(tmp_path / "pairs.jsonl"), 1.0, len(lines))})
    return tmp_path
