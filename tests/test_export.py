"""`mpo-data export`: a mixture as a TRL preference set that `datasets` loads and TRL's DPOTrainer trains on."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from mpo_data.cli import main
from mpo_data.records.formats import MetaEntry, write_meta
from mpo_data.train.data import PairLoader
from mpo_data.train.export import PARQUET_FILE, ExportConfig, export

ROOT = Path(__file__).resolve().parents[1]
TINY_VLM = ROOT / "models" / "tiny-smolvlm"


def mixture(pairs: Path) -> Path:
    """2 whole copies of the 8 pairs plus a random half: 20 active rows, as InternVL would draw them."""
    img, lines = str(pairs / "img"), str(pairs / "pairs.jsonl")
    path = pairs / "mix.json"
    write_meta(path, {"mix": MetaEntry(img, lines, 2, 8), "mix_rest": MetaEntry(img, lines, 0.5, 8)})
    return path


def test_export_loads_back_with_images_and_sources(pairs, tmp_path):
    import datasets

    meta = mixture(pairs)
    assert main(["export", "--meta", str(meta), "--out", str(tmp_path / "hf"), "--seed", "3"]) == 0
    data = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(data) == 20 and set(data.column_names) == {
        "prompt",
        "chosen",
        "rejected",
        "images",
        "dataset",
        "item_id",
        "source",
    }
    assert Counter(data["dataset"]) == {"mix": 16, "mix_rest": 4}
    per_line = Counter(zip(data["dataset"], data["source"]))
    assert {n for (d, _), n in per_line.items() if d == "mix"} == {2} and len(
        {s for d, s in per_line if d == "mix_rest"}
    ) == 4
    two = data[[s.endswith("pairs.jsonl:3") for s in data["source"]].index(True)]
    assert [p["type"] for p in two["prompt"][0]["content"]] == ["image", "image", "text"]
    assert [i.getpixel((0, 0)) for i in two["images"]] == [(255, 0, 0), (0, 0, 255)]  # bytes embedded, PIL back
    assert two["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "No."}]}]
    assert data[[s.endswith("pairs.jsonl:6") for s in data["source"]].index(True)]["images"] == []

    export(ExportConfig(meta=str(meta), out=str(tmp_path / "pq"), format="parquet", seed=3))
    parquet = datasets.load_dataset("parquet", data_files=str(tmp_path / "pq" / PARQUET_FILE))["train"]
    assert parquet["source"] == data["source"] and parquet["prompt"] == data["prompt"]  # same seed, same draw
    assert [i.getpixel((0, 0)) for i in parquet[data["source"].index(two["source"])]["images"]] == [
        (255, 0, 0),
        (0, 0, 255),
    ]
    again = PairLoader().read_dataset(tmp_path / "pq" / PARQUET_FILE).rows  # `mpo-data train` data.dataset
    assert len(again) == 20 and [len(r["images"]) for r in again] == [len(i) for i in data["images"]]


@pytest.mark.train
def test_dpo_trainer_trains_on_the_export_unchanged(pairs, tmp_path):
    import datasets
    import torch
    from transformers import AutoProcessor
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(2)
    export(ExportConfig(meta=str(mixture(pairs)), out=str(tmp_path / "hf")))
    args = DPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        max_length=None,
        save_strategy="no",
    )
    processor = AutoProcessor.from_pretrained(TINY_VLM)
    trainer = DPOTrainer(
        model=str(TINY_VLM),
        args=args,
        train_dataset=datasets.load_from_disk(str(tmp_path / "hf")),
        processing_class=processor,
    )
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
