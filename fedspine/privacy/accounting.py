"""Privacy accounting: compose a site's DP mechanisms and turn them into (ε, δ).

Three accountants, one contract (every one returns an upper bound on ε at δ):

- ``"prv"``: Opacus' PRV accountant (Gopi et al. 2021), the tightest; used for reports.
  Its cost grows with the number of steps (a discretised privacy-loss grid of about
  ``2L / mesh`` points, ``mesh ∝ 1 / sqrt(steps)``, about 67 bytes a point at peak), so a long
  history can need gigabytes. :func:`epsilon` estimates the grid before building it and
  raises :class:`PrivacyAccountingError` above ``prv_max_bytes`` instead of exhausting memory.
- ``"rdp"``: Opacus' RDP accountant with its default orders, looser (9 % to 70 % above PLD on
  benchmarks/accountant_check.py's grid, most at few steps), cheap at any step count; used for
  planning (noise calibration, cap checks, step limits).
- ``"pld"``: Google's dp_accounting PLD accountant, the independent cross-check.

Composition is commutative, so records with the same (kind, σ, q) are merged by summing their
steps before accounting; that is what one uninterrupted run would have given.

Opacus (which loads torch), dp_accounting and matplotlib are imported inside the functions that
use them, so ``import fedspine.privacy`` costs numpy only.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

Accountant = Literal["prv", "rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp", "pld")
REPORT_ACCOUNTANT: Accountant = "prv"
"""What every report, privacy.json and release states ε with (the tightest bound)."""
PLAN_ACCOUNTANT: Accountant = "rdp"
"""What plans σ and checks caps: looser than PRV, so a plan that passes also passes the report."""
CHECK_ACCOUNTANT: Accountant = "pld"
"""The independent cross-check (Google's dp_accounting), never used to decide."""
MECHANISM_KINDS: tuple[str, ...] = ("dp-sgd-poisson",)

PRV_BYTES_PER_POINT = 72
"""Peak memory of Opacus' PRV accountant per grid point (67 B measured, rounded up)."""
PRV_BYTES_PER_POINT_EXTRA = 32
"""Added per grid point for each further distinct mechanism (about 27 B measured)."""
PRV_MAX_BYTES = 1 << 30
"""Default refusal threshold for a PRV computation: 1 GiB."""
PRV_EPS_ERROR_MAX = 0.01
"""Opacus' default absolute ε error; the PRV result is the estimate plus about this much."""
PRV_EPS_ERROR_MIN = 1e-4
PRV_RELATIVE_ERROR = 0.003
"""Target PRV error relative to ε, so the reported bound is within ~0.5 % of the true ε."""


class PrivacyAccountingError(ValueError):
    """An (ε, δ) that cannot be computed as asked: the message says why and what to do."""


@dataclass(frozen=True)
class Mechanism:
    """``steps`` applications of one DP-SGD step with Poisson sampling.

    ``noise_multiplier`` is σ (noise std / clip norm), ``sample_rate`` is q (the probability that
    a privacy unit, a patient, is in a step's batch). ``label`` says what was trained
    (e.g. "gan-discriminator", "clinical-classifier") for the report; it does not change ε.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    label: str = ""
    kind: str = "dp-sgd-poisson"

    def __post_init__(self) -> None:
        if self.kind not in MECHANISM_KINDS:
            raise ValueError(
                f"unknown mechanism kind {self.kind!r}; fedspine can account for "
                f"{', '.join(MECHANISM_KINDS)} only"
            )
        sigma, q = float(self.noise_multiplier), float(self.sample_rate)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(
                f"noise_multiplier must be a positive finite number, got {self.noise_multiplier!r}"
                " (σ = 0 is not differentially private)"
            )
        if not (0 < q <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool):
            raise ValueError(f"steps must be an integer, got {self.steps!r}")
        try:
            steps = operator.index(self.steps)
        except TypeError:
            raise ValueError(f"steps must be an integer, got {self.steps!r}") from None
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "steps", steps)


def epsilon(
    mechanisms: Sequence[Mechanism],
    delta: float,
    accountant: Accountant = "prv",
    *,
    prv_max_bytes: int = PRV_MAX_BYTES,
) -> float:
    """ε at ``delta`` of all ``mechanisms`` composed (an upper bound, whichever accountant)."""
    _check_delta(delta)
    _check_accountant(accountant)
    merged = merge_mechanisms(mechanisms)
    if not merged:
        return 0.0
    if accountant == "rdp":
        return _epsilon_rdp(merged, delta)
    if accountant == "prv":
        return _epsilon_prv(merged, delta, prv_max_bytes)
    return _epsilon_pld(merged, delta)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
    prior: Sequence[Mechanism] = (),
    *,
    label: str = "",
    rel_tol: float = 1e-3,
) -> float:
    """Smallest σ for which ``prior`` composed with ``steps`` new steps stays ≤ target ε.

    Found by bisection to ``rel_tol`` relative in σ; the returned σ is always one whose ε was
    computed and found ≤ target, so it is safe to use as is. Prior spending (an earlier run, a
    DP classifier) is why this cannot simply call Opacus' ``get_noise_multiplier``.
    """
    _check_delta(delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}")
    steps = Mechanism(1.0, sample_rate, steps).steps  # validates q and steps early
    if steps < 1:
        raise ValueError(f"steps must be >= 1 to calibrate noise, got {steps}")
    prior = list(prior)
    already = epsilon(prior, delta, accountant)
    if already >= target_epsilon:
        raise ValueError(
            f"target ε={target_epsilon:g} at δ={delta:.3g} is unreachable: the prior mechanisms "
            f"already spend ε={already:.4g} ({accountant.upper()}); raise the target or train "
            "on a dataset with budget left"
        )

    def eps_at(sigma: float) -> float:
        new = Mechanism(sigma, sample_rate, steps, label=label)
        return epsilon([*prior, new], delta, accountant)

    low, high = 0.0, 1.0
    while eps_at(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(
                f"target ε={target_epsilon:g} at δ={delta:.3g} is unreachable with q={sample_rate}"
                f" and {steps} steps even at σ=1e6 (prior spends ε={already:.4g}); "
                "raise the target, or use fewer steps or a smaller sample rate"
            )
    while high - low > rel_tol * high:
        mid = 0.5 * (low + high)
        if eps_at(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def epsilon_curve(
    mechanisms: Sequence[Mechanism],
    delta: float,
    accountant: Accountant = "rdp",
    points: int = 50,
) -> list[tuple[int, float]]:
    """ε against cumulative steps through ``mechanisms`` in order, for plotting.

    Returns up to ``points`` pairs (steps, ε) from (0, 0.0) to (total steps, ε of everything).
    Each point is a full accounting of a prefix: cheap with "rdp", seconds each with "prv".
    """
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    mechanisms = list(mechanisms)
    total = sum(m.steps for m in mechanisms)
    marks = sorted({round(total * k / (points - 1)) for k in range(points)})
    curve = []
    for mark in marks:
        prefix = _prefix(mechanisms, mark)
        curve.append((int(mark), epsilon(prefix, delta, accountant) if mark else 0.0))
    return curve


def plot_epsilon_curve(
    curves: dict[str, Sequence[tuple[int, float]]],
    path: str | Path,
    *,
    delta: float | None = None,
    cap: float | None = None,
    title: str = "Privacy spent per site",
) -> Path:
    """Write a PNG of ε against steps, one line per site (and a dashed cap line if given)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # slow import; plots only
    from matplotlib.figure import Figure  # slow import; plots only

    path = Path(path)
    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for site, curve in curves.items():
        if curve:
            xs, ys = zip(*curve, strict=True)
            axes.plot(xs, ys, label=str(site))
    if cap is not None:
        axes.axhline(cap, color="black", linestyle="--", linewidth=1, label=f"cap ε={cap:g}")
    axes.set_xlabel("steps (cumulative)")
    axes.set_ylabel("ε" if delta is None else f"ε at δ={delta:.3g}")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if curves or cap is not None:
        axes.legend(loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def default_delta(num_patients: int) -> float:
    """δ for a site of ``num_patients`` privacy units: min(1e-5, 1 / (10 · patients))."""
    if int(num_patients) < 1:
        raise ValueError(f"num_patients must be >= 1, got {num_patients}")
    return min(1e-5, 1.0 / (10 * int(num_patients)))


def merge_mechanisms(mechanisms: Sequence[Mechanism]) -> list[Mechanism]:
    """Sum steps per (kind, σ, q), keeping first-seen order; drops zero-step entries.

    Composition does not depend on order, so this is the composition one run would give.
    Labels of merged entries are joined so the result still says what was trained.
    """
    merged: dict[tuple[str, float, float], Mechanism] = {}
    for m in mechanisms:
        if not isinstance(m, Mechanism):
            raise TypeError(f"expected a Mechanism, got {type(m).__name__}")
        if m.steps == 0:
            continue
        key = (m.kind, m.noise_multiplier, m.sample_rate)
        if key in merged:
            old = merged[key]
            labels = old.label.split("+") if old.label else []
            label = old.label if not m.label or m.label in labels else "+".join([*labels, m.label])
            merged[key] = replace(old, steps=old.steps + m.steps, label=label)
        else:
            merged[key] = m
    return list(merged.values())


def prv_eps_error(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """The absolute ε error PRV is asked for: a fraction of ε, within Opacus' default.

    The RDP bound is a cheap overestimate of ε, so this keeps the PRV bound within about
    0.5 % of the true ε (Opacus' fixed 0.01 is 5 % of an ε of 0.2).
    """
    eps_rdp = _epsilon_rdp(merge_mechanisms(mechanisms), delta) if mechanisms else 0.0
    return min(PRV_EPS_ERROR_MAX, max(PRV_EPS_ERROR_MIN, PRV_RELATIVE_ERROR * eps_rdp))


def prv_memory_estimate(mechanisms: Sequence[Mechanism], delta: float, eps_error: float) -> int:
    """Bytes Opacus' PRV accountant will need at peak for these mechanisms (an estimate)."""
    from opacus.accountants import PRVAccountant  # opacus loads torch
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV  # opacus loads torch

    merged = merge_mechanisms(mechanisms)
    if not merged:
        return 0
    prvs = [PoissonSubsampledGaussianPRV(m.sample_rate, m.noise_multiplier) for m in merged]
    # Opacus is pinned exactly; its private _get_domain is the grid get_epsilon will build.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        domain = PRVAccountant()._get_domain(
            prvs=prvs,
            num_self_compositions=[m.steps for m in merged],
            eps_error=eps_error,
            delta_error=delta / 1000,
        )
    return int(domain.size) * (PRV_BYTES_PER_POINT + PRV_BYTES_PER_POINT_EXTRA * (len(merged) - 1))


def _epsilon_rdp(merged: list[Mechanism], delta: float) -> float:
    from opacus.accountants import RDPAccountant  # opacus loads torch
    from opacus.accountants.analysis.rdp import get_privacy_spent  # opacus loads torch

    rdp = sum(_rdp_per_step(m.noise_multiplier, m.sample_rate) * m.steps for m in merged)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is then looser, still an upper bound.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=np.asarray(rdp), delta=delta
        )
    return float(eps)


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float):
    """Opacus' RDP of one step at its default orders; steps scale it linearly."""
    from opacus.accountants import RDPAccountant  # opacus loads torch
    from opacus.accountants.analysis.rdp import compute_rdp  # opacus loads torch

    vector = np.asarray(
        compute_rdp(
            q=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=1,
            orders=RDPAccountant.DEFAULT_ALPHAS,
        ),
        dtype=float,
    )
    vector.setflags(write=False)
    return vector


def _epsilon_prv(merged: list[Mechanism], delta: float, max_bytes: int) -> float:
    from opacus.accountants import PRVAccountant  # opacus loads torch

    eps_error = prv_eps_error(merged, delta)
    need = prv_memory_estimate(merged, delta, eps_error)
    if need > max_bytes and eps_error < PRV_EPS_ERROR_MAX:
        # The grid shrinks in proportion to the error allowed: trade accuracy for memory first.
        eps_error = min(PRV_EPS_ERROR_MAX, eps_error * need / max_bytes)
        need = prv_memory_estimate(merged, delta, eps_error)
    steps = sum(m.steps for m in merged)
    if need > max_bytes:
        raise PrivacyAccountingError(
            f"PRV accounting of {steps} steps ({len(merged)} distinct (σ, q)) would need about "
            f"{need / 2**30:.1f} GiB of memory, over the {max_bytes / 2**30:.1f} GiB allowed; "
            "use accountant='rdp' (a looser upper bound, cheap at any length) or 'pld', "
            "or raise prv_max_bytes"
        )
    accountant = PRVAccountant()
    accountant.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in merged]
    try:
        with np.errstate(divide="ignore"), warnings.catch_warnings():
            # q = 1 takes log(0) on a branch np.where discards; the domain's own RDP bound may
            # sit at an extreme order, which only widens the (safe) domain.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(accountant.get_epsilon(delta, eps_error=eps_error))
    except (ValueError, RuntimeError) as error:
        raise PrivacyAccountingError(
            f"PRV accounting failed for {steps} steps at δ={delta:.3g}: {error}; "
            "use accountant='rdp' or 'pld' for this history"
        ) from error


def _epsilon_pld(merged: list[Mechanism], delta: float) -> float:
    import dp_accounting  # slow import; PLD only

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
            ),
            m.steps,
        )
        for m in merged
    ]
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def _prefix(mechanisms: list[Mechanism], steps: int) -> list[Mechanism]:
    """The first ``steps`` steps of the sequence, truncating the mechanism that straddles it."""
    out, left = [], steps
    for m in mechanisms:
        if left <= 0:
            break
        take = min(m.steps, left)
        out.append(replace(m, steps=take))
        left -= take
    return out


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}"
        )
