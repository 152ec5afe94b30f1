"""`mpo-data judge`: is a sampled response correct? The judge contract of docs/design.md.

Two steps with different risks. Extraction (the answer format each prompt version asks for) is linear
string work and runs where the data is read. Matching (normalisation, numbers, options, ANLS, symbolic
equality with math-verify) can explode on what a model writes, so it runs in a process pool, each
comparison under a SIGALRM bound in its worker and each task under a hard wall-clock bound in the
parent (a worker stuck in C code is killed). A comparison that times out or raises is reported as a
`judge_error`, never turned into "incorrect" silently.

Where we differ from InternVL's `accuracy_reward.py` on purpose: a response without a (balanced) box is
a format failure, not "the whole response is the answer"; ANLS is 1 - normalised edit distance (their
code takes the distance itself, so unrelated strings score high); numbers compare exactly (their 1e-3
relative tolerance makes 2013 equal 2012), except under the chart rule (5%, years exact). Each matching
rule and the verdicts we chose where graders disagree are in docs/judge.md; tests/judge_cases.jsonl holds
the labelled responses they are measured on (`make bench-judge`).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import re
import signal
import unicodedata
from collections import Counter, deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

from rapidfuzz.distance import Levenshtein

from mpo_data.errors import InputError
from mpo_data.records.formats import JUDGE_INPUT_SCHEMA
from mpo_data.records.jsonl import AtomicFile, dumps, iter_lines
from mpo_data.sampling.prompts import DEFAULT_PROMPT_VERSION, prompt_version

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
        metadata={
            "help": "Matching modes (repeatable); None: chosen by dataset name.",
            "choices": MODES,
            "aliases": ["--mode"],
        },
    )
    timeout: float = field(
        default=5.0, metadata={"help": "Seconds one comparison may take before it is a judge_error."}
    )
    workers: int = field(default=0, metadata={"help": "Matcher processes; 0: one per CPU core."})
    batch_size: int = field(default=512, metadata={"help": "Responses per task sent to a worker."})
    relaxed_tolerance: float = field(
        default=0.05, metadata={"help": "Relative error the chart (relaxed) rule accepts."}
    )
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


# The forms models write an answer label in: "**Final Answer:**", "Final answer is", "最终答案：", "答案是".
_LABEL_FORMS = {"Final answer": r"(?:the\s+)?final\s+answer", "答案": r"(?:最终的?)?答案"}


def _answer_line(label: str) -> re.Pattern:
    if label not in _ANSWER_LINES:
        form = _LABEL_FORMS.get(label, re.escape(label))
        _ANSWER_LINES[label] = re.compile(
            rf"^[\s*#>]*{form}\s*\**\s*(?:[:：]|(?:\s+is\s*|是|为)[:：]?)\**", re.IGNORECASE | re.MULTILINE
        )
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
    answer = stripped[head.end() :].strip().strip("*").strip()
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
#
# Cheap string rules first, each either decisive or passing on; math-verify (sympy) last. Every rule keeps
# what changes an answer's meaning: signs, inequality directions, bracket kinds, element order of tuples,
# digits on both sides of a comma that is not a thousands separator (docs/judge.md: the rules and why).

CACHED_STRINGS = 8192  # per-string results (clean, parse_number, ...) kept per worker: answers repeat across samples
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|boxed|fbox)\s*\{([^{}]*)\}")
# Marks NFKC keeps, and symbols written as characters rather than LaTeX.
_FULL_WIDTH = str.maketrans({"。": ".", "，": ",", "、": ",", "；": ";", "．": ".", "∞": "\\infty ", "π": "\\pi "})
_SPACING = re.compile(r"(?<!\\)\\[,!;: ]|~|\\q?quad\b|\\left\b|\\right\b|\\displaystyle\b|[\u00a0\u2009\u202f]")
_ANSWER_IS = re.compile(
    r"^(?:so,?\s+)?(?:the\s+)?(?:final\s+|correct\s+|right\s+)*(?:answer|option|choice)\b\s*(?:is\b\s*)?[:：]?\s*|^(?:最终)?答案\s*(?:是|为)?\s*[:：]?\s*",
    re.IGNORECASE,
)


@functools.lru_cache(maxsize=CACHED_STRINGS)
def clean(text: str) -> str:
    """An answer without what models wrap around it: full-width forms, `$`, \\text{}/\\boxed{} wrappers,
    spacing commands, "The answer is", `{,}` separators, a trailing period. Case is kept."""
    text = unicodedata.normalize("NFKC", text).translate(_FULL_WIDTH)
    for _ in range(3):  # nested wrappers: \boxed{\text{B}}
        unwrapped = _WRAPPER.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped
    text = _SPACING.sub(" ", text.replace("**", "").replace("{,}", ","))
    text = _ANSWER_IS.sub("", text.strip().strip("$").strip())
    text = " ".join(text.split()).strip("$").strip()
    return text[:-1].rstrip() if text.endswith(".") and not text.endswith("..") else text


@functools.lru_cache(maxsize=CACHED_STRINGS)
def normalize(text: str) -> str:
    """Case, spacing, wrappers, full-width forms and a trailing period do not matter."""
    return clean(text).lower()


_NUMBER_WORDS = dict(zip("zero one two three four five six seven eight nine ten".split(), map(str, range(11))))
_NUMBER_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!:*#~|]")
_MATHY = re.compile(r"[\\^<>=+()\[\]{}|/_\d≤≥−]|(?<![a-z])-|-(?![a-z])", re.IGNORECASE)


def vqa_normalize(text: str) -> str:
    """The VQA evaluation's answer normalisation: punctuation, articles, number words, digit commas."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower().replace("\n", " ").replace("\t", " "))
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


# Units (and currencies) by every spelling we accept; a word of 3+ letters after a count is a noun ("2 dogs").
_UNITS = {
    alias: unit
    for unit, aliases in {
        "h": "h hr hrs hour hours",
        "min": "min mins minute minutes",
        "s": "s sec secs second seconds",
        "day": "day days",
        "week": "week weeks",
        "year": "yr yrs year years",
        "month": "month months",
        "m": "m meter meters metre metres",
        "cm": "cm centimeter centimeters centimetre centimetres",
        "mm": "mm millimeter millimeters",
        "km": "km kilometer kilometers kilometre kilometres",
        "g": "g gram grams",
        "kg": "kg kilogram kilograms",
        "l": "l liter liters litre litres",
        "ml": "ml milliliter milliliters",
        "deg": "deg degree degrees",
        "ft": "ft foot feet",
        "in": "inch inches",
        "mph": "mph",
        "kmh": "kmh km/h",
        "usd": "$ usd dollar dollars us$",
        "myr": "rm myr ringgit",
        "eur": "€ eur euro euros",
        "gbp": "£ gbp pound pounds",
        "cny": "¥ cny yuan 元 rmb",
        "inr": "₹ rs inr rupee rupees",
        "cm^2": "cm^2 cm2",
        "m^2": "m^2 m2",
        "cm^3": "cm^3 cm3",
        "m^3": "m^3 m3",
    }.items()
    for alias in aliases.split()
}
_NOT_NOUNS = {"and", "or", "to", "than", "more", "less", "left", "times", "only", "each", "total", "not", "per"}
_SCALES = {"thousand": 1000, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_SMALL = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_NUMBER_WORD = re.compile(rf"(?:{'|'.join([*_SMALL, *_TENS, 'none'])})\b")

_DEGREE = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_NUMBER = re.compile(
    r"(?P<cur>us\$|usd|\$|rm|€|£|¥|₹|rs\.?)?\s*(?P<sign>[-+−]?)\s*(?P<cur2>\$)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d{1,3}(?: \d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:e(?P<exp>[-+]?\d+)|\s*(?:\\times|\\cdot|×|\*)\s*10\s*\^\s*\{?(?P<exp10>[-+−]?\d+)\}?)?"
    r"(?:\s*/\s*(?P<den>\d+))?\s*(?P<scale>thousand|million|billion|trillion)?\s*(?P<pct>%|percent|per cent)?"
    r"\s*(?P<unit>[a-z€£¥₹元$]+(?:\^?\{?[23]\}?|/h)?)?"
)
_FRAC = re.compile(r"(?P<sign>[-+−]?)\\[dt]?frac\{?(?P<num>\d+)\}?\{?(?P<den>\d+)\}?\s*(?P<pct>%)?")


def _words_to_digits(text: str) -> str:
    """Leading number words as digits: "twenty-one apples" -> "21 apples", "one hundred and five" -> "105",
    "two million" -> "2 million". Words that do not form one number stop it ("two three" -> "2 three")."""
    words = text.replace("-", " ").split()
    value, used, previous = 0, 0, ""
    for word in words:
        if word in _TENS and previous in ("", "hundred", "and"):
            value += _TENS[word]
        elif word in _SMALL and (previous in ("", "hundred", "and") or (previous in _TENS and _SMALL[word] < 10)):
            value += _SMALL[word]
        elif word == "hundred" and (previous in _SMALL and previous != "zero"):
            value *= 100
        elif word == "and" and previous == "hundred":
            pass
        elif word == "none" and not used:
            used = 1
            break
        else:
            break
        used, previous = used + 1, word
    if previous == "and":  # "one hundred and" then no number: the "and" is not part of it
        used -= 1
    return " ".join([str(value), *words[used:]]) if used else text


@functools.lru_cache(maxsize=CACHED_STRINGS)
def parse_number(text: str) -> Number | None:
    """A number as people write it: sign, separators (`1,000`, `1 000`, `14{,}916`), decimals, fractions,
    `1.5e3`, `6.02 \\times 10^{23}`, number and scale words, percent, currency, a unit or a counted noun."""
    text = normalize(text)
    if len(text) > 100:
        return None
    text = _DEGREE.sub(" deg", text).replace("\\%", "%").replace("\\$", "$").strip()
    if _NUMBER_WORD.match(text):
        text = _words_to_digits(text)
    match = _FRAC.fullmatch(text)
    if match:
        if int(match["den"]) == 0:
            return None
        value = Fraction(int(match["num"]), int(match["den"]))
        return Number(-value if match["sign"] in ("-", "−") else value, bool(match["pct"]))
    match = _NUMBER.fullmatch(text)
    if not match:
        return None
    value = Fraction(match["num"].replace(",", "").replace(" ", ""))
    exponent = match["exp"] or (match["exp10"] or "0").replace("−", "-")
    value *= Fraction(10) ** int(exponent)
    if match["den"] is not None:
        if int(match["den"]) == 0:
            return None
        value /= int(match["den"])
    if match["scale"]:
        value *= _SCALES[match["scale"]]
    if match["sign"] in ("-", "−"):
        value = -value
    unit = (match["unit"] or "").replace("{", "").replace("}", "")
    if unit in _NOT_NOUNS or unit in _SMALL or unit in _TENS or unit == "hundred":
        return None
    if unit:
        unit = _UNITS.get(unit, unit.rstrip("s") if len(unit) >= 3 and unit.isalpha() else None)
    currency = match["cur"] or match["cur2"]
    if unit is None or (currency and unit):
        return None  # "5x", "2n": not a unit, so not a number (math decides)
    return Number(value, bool(match["pct"]), _UNITS[currency.rstrip(".")] if currency else unit)


# Units of one quantity that convert ("90 min" is "1.5 h"): (dimension, size in its base unit).
_UNIT_SIZES = {
    "s": ("time", 1),
    "min": ("time", 60),
    "h": ("time", 3600),
    "day": ("time", 86400),
    "week": ("time", 604800),
    "mm": ("length", Fraction(1, 1000)),
    "cm": ("length", Fraction(1, 100)),
    "m": ("length", 1),
    "km": ("length", 1000),
    "g": ("mass", 1),
    "kg": ("mass", 1000),
    "ml": ("volume", 1),
    "l": ("volume", 1000),
}


def numbers_equal(pred: Number, gt: Number) -> bool:
    """Same value (50% also equals 0.5 and 50); units may be dropped or converted, not changed."""
    if pred.unit and gt.unit and pred.unit != gt.unit:
        p, g = _UNIT_SIZES.get(pred.unit), _UNIT_SIZES.get(gt.unit)
        return p is not None and g is not None and p[0] == g[0] and pred.value * p[1] == gt.value * g[1]
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


# "B", "(b)", "B. triangle", "(B) 40^\circ", "Option B", "选B"; the text after the letter is kept.
_OPTION_FORMS = [
    re.compile(r"\(([A-Za-z])\)\s*[.:]?\s*(.*)", re.DOTALL),
    re.compile(r"([A-Z])(?:[.:)]\s*(.*))?", re.DOTALL),
    re.compile(r"([a-z])"),
    re.compile(r"(?:option|choice|选项|选)\s*\(?([A-Za-z])\)?\s*[.:)]?\s*(.*)", re.IGNORECASE | re.DOTALL),
]
_OTHER_OPTION = re.compile(r"\([A-Z]\)")  # "(B) is wrong, so (C)" names more than one
_SEVERAL_OPTIONS = re.compile(r"\(?[A-Z]\)?(?:\s*(?:,|and|or|&|和|或|与)\s*\(?[A-Z]\)?)+")


@functools.lru_cache(maxsize=CACHED_STRINGS)
def option_parts(text: str) -> tuple[str, str] | None:
    """(letter, text after it) of an answer that names one option ("B. triangle" -> ("B", "triangle"))."""
    text = clean(text)
    for form in _OPTION_FORMS:
        match = form.fullmatch(text)
        if match:
            rest = (match.group(2) or "").strip() if form.groups > 1 else ""
            return None if _OTHER_OPTION.search(rest) else (match.group(1).upper(), rest)
    return None


def _options_verdict(pred: str, gt: str, options: tuple[tuple[str, str], ...]) -> tuple[bool | None, str, str]:
    """Multiple choice: a verdict when the ground truth is an option letter, else (None, pred, gt) with the
    letter dropped from "(B) 40^\\circ" so that its text is compared. Naming two options matches none."""
    if _SEVERAL_OPTIONS.fullmatch(clean(pred)) and not _SEVERAL_OPTIONS.fullmatch(clean(gt)):
        return False, pred, gt
    by_letter = dict(options)
    pred_parts, gt_parts = option_parts(pred), option_parts(gt)
    pred_letter = pred_parts[0] if pred_parts else next((k for k, v in options if _text_equal(pred, v)), None)
    if gt_parts is not None:
        if pred_letter is not None or not gt_parts[1]:
            return pred_letter == gt_parts[0], pred, gt
        gt = gt_parts[1]  # "B. rectangle" against an answer without a letter: compare the texts
    elif options:
        gt_letter = next((k for k, v in options if _text_equal(gt, v)), None)
        if gt_letter is not None and pred_letter is not None:
            return pred_letter == gt_letter, pred, gt
    if pred_parts is not None:
        letter, text = pred_parts
        if text:
            return None, text, gt
        if letter in by_letter:
            return _text_equal(by_letter[letter], gt), pred, gt
    return None, pred, gt


def _text_equal(pred: str, gt: str) -> bool:
    """An answer against an option's text: also with articles and punctuation dropped ("a circle")."""
    if normalize(pred) == normalize(gt):
        return True
    if not (_MATHY.search(pred) or _MATHY.search(gt)) and vqa_normalize(pred) == vqa_normalize(gt):
        return True
    p, g = parse_number(pred), parse_number(gt)
    return p is not None and g is not None and numbers_equal(p, g)


_YES_NO = re.compile(r"(yes|no|true|false)(?:[\s,.;:!]+(.*))?", re.DOTALL)


def _yes_no_verdict(pred: str, gt: str) -> bool | None:
    """A yes/no ground truth: the answer's leading yes/no decides ("Yes, it is."), unless it says both."""
    g, p = normalize(gt), normalize(pred)
    if g not in ("yes", "no"):
        return None
    match = _YES_NO.fullmatch(p)
    if not match or match[1] in ("true", "false"):
        return None
    opposite = "no" if match[1] == "yes" else "yes"
    return match[1] == g and opposite not in re.findall(r"[a-z]+", match[2] or "")


_LE = r"(?:<=|\\leq?slant|\\leq?|\\lt|<|≤)"
_GE = r"(?:>=|\\geq?slant|\\geq?|\\gt|>|≥)"
_VAR = r"[a-z]"
_CHAIN = re.compile(rf"(?P<lo>[^<>≤≥=]+?)\s*(?P<op1>{_LE})\s*{_VAR}\s*(?P<op2>{_LE})\s*(?P<hi>[^<>≤≥=]+)")
_CHAIN_DOWN = re.compile(rf"(?P<hi>[^<>≤≥=]+?)\s*(?P<op1>{_GE})\s*{_VAR}\s*(?P<op2>{_GE})\s*(?P<lo>[^<>≤≥=]+)")
_ONE_SIDED = re.compile(rf"{_VAR}\s*(?P<op>{_LE}|{_GE})\s*(?P<bound>[^<>≤≥=]+)")
_ONE_SIDED_REVERSED = re.compile(rf"(?P<bound>[^<>≤≥=]+?)\s*(?P<op>{_LE}|{_GE})\s*{_VAR}")
_IN_SET = re.compile(rf"{_VAR}\s*(?:\\in|∈)\s*(?P<set>.+)")


def _strict(op: str) -> bool:
    return op in ("<", ">", "\\lt", "\\gt")


@functools.lru_cache(maxsize=CACHED_STRINGS)
def as_interval(text: str) -> str:
    """An inequality in one variable as the interval it describes (`-2 \\le x \\le 7` -> `[-2, 7]`,
    `x > 5` -> `(5, \\infty)`, `x \\in [a, b]` -> `[a, b]`); any other text unchanged."""
    text = clean(text)
    match = _IN_SET.fullmatch(text)
    if match:
        return match["set"].strip()
    match = _CHAIN.fullmatch(text) or _CHAIN_DOWN.fullmatch(text)
    if match:
        lo, hi = match["lo"].strip(), match["hi"].strip()
        low_strict, high_strict = (match["op1"], match["op2"]) if match.re is _CHAIN else (match["op2"], match["op1"])
        return f"{'(' if _strict(low_strict) else '['}{lo}, {hi}{')' if _strict(high_strict) else ']'}"
    match = _ONE_SIDED.fullmatch(text)
    reversed_match = None if match else _ONE_SIDED_REVERSED.fullmatch(text)
    if match or reversed_match:
        bound, op = (match or reversed_match)["bound"].strip(), (match or reversed_match)["op"]
        if bool(re.fullmatch(_LE, op)) != bool(reversed_match):  # x < b, or b > x
            return f"(-\\infty, {bound}{')' if _strict(op) else ']'}"
        return f"{'(' if _strict(op) else '['}{bound}, \\infty)"
    return text


_OPENERS, _CLOSERS = "([{", ")]}"
_ELLIPSIS = {"\\ldots", "\\cdots", "\\dots", "...", "…"}
MAX_ELEMENTS = 50


@functools.lru_cache(maxsize=CACHED_STRINGS)
def split_list(text: str) -> tuple[str, tuple[str, ...], str] | None:
    """(opening bracket, elements, closing bracket) of a list, tuple, set or interval; None for one element.

    `\\{1, 2\\}` is a set ("{", "}"); a bare `1, 2` has no brackets; `1,000` is a number, not a list."""
    text = clean(text)
    opener = closer = ""
    if text.startswith("\\{") and text.endswith("\\}"):
        inner, opener, closer = text[2:-2], "{", "}"
    elif len(text) >= 2 and text[0] in _OPENERS and text[-1] in _CLOSERS and _encloses(text):
        inner, opener, closer = text[1:-1], text[0], text[-1]
    else:
        inner = text
    elements, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch in _OPENERS:
            depth += 1
        elif ch in _CLOSERS:
            depth -= 1
        elif ch == "," and depth == 0:
            elements.append(inner[start:i].strip())
            start = i + 1
    elements.append(inner[start:].strip())
    if not opener and len(elements) == 1 and re.match(r"\\pm(?![a-z])", elements[0]):  # \pm\sqrt{2}: both roots
        elements = [elements[0][3:].strip(), "-" + elements[0][3:].strip()]
    if len(elements) < 2 or len(elements) > MAX_ELEMENTS or (not opener and parse_number(text) is not None):
        return None
    return opener, tuple(elements), closer


def _encloses(text: str) -> bool:
    """Does the first bracket close at the very end (`(1,2)`, `[0,9)`), not earlier (`(1,2) \\cup (3,4)`)?"""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch in _OPENERS
        depth -= ch in _CLOSERS
        if depth == 0:
            return i == len(text) - 1
    return False


def _lists_verdict(pred: str, gt: str, match_one) -> bool | None:
    """Lists: same brackets, same length; tuples, intervals and sequences with `\\ldots` in order, sets and
    bare lists (`1, -2` for `-2, 1`) in any order. None when neither side is a list."""
    p, g = split_list(pred), split_list(gt)
    if p is None and g is None:
        return None
    if p is None or g is None:
        return False
    (p_open, p_items, p_close), (g_open, g_items, g_close) = p, g
    unordered = (g_open, g_close) in (("", ""), ("{", "}"))
    if (p_open, p_close) != (g_open, g_close) and not (unordered and (p_open, p_close) in (("", ""), ("{", "}"))):
        return False
    if len(p_items) != len(g_items):
        return False
    if any(e in _ELLIPSIS for e in p_items + g_items):
        unordered = False
    if not unordered:
        return all(_element_equal(a, b, match_one) for a, b in zip(p_items, g_items))
    left = list(g_items)
    for item in p_items:
        hit = next((i for i, other in enumerate(left) if _element_equal(item, other, match_one)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def _element_equal(pred: str, gt: str, match_one) -> bool:
    if pred in _ELLIPSIS or gt in _ELLIPSIS:
        return pred in _ELLIPSIS and gt in _ELLIPSIS
    return match_one(pred, gt)


_SYMBOLIC = re.compile(r"[\\^=*/()\[\]]|sqrt|pi|[a-z]\s*[+-]|[+-]\s*[a-z]|\d[a-z]|!", re.IGNORECASE)
RELATIVE_TOLERANCE = 1e-9  # numbers math-verify calls equal must also agree to 9 significant digits


def _numerically_apart(a: Any, b: Any) -> bool:
    """Two constants math-verify rounded to the same 6 decimals (1/2006! and 1/2004!) but that differ."""
    import sympy

    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr) and a.is_number and b.is_number):
        return False
    x, y = sympy.N(a, 30), sympy.N(b, 30)
    if not (x.is_real and y.is_real) or x == y:
        return False
    return bool(abs(x - y) > RELATIVE_TOLERANCE * max(abs(x), abs(y)))


def math_equal(pred: str, gt: str) -> bool:
    """Symbolic equality by math-verify, with its signal-based timeouts off (our worker bounds it), and
    constants compared relatively rather than after rounding to 6 decimals."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"${gt}$", extraction_config=config, parsing_timeout=None, raise_on_error=True)
    target = parse(f"${pred}$", extraction_config=config, parsing_timeout=None, raise_on_error=True)
    if not gold or not target:
        return False
    if not verify(gold, target, timeout_seconds=None, raise_on_error=True):
        return False
    return not _numerically_apart(gold[0], target[0])


def answers_match(
    pred: str,
    gt: str,
    modes: tuple[str, ...],
    options: tuple[tuple[str, str], ...] = (),
    relaxed_tolerance: float = 0.05,
    anls_threshold: float = 0.9,
) -> bool:
    """Is answer `pred` equal to ground truth `gt` under `modes` (exact after normalisation always counts)?

    The public equality of the judge: pairs' self-consistency labels call it on two sampled answers too."""
    if normalize(pred) == normalize(gt):
        return True
    if len(pred) > MAX_COMPARE_CHARS or len(gt) > MAX_COMPARE_CHARS:
        return False
    if "mc" in modes:
        verdict, pred, gt = _options_verdict(pred, gt, options)
        if verdict is not None:
            return verdict
    verdict = _yes_no_verdict(pred, gt)
    if verdict is not None:
        return verdict
    return _values_match(pred, gt, modes, relaxed_tolerance, anls_threshold)


def _values_match(pred: str, gt: str, modes: tuple[str, ...], tolerance: float, threshold: float) -> bool:
    """Numbers, lists, VQA words, ANLS and symbolic math, in order of cost."""
    if normalize(pred) == normalize(gt):
        return True
    p_num, g_num = parse_number(pred), parse_number(gt)
    if p_num is not None and g_num is not None:  # two numbers: exact (or relaxed), never by edit distance
        return numbers_equal(p_num, g_num) or ("relaxed" in modes and relaxed_equal(p_num, g_num, tolerance))
    mathy = _MATHY.search(pred) or _MATHY.search(gt)
    p_set, g_set = (as_interval(pred), as_interval(gt)) if mathy else (pred, gt)
    if mathy:  # word lists ("red, white") are left to the VQA and ANLS rules
        verdict = _lists_verdict(p_set, g_set, lambda a, b: _values_match(a, b, modes, tolerance, threshold))
        if verdict is not None:
            return verdict
    if "vqa" in modes and not mathy and vqa_normalize(pred) and vqa_normalize(pred) == vqa_normalize(gt):
        return True
    if "anls" in modes and anls(clean(pred), clean(gt)) >= threshold:
        return True
    if "math" in modes and (_SYMBOLIC.search(pred) or _SYMBOLIC.search(gt)):
        return math_equal(clean(p_set), clean(g_set))
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
    math_equal("x", "x")  # loads math-verify's parser here, not under the first comparison's alarm (seconds)


@dataclass
class JudgeItem:
    """One response to judge (the judge contract's input line, parsed); `payload` travels back untouched."""

    payload: Any
    response: str
    answer: str
    question: str | None
    prompt_version: str
    modes: tuple[str, ...]


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

    KEYS: ClassVar[tuple[str, ...]] = ("answer_pred", "format_ok", "is_correct", "judge_error", "answer_span")

    def contract(self) -> dict[str, Any]:
        """The keys the judge adds to a line (`judge` output, judged samples in pairs' pos_items/)."""
        out: dict[str, Any] = {
            "answer_pred": self.answer_pred,
            "format_ok": self.format_ok,
            "is_correct": self.is_correct,
        }
        if self.judge_error:
            out["judge_error"] = self.judge_error
        if self.span:
            out["answer_span"] = list(self.span)
        return out


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
        for row in rows:
            extraction = extract_answer(row.response, row.prompt_version)
            key = None
            if extraction.format_ok:
                options = question_options(row.question) if "mc" in row.modes else ()
                key = (extraction.answer, row.answer, row.modes, options)
                if key not in self._cache:
                    todo[key] = None
            payloads.append(row.payload)
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
            verdict = Verdict(
                extraction.answer, extraction.format_ok, matched and error is None, error, extraction.span
            )
            verdicts.append((payload, verdict))
        return verdicts

    def judge_many(self, rows: Iterable[JudgeItem]) -> Iterator[tuple[Any, Verdict]]:
        """(payload, verdict) for each item, in order.

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


def judge_item(loc: str, raw: Any, modes: tuple[str, ...]) -> JudgeItem:
    """The judge contract's input line (`JUDGE_INPUT_SCHEMA`) as an item, or InputError naming FILE:LINE."""
    problems = JUDGE_INPUT_SCHEMA.problems(raw)
    if problems:
        raise InputError(f"{loc}: {problems[0]}")
    return JudgeItem(raw, raw["response"], str(raw["answer"]), raw.get("question"), checked_version(loc, raw), modes)


def judge_file(input_path: Path, output_path: Path, config: JudgeConfig, dataset: str | None = None) -> Counter:
    """Judge every line of a JSONL file into `output_path` (atomic); returns the counts."""
    modes = tuple(config.modes) if config.modes else modes_for_dataset(dataset or input_path.stem)

    def parsed() -> Iterator[JudgeItem]:
        for line in iter_lines(input_path):
            if line.error:
                raise InputError(f"{line.loc}: {line.error}")
            yield judge_item(line.loc, line.value, modes)

    counts: Counter = Counter()
    with Judge(config) as judge, AtomicFile(output_path) as out:
        for row, verdict in judge.judge_many(parsed()):
            row.update(verdict.contract())
            out.write(dumps(row))
            counts.update(
                lines=1,
                correct=verdict.is_correct,
                format_failures=not verdict.format_ok,
                judge_errors=verdict.judge_error is not None,
            )
    return counts
