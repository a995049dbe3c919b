"""The one-run privacy audit's statistics: an empirical lower bound on ε from canary guesses.

Both audits rest on Steinke, Nasr and Jagielski (2023), "Privacy Auditing with One (1) Training
Run": insert m canaries, each an independent privacy unit included with probability 1/2; after
training, guess "included" for the k+ highest-scoring canaries and "excluded" for the k- lowest.
Under (ε, δ)-DP the number of correct guesses is dominated by Binomial(k+ + k-, e^ε / (1 + e^ε))
up to a δ term (their Theorem, implemented in :func:`audit_p_value`), so many correct guesses
prove an empirical lower bound on ε at confidence 1 − β (:func:`eps_lower_bound`). A bound above
the claimed ε means the implementation is less private than claimed.

What an audit can and cannot show: the bound is a LOWER bound from one finite experiment, never
a proof of privacy. A bound above the claim is evidence of a bug (wrong at most with probability
β); a bound below it only says this experiment found nothing, and says nothing about bugs the
experiment cannot see or is too small to see.

The audits that produce the guesses are :mod:`fedspine.audit.step_canary` (the clip-and-noise
code alone) and :mod:`fedspine.audit.canary` (the whole private path against the ledger).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

DEFAULT_BETA = 0.05


def audit_p_value(m: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """Upper bound on P[≥ ``correct`` right out of ``guesses``] under (ε, δ)-DP with m canaries.

    Steinke, Nasr and Jagielski (2023), Theorem for (ε, δ)-DP:
    P[W ≥ v] ≤ P[Binomial(r, p) ≥ v] + 2·m·δ·max_{1≤i≤v} P[v − i ≤ Binomial(r, p) < v] / i,
    with p = e^ε / (1 + e^ε), r guesses and v correct. δ = 0 gives the pure-ε binomial tail.
    """
    r, v = int(guesses), int(correct)
    if not 0 <= v <= r <= m:
        raise ValueError(f"audit_p_value: need 0 <= correct <= guesses <= m, got {v}, {r}, {m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"audit_p_value: need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    p = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, p))
    alpha = 0.0
    if v > 0 and delta > 0:
        below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[Bin = v-1], ..., P[Bin = 0]
        alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def eps_lower_bound(
    m: int, guesses: int, correct: int, delta: float, beta: float = DEFAULT_BETA
) -> float:
    """The ε below which (ε, δ)-DP is rejected at confidence 1 − β: sup{ε : p-value(ε) < β}.

    0.0 when even ε = 0 cannot be rejected. Found by bisection to 1e-6 in ε.
    """
    if not 0 < beta < 1:
        raise ValueError(f"eps_lower_bound: beta must be in (0, 1), got {beta}")
    if audit_p_value(m, guesses, correct, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(m, guesses, correct, high, delta) < beta:
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    while high - low > 1e-6:
        mid = 0.5 * (low + high)
        if audit_p_value(m, guesses, correct, mid, delta) < beta:
            low = mid
        else:
            high = mid
    return low


def guess_members(scores: np.ndarray, k_plus: int, k_minus: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices guessed "included" (the ``k_plus`` highest scores) and "excluded" (the
    ``k_minus`` lowest); ties keep their order."""
    order = np.argsort(scores, kind="stable")
    guess_in = order[len(order) - k_plus :] if k_plus else order[:0]
    return guess_in, order[:k_minus]
