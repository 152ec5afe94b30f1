"""Shape/colour hallucinations in easy-VQA descriptions: DropoutNTP's premise, measured.

DropoutNTP assumes that a model continuing a description without the image makes things up. easy-VQA
images hold one shape in one colour, so a rule over shape and colour words can check that: a text that
names (not negated: "there is no triangle" names nothing) a shape or colour other than the image's is a
hallucination; one that names only the image's is faithful; one that names none makes no claim. The
image's own shape and colour are read from the faithful description (`chosen`) with the same rule.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal

from mpo_data.stats import wilson

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")  # easy-VQA's eight
SYNONYMS = {"grey": "gray", "circles": "circle", "rectangles": "rectangle", "triangles": "triangle"}
NEGATIONS = {"no", "not", "without", "nor", "neither"}
NEGATION_REACH = 2  # a negation word up to this many words before a shape/colour word cancels it ("no red circle")
WORD = re.compile(r"[a-z]+")

Verdict = Literal["faithful", "hallucination", "no_claim"]


def claims(text: str) -> tuple[set[str], set[str]]:
    """(shapes, colours) the text names, leaving out negated mentions."""
    words = [SYNONYMS.get(w, w) for w in WORD.findall(text.lower())]
    shapes, colours = set(), set()
    for i, word in enumerate(words):
        if word not in SHAPES and word not in COLOURS:
            continue
        if NEGATIONS & set(words[max(0, i - NEGATION_REACH) : i]):
            continue
        (shapes if word in SHAPES else colours).add(word)
    return shapes, colours


def truth(description: str) -> tuple[str, str] | None:
    """The (shape, colour) a faithful description names, or None unless it names exactly one of each."""
    shapes, colours = claims(description)
    return (next(iter(shapes)), next(iter(colours))) if len(shapes) == 1 and len(colours) == 1 else None


def verdict(text: str, shape: str, colour: str) -> Verdict:
    """Is `text` faithful to an image of a `colour` `shape`, a hallucination, or no claim at all?"""
    shapes, colours = claims(text)
    if not shapes and not colours:
        return "no_claim"
    return "faithful" if shapes <= {shape} and colours <= {colour} else "hallucination"


def score_continuation(chosen: str, rejected: str, prefix: str) -> Verdict | Literal["unscored"]:
    """The verdict on what a DropoutNTP continuation added to `prefix` (the start of `chosen`);
    "unscored" where `chosen` does not name one shape and one colour (not an easy-VQA description)."""
    facts = truth(chosen)
    if facts is None or not rejected.startswith(prefix):
        return "unscored"
    return verdict(rejected[len(prefix) :], *facts)


def rate(counts: Counter) -> dict:
    """Hallucination rate among continuations that make a claim, with its 95% Wilson interval."""
    claimed = counts["faithful"] + counts["hallucination"]
    low, high = wilson(counts["hallucination"], claimed)
    return {
        "rate": round(counts["hallucination"] / claimed, 4) if claimed else None,
        "ci": [round(low, 4), round(high, 4)],
        "hallucination": counts["hallucination"],
        "faithful": counts["faithful"],
        "no_claim": counts["no_claim"],
        "unscored": counts["unscored"],
    }
