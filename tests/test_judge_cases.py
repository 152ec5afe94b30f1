"""The judge against tests/judge_cases.jsonl: labelled full responses restated from peers' graders' cases.

A wrong answer judged right becomes a `chosen`, so none may be; overall agreement must stay >= 0.98.
`make bench-judge` prints the same figures broken down by category and error kind.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest

from mpo_data.preference.judge import MODES, Judge, JudgeConfig, JudgeItem
from mpo_data.sampling.prompts import PROMPT_VERSIONS

CASES = Path(__file__).parent / "judge_cases.jsonl"
KEYS = {"id", "category", "source", "modes", "prompt_version", "answer", "response", "expected"}


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return [orjson.loads(line) for line in CASES.read_bytes().splitlines()]


def test_case_file_is_well_formed(cases):
    assert len(cases) >= 400
    for case in cases:
        assert KEYS <= case.keys(), case["id"]
        assert set(case["modes"]) <= set(MODES) and case["prompt_version"] in PROMPT_VERSIONS
    assert {c["prompt_version"] for c in cases} >= {"en", "en_v2", "en_r1", "zh", "zh_v2", "zh_r1"}
    labels = Counter(c["expected"] for c in cases)
    assert labels[True] > 100 and labels[False] > 100  # a judge that says always-yes or always-no fails


def test_no_wrong_answer_called_right_and_agreement(cases):
    items = (
        JudgeItem(c, c["response"], c["answer"], c.get("question"), c["prompt_version"], tuple(c["modes"]))
        for c in cases
    )
    with Judge(JudgeConfig(workers=2, timeout=30.0)) as judge:
        verdicts = [(case, v) for case, v in judge.judge_many(items)]
    wrong_called_right = [c["id"] for c, v in verdicts if v.is_correct and not c["expected"]]
    errors = [(c["id"], v.judge_error) for c, v in verdicts if v.judge_error]
    agree = sum(v.is_correct == c["expected"] and not v.judge_error for c, v in verdicts)
    assert wrong_called_right == []
    assert errors == []
    assert agree / len(verdicts) >= 0.98, [c["id"] for c, v in verdicts if v.is_correct != c["expected"]]
