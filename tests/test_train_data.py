"""Training data (mpo_data/train/data.py): meta.json sampling as InternVL's loader, TRL rows, bad input messages."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mpo_data.errors import InputError
from mpo_data.records.formats import MetaEntry, write_meta
from mpo_data.train.data import PairLoader, repeat_indices

ROOT = Path(__file__).resolve().parents[1]
TINY_VLM = ROOT / "models" / "tiny-smolvlm"
CONFIG = ROOT / "training" / "configs" / "tiny_vlm_full_cpu.yaml"

pytestmark = pytest.mark.usefixtures("torch_threads")


def meta_with(tmp_path: Path, repeat_time: float) -> Path:
    path = tmp_path / f"meta_{repeat_time}.json"
    write_meta(path, {"mix": MetaEntry(str(tmp_path / "img"), str(tmp_path / "pairs.jsonl"), repeat_time, 8)})
    return path


@pytest.mark.parametrize("repeat_time, rows", [(0.5, 4), (1, 8), (1.5, 8), (2.25, 16)])
def test_meta_sampling_follows_internvls_row_rule(pairs, repeat_time, rows):
    picked = PairLoader().read_meta(meta_with(pairs, repeat_time), seed=3)
    assert len(picked.rows) == rows and picked.counts["mix"] == {"lines": 8, "valid": 8, "sampled": rows}
    per_line = Counter(picked.sources)
    if repeat_time < 1:  # a random subset without replacement, drawn again by the same seed only
        assert len(per_line) == rows and set(per_line.values()) == {1}
        assert PairLoader().read_meta(meta_with(pairs, repeat_time), seed=3).sources == picked.sources
        draws = {tuple(PairLoader().read_meta(meta_with(pairs, repeat_time), seed=s).sources) for s in range(6)}
        assert len(draws) > 1
    else:  # int(r) whole copies of every line: 1.5 is one copy, 2.25 two, as InternVL reads them
        assert len(per_line) == 8 and set(per_line.values()) == {int(repeat_time)}


def test_repeat_indices_on_awkward_lengths():
    import random

    from mpo_data.preference.meta import active_rows

    for length in (1, 3, 7, 13, 100):
        for r in (0.1, 0.5, 0.99, 1, 1.5, 2.25, 3.7):
            picked = repeat_indices(length, r, random.Random(0))
            assert len(picked) == active_rows(length, r)
            assert set(Counter(picked).values()) <= ({1} if r < 1 else {int(r)})


def test_rows_are_trl_vision_preference_rows(pairs):
    rows = PairLoader().read_meta(pairs / "meta.json", seed=0).rows
    two = rows[2]
    assert [p["type"] for p in two["prompt"][0]["content"]] == ["image", "image", "text"]
    assert len(two["images"]) == 2 and all(isinstance(i, Image.Image) for i in two["images"])
    assert two["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "No."}]}]
    assert rows[5]["images"] == [] and rows[5]["prompt"][0]["content"] == [{"type": "text", "text": "What is 2 + 3?"}]
    text_only = PairLoader(text_only=True, on_error="skip").read_meta(pairs / "meta.json", seed=0)
    assert [r["prompt"] for r in text_only.rows][0] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert text_only.quarantine.counts == {"image row, text-only model": 5}


def test_bad_meta_and_pair_lines_name_file_and_line(pairs):
    write_meta(pairs / "gone.json", {"mix": MetaEntry(str(pairs / "img"), "nowhere.jsonl", 1.0, 8)})
    with pytest.raises(InputError, match=r"gone.json: entry 'mix': annotation 'nowhere.jsonl' not found"):
        PairLoader().read_meta(pairs / "gone.json", seed=0)
    (pairs / "bad.json").write_text(
        '{"mix": {"root": "img", "annotation": "pairs.jsonl", "repeat_time": 0, "length": 8}}'
    )
    with pytest.raises(InputError, match=r"bad.json: entry 'mix': 'repeat_time' must be > 0"):
        PairLoader().read_meta(pairs / "bad.json", seed=0)
    with (pairs / "pairs.jsonl").open("a") as f:
        f.write('{"image": "missing.png", "question": "q", "chosen": "a", "rejected": "b"}\n')
        f.write('{"question": "q", "chosen": "a"}\n')
    with pytest.raises(InputError, match=r"pairs.jsonl:9: image 'missing.png' not found"):
        PairLoader().read_meta(pairs / "meta.json", seed=0)
    loader = PairLoader(on_error="skip", quarantine=pairs / "q.jsonl")
    loader.read_meta(pairs / "meta.json", seed=0)
    loader.close()
    assert len(loader.out.rows) == 8 and loader.out.quarantine.counts == {"image missing": 1, "schema": 1}
    kept = [json.loads(line)["loc"] for line in (pairs / "q.jsonl").read_text().splitlines()]
    assert kept == [f"{pairs}/pairs.jsonl:9", f"{pairs}/pairs.jsonl:10"]


def test_hf_dataset_on_disk_with_pil_images(tmp_path):
    import datasets

    red = Image.new("RGB", (20, 20), "red")
    datasets.Dataset.from_list(
        [
            {"prompt": "Colour?", "chosen": "Red.", "rejected": "Blue.", "images": [red]},
            {"prompt": "Colour?", "chosen": "Red.", "rejected": "", "images": [red]},
        ]
    ).save_to_disk(tmp_path / "ds")
    with pytest.raises(InputError, match=r"ds:2: 'rejected' is empty"):
        PairLoader().read_dataset(tmp_path / "ds")
    rows = PairLoader(on_error="skip").read_dataset(tmp_path / "ds").rows
    assert len(rows) == 1 and rows[0]["images"][0].size == (20, 20)
    assert rows[0]["prompt"][0]["content"][0] == {"type": "image"}
    # Parquet written by `datasets`: Image cells are {bytes, path} structs, decoded here
    datasets.load_from_disk(tmp_path / "ds").to_parquet(tmp_path / "ds.parquet")
    rows = PairLoader(on_error="skip").read_dataset(tmp_path / "ds.parquet").rows
    assert len(rows) == 1 and rows[0]["images"][0].getpixel((3, 3)) == (255, 0, 0)


def test_mmpr_placeholders_become_image_parts_in_place(pairs):
    lines = [
        {
            "image": ["red.png", "blue.png"],
            "question": "Image-1: <image>\nImage-2: <image>\nSame?",
            "chosen": "No.",
            "rejected": "Yes.",
        },
        {"image": "red.png", "question": "<image>\nColour?", "chosen": "Red.", "rejected": "Blue."},
    ]
    (pairs / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    two, one = PairLoader().read_meta(pairs / "meta.json", seed=0).rows[:2]
    assert two["prompt"][0]["content"] == [
        {"type": "text", "text": "Image-1: "},
        {"type": "image"},
        {"type": "text", "text": "\nImage-2: "},
        {"type": "image"},
        {"type": "text", "text": "\nSame?"},
    ]
    assert one["prompt"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "\nColour?"}]
    assert "<image>" not in json.dumps([two["prompt"], one["prompt"]])
