"""The one-run canary audit: a correct DP step passes, planted noise and clipping bugs are caught,
and the Steinke-Nasr-Jagielski bound itself is valid and behaves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedspine.privacy.canary import audit_dp_step, audit_p_value, eps_lower_bound
from fedspine.training.dp import make_dp_optimizer

# σ = 3.33 at sample rate 1 for one step per canary: a claim of ε ≈ 1.14 at δ = 1e-5, where the
# (ε, δ) one-run bound is tightest relative to the claim. 10^5 Dirac canaries in 2,000
# coordinates: 50 DP steps, under a second each audit.
SIGMA = 3.33
CANARIES = 100_000


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def half_noise(optimizer, *, noise_multiplier, **kwargs):
    """Planted bug: noise calibrated for half the clip norm (std σ·C/2)."""
    return make_dp_optimizer(optimizer, noise_multiplier=noise_multiplier / 2, **kwargs)


def double_clip(optimizer, *, noise_multiplier, max_grad_norm, **kwargs):
    """Planted bug: rows clipped at 2C while the noise std stays σ·C."""
    return make_dp_optimizer(
        optimizer, noise_multiplier=noise_multiplier / 2, max_grad_norm=2 * max_grad_norm, **kwargs
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_correct_dp_step_passes_the_audit(seed):
    result = audit_dp_step(SIGMA, num_canaries=CANARIES, seed=seed)
    assert result.steps == 50
    assert result.claimed_epsilon == pytest.approx(1.136, abs=0.02)
    assert result.passed
    # A margin, not a coin flip: over 20 seeds the bound stayed within 0.55-0.72 of the claim.
    assert result.eps_lower_bound < 0.85 * result.claimed_epsilon
    # ... and it is not vacuous: the canaries are detected well above chance.
    assert result.eps_lower_bound > 0.3
    assert result.correct > 0.6 * result.guesses


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_half_noise_bug_is_caught(seed):
    result = audit_dp_step(SIGMA, num_canaries=CANARIES, seed=seed, dp_optimizer_factory=half_noise)
    assert not result.passed
    # Over 20 seeds the bound was 1.27-1.41 times the claim.
    assert result.eps_lower_bound > 1.15 * result.claimed_epsilon


def test_clipping_is_audited_with_oversized_canaries():
    honest = audit_dp_step(SIGMA, num_canaries=CANARIES, canary_norm=2.0, seed=3)
    assert honest.passed  # rows of norm 2C are clipped to C: same evidence as norm C
    broken = audit_dp_step(
        SIGMA, num_canaries=CANARIES, canary_norm=2.0, seed=3, dp_optimizer_factory=double_clip
    )
    assert not broken.passed


def test_random_directions_score_like_dirac_canaries():
    # Little noise: canaries in a random rotation of 500 coordinates are found almost perfectly.
    result = audit_dp_step(
        0.3, num_canaries=5_000, dim=500, directions="random", k_plus=50, k_minus=50, seed=4
    )
    assert result.correct >= 99
    assert result.passed  # the claim at σ = 0.3 is far above what 100 guesses can show


def test_bound_is_valid_for_randomized_response():
    """An ε-DP mechanism (randomized response) must rarely produce a bound above ε."""
    rng = np.random.default_rng(0)
    eps, m, trials = 1.0, 500, 300
    keep = math.exp(eps) / (1 + math.exp(eps))
    above = 0
    for _ in range(trials):
        correct = int((rng.random(m) < keep).sum())  # guess every canary from its RR answer
        above += eps_lower_bound(m, m, correct, delta=0.0, beta=0.05) > eps
    assert above / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def test_p_value_behaves():
    # Pure ε: the binomial tail exactly.
    assert audit_p_value(100, 10, 10, 0.0, 0.0) == pytest.approx(0.5**10)
    # More correct guesses are less likely; a larger ε makes them more likely; δ only adds.
    assert audit_p_value(1000, 100, 80, 1.0, 0.0) < audit_p_value(1000, 100, 70, 1.0, 0.0)
    assert audit_p_value(1000, 100, 80, 1.0, 0.0) < audit_p_value(1000, 100, 80, 2.0, 0.0)
    assert audit_p_value(1000, 100, 80, 1.0, 1e-5) > audit_p_value(1000, 100, 80, 1.0, 0.0)
    assert eps_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance level proves nothing
    strong = eps_lower_bound(1000, 100, 95, 1e-5)
    assert 1.5 < strong < eps_lower_bound(1000, 100, 100, 1e-5)
    assert audit_p_value(1000, 100, 95, strong, 1e-5) == pytest.approx(0.05, abs=1e-4)
    with pytest.raises(ValueError):
        audit_p_value(10, 20, 5, 1.0, 0.0)
