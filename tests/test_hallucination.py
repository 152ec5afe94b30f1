"""The shape/colour hallucination scorer on hand-written easy-VQA descriptions and continuations."""

from __future__ import annotations

from collections import Counter

import pytest

from mpo_data.preference import hallucination as h
from mpo_data.sampling.dropout_ntp import cut_prefix
from mpo_data.tools.demo import describe


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A red circle on a white background.", "faithful"),
        ("The picture shows a blue circle.", "hallucination"),  # wrong colour
        ("It is a red triangle.", "hallucination"),  # wrong shape
        ("There is no triangle and no rectangle, only a circle.", "faithful"),  # negated shapes claim nothing
        ("There is no green shape here.", "no_claim"),
        ("A plain picture with something in the middle.", "no_claim"),
        ("Two circles, drawn in grey.", "hallucination"),  # synonyms and plurals are read
        ("The circle is red and the square is drawn with care.", "faithful"),  # "square" is no easy-VQA shape
    ],
)
def test_verdicts_on_an_image_of_a_red_circle(text, expected):
    assert h.verdict(text, "circle", "red") == expected


def test_a_faithful_description_gives_the_truth_back():
    assert h.truth(describe("triangle", "teal")) == ("triangle", "teal")
    assert h.truth("A red and blue circle.") is None  # two colours: not one image's truth


def test_continuations_are_scored_after_the_prefix():
    chosen = describe("rectangle", "yellow")
    prefix, rest = cut_prefix(chosen, 0.5)
    assert h.score_continuation(chosen, chosen, prefix) == "faithful"
    assert h.score_continuation(chosen, prefix + " with one flat blue colour.", prefix) == "hallucination"
    assert h.score_continuation(chosen, prefix + " and that is all.", prefix) == "no_claim"
    assert h.score_continuation("Describe nothing.", "Describe nothing. A red circle.", "Describe") == "unscored"


def test_rate_counts_claims_only_and_gives_a_wilson_interval():
    summary = h.rate(Counter(hallucination=3, faithful=7, no_claim=5))
    assert summary["rate"] == 0.3 and summary["no_claim"] == 5
    low, high = summary["ci"]
    assert 0.1 < low < 0.3 < high < 0.61
    assert h.rate(Counter(no_claim=2))["rate"] is None
