"""`mpo-data judge`: is a sampled response correct? The judge contract of design.md.

Two steps with different risks. Extraction (the answer format each prompt version asks for) is linear
string work and runs where the data is read. Matching (normalisation, numbers, options, ANLS, symbolic
equality with math-verify) can explode on what a model writes, so it runs in a process pool, each
comparison under a SIGALRM bound in its worker and each task under a hard wall-clock bound in the
parent (a worker stuck in C code is killed). A comparison that times out or raises is reported as a
`judge_error`, never turned into "incorrect" silently.

Where we differ from InternVL's `accuracy_reward.py` on purpose: a response without a (balanced) box is
a format failure, not "the whole response is the answer"; ANLS is 1 - normalised edit distance (their
code takes the distance itself, so unrelated strings score high); numbers compare exactly (their 1e-3
relative tolerance makes 2013 equal 2012), except under the chart rule (5%, years exact).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
from collections import Counter, deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

from rapidfuzz.distance import Levenshtein

from mpo_data.errors import InputError
from mpo_data.jsonl import AtomicFile, dumps, iter_lines
from mpo_data.prompts import DEFAULT_PROMPT_VERSION, prompt_version

MODES = ("vqa", "mc", "number", "relaxed", "anls", "math")  # exact match after normalisation always applies

# Dataset-name keywords -> matching modes, first hit wins (InternVL's get_mode, plus chart/doc siblings).
DATASET_MODES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("chartqa", "plotqa", "dvqa", "figureqa"), ("relaxed",)),
    (("docvqa", "infographic", "infovqa"), ("anls",)),
    (("sroie", "clevr_math", "geos", "geometry"), ("relaxed", "vqa", "mc")),
    (("mavis",), ("vqa", "mc", "number", "math")),
]
DEFAULT_MODES = ("vqa", "mc", "number", "math")

MAX_COMPARE_CHARS = 2000  # edit distance and number parsing skip longer answers (exact match still applies)


def modes_for_dataset(name: str) -> tuple[str, ...]:
    """The matching modes InternVL uses for a dataset, chosen by keywords in its name."""
    lowered = name.lower()
    for keywords, modes in DATASET_MODES:
        if any(k in lowered for k in keywords):
            return modes
    return DEFAULT_MODES


@dataclass
class JudgeConfig:
    """How answers are matched and how long one verdict may take."""

    modes: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Matching modes (repeatable); None: chosen by dataset name.", "choices": MODES, "aliases": ["--mode"]},
    )
    timeout: float = field(default=5.0, metadata={"help": "Seconds one comparison may take before it is a judge_error."})
    workers: int = field(default=0, metadata={"help": "Matcher processes; 0: one per CPU core."})
    batch_size: int = field(default=512, metadata={"help": "Responses per task sent to a worker."})
    relaxed_tolerance: float = field(default=0.05, metadata={"help": "Relative error the chart (relaxed) rule accepts."})
    anls_threshold: float = field(
        default=0.9, metadata={"help": "ANLS similarity a document answer needs (InternVL's 0.9 bar on every score)."}
    )


# ----------------------------------------------------------------------------------------- extraction


@dataclass
class Extraction:
    """The final answer a response gives, and where it sits (for --answer-fix)."""

    answer: str | None
    format_ok: bool
    span: tuple[int, int] | None = None


_FAIL = Extraction(None, False)
_BRACE = re.compile(r"[{}]")
_ANSWER_LINES: dict[str, re.Pattern] = {}  # label -> the pattern of a line that starts with it


def _answer_line(label: str) -> re.Pattern:
    if label not in _ANSWER_LINES:
        _ANSWER_LINES[label] = re.compile(rf"^[\s*#>]*{re.escape(label)}\s*[:：]\**", re.IGNORECASE | re.MULTILINE)
    return _ANSWER_LINES[label]


def last_boxed(text: str, start: int = 0) -> Extraction:
    """Content of the last \\boxed{...} at or after `start`, braces balanced; unbalanced is a failure."""
    open_at = text.rfind("\\boxed{", start)
    if open_at == -1:
        return _FAIL
    begin = open_at + len("\\boxed{")
    depth = 1
    for match in _BRACE.finditer(text, begin):  # linear; only brace positions are visited
        depth += 1 if match.group() == "{" else -1
        if depth == 0:
            end = match.start()
            answer = text[begin:end].strip()
            return Extraction(answer, True, (begin, end)) if answer else _FAIL
    return _FAIL


def _final_answer_line(text: str, label: str) -> Extraction:
    """en/zh: the last non-empty line reads `<label>: ...` (Final answer, 答案) after some reasoning."""
    stripped = text.rstrip()
    line_start = stripped.rfind("\n") + 1
    if line_start == 0:  # no reasoning before the answer line
        return _FAIL
    head = _answer_line(label).match(stripped, line_start)
    if not head:
        return _FAIL
    answer = stripped[head.end():].strip().strip("*").strip()
    if not answer:
        return _FAIL
    begin = stripped.index(answer, head.end())
    return Extraction(answer, True, (begin, begin + len(answer)))


def _think_then_box(text: str) -> Extraction:
    """en_r1/zh_r1: exactly one <think>...</think> block, then the boxed answer after it."""
    if text.count("<think>") != 1 or text.count("</think>") != 1:
        return _FAIL
    opened, closed = text.find("<think>"), text.find("</think>")
    if text[:opened].strip() or closed < opened:
        return _FAIL
    return last_boxed(text, closed + len("</think>"))


def extract_answer(response: str, version: str = DEFAULT_PROMPT_VERSION) -> Extraction:
    """The final answer in the format prompt version `version` asks for; anything else is a format failure."""
    spec = prompt_version(version)
    if spec.answer_format == "line":
        return _final_answer_line(response, spec.answer_label)
    if spec.answer_format == "boxed":
        return last_boxed(response)
    return _think_then_box(response)


_OPTION_LINE = re.compile(r"^[ \t]*\(?([A-Z])[.:)][ \t]*(\S[^\n]*?)[ \t]*$", re.MULTILINE)


def question_options(question: str | None) -> tuple[tuple[str, str], ...]:
    """Options a question lists one per line ("A. triangle", "(B) red"), as (letter, text)."""
    if not question:
        return ()
    found = dict(_OPTION_LINE.findall(question))
    return tuple(sorted(found.items())) if len(found) >= 2 else ()


# ------------------------------------------------------------------------------------------- matching

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize(text: str) -> str:
    """Case, spacing, math delimiters, \\text{} wrappers and a trailing period do not matter."""
    text = _TEXT_WRAPPER.sub(r"\1", text.strip())
    text = text.replace("**", "").strip().strip("$").strip()
    text = re.sub(r"\s+", " ", text).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


_NUMBER_WORDS = dict(zip("zero one two three four five six seven eight nine ten".split(), map(str, range(11))))
_NUMBER_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!:*#~|]")


def vqa_normalize(text: str) -> str:
    """The VQA evaluation's answer normalisation: punctuation, articles, number words, digit commas."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower().replace("\n", " ").replace("\t", " "))
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", "", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


@dataclass(frozen=True)
class Number:
    """A numeric answer: exact value, whether it was a percentage, and its unit if any."""

    value: Fraction
    percent: bool = False
    unit: str = ""


_DEGREE = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_NUMBER = re.compile(
    r"(?P<sign>[-+−]?)\s*(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+))?\s*(?P<pct>%)?\s*(?P<unit>[a-z]{1,12}(?:\^?[23])?)?"
)
_FRAC = re.compile(r"(?P<sign>[-+−]?)\\[dt]?frac\{?(?P<num>\d+)\}?\{?(?P<den>\d+)\}?\s*(?P<pct>%)?(?P<unit>)")
_UNIT_ALIASES = {"degree": "deg", "degrees": "deg", "°": "deg"}


def parse_number(text: str) -> Number | None:
    """A number with optional sign, thousand separators, fraction, percent sign and unit; else None."""
    text = normalize(text)
    if len(text) > 100:
        return None
    text = _DEGREE.sub(" deg", text).replace("\\%", "%").replace("\\,", "").replace("\\!", "").lstrip("$").strip()
    match = _FRAC.fullmatch(text) or _NUMBER.fullmatch(text)
    if not match:
        return None
    value = Fraction(match["num"].replace(",", ""))
    if match["den"] is not None:
        if int(match["den"]) == 0:
            return None
        value /= int(match["den"])
    if match["sign"] in ("-", "−"):
        value = -value
    unit = match["unit"] or ""
    unit = _UNIT_ALIASES.get(unit, unit.rstrip("s") if len(unit) > 3 else unit)
    return Number(value, bool(match["pct"]), unit)


def numbers_equal(pred: Number, gt: Number) -> bool:
    """Same value (50% also equals 0.5 and 50); units may be dropped but must not differ."""
    if pred.unit and gt.unit and pred.unit != gt.unit:
        return False
    if pred.value == gt.value:
        return True
    if gt.percent and not pred.percent:
        return pred.value == gt.value / 100
    if pred.percent and not gt.percent:
        return pred.value / 100 == gt.value
    return False


def _is_year(number: Number) -> bool:
    return number.value.denominator == 1 and 1000 <= number.value <= 2999 and not number.percent


def relaxed_equal(pred: Number, gt: Number, tolerance: float) -> bool:
    """ChartQA's relaxed accuracy: within `tolerance` relative error; years and zero must be exact."""
    if pred.unit and gt.unit and pred.unit != gt.unit:
        return False
    if _is_year(gt) or gt.value == 0:
        return pred.value == gt.value
    return abs(pred.value - gt.value) <= abs(gt.value) * Fraction(tolerance)


def anls(pred: str, gt: str) -> float:
    """ANLS similarity of one answer: 1 - normalised edit distance, 0 when that distance is >= 0.5."""
    pred, gt = " ".join(pred.lower().split()), " ".join(gt.lower().split())
    distance = Levenshtein.normalized_distance(pred, gt)  # edit distance / longer length; 0 for two empty strings
    return 1.0 - distance if distance < 0.5 else 0.0


_LETTER_FORMS = [
    re.compile(r"\(?([A-Za-z])\)?"),  # "B", "(b)"
    re.compile(r"\(([A-Za-z])\)\s.*", re.DOTALL),  # "(B) triangle"
    re.compile(r"([A-Z])[.:)](?:\s.*)?", re.DOTALL),  # "B. triangle", "B)"
    re.compile(r"(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is\s*)?[:：]?\s*\(?([A-Za-z])\)?\.?", re.I),
]


def option_letter(text: str) -> str | None:
    """The option letter an answer names: "B", "(b)", "B. triangle", "Option B"; else None."""
    text = text.strip().strip("*$").strip()
    for form in _LETTER_FORMS:
        match = form.fullmatch(text)
        if match:
            return match.group(1).upper()
    return None


def _text_equal(pred: str, gt: str) -> bool:
    if normalize(pred) == normalize(gt):
        return True
    p, g = parse_number(pred), parse_number(gt)
    return p is not None and g is not None and numbers_equal(p, g)


def options_equal(pred: str, gt: str, options: tuple[tuple[str, str], ...]) -> bool:
    """Multiple choice: same letter, or the option's text given where the other side gives its letter."""
    by_letter = dict(options)
    pred_letter, gt_letter = option_letter(pred), option_letter(gt)
    if gt_letter is None:
        gt_letter = next((k for k, v in options if _text_equal(gt, v)), None)
    if pred_letter is None:
        pred_letter = next((k for k, v in options if _text_equal(pred, v)), None)
    if gt_letter is not None and pred_letter is not None:
        return pred_letter == gt_letter
    if pred_letter is not None and pred_letter in by_letter:
        return _text_equal(by_letter[pred_letter], gt)
    return False


_SYMBOLIC = re.compile(r"[\\^=*/()]|sqrt|pi|[a-z]\s*[+-]|[+-]\s*[a-z]|\d[a-z]", re.IGNORECASE)


def math_equal(pred: str, gt: str) -> bool:
    """Symbolic equality by math-verify, with its signal-based timeouts off (our worker bounds it)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"${gt}$", extraction_config=config, parsing_timeout=None, raise_on_error=True)
    target = parse(f"${pred}$", extraction_config=config, parsing_timeout=None, raise_on_error=True)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=None, raise_on_error=True))


def answers_match(
    pred: str,
    gt: str,
    modes: tuple[str, ...],
    options: tuple[tuple[str, str], ...] = (),
    relaxed_tolerance: float = 0.05,
    anls_threshold: float = 0.9,
) -> bool:
    """Does `pred` match `gt` under any of `modes` (exact after normalisation always counts)?"""
    if normalize(pred) == normalize(gt):
        return True
    if len(pred) > MAX_COMPARE_CHARS or len(gt) > MAX_COMPARE_CHARS:
        return False
    p_num, g_num = parse_number(pred), parse_number(gt)
    if p_num is not None and g_num is not None:  # two numbers: exact (or relaxed), never by edit distance
        return numbers_equal(p_num, g_num) or ("relaxed" in modes and relaxed_equal(p_num, g_num, relaxed_tolerance))
    if "mc" in modes and options_equal(pred, gt, options):
        return True
    if "vqa" in modes and vqa_normalize(pred) and vqa_normalize(pred) == vqa_normalize(gt):
        return True
    if "anls" in modes and (p_num is None or g_num is None) and anls(pred, gt) >= anls_threshold:
        return True
    if "math" in modes and (_SYMBOLIC.search(pred) or _SYMBOLIC.search(gt)):
        return math_equal(pred, gt)
    return False


# --------------------------------------------------------------------------------- bounded worker pool


class _Timeout(BaseException):
    """Raised by SIGALRM inside a worker; a BaseException so that math-verify's `except Exception` lets it through."""


def _on_alarm(signum, frame) -> None:
    raise _Timeout


def _init_worker() -> None:
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    logging.getLogger("math_verify").setLevel(logging.ERROR)


JudgeItem = tuple[Any, str, str, str | None, str, tuple[str, ...]]  # payload, response, answer, question, version, modes
MatchKey = tuple[str, str, tuple[str, ...], tuple[tuple[str, str], ...]]
MatchResult = tuple[bool, str | None]  # (matched, judge_error)


def _match_many(keys: list[MatchKey], timeout: float, tolerance: float, threshold: float) -> list[MatchResult]:
    """Worker task: each comparison under its own SIGALRM bound."""
    results: list[MatchResult] = []
    for pred, gt, modes, options in keys:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            results.append((answers_match(pred, gt, modes, options, tolerance, threshold), None))
        except _Timeout:
            results.append((False, f"timeout after {timeout:g}s"))
        except Exception as e:  # a verifier that raises is reported, never read as "incorrect"
            results.append((False, f"{type(e).__name__}: {str(e)[:200]}"))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return results


@dataclass
class Verdict:
    """The judge's output for one response."""

    answer_pred: str | None
    format_ok: bool
    is_correct: bool
    judge_error: str | None = None
    span: tuple[int, int] | None = None  # where answer_pred sits in the response


@dataclass
class _Task:
    payloads: list[Any]
    extractions: list[Extraction]
    keys: list[MatchKey | None]
    todo: list[MatchKey]
    handle: Any = None


class Judge:
    """Judges streams of responses on a process pool; every verdict arrives within a bounded time.

    Use as a context manager. Verdicts of repeated (answer, ground truth) pairs are cached.
    """

    CACHE_LIMIT = 200_000

    def __init__(self, config: JudgeConfig | None = None):
        self.config = config or JudgeConfig()
        self.workers = self.config.workers or os.cpu_count() or 1
        self._context = multiprocessing.get_context("forkserver")
        self._pool = None
        self._cache: dict[MatchKey, MatchResult] = {}
        self._pending: deque[_Task] = deque()

    def __enter__(self) -> "Judge":
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self._pool = self._context.Pool(self.workers, initializer=_init_worker)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def _submit(self, keys: list[MatchKey]) -> Any:
        c = self.config
        return self._pool.apply_async(_match_many, (keys, c.timeout, c.relaxed_tolerance, c.anls_threshold))

    def _restart(self) -> None:
        """Kill a pool with a stuck worker and resubmit what was in flight."""
        self.close()
        self._start()
        for task in self._pending:
            if task.todo:
                task.handle = self._submit(task.todo)

    def _results(self, todo: list[MatchKey], handle: Any) -> list[MatchResult]:
        """Wait for a task within its hard bound; on a hang, kill the pool and retry key by key."""
        bound = self.config.timeout * (len(todo) + 1) + 10
        try:
            return handle.get(bound)
        except multiprocessing.TimeoutError:
            self._restart()
        if len(todo) == 1:
            return [(False, f"timeout after {self.config.timeout:g}s (worker killed)")]
        return [self._results([key], self._submit([key]))[0] for key in todo]

    def _prepare(self, rows: list[JudgeItem]) -> _Task:
        payloads, extractions, keys, todo = [], [], [], {}
        for payload, response, answer, question, version, modes in rows:
            extraction = extract_answer(response, version)
            key = None
            if extraction.format_ok:
                options = question_options(question) if "mc" in modes else ()
                key = (extraction.answer, str(answer), modes, options)
                if key not in self._cache:
                    todo[key] = None
            payloads.append(payload)
            extractions.append(extraction)
            keys.append(key)
        task = _Task(payloads, extractions, keys, list(todo))
        if task.todo:
            task.handle = self._submit(task.todo)
        return task

    def _finish(self, task: _Task) -> list[tuple[Any, Verdict]]:
        if task.todo:
            if len(self._cache) > self.CACHE_LIMIT:
                self._cache.clear()
            self._cache.update(zip(task.todo, self._results(task.todo, task.handle)))
        verdicts = []
        for payload, extraction, key in zip(task.payloads, task.extractions, task.keys):
            matched, error = self._cache[key] if key is not None else (False, None)
            verdict = Verdict(extraction.answer, extraction.format_ok, matched and error is None, error, extraction.span)
            verdicts.append((payload, verdict))
        return verdicts

    def judge_many(self, rows: Iterable[JudgeItem]) -> Iterator[tuple[Any, Verdict]]:
        """(payload, verdict) for each (payload, response, answer, question, prompt_version, modes), in order.

        The payload travels untouched, so callers stream their records through without keeping them.
        """
        in_flight = 2 * self.workers
        batch: list = []
        for row in rows:
            batch.append(row)
            if len(batch) >= self.config.batch_size:
                self._pending.append(self._prepare(batch))
                batch = []
                while len(self._pending) > in_flight:
                    yield from self._finish(self._pending.popleft())
        if batch:
            self._pending.append(self._prepare(batch))
        while self._pending:
            yield from self._finish(self._pending.popleft())


# ------------------------------------------------------------------------------------ judging a file


def checked_version(loc: str, raw: dict) -> str:
    """The prompt_version a sample line names (default en_v2), or InputError naming the line."""
    version = raw.get("prompt_version") or DEFAULT_PROMPT_VERSION
    try:
        prompt_version(version)
    except ValueError as e:
        raise InputError(f"{loc}: {e}") from None
    return version


def _judge_row(loc: str, raw: Any) -> tuple[str, str, str | None, str]:
    """(response, answer, question, prompt_version) of one input line, or InputError naming it."""
    if not isinstance(raw, dict):
        raise InputError(f"{loc}: expected a JSON object, got {type(raw).__name__}")
    if not isinstance(raw.get("response"), str):
        raise InputError(f"{loc}: 'response' must be a string")
    answer = raw.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise InputError(f"{loc}: 'answer' must be a non-empty string or number")
    question = raw.get("question")
    if question is not None and not isinstance(question, str):
        raise InputError(f"{loc}: 'question' must be a string")
    return raw["response"], str(answer), question, checked_version(loc, raw)


def judge_file(input_path: Path, output_path: Path, config: JudgeConfig, dataset: str | None = None) -> Counter:
    """Judge every line of a JSONL file into `output_path` (atomic); returns the counts."""
    modes = tuple(config.modes) if config.modes else modes_for_dataset(dataset or input_path.stem)

    def parsed() -> Iterator[JudgeItem]:
        for line in iter_lines(input_path):
            if line.error:
                raise InputError(f"{line.loc}: {line.error}")
            yield (line.value, *_judge_row(line.loc, line.value), modes)

    counts: Counter = Counter()
    with Judge(config) as judge, AtomicFile(output_path) as out:
        for row, verdict in judge.judge_many(parsed()):
            row.update(answer_pred=verdict.answer_pred, format_ok=verdict.format_ok, is_correct=verdict.is_correct)
            if verdict.judge_error:
                row["judge_error"] = verdict.judge_error
            out.write(dumps(row))
            counts.update(lines=1, correct=verdict.is_correct, format_failures=not verdict.format_ok,
                          judge_errors=verdict.judge_error is not None)
    return counts
