"""`mpo-data meta`: true lengths, fractional repeats, exact target totals, --base merging, bad input."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from mpo_data.cli import main
from mpo_data.preference.meta import MetaConfig, active_rows, build_meta, repeat_for, share_rows, split_share
from mpo_data.records.formats import MetaEntry, read_meta, write_meta


def _pairs(folder: Path, name: str, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    rows = [{"image": "a.png", "question": f"q{i}", "chosen": "c", "rejected": "r"} for i in range(n)]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def internvl_rows(length: int, repeat_time: float) -> int:
    """Rows InternVL's MPO loader keeps, restated from its code: random.sample below 1, int(r) copies above."""
    rows = list(range(length))
    if repeat_time < 1:
        rows = random.sample(rows, k=int(length * repeat_time))
    if repeat_time > 1:
        rows = rows * int(repeat_time)
    return len(rows)


def _total(entries) -> int:
    totals = {sum(rule(e.length, e.repeat_time) for e in entries.values()) for rule in (active_rows, internvl_rows)}
    assert len(totals) == 1, "our row rule disagrees with InternVL's"
    return totals.pop()


@pytest.mark.parametrize(
    "repeat_time, rows", [(0.5, 5), (0.99, 9), (1, 10), (1.5, 10), (2, 20), (2.25, 20), (3.7, 30)]
)
def test_active_rows_is_internvls_rule(repeat_time, rows):
    assert active_rows(10, repeat_time) == internvl_rows(10, repeat_time) == rows


@pytest.mark.parametrize("length, rows", [(7, 3), (3, 1), (1000, 999), (999_983, 234_567), (12, 24), (5, 0)])
def test_repeat_for_gives_exact_rows(length, rows):
    r = repeat_for(length, rows)
    assert active_rows(length, r) == rows and r > 0
    assert isinstance(r, int) == (rows > 0 and rows % length == 0)


def test_a_share_above_one_copy_is_whole_copies_plus_a_rest_entry():
    entry = MetaEntry("i", "a.jsonl", 1, 7)
    parts = split_share("a", entry, 17)
    assert {n: e.repeat_time for n, e in parts.items()} == {"a": 2, "a_rest": 0.43}
    assert sum(active_rows(7, e.repeat_time) for e in parts.values()) == 17
    assert {n: e.repeat_time for n, e in split_share("a", entry, 14).items()} == {"a": 2}
    with pytest.raises(ValueError):
        repeat_for(7, 10)


def test_share_rows_sums_exactly():
    shares = share_rows(10, {"a": 1, "b": 1, "c": 1})
    assert sum(shares.values()) == 10 and sorted(shares.values()) == [3, 3, 4]


def test_lengths_fractional_repeats_and_target(tmp_path):
    _pairs(tmp_path / "p", "small", 7)
    _pairs(tmp_path / "p", "big", 13)
    out = tmp_path / "meta" / "mix.json"
    assert (
        main(
            [
                "meta",
                "--pairs-dir",
                str(tmp_path / "p"),
                "--image-root",
                "imgs",
                "--out",
                str(out),
                "--target-total",
                "31",
                "--weight",
                "small=1",
                "--weight",
                "big=1",
            ]
        )
        == 0
    )
    meta = read_meta(out)
    # 15 or 16 rows each: whole copies + a NAME_rest entry below 1 over the same file, as InternVL reads them
    assert {n: e.length for n, e in meta.items()} == {"small": 7, "small_rest": 7, "big": 13, "big_rest": 13}
    assert _total(meta) == 31
    assert (meta["small"].repeat_time, meta["big"].repeat_time) == (2, 1)
    assert all(0 < meta[n].repeat_time < 1 for n in ("small_rest", "big_rest"))
    assert {active_rows(7, meta["small_rest"].repeat_time), active_rows(13, meta["big_rest"].repeat_time)} <= {1, 2, 3}
    assert meta["small_rest"].root == "imgs" and meta["small_rest"].annotation == meta["small"].annotation
    raw = orjson.loads(out.read_bytes())["small"]
    assert set(raw) == {"root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time", "length"}


def test_default_weights_mean_equal_repeat_and_fixed_repeat(tmp_path):
    _pairs(tmp_path / "p", "a", 100)
    _pairs(tmp_path / "p", "b", 300)
    _pairs(tmp_path / "p", "c", 50)
    entries = build_meta(
        MetaConfig(
            pairs_dir=tmp_path / "p", image_root="i", out=tmp_path / "m.json", target_total=250, repeats={"c": 1.5}
        )
    )
    # --repeat c=1.5 means 75 rows: one whole copy plus 25 rows from a second entry
    assert (entries["c"].repeat_time, entries["c_rest"].repeat_time) == (1, 0.5)
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
    scaled = build_meta(
        MetaConfig(pairs_dir=tmp_path / "p", image_root="i", out=tmp_path / "m.json", base=base, target_total=1200)
    )
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
    assert (
        main(
            [
                "meta",
                "--pairs-dir",
                str(tmp_path / "p"),
                "--image-root",
                "i",
                "--out",
                str(tmp_path / "m.json"),
                *extra,
            ]
        )
        == 1
    )
    assert message in capsys.readouterr().err


def test_cli_bad_pair_line_names_file_and_line(tmp_path, capsys):
    path = _pairs(tmp_path / "p", "a", 2)
    path.write_bytes(path.read_bytes() + b'{"question": "q", "chosen": "c"}\n')
    assert (
        main(["meta", "--pairs-dir", str(tmp_path / "p"), "--image-root", "i", "--out", str(tmp_path / "m.json")]) == 1
    )
    assert f"{path}:3: missing key 'rejected'" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_validate_warns_on_fractional_repeat_above_one(tmp_path, capsys):
    annotation = _pairs(tmp_path / "p", "a", 4)
    meta = tmp_path / "m.json"
    write_meta(meta, {"a": MetaEntry("i", str(annotation), 1.5, 4), "b": MetaEntry("i", str(annotation), 0.5, 4)})
    assert main(["validate", str(meta), "--kind", "meta"]) == 0  # valid for InternVL, but not 1.5x the rows
    err = capsys.readouterr().err
    assert f"warning: {meta}: entry 'a': repeat_time 1.5 above 1" in err and "1 whole copy" in err
    assert "entry 'b'" not in err
