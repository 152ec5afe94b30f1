"""`mpo-data sample` (mpo_data/sampling/sample.py): rows over a prompt file on the session's real VLM engine, and
bad input failing or quarantined before any engine starts."""

from __future__ import annotations

import pytest

from mpo_data import cli
from mpo_data.records.inputs import PromptReader
from mpo_data.records.jsonl import read_jsonl
from mpo_data.sampling.sample import batches, generate_rows
from mpo_data.sampling.stage_config import SamplingConfig
from mpo_data.tools.model_folders import IMAGE_SEQ_LEN


@pytest.mark.engine
def test_generate_rows_over_a_prompt_file(vlm_engine, demo_dir, tmp_path):
    source = tmp_path / "vqa.jsonl"
    source.write_text("".join((demo_dir / "easy_vqa.jsonl").read_text().splitlines(keepends=True)[:3]))
    reader = PromptReader(source, "correctness", "vqa", image_root=demo_dir / "images")
    sampling = SamplingConfig(n=2, max_new_tokens=4)
    rows = list(generate_rows(batches(reader, 2), reader.image_root, vlm_engine, sampling))
    assert len(rows) == 3
    expected = [value for _, value in read_jsonl(source)]
    for row, line in zip(rows, expected):
        assert row["question"] == line["question"] and row["image"] == line["image"]
        assert row["prompt_tokens"] > IMAGE_SEQ_LEN and len(row["samples"]) == 2
        assert row["model"] == vlm_engine.config.model and row["sampling"] == sampling.as_dict()
    assert len({row["item_id"] for row in rows}) == 3


# ---- `mpo-data sample` on bad input: fails or quarantines before any engine starts ----


def test_sample_cli_names_the_bad_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question": "ok?", "answer": "1"}\n{"question": 5}\n')
    out = tmp_path / "out.jsonl"
    rc = cli.main(["sample", "--model", "unused", "--prompts", str(prompts), "--out", str(out), "--batch-size", "8"])
    assert rc == 1
    assert f"{prompts}:2:" in capsys.readouterr().err
    assert not out.exists()


def test_sample_cli_skip_quarantines_and_counts(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question": 5}\nnot json\n')
    out = tmp_path / "out.jsonl"
    rc = cli.main(["sample", "--model", "unused", "--prompts", str(prompts), "--out", str(out), "--on-error", "skip"])
    assert rc == 0 and out.read_text() == ""
    quarantined = [value["loc"] for _, value in read_jsonl(tmp_path / "out.jsonl.quarantine.jsonl")]
    assert quarantined == [f"{prompts}:1", f"{prompts}:2"]
    assert "invalid JSON" in capsys.readouterr().err
