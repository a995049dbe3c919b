"""The canary audits: a correct DP step passes, planted noise and clipping bugs are caught, and the
Steinke-Nasr-Jagielski bound itself is valid and behaves; end to end, the real trainer, engine
and ledger pass, and a ledger that misses steps or noise far weaker than recorded is caught."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedspine.audit.canary import (
    audit_dp_step,
    audit_p_value,
    engine_canary_audit,
    eps_lower_bound,
)
from fedspine.privacy.engine import PrivacyEngine
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


# ---- end to end: trainer, sampler, DP step, engine reservation, ledger ------------------------
# The defaults: 8 runs of 2 DP steps, 64 canary patients per run (512 in all), σ = 2, q = 0.25:
# the ledger holds ε ≈ 1.05 per run at δ = 1e-5. About 1-3 s per audit on one CPU thread.


def test_engine_audit_passes_on_the_real_engine(tmp_path):
    rng_before = torch.get_rng_state()
    result = engine_canary_audit(home=tmp_path)
    assert result.passed, result.problems
    assert (result.runs, result.steps_per_run, result.num_canaries) == (8, 2, 512)
    # Every D update the trainer applied is in the ledger, and was there before it was applied.
    assert result.steps_taken == result.ledger_steps == 16
    assert result.unrecorded_steps == 0 and result.write_ahead_violations == 0
    # The claim is what the ledger holds for a run, read back through the engine.
    assert result.delta == pytest.approx(1e-5)
    # ε of Mechanism(σ=2, q=0.25, 2 steps) at δ = 1e-5 with PRV.
    assert result.ledger_epsilon == pytest.approx(1.052, abs=0.02)
    # At this size honest noise hides the canaries: no evidence at all, a wide margin.
    assert result.eps_lower_bound < 0.5 * result.ledger_epsilon
    assert torch.equal(torch.get_rng_state(), rng_before)  # the audit leaves torch's RNG alone


def test_engine_audit_sees_the_canaries_when_the_noise_is_low(tmp_path):
    # Not a vacuous pass: at σ = 0.05 the same statistic, through the same real path, finds the
    # included canaries (a bound well above 0), and passes because the ledger's ε is far larger.
    result = engine_canary_audit(noise_multiplier=0.05, home=tmp_path)
    assert result.eps_lower_bound > 1.0  # 1.83 (60 of 64 right) at seed 0
    assert result.correct > 0.8 * result.guesses
    assert result.ledger_epsilon > 10 * result.eps_lower_bound
    assert result.passed, result.problems


def _weaker_noise(trainer):
    """Planted bug: the optimizer adds σ/100 while the trainer (and so the ledger) says σ."""
    trainer.dp_step.dp_optimizer.noise_multiplier /= 100


def test_engine_audit_catches_noise_weaker_than_the_ledger_records(tmp_path):
    result = engine_canary_audit(trainer_hook=_weaker_noise, home=tmp_path)
    assert not result.passed
    # Every top-scoring canary was truly included (64 of 64 at seeds 0-2): bound 3.02.
    assert result.correct >= result.guesses - 1
    assert result.eps_lower_bound > 2 * result.ledger_epsilon
    # The ledger itself is complete: the bound alone catches this bug.
    assert result.unrecorded_steps == 0 and result.write_ahead_violations == 0
    (problem,) = result.problems
    assert "exceeds the ledger's" in problem


class SilentEngine(PrivacyEngine):
    """Planted bug: the reservation's take() writes nothing, so steps run but are never recorded."""

    def reserve(self, plan, *args, **kwargs):
        reservation = super().reserve(plan, *args, **kwargs)
        reservation.take = lambda steps=1: None
        return reservation


class LateEngine(PrivacyEngine):
    """Planted bug: steps are written only when the run settles, after D was updated (a crash
    mid-run would leave them out of the ledger)."""

    def reserve(self, plan, *args, **kwargs):
        reservation = super().reserve(plan, *args, **kwargs)
        take, settle, pending = reservation.take, reservation.settle, []

        def settle_late():
            take(sum(pending))
            return settle()

        reservation.take = lambda steps=1: pending.append(steps)
        reservation.settle = settle_late
        return reservation


@pytest.mark.parametrize("engine", [SilentEngine, LateEngine])
def test_engine_audit_catches_steps_the_ledger_does_not_hold(engine, tmp_path):
    result = engine_canary_audit(canaries_per_run=8, runs=2, engine_factory=engine, home=tmp_path)
    assert not result.passed
    assert result.steps_taken == 4
    # Each update ran before the ledger held its step.
    assert result.write_ahead_violations == 4
    if engine is SilentEngine:
        assert result.ledger_steps == 0 and result.unrecorded_steps == 4
        assert result.ledger_epsilon == 0.0
        assert any("not in the ledger" in p for p in result.problems)
    else:
        assert result.ledger_steps == 4 and result.unrecorded_steps == 0
        (problem,) = result.problems
        assert "before the ledger held" in problem


def test_engine_audit_refuses_bad_sizes():
    with pytest.raises(ValueError, match="canaries_per_run"):
        engine_canary_audit(canaries_per_run=0)
    with pytest.raises(ValueError, match="sample_rate"):
        engine_canary_audit(sample_rate=1.5)
    with pytest.raises(ValueError, match="guesses"):
        engine_canary_audit(canaries_per_run=4, runs=1, k_plus=5)
