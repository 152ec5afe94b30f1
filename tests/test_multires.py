"""Multi-resolution sampling (`--max-num` with several tile counts): settings, work plan, resume keys, pairing
apart, and the real stage on the tiny VLM (its Idefics3 processor tiles per request)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from mpo_data.cli import build_parser
from mpo_data.config import config_from_args
from mpo_data.errors import InputError
from mpo_data.preference.judge import JudgeConfig
from mpo_data.preference.pairs import PairsConfig, build_pairs
from mpo_data.records.inputs import PromptReader
from mpo_data.records.shards import ShardStore, sample_group, stage_dir
from mpo_data.sampling.stage_config import (
    CorrectnessConfig,
    DropoutNTPConfig,
    EngineConfig,
    SamplingConfig,
)
from mpo_data.sampling.stages import WORK_COLUMNS, plan_work, run_stage, work_rows, work_table


def _lines(folder: Path) -> list[dict]:
    return [
        orjson.loads(line) for part in sorted(folder.glob("part-*.jsonl")) for line in part.read_bytes().splitlines()
    ]


def test_several_tile_counts_from_flags_and_the_idefics3_grid(models_dir):
    vlm = str(models_dir / "tiny-smolvlm")
    args = build_parser("correctness").parse_args(
        ["correctness", "--checkpoint", vlm, "--prompt-path", "p.jsonl", "--max-num", "1", "--max-num", "4"]
    )
    engine = config_from_args(CorrectnessConfig, args).engine
    assert engine.max_num == [1, 4] and engine.tile_counts() == [1, 4]
    # tiny-smolvlm's tiles are 56 px: 4 tiles at most is a 2 x 2 grid of an image resized to 112 px
    assert engine.tiling_kwargs(1) == {"do_image_splitting": False, "size": {"longest_edge": 56}}
    assert (
        engine.tiling_kwargs(4)
        == engine.tiling_kwargs(5)
        == {"do_image_splitting": True, "size": {"longest_edge": 112}}
    )
    assert engine.tiling_kwargs() == engine.tiling_kwargs(4)  # the engine starts at the largest, sized for it
    assert engine.tiling_note() is None  # it means something here


@pytest.mark.parametrize("values, message", [([0], "tile counts >= 1"), ([4, 4], "given twice"), ([-1, 2], ">= 1")])
def test_bad_tile_counts_are_refused(models_dir, values, message):
    with pytest.raises(InputError, match=message):
        EngineConfig(str(models_dir / "tiny-smolvlm"), max_num=values).check_tiling()


def test_several_tile_counts_on_a_text_model_or_text_dataset_are_refused(tmp_path, demo_dir, models_dir):
    with pytest.raises(InputError, match="LlamaForCausalLM has no image tiling"):
        EngineConfig(str(models_dir / "smollm2-135m-instruct"), max_num=[1, 4]).check_tiling()
    EngineConfig(str(models_dir / "smollm2-135m-instruct"), max_num=[6]).check_tiling()  # one: accepted, no effect
    text = CorrectnessConfig(
        str(demo_dir / "arithmetic.jsonl"),
        EngineConfig(str(models_dir / "tiny-smolvlm"), max_num=[1, 4]),
        out_dir=str(tmp_path),
        sample_max_num=2,
    )
    with pytest.raises(InputError, match=r"arithmetic.jsonl: --max-num \[1, 4\]: no selected item has an image"):
        run_stage(text)  # refused before any engine starts
    hidden = DropoutNTPConfig(
        str(demo_dir / "easy_vqa_describe.jsonl"),
        EngineConfig(str(models_dir / "tiny-smolvlm"), max_num=[1, 4]),
        out_dir=str(tmp_path),
        image_root=str(demo_dir / "images"),
        sample_max_num=2,
    )
    assert hidden.tile_counts() == [None]  # DropoutNTP without --load-image shows no image: tiling is moot
    with pytest.raises(InputError, match="its images are not shown"):
        run_stage(hidden)


def test_work_is_planned_per_item_and_tile_count_and_resumes_by_that_key(tmp_path, demo_dir):
    vqa = list(PromptReader(str(demo_dir / "easy_vqa.jsonl"), "correctness", "vqa", demo_dir / "images"))[:2]
    text = list(PromptReader(str(demo_dir / "arithmetic.jsonl"), "correctness", "arith"))[:1]
    work = plan_work(vqa + text, {}, 2, [1, 4])
    assert [(w["item_id"], w["max_num"], w["indices"]) for w in work] == [
        (vqa[0].item_id, 1, [0, 1]),
        (vqa[0].item_id, 4, [0, 1]),
        (vqa[1].item_id, 1, [0, 1]),
        (vqa[1].item_id, 4, [0, 1]),
        (text[0].item_id, None, [0, 1]),  # a text item is sampled once: tiling does not change it
    ]
    # samples already written at 1 tile: a rerun with 4 added (or kept) plans only what 4 lacks
    store = ShardStore(tmp_path / "shards")
    done_rows = [{"item_id": i.item_id, "sample_index": s, "max_num": 1} for i in vqa for s in (0, 1)]
    store.write_part(done_rows + [{"item_id": vqa[0].item_id, "sample_index": 0, "max_num": 4}], [])
    done = store.done()
    assert done == {
        sample_group(vqa[0].item_id, 1): {0, 1},
        sample_group(vqa[1].item_id, 1): {0, 1},
        sample_group(vqa[0].item_id, 4): {0},
    }
    assert [(w["max_num"], w["indices"]) for w in plan_work(vqa, done, 2, [1, 4])] == [(4, [1]), (4, [0, 1])]
    assert plan_work(vqa, done, 2, [1]) == []  # a value dropped from the list: its samples stay, nothing to do
    assert store.totals()["items"] == 2  # prompt items, whatever their tile counts
    assert sample_group("abc", None) == "abc" and sample_group("abc", 6) == "abc@6"


def test_work_rows_travel_through_a_ray_data_batch_unchanged(demo_dir):
    """Ray Data hands an actor numpy columns: the rows it rebuilds are the planned ones, tile count or none."""
    vqa = list(PromptReader(str(demo_dir / "easy_vqa.jsonl"), "correctness", "vqa", demo_dir / "images"))[:1]
    text = list(PromptReader(str(demo_dir / "arithmetic.jsonl"), "correctness", "arith"))[:1]
    work = plan_work(vqa + text, {}, 2, [1, 4])
    table = work_table(work)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in WORK_COLUMNS}
    rebuilt = work_rows(batch)
    assert [(w["max_num"], type(w["indices"][0])) for w in rebuilt] == [(1, np.int64), (4, np.int64), (None, np.int64)]
    assert [{**w, "indices": list(map(int, w["indices"]))} for w in rebuilt] == work


def test_pairs_never_mix_tile_counts(tmp_path):
    """Item 0 answers right only at 1 tile and wrong only at 4: kept apart, no (right, wrong) pair forms."""

    def sample(item: int, index: int, tiles: int, answer: str) -> dict:
        return {
            "image": f"img/{item}.png",
            "question": "How many?",
            "answer": "19",
            "item_id": f"item{item}",
            "sample_index": index,
            "max_num": tiles,
            "prompt": "<image>\nHow many?",
            "prompt_tokens": 5 * tiles,
            "response": f"Counted {index} at {tiles}. \\boxed{{{answer}}}",
            "finish_reason": "stop",
            "output_tokens": 9,
            "prompt_version": "en_v2",
            "model": "m",
            "sampling": {"n": 4},
        }

    rows = [sample(0, i, 1, "19") for i in range(3)] + [sample(0, i, 4, "7") for i in range(3)]
    rows += [
        sample(1, 0, 4, "19"),
        sample(1, 1, 4, "7"),
    ]  # item 1: both verdicts at 4 tiles: one pair, 4 tiles each side
    folder = tmp_path / "samples" / "correctness" / "toy"
    folder.mkdir(parents=True)
    (folder / "part-00000.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    summary = build_pairs(
        PairsConfig(data_dir=tmp_path / "samples", save_dir=tmp_path / "pairs", judge=JudgeConfig(workers=1))
    )
    pairs = [
        orjson.loads(line)
        for line in (tmp_path / "pairs" / "toy_pairs_vqa_correctness_rules.jsonl").read_bytes().splitlines()
    ]
    assert [
        (p["chosen_meta"]["item_id"], p["chosen_meta"]["max_num"], p["rejected_meta"]["max_num"]) for p in pairs
    ] == [("item1", 4, 4)]
    assert summary["correctness/toy"]["items"] == 3  # (item 0, 1 tile), (item 0, 4 tiles), (item 1, 4 tiles)


@pytest.mark.engine
@pytest.mark.ray
def test_two_tile_counts_on_the_tiny_vlm(tmp_path, demo_dir, models_dir, ray_local):
    """The real stage: each image item sampled at 1 and 4 tiles, per request, in one engine; a rerun does nothing."""
    config = CorrectnessConfig(
        str(demo_dir / "easy_vqa.jsonl"),
        EngineConfig(str(models_dir / "tiny-smolvlm"), max_num=[1, 4]),
        SamplingConfig(n=2, max_new_tokens=8),
        out_dir=str(tmp_path),
        image_root=str(demo_dir / "images"),
        sample_max_num=3,
    )
    summary = run_stage(config)
    samples = _lines(stage_dir(tmp_path, "correctness", "easy_vqa"))
    assert summary["samples_requested"] == 3 * 2 * 2 and len(samples) == 12
    assert {s["max_num"] for s in samples} == {1, 4}
    tokens = {(s["item_id"], s["max_num"]): s["prompt_tokens"] for s in samples}
    assert len({s["item_id"] for s in samples}) == 3
    for item_id in {s["item_id"] for s in samples}:
        # 1 tile: the image alone; 4: a 2 x 2 grid of tiles beside it, each its own image tokens
        assert tokens[(item_id, 4)] > tokens[(item_id, 1)] > 0
    again = run_stage(config)
    assert again["samples_requested"] == 0 and again["totals"]["samples"] == 12
