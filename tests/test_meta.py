"""`mpo-data meta`: true lengths, fractional repeats, exact target totals, --base merging, bad input."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from mpo_data.cli import main
from mpo_data.formats import MetaEntry, read_meta, write_meta
from mpo_data.meta import MetaConfig, active_rows, build_meta, repeat_for, share_rows


def _pairs(folder: Path, name: str, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    rows = [{"image": "a.png", "question": f"q{i}", "chosen": "c", "rejected": "r"} for i in range(n)]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _total(entries) -> int:
    return sum(active_rows(e.length, e.repeat_time) for e in entries.values())


@pytest.mark.parametrize("length, rows", [(7, 3), (7, 10), (3, 1), (1000, 1500), (999_983, 1_234_567), (12, 24), (5, 0)])
def test_repeat_for_gives_exact_rows(length, rows):
    r = repeat_for(length, rows)
    assert active_rows(length, r) == rows and r > 0
    assert isinstance(r, int) == (rows > 0 and rows % length == 0)


def test_share_rows_sums_exactly():
    shares = share_rows(10, {"a": 1, "b": 1, "c": 1})
    assert sum(shares.values()) == 10 and sorted(shares.values()) == [3, 3, 4]


def test_lengths_fractional_repeats_and_target(tmp_path):
    _pairs(tmp_path / "p", "small", 7)
    _pairs(tmp_path / "p", "big", 13)
    out = tmp_path / "meta" / "mix.json"
    assert main(["meta", "--pairs-dir", str(tmp_path / "p"), "--image-root", "imgs", "--out", str(out),
                 "--target-total", "31", "--weight", "small=1", "--weight", "big=1"]) == 0
    meta = read_meta(out)
    assert {n: e.length for n, e in meta.items()} == {"small": 7, "big": 13}
    assert _total(meta) == 31
    assert meta["small"].repeat_time > 2 and meta["big"].repeat_time > 1  # 15 or 16 rows each, fractional
    assert meta["small"].root == "imgs" and meta["small"].annotation.endswith("small.jsonl")
    raw = orjson.loads(out.read_bytes())["small"]
    assert set(raw) == {"root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time", "length"}


def test_default_weights_mean_equal_repeat_and_fixed_repeat(tmp_path):
    _pairs(tmp_path / "p", "a", 100)
    _pairs(tmp_path / "p", "b", 300)
    _pairs(tmp_path / "p", "c", 50)
    entries = build_meta(MetaConfig(pairs_dir=tmp_path / "p", image_root="i", out=tmp_path / "m.json",
                                    target_total=250, repeats={"c": 1.5}))
    assert entries["c"].repeat_time == 1.5 and active_rows(50, 1.5) == 75
    # 175 rows shared 100:300 (equal repeat 0.4375) -> 43.75 and 131.25 -> whole rows 44 + 131
    assert (active_rows(100, entries["a"].repeat_time), active_rows(300, entries["b"].repeat_time)) == (44, 131)
    assert (entries["a"].repeat_time, entries["b"].repeat_time) == (0.44, 0.4367)
    assert _total(entries) == 250


def test_base_merge_keeps_entries_and_rescales(tmp_path):
    base = tmp_path / "base.json"
    write_meta(base, {"mmpr_x": MetaEntry(root="MMPR/images", annotation="x.jsonl", repeat_time=0.5, length=1000)})
    _pairs(tmp_path / "p", "new", 100)
    kept = build_meta(MetaConfig(pairs_dir=tmp_path / "p", image_root="i", out=tmp_path / "m.json", base=base))
    assert kept["mmpr_x"].repeat_time == 0.5 and kept["mmpr_x"].root == "MMPR/images" and kept["new"].repeat_time == 1
    scaled = build_meta(MetaConfig(pairs_dir=tmp_path / "p", image_root="i", out=tmp_path / "m.json", base=base,
                                   target_total=1200))
    assert _total(scaled) == 1200
    assert active_rows(1000, scaled["mmpr_x"].repeat_time) == 1000  # shares 500:100 of the union -> 1000:200
    assert active_rows(100, scaled["new"].repeat_time) == 200


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weight", "nope=1"], "unknown entries ['nope']"),
        (["--repeat", "a=x"], "repeats.a: expected float, got str 'x'"),
        (["--target-total", "10", "--repeat", "a=5"], "nothing left to share"),
    ],
)
def test_cli_bad_options(tmp_path, capsys, extra, message):
    _pairs(tmp_path / "p", "a", 10)
    assert main(["meta", "--pairs-dir", str(tmp_path / "p"), "--image-root", "i", "--out", str(tmp_path / "m.json"), *extra]) == 1
    assert message in capsys.readouterr().err


def test_cli_bad_pair_line_names_file_and_line(tmp_path, capsys):
    path = _pairs(tmp_path / "p", "a", 2)
    path.write_bytes(path.read_bytes() + b'{"question": "q", "chosen": "c"}\n')
    assert main(["meta", "--pairs-dir", str(tmp_path / "p"), "--image-root", "i", "--out", str(tmp_path / "m.json")]) == 1
    assert f"{path}:3: missing key 'rejected'" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
