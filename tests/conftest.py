"""Shared fixtures. Heavy real components (vLLM engine, Ray) are session-scoped: one start per run."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo prompt sets (`make test` builds them first; built here if missing)."""
    if not (DEMO / "easy_vqa_describe.jsonl").exists():
        from mpo_data import demo

        demo.build(DEMO)
    return DEMO
