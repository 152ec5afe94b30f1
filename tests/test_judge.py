"""The judge contract: extraction per prompt version, every matching rule and its traps, bounded time."""

from __future__ import annotations

import time

import orjson
import pytest

from mpo_data.cli import main
from mpo_data.preference.judge import (
    DEFAULT_MODES,
    Judge,
    JudgeConfig,
    JudgeItem,
    answers_match,
    extract_answer,
    modes_for_dataset,
    question_options,
)
from mpo_data.sampling.prompts import PROMPT_VERSIONS, render

OPTIONS_Q = "Which shape is shown?\nA. triangle\nB. rectangle\nC. circle"


@pytest.mark.parametrize(
    "response, version, answer, ok",
    [
        ("Count them.\nFinal answer: 19", "en", "19", True),
        ("Count them.\n**Final answer:** 19", "en", "19", True),
        ("Final answer: 19", "en", None, False),  # no reasoning before the answer line
        ("Count them.\nFinal answer: 19\nThanks!", "en", None, False),  # not the last line
        ("so \\boxed{\\frac{1}{2}}.", "en_v2", "\\frac{1}{2}", True),  # nested braces
        ("first \\boxed{3}, then \\boxed{4}", "en_v2", "4", True),  # the final box
        ("so \\boxed{\\frac{1}{2}", "en_v2", None, False),  # unbalanced
        ("so the answer is 4", "en_v2", None, False),  # no box at all
        ("<think>count</think> so \\boxed{4}", "r1", "4", True),
        ("<think>so \\boxed{4}</think> done", "r1", None, False),  # boxed only inside <think>
        ("<think>a</think><think>b</think>\\boxed{4}", "r1", None, False),  # two blocks
        ("count\\boxed{4}", "r1", None, False),  # no block
        ("<think>count</think> so \\boxed{4}", "en_r1", "4", True),  # r1 is another name for en_r1
        ("<think>数一数</think> 所以 \\boxed{4}", "zh_r1", "4", True),
        ("先数一数。\n答案：4", "zh", "4", True),  # zh: a last line "答案: ...", full-width colon too
        ("先数一数。\nFinal answer: 4", "zh", None, False),
        ("先数一数，所以 \\boxed{4}", "zh_v2", "4", True),
    ],
)
def test_extraction_per_prompt_version(response, version, answer, ok):
    got = extract_answer(response, version)
    assert (got.answer, got.format_ok) == (answer, ok)
    if ok:
        assert response[got.span[0] : got.span[1]] == answer


@pytest.mark.parametrize(
    "pred, gt, modes, options, expected",
    [
        ("19", "19", DEFAULT_MODES, (), True),
        ("119", "19", DEFAULT_MODES, (), False),  # no substring match
        ("19", "119", ("anls",), (), False),
        ("2013", "2012", DEFAULT_MODES, (), False),
        ("2013", "2012", ("relaxed",), (), False),  # years stay exact under the 5% rule
        ("102", "100", ("relaxed",), (), True),
        ("106", "100", ("relaxed",), (), False),
        ("triangle", "rectangle", DEFAULT_MODES, (), False),
        ("triangle", "rectangle", ("anls",), (), False),
        ("the documemt", "the document", ("anls",), (), True),  # one OCR slip: ANLS 0.92
        ("unrelated words", "the document", ("anls",), (), False),  # InternVL's inverted ANLS passes this
        ("1,000", "1000", DEFAULT_MODES, (), True),
        ("1,000", "100", DEFAULT_MODES, (), False),
        ("50%", "50", DEFAULT_MODES, (), True),
        ("0.5", "50%", DEFAULT_MODES, (), True),  # a percentage also equals its fraction
        ("5%", "50%", DEFAULT_MODES, (), False),
        ("3/4", "0.75", DEFAULT_MODES, (), True),
        ("\\frac{3}{4}", "0.75", DEFAULT_MODES, (), True),
        ("\\frac{3}{5}", "\\frac{3}{4}", DEFAULT_MODES, (), False),
        ("5 cm", "5", DEFAULT_MODES, (), True),
        ("5 cm", "5 m", DEFAULT_MODES, (), False),
        ("30^\\circ", "30 degrees", DEFAULT_MODES, (), True),
        ("\\text{12 cm}", "12", DEFAULT_MODES, (), True),
        ("Two", "2", DEFAULT_MODES, (), True),
        ("Yes.", "yes", DEFAULT_MODES, (), True),
        ("no", "yes", DEFAULT_MODES, (), False),
        ("A", "A", DEFAULT_MODES, (), True),
        ("(A)", "A", DEFAULT_MODES, (), True),
        ("A. triangle", "A", DEFAULT_MODES, (), True),
        ("B", "A", DEFAULT_MODES, (), False),
        ("triangle", "A", DEFAULT_MODES, question_options(OPTIONS_Q), True),  # option text for its letter
        ("rectangle", "A", DEFAULT_MODES, question_options(OPTIONS_Q), False),
        ("A", "triangle", DEFAULT_MODES, question_options(OPTIONS_Q), True),
        ("x^2+2x+1", "(x+1)^2", DEFAULT_MODES, (), True),  # symbolic, by math-verify
        ("x^2+2x+2", "(x+1)^2", DEFAULT_MODES, (), False),
        ("\\sqrt{2}", "2^{1/2}", DEFAULT_MODES, (), True),
    ],
)
def test_matching_rules(pred, gt, modes, options, expected):
    assert answers_match(pred, gt, modes, options) is expected


def test_modes_by_dataset_name():
    assert modes_for_dataset("chartqa_train") == ("relaxed",)
    assert modes_for_dataset("DocVQA_en") == ("anls",)
    assert modes_for_dataset("geometry3k") == ("relaxed", "vqa", "mc")
    assert modes_for_dataset("anything") == DEFAULT_MODES


def test_question_options_need_two():
    assert question_options(OPTIONS_Q) == (("A", "triangle"), ("B", "rectangle"), ("C", "circle"))
    assert question_options("A. lonely line") == ()


@pytest.fixture(scope="module")
def judge():
    with Judge(JudgeConfig(timeout=1.0, workers=2, batch_size=4)) as j:
        yield j


def test_pool_verdicts_in_order_with_errors_reported(judge):
    huge_power = "so \\boxed{9^{9^{9^{9^{9}}}}}"
    rows = [
        JudgeItem(0, "so \\boxed{19}", "19", None, "en_v2", DEFAULT_MODES),
        JudgeItem(1, "so \\boxed{119}", "19", None, "en_v2", DEFAULT_MODES),
        JudgeItem(2, huge_power, "1", None, "en_v2", DEFAULT_MODES),
        JudgeItem(3, "so \\boxed{" + "{" * 100_000 + "}" * 100_000 + "}", "1", None, "en_v2", DEFAULT_MODES),
        JudgeItem(4, "<think>x</think>\\boxed{B}", "rectangle", OPTIONS_Q, "r1", DEFAULT_MODES),
        JudgeItem(5, "no box", "1", None, "en_v2", DEFAULT_MODES),
    ]
    start = time.monotonic()
    out = list(judge.judge_many(rows))
    assert time.monotonic() - start < 30
    assert [p for p, _ in out] == list(range(6))
    verdicts = [v for _, v in out]
    assert [v.is_correct for v in verdicts] == [True, False, False, False, True, False]
    assert verdicts[2].judge_error and "timeout" in verdicts[2].judge_error  # counted, not "incorrect" silently
    assert verdicts[1].judge_error is None and verdicts[5].format_ok is False


def test_long_document_answers_get_a_verdict_not_a_timeout(judge):
    """ANLS over answers near MAX_COMPARE_CHARS: a pure-Python edit distance took ~9 s at 2000 chars here."""
    gt = "lorem ipsum dolor " * 110  # 1980 characters
    rows = [
        JudgeItem(0, f"reading it\nFinal answer: {gt[:-1]}x", gt, None, "en", ("anls",)),
        JudgeItem(1, f"reading it\n答案: {gt[::-1]}", gt, None, "zh", ("anls",)),
    ]
    verdicts = [v for _, v in judge.judge_many(rows)]
    assert [(v.is_correct, v.judge_error) for v in verdicts] == [(True, None), (False, None)]


def _write(path, rows):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def test_cli_adds_the_contract_fields(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(
        src,
        [
            {"response": "r\\boxed{2012}", "answer": 2012, "extra": 1},
            {"response": "r\\boxed{2013}", "answer": "2012"},
            {
                "response": "think\nFinal answer: B. rectangle",
                "answer": "B",
                "prompt_version": "en",
                "question": OPTIONS_Q,
            },
        ],
    )
    assert main(["judge", "--input", str(src), "--output", str(dst), "--workers", "1"]) == 0
    rows = [orjson.loads(line) for line in dst.read_bytes().splitlines()]
    assert [(r["answer_pred"], r["format_ok"], r["is_correct"]) for r in rows] == [
        ("2012", True, True),
        ("2013", True, False),
        ("B. rectangle", True, True),
    ]
    assert rows[0]["extra"] == 1
    assert "3 lines: 2 correct" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"answer": "1"}', "missing key 'response'"),
        (b'{"response": "x", "answer": ""}', "'answer' is empty"),
        (b'{"response": "x", "answer": "1", "prompt_version": "v9"}', "unknown prompt_version"),
        (b"{not json", "invalid JSON"),
    ],
)
def test_cli_bad_input_names_file_and_line(tmp_path, capsys, line, message):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"response": "r\\\\boxed{1}", "answer": "1"}\n' + line + b"\n")
    assert main(["judge", "--input", str(src), "--output", str(tmp_path / "out.jsonl"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{src}:2: " in err and message in err
    assert not (tmp_path / "out.jsonl").exists()  # no half-written output


@pytest.mark.parametrize("name", list(PROMPT_VERSIONS))
def test_every_prompt_version_asks_for_the_format_the_judge_checks(name):
    version = PROMPT_VERSIONS[name]
    prompt = render("How many sides has a square?", name)
    assert "How many sides has a square?" in prompt and "{" not in prompt.replace("\\boxed{}", "")
    response = {
        "line": "Count them.\n{label}: 4",
        "boxed": "Count them: \\boxed{{4}}",
        "think_boxed": "<think>count</think> \\boxed{{4}}",
    }[version.answer_format].format(label=version.answer_label)
    assert extract_answer(response, name).answer == "4"
    if version.answer_format == "line":
        assert version.answer_label in prompt
