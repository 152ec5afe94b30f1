"""`mpo-data run`: strict pipeline configs, and a real tiny run that a rerun resumes without new work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from mpo_data.errors import InputError
from mpo_data.pipeline import load_pipeline
from mpo_data.records.formats import REST_SUFFIX, read_meta

ROOT = Path(__file__).resolve().parents[1]
# a line in Ray's own log formats: Python loggers ("2026-01-01 10:00:00,123\tINFO file.py:1 -- ...") and its C++ core
RAY_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t[A-Z]+ .*|\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] .*")


def write(tmp_path, config) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def base_config(tmp_path, demo_dir) -> dict:
    return {
        "out_dir": str(tmp_path / "out"),
        "defaults": {
            "engine": {"model": str(ROOT / "models" / "smollm2-135m-instruct")},
            "image_root": str(demo_dir / "images"),
        },
        "datasets": [
            {
                "name": "arith",
                "stage": "correctness",
                "settings": {
                    "prompt_path": str(demo_dir / "arithmetic.jsonl"),
                    "sample_max_num": 3,
                    "sampling": {"n": 3, "max_new_tokens": 48},
                },
            },
            {
                "name": "describe",
                "stage": "dropout-ntp",
                "weight": 2.0,
                "settings": {
                    "prompt_path": str(demo_dir / "easy_vqa_describe.jsonl"),
                    "sample_max_num": 3,
                    "sampling": {"max_new_tokens": 128},
                },
            },
        ],
        "meta": {"out": str(tmp_path / "meta.json")},
    }


def test_shipped_pipelines_parse():
    for name in ("demo", "mmpr"):
        config, stages = load_pipeline(ROOT / "pipelines" / f"{name}.yaml")
        assert stages and all(s.out_dir == config.out_dir for s in stages)
    config, stages = load_pipeline(ROOT / "pipelines" / "mmpr.yaml")
    geoqa, caption = stages[0], stages[2]
    assert (
        geoqa.engine.tensor_parallel_size == 4
        and geoqa.engine.max_model_len == 16384
        and config.meta.target_total == 400000
    )
    # a section given in part keeps the rest: the defaults' temperature, the stage's own sample count
    assert (geoqa.sampling.n, geoqa.sampling.max_new_tokens, geoqa.sampling.temperature) == (32, 2048, 1.0)
    assert caption.sampling.n == 1 and caption.engine.model == geoqa.engine.model and caption.engine.dynamic is True


def test_example_mixture_reads_and_names_the_demo_pair_files():
    example = read_meta(ROOT / "meta" / "example.json")
    config, _ = load_pipeline(ROOT / "pipelines" / "demo.yaml")
    for name, entry in example.items():
        assert entry.annotation == f"{config.out_dir}/pairs/{name.removesuffix(REST_SUFFIX)}.jsonl"
        assert any(name.startswith(f"{d.name}_") for d in config.datasets)
    # 1.5 x the describe pairs as InternVL reads it: one whole copy plus a second entry taking half
    assert sorted(e.repeat_time for e in example.values()) == [0.5, 0.5, 1, 2]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.update(colour=1), "pipe.yaml:1: unknown key 'colour'"),
        (
            lambda c: c["datasets"][0]["settings"].update(tempreature=1),
            "datasets[0].settings: unknown key 'tempreature'",
        ),
        (
            lambda c: c["datasets"][0]["settings"]["sampling"].update(temprature=1),
            "datasets[0].settings.sampling: unknown key 'temprature'",
        ),
        (
            lambda c: c["defaults"]["engine"].update(max_model_len="long"),
            "datasets[0].settings.engine.max_model_len: expected int",
        ),
        (lambda c: c.update(pairs={"save_dir": "x"}), "pairs: 'save_dir' is set by the pipeline"),
        (lambda c: c["datasets"][1].update(stage="dpo"), "datasets[1].stage: expected one of"),
        (lambda c: c["datasets"][0]["settings"].update(prompt_version="zz"), "datasets[0].settings.prompt_version"),
        (lambda c: c["datasets"][0]["settings"].update(out_dir="x"), "datasets[0]: 'out_dir' is set by the pipeline"),
        (lambda c: c["datasets"][1].update(name="arith"), "names must be unique"),
        (lambda c: c["meta"].pop("out"), "meta: missing key 'out'"),
    ],
)
def test_bad_pipeline_config_names_key_and_file(tmp_path, demo_dir, edit, message):
    config = base_config(tmp_path, demo_dir)
    edit(config)
    path = write(tmp_path, config)
    with pytest.raises(InputError) as err:
        load_pipeline(path)
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.mark.ray
@pytest.mark.engine
def test_tiny_pipeline_runs_and_rerun_does_no_work(tmp_path, demo_dir):
    path = write(tmp_path, base_config(tmp_path, demo_dir))
    cmd = [sys.executable, "-m", "mpo_data", "run", str(path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, preexec_fn=lambda: os.umask(0o022))
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    # quiet logs: Ray's own lines (Python loggers, its C++ core) went to its log folder, named in the summary
    assert not RAY_LINE.search(first.stderr), RAY_LINE.search(first.stderr).group(0)
    ray_logs = Path(
        orjson.loads((out / "samples" / "correctness" / "arith" / "summary.json").read_bytes())["ray_logs"]
    )
    assert "Started a local Ray instance" in (ray_logs / "mpo-data-driver.log").read_text()
    samples = sorted((out / "samples").glob("*/*/part-*.jsonl"))
    arith = orjson.loads((out / "samples" / "correctness" / "arith" / "summary.json").read_bytes())
    assert arith["samples_out"] == 9
    meta = read_meta(tmp_path / "meta.json")
    # one entry per pair file the run wrote, each row once (no target_total), as many rows as pairs were made
    assert set(meta) == {f.stem for f in (out / "pairs").glob("*.jsonl")}
    assert all(entry.repeat_time == 1 for entry in meta.values())
    made = orjson.loads((out / "pairs" / "pairs_summary.json").read_bytes())
    assert sum(e.length for e in meta.values()) == sum(
        v for c in made.values() for k, v in c.items() if k.startswith("pairs_")
    )
    for name, entry in meta.items():
        assert entry.length == sum(1 for _ in open(entry.annotation))
        assert entry.root in (str(demo_dir / "images"),)
    assert any(n.startswith("describe_prefix_pair_sr0.5_wo_image") for n in meta)
    record = orjson.loads((out / "pipeline.json").read_bytes())
    assert record["pairs_rebuilt"] is True and record["meta"] == str(tmp_path / "meta.json")

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900, preexec_fn=lambda: os.umask(0o022))
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted((out / "samples").glob("*/*/part-*.jsonl")) == samples
    again = orjson.loads((out / "samples" / "correctness" / "arith" / "summary.json").read_bytes())
    assert again["samples_requested"] == 0 and again["samples_already_done"] == 9
    assert orjson.loads((out / "pipeline.json").read_bytes())["pairs_rebuilt"] is False
    assert read_meta(tmp_path / "meta.json") == meta
    report = subprocess.run(
        [sys.executable, "-m", "mpo_data", "report", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert report.returncode == 0, report.stderr[-3000:]
    # every file the run wrote has the mode open() gives under umask 022: parts, run.json, summaries, pairs, report, meta
    modes = {
        str(f.relative_to(tmp_path)): oct(f.stat().st_mode & 0o777)
        for f in [*out.rglob("*"), tmp_path / "meta.json"]
        if f.is_file()
    }
    assert {"out/report.html", "out/pairs/pairs_summary.json", "out/samples/correctness/arith/run.json"} <= set(modes)
    assert set(modes.values()) == {"0o644"}, modes
