"""Input formats, validation messages, quarantine, sources and ids (issue: foundation)."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest
from PIL import Image

from mpo_data.errors import InputError
from mpo_data.records import images
from mpo_data.records.formats import MetaEntry, PromptItem, make_item_id, read_meta, write_meta
from mpo_data.records.inputs import PromptReader, validate_file
from mpo_data.records.jsonl import AtomicFile, write_jsonl


@pytest.fixture
def root(tmp_path):
    """An image root with one good PNG, one corrupt file and a symlink that escapes."""
    img_root = tmp_path / "images"
    img_root.mkdir()
    Image.new("RGB", (32, 24), "red").save(img_root / "ok.png")
    (img_root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "secret.png").write_bytes((img_root / "ok.png").read_bytes())
    os.symlink(tmp_path / "secret.png", img_root / "escape.png")
    return img_root


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_LINES = [
    ('{"question": "q", "answer": ', "invalid JSON"),
    ('{"answer": "1"}', "missing key 'question'"),
    ('{"question": 3, "answer": "1"}', "'question' must be str, got int"),
    ('{"question": "   ", "answer": "1"}', "'question' is empty"),
    ('{"question": "q"}', "missing key 'answer'"),
    ('{"question": "q", "answer": true}', "'answer' must be str or int or float, got bool"),
    ('{"image": 5, "question": "q", "answer": "1"}', "'image' must be a path or a non-empty list of paths"),
    ('{"image": "gone.png", "question": "q", "answer": "1"}', "image 'gone.png' not found"),
    ('{"image": "broken.png", "question": "q", "answer": "1"}', "unreadable"),
    ('{"image": "../secret.png", "question": "q", "answer": "1"}', "resolves outside the image root"),
    ('{"image": "/etc/hostname", "question": "q", "answer": "1"}', "is absolute"),
    ('{"image": "escape.png", "question": "q", "answer": "1"}', "resolves outside the image root"),
    ('["not", "an", "object"]', "expected a JSON object, got list"),
    (
        '{"image": "ok.png", "question": "<image> vs <image>?", "answer": "1"}',
        "has 2 <image> placeholder(s) for 1 image(s)",
    ),
    ('{"question": "<image>\\nq", "answer": "1"}', "has 1 <image> placeholder(s) for 0 image(s)"),
    ('{"image": ["ok.png", "ok.png"], "question": "<image> q", "answer": "1"}', "for 2 image(s); expected 0 or 2"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_each_bad_line_names_file_line_and_reason(tmp_path, root, line, message):
    path = write_lines(tmp_path / "p.jsonl", ['{"image": "ok.png", "question": "q", "answer": "1"}', line])
    rows, problems = validate_file(path, "correctness", root)
    assert rows == 2
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:2: ")
    assert message in problems[0]


def test_decompression_bomb_is_refused_not_decoded(tmp_path, root):
    Image.new("1", (10_000, 10_000)).save(root / "bomb.png")  # 100 Mpx in a few kB
    path = write_lines(tmp_path / "p.jsonl", ['{"image": "bomb.png", "question": "q", "answer": "1"}'])
    problems = validate_file(path, "correctness", root)[1]
    assert problems == [f"{path}:1: image '{root / 'bomb.png'}' is 10000x10000, over the 64,000,000-pixel limit"]
    with pytest.raises(images.ImageError, match="over the 100-pixel limit"):
        images.load(root, "ok.png", max_pixels=100)
    assert images.load(root, "ok.png").mode == "RGB"


def test_dropout_kind_rules(tmp_path, root):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            '{"image": ["ok.png", "ok.png"], "question": "q", "chosen": "A red box.", "rejected": null}',
            '{"question": "q", "chosen": "text only"}',
            '{"question": "q", "chosen": "x", "rejected": "already there"}',
            '{"question": "q", "answer": "no chosen"}',
        ],
    )
    problems = validate_file(path, "dropout-ntp", root)[1]
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:3", f"{path}:4"]
    assert "'rejected' must be null or absent" in problems[0]
    assert "missing key 'chosen'" in problems[1]


def test_reader_fail_raises_with_location(tmp_path, root):
    path = write_lines(tmp_path / "p.jsonl", ['{"question": "q", "answer": "1"}', '{"question": ""}'])
    with pytest.raises(InputError, match=rf"{path}:2: "):
        list(PromptReader(path, "correctness", "ds", root))


def test_reader_skip_quarantines_with_reasons_and_counts(tmp_path, root):
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            '{"image": "ok.png", "question": "q", "answer": "1", "extra": {"k": 1}}',
            "{oops",
            '{"image": "gone.png", "question": "q", "answer": "1"}',
            '{"question": "q2", "answer": 7}',
        ],
    )
    quarantine = tmp_path / "q" / "quarantine.jsonl"
    reader = PromptReader(path, "correctness", "ds", root, on_error="skip", quarantine=quarantine)
    items = list(reader)
    assert [i.question for i in items] == ["q", "q2"]
    assert items[0].extra == {"extra": {"k": 1}} and items[1].answer == "7"
    assert reader.read == 4
    assert dict(reader.quarantine.counts) == {"invalid JSON": 1, "image missing": 1}
    lines = [orjson.loads(text) for text in quarantine.read_text().splitlines()]
    assert [row["loc"] for row in lines] == [f"{path}:2", f"{path}:3"]
    assert "not found" in lines[1]["reasons"][0] and lines[1]["line"]["image"] == "gone.png"


def test_reader_checks_each_image_file_once_and_names_every_line_that_uses_a_bad_one(tmp_path, root, monkeypatch):
    checked, real = [], images.check
    monkeypatch.setattr(images, "check", lambda root, rel, **kw: checked.append(rel) or real(root, rel, **kw))
    lines = [
        f'{{"image": "{name}", "question": "q{i}", "answer": "1"}}'
        for i, name in enumerate(["ok.png", "broken.png"] * 3)
    ]
    reader = PromptReader(write_lines(tmp_path / "p.jsonl", lines), "correctness", "ds", root, on_error="skip")
    assert [i.question for i in reader] == ["q0", "q2", "q4"]
    assert sorted(checked) == ["broken.png", "ok.png"]
    assert dict(reader.quarantine.counts) == {"image unreadable": 3}  # each line that names it, not once


def test_parquet_and_hf_dataset_sources(tmp_path, root):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": "ok.png", "question": "q1", "answer": "1"}, {"image": None, "question": "", "answer": "2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    for source in (tmp_path / "p.parquet", tmp_path / "hf"):
        rows_seen, problems = validate_file(source, "correctness", root)
        assert rows_seen == 2 and problems == [f"{source}:2: 'question' is empty"]


def test_datasets_image_columns_are_prompt_sets(tmp_path):
    import datasets

    red, blue = Image.new("RGB", (20, 10), "red"), Image.new("RGB", (10, 20), "blue")
    data = datasets.Dataset.from_list(
        [
            {"image": red, "question": "Colour?", "answer": "red"},
            {"image": blue, "question": "Colour?", "answer": "blue"},
        ]
    ).cast_column("image", datasets.Image())
    data.to_parquet(str(tmp_path / "p.parquet"))  # Image cells become {bytes, path} structs
    data.save_to_disk(str(tmp_path / "hf"))  # Image features, decoded to PIL by default
    seen = {}
    for source in (tmp_path / "p.parquet", tmp_path / "hf"):
        assert validate_file(source, "correctness") == (2, [])
        reader = PromptReader(source, "correctness", "ds", images_dir=tmp_path / "images")
        items = list(reader)
        assert reader.image_root == tmp_path / "images"
        assert [images.load(reader.image_root, i.image).getpixel((0, 0)) for i in items] == [(255, 0, 0), (0, 0, 255)]
        seen[source.name] = [i.item_id for i in items]
    assert seen["p.parquet"] == seen["hf"]  # content-addressed files: the same items whatever the container
    assert len(list((tmp_path / "images").iterdir())) == 2


def test_item_id_is_stable_and_sensitive():
    base = make_item_id("ds", "a.png", "q", "1")
    assert base == make_item_id("ds", ["a.png"], "q", 1)
    assert (
        len(
            {
                base,
                make_item_id("ds2", "a.png", "q", "1"),
                make_item_id("ds", "b.png", "q", "1"),
                make_item_id("ds", "a.png", "q?", "1"),
                make_item_id("ds", "a.png", "q", "2"),
            }
        )
        == 5
    )
    item = PromptItem.from_raw({"image": "a.png", "question": "q", "answer": 1, "k": "v"}, "ds")
    assert item.item_id == base and item.to_dict() == {"k": "v", "image": "a.png", "question": "q", "answer": "1"}


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with AtomicFile(target) as handle:
            handle.write(b'{"half": ')
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    assert write_jsonl(target, [{"a": 1}, {"b": 2}]) == 2
    assert target.read_text() == '{"a":1}\n{"b":2}\n'


def test_meta_roundtrip_and_messages(tmp_path):
    path = tmp_path / "meta.json"
    meta = {"a": MetaEntry("img", "a.jsonl", 1.5, 10), "b": MetaEntry("img", "b.jsonl", 0.25, 4, True, 6)}
    write_meta(path, meta)
    assert read_meta(path) == meta
    assert orjson.loads(path.read_bytes())["a"]["repeat_time"] == 1.5
    path.write_text('{"a": {"root": "r", "annotation": "x", "repeat_time": 0, "length": "3", "colour": 1}}')
    with pytest.raises(InputError) as err:
        read_meta(path)
    text = str(err.value)
    assert "entry 'a': 'repeat_time' must be > 0" in text
    assert "entry 'a': 'length' must be int, got str" in text
    assert "entry 'a': unknown field 'colour'" in text
    path.write_text("{")
    with pytest.raises(InputError, match="invalid JSON"):
        read_meta(path)


def test_demo_sets_validate_clean(demo_dir):
    for name, kind in [
        ("arithmetic", "correctness"),
        ("easy_vqa", "correctness"),
        ("easy_vqa_describe", "dropout-ntp"),
    ]:
        rows, problems = validate_file(demo_dir / f"{name}.jsonl", kind, demo_dir / "images")
        assert rows > 0 and problems == []


def test_cli_validate_prints_three_problems_and_exits_1(tmp_path, root):
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            '{"image": "ok.png", "question": "q", "answer": "1"}',
            '{"image": "ok.png", "question": "q", "answer": ',
            '{"image": "missing.png", "question": "q", "answer": "1"}',
            '{"image": "../secret.png", "question": "q", "answer": "1"}',
        ],
    )
    cmd = [sys.executable, "-m", "mpo_data", "validate", str(path), "--kind", "correctness", "--image-root", str(root)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert "Traceback" not in result.stderr
    ok = subprocess.run(cmd[:4] + [str(tmp_path / "good.jsonl")] + cmd[5:], capture_output=True, text=True)
    assert ok.returncode == 1 and "no such file" in ok.stderr and "Traceback" not in ok.stderr


def test_pair_lines_need_one_placeholder_per_image(tmp_path, root):
    path = write_lines(
        tmp_path / "pairs.jsonl",
        [
            '{"image": ["ok.png", "ok.png"], "question": "Image-1: <image>\\nImage-2: <image>\\nSame?", "chosen": "a", "rejected": "b"}',
            '{"image": "ok.png", "question": "Colour?", "chosen": "a", "rejected": "b"}',
            '{"image": "ok.png", "question": "<image>\\nColour?", "chosen": "a", "rejected": "b"}',
            '{"image": ["ok.png", "ok.png"], "question": "Same?", "chosen": "a", "rejected": "b"}',
        ],
    )
    problems = validate_file(path, "pairs", root)[1]
    assert problems == [f"{path}:4: 'question' has 0 <image> placeholder(s) for 2 image(s); expected 2"]


def test_each_record_writer_matches_its_schema():
    from dataclasses import fields

    from mpo_data.preference.judge import Verdict
    from mpo_data.records.formats import (
        DROPOUT_SAMPLE_SCHEMA,
        META_ENTRY_SCHEMA,
        PAIR_SCHEMA,
        PROMPT_SCHEMAS,
        SAMPLE_SCHEMA,
        Pair,
        Sample,
    )
    from mpo_data.sampling.dropout_ntp import DropoutNTPStage
    from mpo_data.sampling.engine import Completion
    from mpo_data.sampling.stage_config import DropoutNTPConfig, EngineConfig

    prompt = {"image": "a.png", "question": "q?", "answer": "1"}
    sample = Sample("id", 0, prompt, "<image>\nq?", "r", "stop", 3, 4, "en_v2", "m", {"n": 1}).to_dict()
    assert SAMPLE_SCHEMA.problems(sample) == []
    tiled = Sample("id", 0, prompt, "<image>\nq?", "r", "stop", 3, 4, "en_v2", "m", {"n": 1}, max_num=4).to_dict()
    assert tiled["max_num"] == 4 and SAMPLE_SCHEMA.problems(tiled) == [] and "max_num" not in sample
    assert set(SAMPLE_SCHEMA.keys) == set(PROMPT_SCHEMAS["correctness"].keys) | Sample.added_keys()  # in step
    pair = Pair("<image>\nq?", "a", "b", "a.png", "q?", "1", {}, {}, {}).to_dict()
    assert PAIR_SCHEMA.problems(pair) == [] and set(pair) == set(PAIR_SCHEMA.keys) == {f.name for f in fields(Pair)}
    assert set(MetaEntry("r", "a.jsonl").to_dict()) == set(META_ENTRY_SCHEMA.keys)
    stage = DropoutNTPStage(DropoutNTPConfig("p.jsonl", EngineConfig("m")))
    item = {"image": "a.png", "question": "q?", "chosen": "A red square."}
    line, _ = stage.outcome(item, {"item_id": "i", "sample_index": 0}, Completion(" blue one.", 3, "stop"), 5)
    assert DROPOUT_SAMPLE_SCHEMA.problems(line) == [] and set(line) <= set(DROPOUT_SAMPLE_SCHEMA.keys)
    verdict = Verdict("1", True, False, "timeout", (3, 4)).contract()
    assert set(verdict) == set(Verdict.KEYS)
    assert SAMPLE_SCHEMA.problems({**sample, "sample_index": "0"}) == ["'sample_index' must be int, got str"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_file_gets_the_mode_open_would_give(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_jsonl(tmp_path / "a.jsonl", [{"a": 1}])
        with open(tmp_path / "b.jsonl", "w"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a.jsonl").stat().st_mode & 0o777 == mode == (tmp_path / "b.jsonl").stat().st_mode & 0o777
