"""Interval statistics for the figures we report: Wilson's interval of a proportion and Newcombe's interval of a
paired difference (answer accuracy before vs after training, the ablation, the hallucination rate)."""

from __future__ import annotations

import math
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (no continuity correction); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_ci(before: list[bool], after: list[bool], z: float = Z95) -> tuple[float, float]:
    """Newcombe's interval for accuracy(after) - accuracy(before) on the same questions (method 10).

    The correlation estimate phi is continuity-corrected as in Newcombe's paper (0 while ad - bc <= n/2).
    """
    n = len(before)
    both = sum(a and b for a, b in zip(after, before))
    gained = sum(a and not b for a, b in zip(after, before))
    lost = sum(b and not a for a, b in zip(after, before))
    neither = n - both - gained - lost
    p1, p2 = (both + gained) / n, (both + lost) / n
    (l1, u1), (l2, u2) = wilson(both + gained, n, z), wilson(both + lost, n, z)
    cross = both * neither - gained * lost
    corrected = cross - n / 2 if cross > n / 2 else min(cross, 0)
    margins = (both + gained) * (lost + neither) * (both + lost) * (gained + neither)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)
