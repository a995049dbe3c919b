"""Accounting: PRV and RDP against Google's PLD, noise calibration, curves, δ."""

from __future__ import annotations

import math
import tracemalloc
import warnings

import pytest

from fedspine.privacy.accounting import (
    Mechanism,
    PrivacyAccountingError,
    calibrate_noise,
    default_delta,
    epsilon,
    epsilon_curve,
    merge_mechanisms,
    plot_epsilon_curve,
    prv_eps_error,
    prv_memory_estimate,
)

DELTA = 1e-5
GRID = [(s, q, n) for s in (0.8, 1.0, 2.0) for q in (0.01, 0.05) for n in (100, 1000)]


@pytest.mark.parametrize(("sigma", "q", "steps"), GRID)
def test_prv_matches_pld_and_rdp_is_an_upper_bound(sigma: float, q: float, steps: int) -> None:
    mechanisms = [Mechanism(sigma, q, steps)]
    prv = epsilon(mechanisms, DELTA, "prv")
    rdp = epsilon(mechanisms, DELTA, "rdp")
    pld = epsilon(mechanisms, DELTA, "pld")
    assert abs(prv - pld) <= 0.01 * pld, (prv, pld)
    assert rdp >= 0.99 * pld, (rdp, pld)
    # RDP is the looser bound everywhere on this grid (9 % to 70 % above PLD, measured).
    assert rdp > prv


def test_heterogeneous_composition_matches_pld() -> None:
    mechanisms = [
        Mechanism(1.0, 0.01, 500, label="gan-discriminator"),
        Mechanism(1.5, 0.02, 300, label="clinical-classifier"),
        Mechanism(0.9, 0.05, 200, label="gan-discriminator"),
    ]
    prv = epsilon(mechanisms, DELTA, "prv")
    pld = epsilon(mechanisms, DELTA, "pld")
    assert abs(prv - pld) <= 0.01 * pld
    # Composition adds: the whole spends more than any part.
    assert prv > max(epsilon([m], DELTA, "prv") for m in mechanisms)


def test_rdp_equals_opacus_accountant_stepped_by_hand() -> None:
    from opacus.accountants import RDPAccountant

    schedule = [(1.0, 0.02)] * 40 + [(1.3, 0.05)] * 25 + [(1.0, 0.02)] * 35
    accountant = RDPAccountant()
    for sigma, q in schedule:
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert len(accountant.history) == 3  # Opacus keeps the interleaved runs apart
    ours = epsilon([Mechanism(s, q, 1) for s, q in schedule], DELTA, "rdp")
    assert ours == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9, abs=1e-12)


def test_merge_sums_steps_per_sigma_and_rate() -> None:
    merged = merge_mechanisms(
        [
            Mechanism(1.0, 0.1, 10, label="gan-discriminator"),
            Mechanism(2.0, 0.1, 5, label="clinical-classifier"),
            Mechanism(1.0, 0.1, 7, label="gan-discriminator"),
            Mechanism(1.0, 0.1, 0),
            Mechanism(1.0, 0.2, 3),
        ]
    )
    assert [(m.noise_multiplier, m.sample_rate, m.steps) for m in merged] == [
        (1.0, 0.1, 17),
        (2.0, 0.1, 5),
        (1.0, 0.2, 3),
    ]
    assert merged[0].label == "gan-discriminator"


def test_nothing_spent_is_zero_and_more_steps_spend_more() -> None:
    assert epsilon([], DELTA, "prv") == 0.0
    assert epsilon([Mechanism(1.0, 0.1, 0)], DELTA, "rdp") == 0.0
    for accountant in ("rdp", "prv"):
        few = epsilon([Mechanism(1.0, 0.05, 50)], DELTA, accountant)
        many = epsilon([Mechanism(1.0, 0.05, 200)], DELTA, accountant)
        assert 0 < few < many
    # A smaller δ costs more ε.
    assert epsilon([Mechanism(1.0, 0.05, 50)], 1e-7, "rdp") > epsilon(
        [Mechanism(1.0, 0.05, 50)], 1e-5, "rdp"
    )


def test_full_batch_sampling_is_accounted_quietly() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prv = epsilon([Mechanism(5.0, 1.0, 10)], DELTA, "prv")
    pld = epsilon([Mechanism(5.0, 1.0, 10)], DELTA, "pld")
    assert abs(prv - pld) <= 0.01 * pld


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
        ({"noise_multiplier": math.inf, "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -1}, "steps"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5}, "steps"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "kind": "laplace"}, "kind"),
    ],
)
def test_mechanism_rejects_what_cannot_be_accounted(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Mechanism(**kwargs)


def test_bad_delta_or_accountant_is_refused() -> None:
    m = [Mechanism(1.0, 0.1, 10)]
    with pytest.raises(ValueError, match="delta"):
        epsilon(m, 0.0, "rdp")
    with pytest.raises(ValueError, match="accountant"):
        epsilon(m, DELTA, "gdp")  # type: ignore[arg-type]


def test_prv_memory_guard_refuses_with_a_way_out() -> None:
    m = [Mechanism(1.0, 0.05, 2000)]
    with pytest.raises(PrivacyAccountingError, match="accountant='rdp'"):
        epsilon(m, DELTA, "prv", prv_max_bytes=1 << 20)
    # Within a budget that only fits the coarsest grid, it trades accuracy and still answers.
    coarse = prv_memory_estimate(m, DELTA, 0.01)
    assert epsilon(m, DELTA, "prv", prv_max_bytes=coarse) >= epsilon(m, DELTA, "pld") * 0.999


def test_prv_memory_estimate_covers_the_measured_peak() -> None:
    m = [Mechanism(1.0, 0.01, 1000)]
    assert prv_eps_error(m, DELTA) == pytest.approx(0.003 * epsilon(m, DELTA, "rdp"))
    estimate = prv_memory_estimate(m, DELTA, 0.002)
    tracemalloc.start()
    try:
        epsilon(m, DELTA, "prv")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    at_used_error = prv_memory_estimate(m, DELTA, prv_eps_error(m, DELTA))
    assert peak <= at_used_error <= 1.5 * peak
    # The grid, and so the memory, grows as 1 / eps_error.
    assert estimate > at_used_error * 2.5


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # Opacus' own search
def test_calibrate_noise_hits_the_target_from_below() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    target, q, steps = 3.0, 0.02, 800
    sigma = calibrate_noise(target, DELTA, q, steps, accountant="rdp")
    assert epsilon([Mechanism(sigma, q, steps)], DELTA, "rdp") <= target
    assert epsilon([Mechanism(sigma * (1 - 2e-3), q, steps)], DELTA, "rdp") > target
    opacus_sigma = get_noise_multiplier(
        target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp"
    )
    assert sigma <= opacus_sigma * (1 + 1e-3)
    assert sigma == pytest.approx(opacus_sigma, rel=0.01)


def test_calibrate_noise_with_prior_keeps_the_composition_under_target() -> None:
    prior = [Mechanism(1.2, 0.02, 400, label="clinical-classifier")]
    target, q, steps = 4.0, 0.02, 800
    alone = calibrate_noise(target, DELTA, q, steps)
    sigma = calibrate_noise(target, DELTA, q, steps, prior=prior)
    assert sigma > alone
    assert epsilon([*prior, Mechanism(sigma, q, steps)], DELTA, "rdp") <= target
    assert epsilon([*prior, Mechanism(sigma * (1 - 2e-3), q, steps)], DELTA, "rdp") > target


def test_calibrate_noise_with_prv() -> None:
    sigma = calibrate_noise(2.0, DELTA, 0.05, 100, accountant="prv")
    assert epsilon([Mechanism(sigma, 0.05, 100)], DELTA, "prv") <= 2.0
    assert epsilon([Mechanism(sigma * 0.99, 0.05, 100)], DELTA, "prv") > 2.0
    # PRV is tighter, so it needs less noise than RDP for the same target.
    assert sigma < calibrate_noise(2.0, DELTA, 0.05, 100, accountant="rdp")


def test_calibrate_noise_refuses_an_unreachable_target() -> None:
    prior = [Mechanism(0.8, 0.05, 1000)]  # ε ≈ 19
    with pytest.raises(ValueError, match="unreachable.*already spend"):
        calibrate_noise(8.0, DELTA, 0.02, 100, prior=prior)
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise(1e-9, DELTA, 1.0, 10**6)


def test_epsilon_curve_runs_through_the_list() -> None:
    first = Mechanism(1.0, 0.02, 300, label="clinical-classifier")
    second = Mechanism(1.5, 0.05, 700, label="gan-discriminator")
    curve = epsilon_curve([first, second], DELTA, "rdp", points=11)
    steps = [s for s, _ in curve]
    eps = [e for _, e in curve]
    assert curve[0] == (0, 0.0)
    assert steps == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert eps[3] == pytest.approx(epsilon([first], DELTA, "rdp"), rel=1e-12)
    assert eps[-1] == pytest.approx(epsilon([first, second], DELTA, "rdp"), rel=1e-12)


def test_plot_epsilon_curve_writes_a_png(tmp_path) -> None:
    from PIL import Image

    curves = {
        "site-a": epsilon_curve([Mechanism(1.0, 0.02, 500)], DELTA, points=20),
        "site-b": epsilon_curve([Mechanism(1.5, 0.05, 800)], DELTA, points=20),
    }
    out = plot_epsilon_curve(curves, tmp_path / "plots" / "eps.png", delta=DELTA, cap=8.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        assert image.size == (768, 480)


@pytest.mark.parametrize(
    ("patients", "expected"), [(1, 1e-5), (10_000, 1e-5), (20_000, 5e-6), (10**6, 1e-7)]
)
def test_default_delta(patients: int, expected: float) -> None:
    assert default_delta(patients) == pytest.approx(expected, rel=1e-12)
    assert default_delta(patients) <= 1 / (10 * patients)


def test_default_delta_needs_patients() -> None:
    with pytest.raises(ValueError, match="num_patients"):
        default_delta(0)
