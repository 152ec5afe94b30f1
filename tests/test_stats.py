"""Interval statistics (mpo_data/stats.py): Wilson's interval against published values, Newcombe's paired interval."""

from __future__ import annotations

import math

import pytest

from mpo_data.stats import paired_difference_ci, wilson


def test_wilson_matches_published_values():
    # Newcombe (1998), single proportion, method 3: 0/10 -> (0, 0.2775), 5/10 -> (0.2366, 0.7634)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)


def _verdicts(both: int, gained: int, lost: int, neither: int) -> tuple[list[bool], list[bool]]:
    before = [True] * both + [False] * gained + [True] * lost + [False] * neither
    after = [True] * both + [True] * gained + [False] * lost + [False] * neither
    return before, after


def test_paired_interval_without_correlation_is_square_and_add_of_wilson():
    # ad - bc = 0: phi is 0 and the interval is the plain square-and-add of the two Wilson intervals
    before, after = _verdicts(both=10, gained=10, lost=10, neither=10)
    (l1, u1), (l2, u2) = wilson(20, 40), wilson(20, 40)
    low, high = paired_difference_ci(before, after)
    assert low == pytest.approx(-math.hypot(0.5 - l1, u2 - 0.5)) and high == pytest.approx(
        math.hypot(u1 - 0.5, 0.5 - l2)
    )


def test_paired_interval_narrows_with_correlation_and_mirrors_when_swapped():
    before, after = _verdicts(both=60, gained=25, lost=5, neither=110)
    low, high = paired_difference_ci(before, after)
    assert low < 0.1 < high and low > 0  # 20 more right out of 200, correlated verdicts: clearly above zero
    (l1, u1), (l2, u2) = wilson(85, 200), wilson(65, 200)
    assert high - low < math.hypot(0.425 - l1, u2 - 0.325) + math.hypot(
        u1 - 0.425, 0.325 - l2
    )  # narrower than independent
    assert paired_difference_ci(after, before) == pytest.approx((-high, -low))
