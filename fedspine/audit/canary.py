"""Privacy audits of the DP discriminator step with canaries: empirical lower bounds on ε.

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

1. :func:`audit_dp_step`: the clip-and-noise code alone
-------------------------------------------------------

The clip-and-noise code path of the DP discriminator step
(:func:`fedspine.training.dp.make_dp_optimizer` and :func:`fedspine.training.dp.privatised_step`,
Opacus' DPOptimizer with chunked accumulation) on a flat parameter vector updated by plain SGD
with lr = 1, so the parameter change of a step is exactly the privatised gradient. Canaries are
gradient rows of norm C along fixed directions (Dirac: one coordinate each, or the columns of a
random rotation); background units with gradients larger than C are clipped alongside them. It
is tight but narrow: no sampler, no per-patient gradient engine, no ledger, so it cannot see a
sampling bug, a patient whose images end up in several rows, or steps that ran but were never
accounted for.

Why canaries live in blocks of steps: the bound's power grows with m, and a dense gradient row
costs ``dim`` floats, so with every canary in every step a step costs m·dim. Each block of
``steps_per_canary`` steps therefore carries its own ``dim`` canaries, one per direction, and a
canary's claimed ε is that of the Gaussian mechanism composed over its block (sample rate 1: a
member canary is in every step of its block). That is still one run in the theorem's sense: each
canary is one unit whose inclusion the mechanism protects with that (ε, δ).

How tight it can be: for a Gaussian mechanism the (ε, δ) one-run bound reaches roughly 0.6 of
the true ε at m = 10^5 (about 0.5 at m = 10^3), so noise of σ·C/2 where σ·C was claimed (true ε
about 2.2 times the claim) is caught by a margin of about 1.3×, and only with m ≳ 5·10^4 canaries
and a claim near ε ≈ 1 (σ ≈ 3 per step). See tests/audit/test_canary.py.

2. :func:`engine_canary_audit`: the whole private path against the ledger
-------------------------------------------------------------------------

The real path of a DP run, on a tiny conditional GAN (8 px, a few thousand parameters, CPU, a
few seconds): :class:`~fedspine.training.dp_trainer.DPGanTrainer`'s ``train_step`` →
:class:`~fedspine.training.dp.PatientPoissonSampler` →
:class:`~fedspine.training.dp.DPDiscriminatorStep` (per-patient vmap rows, Opacus clip and
noise) with a
:class:`~fedspine.privacy.engine.PrivacyEngine` reservation attached, whose ``take`` must write
each step into the ledger before D is updated. It repeats ``runs`` short trainings, each under
a fresh privacy home, on a few background patients plus canary patients each included by a fair
coin, and compares:

- the empirical ε lower bound from the canaries' scores with the ε the LEDGER holds for the run
  after it settled (:meth:`PrivacyEngine.spent`, the reporting accountant at the engine's δ),
  not with the σ that was planned: a step that ran but was never recorded lowers the ledger's ε
  and can push it under the bound;
- the D updates that were applied (counted at D's own optimizer, beneath Opacus, whatever the
  trainer's counters say) with the steps the ledger holds after settling, and, at each update,
  with the steps it already held (the write-ahead promise: a crash may over-count, never
  under-count).

The audit fails when the bound exceeds the ledger's ε, when updates ran that the ledger does
not hold, or when an update was applied before the ledger held it.

The canary: a patient of its own class, whose public prior is 0, so no fake and no other patient
ever carries that label. Its gradient row (real term, R1 and its paired fakes, clipped to C as a
whole) is therefore the only one that writes its class's column of D's label embedding
(``mapping.embed.weight``); elsewhere it mixes with everyone. Its score is the privatised
gradient's value in that column, projected on the column's direction in the canary's row at the
initial D (computed by the auditor, independently of the coins) and summed over the run's D
updates. Each canary is in one run only, so the runs together are (max ε, δ)-DP for every
canary (parallel composition) and the one-run theorem covers all runs' canaries at once.

What it catches (measured with the defaults, see tests/audit/test_canary.py): steps that ran
but are not in the ledger, or were written only after D's update (exactly, from the step counts,
whatever the noise); noise 100× weaker than the ledger records (every top guess right: bound
about 3.0 from 512 canaries and 64 guesses, against the ledger's ε ≈ 1.05). What it does not:
with honest noise a canary moves its column by only about 0.1·C per step it is sampled in (the
embedding's bias, shared by all classes, takes most of its clipped row), against noise of σ·C,
so the bound stays about 0, and noise 10× or 2× too weak, clipping switched off with the noise
kept, or a sampler at q = 1 where the ledger records q = 0.25 all pass unnoticed at this size
(:func:`audit_dp_step` is the sharper check of the noise calibration alone). It exercises one
tiny centralised configuration (8 px, no augmentation, CPU, its own σ, q and step count), not
the production model, augmentation, federated rounds or the GPU path, and its statistic reads
only the label-embedding columns, so a leak confined to other parameters is invisible to it.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedspine.privacy.accounting import REPORT_ACCOUNTANT, Accountant, Mechanism, epsilon

DEFAULT_BETA = 0.05


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit: the empirical ε lower bound against the accountant's claim."""

    eps_lower_bound: float
    claimed_epsilon: float
    delta: float
    beta: float
    correct: int
    guesses: int
    k_plus: int
    k_minus: int
    num_canaries: int
    included: int
    steps: int
    steps_per_canary: int
    noise_multiplier: float
    clip_norm: float
    canary_norm: float
    directions: str
    accountant: str

    @property
    def passed(self) -> bool:
        """True when the audit found no evidence against the claim (bound ≤ claimed ε)."""
        return self.eps_lower_bound <= self.claimed_epsilon

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def audit_dp_step(
    noise_multiplier: float,
    *,
    num_canaries: int = 100_000,
    dim: int = 2_000,
    steps_per_canary: int = 1,
    clip_norm: float = 1.0,
    canary_norm: float | None = None,
    background_units: int = 16,
    background_norm: float = 3.0,
    k_plus: int | None = None,
    k_minus: int | None = None,
    delta: float = 1e-5,
    beta: float = DEFAULT_BETA,
    accountant: Accountant = REPORT_ACCOUNTANT,
    directions: Literal["dirac", "random"] = "dirac",
    chunk_size: int = 512,
    seed: int = 0,
    dp_optimizer_factory: Callable[..., Any] | None = None,
) -> AuditResult:
    """Run the one-run canary audit of the DP step's clip-and-noise path; see the module doc.

    ``noise_multiplier`` is the σ the accountant is told (the claim). ``dp_optimizer_factory``
    builds the DP optimizer with :func:`fedspine.training.dp.make_dp_optimizer`'s signature; the
    default is that function, and tests plant bugs by passing a wrong one. ``canary_norm``
    (default C) is a canary's norm before clipping: above C, the audit also checks clipping.
    ``k_plus`` and ``k_minus`` default to 1 % of the canaries each; they must be fixed before
    looking at the scores (trying several and keeping the best invalidates β).
    """
    from fedspine.training.dp import make_dp_optimizer, privatised_step

    m = int(num_canaries)
    if m < 2 or dim < 1 or steps_per_canary < 1 or chunk_size < 1:
        raise ValueError(
            "audit_dp_step: num_canaries must be >= 2 and dim, steps_per_canary and chunk_size "
            f">= 1; got {num_canaries}, {dim}, {steps_per_canary}, {chunk_size}"
        )
    if directions not in ("dirac", "random"):
        raise ValueError(f"audit_dp_step: directions must be 'dirac' or 'random', got {directions}")
    k_plus = max(1, m // 100) if k_plus is None else int(k_plus)
    k_minus = max(1, m // 100) if k_minus is None else int(k_minus)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus < 1 or k_plus + k_minus > m:
        raise ValueError(
            f"audit_dp_step: need 1 <= k_plus + k_minus <= {m} guesses, got {k_plus} + {k_minus}"
        )
    canary_norm = float(clip_norm if canary_norm is None else canary_norm)
    factory = make_dp_optimizer if dp_optimizer_factory is None else dp_optimizer_factory

    rng = np.random.default_rng(seed)
    torch_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    included = rng.random(m) < 0.5
    basis = _random_rotation(dim, torch_gen) if directions == "random" else None

    theta = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    expected = max(1, dim // 2 + background_units)
    dp_opt = factory(
        torch.optim.SGD([theta], lr=1.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm,
        expected_batch_size=expected,
        generator=noise_gen,
    )
    scores = np.empty(m)
    blocks = math.ceil(m / dim)
    for block in range(blocks):
        first = block * dim
        count = min(dim, m - first)
        members = torch.from_numpy(np.flatnonzero(included[first : first + count]))
        start = theta.detach().clone()
        for _ in range(steps_per_canary):
            chunks = _step_rows(
                members,
                basis,
                dim,
                canary_norm,
                background_units,
                background_norm * clip_norm,
                chunk_size,
                torch_gen,
            )
            privatised_step(dp_opt, chunks)
        # SGD with lr = 1: the block's parameter change is minus the sum of its noisy updates.
        update = (start - theta.detach()) * expected
        projected = update if basis is None else basis.T @ update
        scores[first : first + count] = projected[:count].numpy()

    guess_in, guess_out = _guesses(scores, k_plus, k_minus)
    correct = int(included[guess_in].sum() + (~included[guess_out]).sum())
    guesses = k_plus + k_minus
    claimed = epsilon(
        [Mechanism(noise_multiplier, 1.0, steps_per_canary, label="canary")], delta, accountant
    )
    return AuditResult(
        eps_lower_bound=eps_lower_bound(m, guesses, correct, delta, beta),
        claimed_epsilon=float(claimed),
        delta=float(delta),
        beta=float(beta),
        correct=correct,
        guesses=guesses,
        k_plus=k_plus,
        k_minus=k_minus,
        num_canaries=m,
        included=int(included.sum()),
        steps=blocks * steps_per_canary,
        steps_per_canary=int(steps_per_canary),
        noise_multiplier=float(noise_multiplier),
        clip_norm=float(clip_norm),
        canary_norm=canary_norm,
        directions=directions,
        accountant=accountant,
    )


def audit_p_value(m: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """Upper bound on P[≥ ``correct`` right out of ``guesses``] under (ε, δ)-DP with m canaries.

    Steinke, Nasr and Jagielski (2023), Theorem for (ε, δ)-DP:
    P[W ≥ v] ≤ P[Binomial(r, p) ≥ v] + 2·m·δ·max_{1≤i≤v} P[v − i ≤ Binomial(r, p) < v] / i,
    with p = e^ε / (1 + e^ε), r guesses and v correct. δ = 0 gives the pure-ε binomial tail.
    """
    from scipy import stats

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


# --------------------------------------------------------------------------------------------


def _step_rows(
    members: torch.Tensor,
    basis: torch.Tensor | None,
    dim: int,
    canary_norm: float,
    background_units: int,
    background_norm: float,
    chunk_size: int,
    generator: torch.Generator,
) -> Iterator[list[torch.Tensor]]:
    """Per-unit gradient rows of one step: the block's member canaries and fresh background
    units, ``chunk_size`` rows at a time (the same chunked path the D step uses)."""
    for begin in range(0, members.numel(), chunk_size):
        idx = members[begin : begin + chunk_size]
        if basis is None:
            rows = torch.zeros(idx.numel(), dim, dtype=torch.float64)
            rows[torch.arange(idx.numel()), idx] = canary_norm
        else:
            rows = basis[:, idx].T * canary_norm
        yield [rows]
    if background_units:
        rows = torch.randn(background_units, dim, generator=generator, dtype=torch.float64)
        rows = rows / rows.norm(dim=1, keepdim=True) * background_norm
        yield [rows]


def _guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(scores, kind="stable")
    guess_in = order[len(order) - k_plus :] if k_plus else order[:0]
    return guess_in, order[:k_minus]


def _random_rotation(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    gauss = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r))


# --------------------------------------------------------------------------------------------
# End to end: canary patients through the trainer's real DP discriminator step and the ledger.


@dataclass(frozen=True)
class EngineAuditResult:
    """Outcome of :func:`engine_canary_audit`: the empirical ε lower bound against the ε the
    ledger holds for the steps that ran, and the step counts behind both.

    ``ledger_epsilon`` is the largest ε any run's ledger holds after settling, at ``delta``
    with ``accountant``. ``steps_taken`` counts the D updates applied in all runs (at D's own
    optimizer, or the DP step's counter if larger), ``ledger_steps`` the steps the runs' ledgers
    hold after settling, ``unrecorded_steps`` the updates beyond them (summed per run), and
    ``write_ahead_violations`` the updates applied while the ledger did not yet hold them.
    ``canary_signal`` is the mean length of a canary's own column in its row clipped to C, over
    C, at the initial D: how far one inclusion moves the score, against noise of σ.
    """

    eps_lower_bound: float
    ledger_epsilon: float
    delta: float
    beta: float
    correct: int
    guesses: int
    k_plus: int
    k_minus: int
    num_canaries: int
    included: int
    runs: int
    steps_per_run: int
    steps_taken: int
    ledger_steps: int
    unrecorded_steps: int
    write_ahead_violations: int
    noise_multiplier: float
    sample_rate: float
    clip_norm: float
    canary_signal: float
    accountant: str

    @property
    def problems(self) -> list[str]:
        """Why the audit failed, one sentence each; empty when it passed."""
        out = []
        if self.unrecorded_steps:
            out.append(
                f"{self.unrecorded_steps} of the {self.steps_taken} DP steps the trainer took "
                f"are not in the ledger (it holds {self.ledger_steps} after settling)"
            )
        if self.write_ahead_violations:
            out.append(
                f"{self.write_ahead_violations} discriminator updates were applied before the "
                "ledger held their step (the write-ahead reservation was skipped)"
            )
        if self.eps_lower_bound > self.ledger_epsilon:
            out.append(
                f"the empirical lower bound ε ≥ {self.eps_lower_bound:.3f} (confidence "
                f"{1 - self.beta:.0%}) exceeds the ledger's ε = {self.ledger_epsilon:.3f} at "
                f"δ = {self.delta:.3g}: the run is less private than the ledger says"
            )
        return out

    @property
    def passed(self) -> bool:
        """True when the audit found no evidence against the ledger (see the module doc for
        why that is evidence, not proof)."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "problems": self.problems}


AUDIT_RESOLUTION = 8
"""Image size of the audit's tiny conditional GAN (px)."""
_CANARY_PARAMETER = "mapping.embed.weight"
_BACKGROUND_CLASSES = 2


def engine_canary_audit(
    *,
    canaries_per_run: int = 64,
    runs: int = 8,
    steps: int = 2,
    noise_multiplier: float = 2.0,
    sample_rate: float = 0.25,
    clip_norm: float = 1.0,
    background_patients: int = 8,
    images_per_patient: int = 2,
    k_plus: int | None = None,
    k_minus: int = 0,
    beta: float = DEFAULT_BETA,
    reserve_block: int = 1,
    seed: int | None = 0,
    home: str | os.PathLike | None = None,
    engine_factory: Callable[..., Any] | None = None,
    trainer_hook: Callable[[Any], None] | None = None,
) -> EngineAuditResult:
    """Audit the whole private path end to end with canary patients; see the module doc.

    Runs ``runs`` short DP trainings (``steps`` G steps, one DP discriminator step each) of a
    tiny :class:`~fedspine.training.dp_trainer.DPGanTrainer`, each on ``background_patients``
    ordinary patients plus each of ``canaries_per_run`` canary patients included by a fair
    coin, every run under its own :class:`~fedspine.privacy.engine.PrivacyEngine` (a fresh
    privacy home in a new folder under ``home``, kept there for inspection; default a temporary
    folder, removed) whose reservation the DP step takes before each update. Returns the
    Steinke-Nasr-Jagielski lower bound on ε from the canaries' scores, at confidence
    1 − ``beta`` and the ledger's δ, against the largest ε any run's ledger holds after
    settling (:meth:`PrivacyEngine.spent`), and the step counts.

    ``engine_factory`` (default PrivacyEngine, same signature) and ``trainer_hook`` (called on
    each run's trainer before it trains) are for tests that plant bugs. ``k_plus`` (default an
    eighth of all canaries) and ``k_minus`` are fixed before any score is seen. ``seed`` fixes
    the coins, images, sampling and noise; None draws them from the OS.
    """
    from fedspine.privacy.engine import PrivacyEngine, site_delta

    m, num_runs, num_steps = int(canaries_per_run), int(runs), int(steps)
    bg, per_patient = int(background_patients), int(images_per_patient)
    if min(m, num_runs, num_steps, bg, per_patient, int(reserve_block)) < 1:
        raise ValueError(
            "engine_canary_audit: canaries_per_run, runs, steps, background_patients, "
            "images_per_patient and reserve_block must all be >= 1; got "
            f"{m}, {num_runs}, {num_steps}, {bg}, {per_patient}, {reserve_block}"
        )
    if not 0 < sample_rate <= 1:
        raise ValueError(f"engine_canary_audit: sample_rate must be in (0, 1], got {sample_rate}")
    total = m * num_runs
    k_plus = max(1, total // 8) if k_plus is None else int(k_plus)
    k_minus = int(k_minus)
    if k_plus < 0 or k_minus < 0 or not 1 <= k_plus + k_minus <= total:
        raise ValueError(
            f"engine_canary_audit: need 1 <= k_plus + k_minus <= {total} guesses, "
            f"got {k_plus} + {k_minus}"
        )
    factory = PrivacyEngine if engine_factory is None else engine_factory
    coin_seq, data_seq, run_seq = np.random.SeedSequence(seed).spawn(3)
    coins = np.random.default_rng(coin_seq)
    data = np.random.default_rng(data_seq)
    run_seeds = np.random.default_rng(run_seq).integers(2**62, size=(num_runs, 2))
    # The smallest δ the site would allow for any run's patients, so all runs claim one δ.
    requested_delta = site_delta(bg + m)

    size = AUDIT_RESOLUTION
    bg_images = torch.from_numpy(data.integers(0, 256, (bg * per_patient, 1, size, size), np.uint8))
    bg_labels = torch.from_numpy(np.repeat(data.integers(0, _BACKGROUND_CLASSES, bg), per_patient))
    bg_ids = np.repeat([f"background-{i}" for i in range(bg)], per_patient)
    # Each canary is a patient of its own class (public prior 0, so no fake ever has it): its
    # row alone writes that class's column of D's label embedding.
    canary_images = torch.full((m * per_patient, 1, size, size), 255, dtype=torch.uint8)
    canary_labels = torch.from_numpy(np.repeat(np.arange(m) + _BACKGROUND_CLASSES, per_patient))
    expected = max(1, round(sample_rate * (bg + m / 2)))
    dp, config = _audit_configs(m, noise_multiplier, clip_norm, expected)
    prior = np.r_[np.ones(_BACKGROUND_CLASSES), np.zeros(m)]

    scores, included_all = [], []
    taken_total = held_total = unrecorded = violations = 0
    ledger_eps: list[float] = []
    deltas: list[float] = []
    known_eps: dict[tuple, float] = {}
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        root = Path(tempfile.mkdtemp(prefix="canary-audit-", dir=home if home else tmp))
        all_ids = np.repeat([f"canary-{j}" for j in range(m)], per_patient)
        reference = _audit_trainer(config, dp, prior, all_ids, noise_multiplier, sample_rate)
        initial = {
            name: copy.deepcopy(getattr(reference, name).state_dict())
            for name in ("D", "G", "G_ema")
        }
        directions, signal = _canary_directions(
            reference, canary_images, canary_labels, per_patient, clip_norm
        )
        del reference
        for run in range(num_runs):
            included = coins.random(m) < 0.5
            members = np.flatnonzero(np.repeat(included, per_patient))
            names = [f"canary-{run}-{j}" for j in np.flatnonzero(included)]
            ids = np.r_[bg_ids, np.repeat(names, per_patient)]
            images = torch.cat([bg_images, canary_images[members]])
            labels = torch.cat([bg_labels, canary_labels[members]])
            trainer = _audit_trainer(config, dp, prior, ids, noise_multiplier, sample_rate)
            for name, state in initial.items():
                getattr(trainer, name).load_state_dict(state)
            trainer.noise_gen.manual_seed(int(run_seeds[run, 0]))
            trainer.sampler.rng = np.random.default_rng(int(run_seeds[run, 1]))
            if trainer_hook is not None:
                trainer_hook(trainer)
            engine = factory(ids, unit="patient", home=root / f"run-{run}", delta=requested_delta)
            column_grads, taken, held, late = _audit_run(
                trainer, engine, images, labels, num_steps, sample_rate, clip_norm, reserve_block
            )
            score = sum(((g * directions).sum(0) for g in column_grads), torch.zeros(m))
            scores.append(score.double().numpy())
            included_all.append(included)
            taken_total += taken
            held_total += held
            unrecorded += max(taken - held, 0)
            violations += late
            ledger_eps.append(_ledger_epsilon(engine, known_eps))
            deltas.append(float(engine.delta))

    score_all = np.concatenate(scores)
    included_flat = np.concatenate(included_all)
    guess_in, guess_out = _guesses(score_all, k_plus, k_minus)
    correct = int(included_flat[guess_in].sum() + (~included_flat[guess_out]).sum())
    delta = max(deltas)  # the ledger's δ (the largest, should an engine have used another)
    return EngineAuditResult(
        eps_lower_bound=eps_lower_bound(total, k_plus + k_minus, correct, delta, beta),
        ledger_epsilon=max(ledger_eps),
        delta=float(delta),
        beta=float(beta),
        correct=correct,
        guesses=k_plus + k_minus,
        k_plus=k_plus,
        k_minus=k_minus,
        num_canaries=total,
        included=int(included_flat.sum()),
        runs=num_runs,
        steps_per_run=num_steps,
        steps_taken=taken_total,
        ledger_steps=held_total,
        unrecorded_steps=unrecorded,
        write_ahead_violations=violations,
        noise_multiplier=float(noise_multiplier),
        sample_rate=float(sample_rate),
        clip_norm=float(clip_norm),
        canary_signal=signal,
        accountant=REPORT_ACCOUNTANT,
    )


def _audit_configs(
    num_canaries: int, noise_multiplier: float, clip_norm: float, expected: int
) -> tuple[Any, Any]:
    """The DPConfig and the tiny TrainConfig (8 px, narrow, no augmentation) of the audit."""
    from dataclasses import replace

    from fedspine.models import NetworkConfig
    from fedspine.training.config import preset_config
    from fedspine.training.dp import DPConfig
    from fedspine.training.dp_trainer import dp_train_config

    c_dim = _BACKGROUND_CLASSES + num_canaries
    dp = DPConfig(
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(clip_norm),
        expected_patients_per_step=int(expected),
    )
    base = preset_config("cpu", None, c_dim)
    network = NetworkConfig(
        resolution=AUDIT_RESOLUTION,
        img_channels=1,
        c_dim=c_dim,
        z_dim=8,
        w_dim=8,
        mapping_layers=1,
        channel_base=64,
        channel_max=16,
        mbstd_group=0,
        fused_modconv=False,
    )
    config = replace(
        base,
        network=network,
        augment=replace(base.augment, preset="none"),
        batch=2,
        pl_weight=0.0,
        device="cpu",
        mixed_precision="off",
        seed=0,
    )
    return dp, dp_train_config(config, dp)


def _audit_trainer(config, dp, prior, ids, noise_multiplier, sample_rate):
    from fedspine.training.dp_trainer import DPGanTrainer

    return DPGanTrainer(
        config, dp, prior, ids, noise_multiplier=noise_multiplier, sample_rate=sample_rate
    )


def _canary_parameter(D: torch.nn.Module) -> torch.nn.Parameter:
    params = dict(D.named_parameters())
    if _CANARY_PARAMETER not in params:
        raise RuntimeError(
            f"engine_canary_audit: the discriminator has no {_CANARY_PARAMETER!r}; the audit "
            "reads each canary's class column of D's label embedding"
        )
    return params[_CANARY_PARAMETER]


def _canary_directions(
    trainer: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    per_patient: int,
    clip_norm: float,
) -> tuple[torch.Tensor, float]:
    """Unit vector of each canary's own embedding column in its gradient row at the initial
    D ([cmap, canaries]), and the mean length of that column in a row clipped to C, over C."""
    from fedspine.training.dp import flatten_units

    m = images.shape[0] // per_patient
    units = [np.arange(j * per_patient, (j + 1) * per_patient) for j in range(m)]
    index, unit_index = flatten_units(units)
    step = trainer.dp_step
    rows = step.per_unit_grads(step.prepare(images[index], labels[index], unit_index))
    norms = torch.cat([r.flatten(1) for r in rows.values()], dim=1).norm(dim=1)
    columns = rows[_CANARY_PARAMETER][:, :, _BACKGROUND_CLASSES:]  # [canary, cmap, class]
    own = columns[torch.arange(m), :, torch.arange(m)].T.detach()  # [cmap, canary]
    lengths = own.norm(dim=0)
    clipped = lengths * torch.clamp(clip_norm / norms.clamp_min(1e-12), max=1.0)
    return own / lengths.clamp_min(1e-12), float(clipped.mean() / clip_norm)


def _ledger_epsilon(engine: Any, known: dict[tuple, float]) -> float:
    """``engine.spent()``, computed once per δ and ledger history within one audit: every run
    holds the same mechanism, and the reporting accountant takes seconds."""
    key = (engine.delta, tuple(tuple(h) for h in engine.histories()))
    if key not in known:
        known[key] = float(engine.spent())
    return known[key]


def _ledger_steps(engine: Any) -> int:
    return sum(int(r["steps"]) for r in engine.records(run_id=engine.run_id))


def _audit_run(
    trainer: Any,
    engine: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    sample_rate: float,
    clip_norm: float,
    block: int,
) -> tuple[list[torch.Tensor], int, int, int]:
    """One audited run: (privatised canary columns of each D update, steps the trainer took,
    steps the ledger holds after settling, updates applied before the ledger held them)."""
    from fedspine.training.dp import MECHANISM_LABEL

    dp_step = trainer.dp_step
    d_steps = steps * int(trainer.dp.d_steps_per_g)
    plan = engine.plan(
        steps=d_steps,
        sample_rate=sample_rate,
        clip_norm=clip_norm,
        label=MECHANISM_LABEL,
        noise_multiplier=trainer.noise_multiplier,
    )
    reservation = engine.reserve(plan, block=block)
    embed = _canary_parameter(trainer.D)
    columns: list[torch.Tensor] = []
    late = 0

    def before_update(*_: Any) -> None:
        # Runs as D's own optimizer is about to apply an update: p.grad is the privatised
        # gradient, and the ledger must already hold this step.
        nonlocal late
        columns.append(embed.grad[:, _BACKGROUND_CLASSES:].detach().float().cpu().clone())
        late += _ledger_steps(engine) < len(columns)

    # The optimizer that actually changes D (the one Opacus' DPOptimizer wraps): every
    # update it applies is counted here, whatever the trainer's own counters say.
    optimizer = getattr(dp_step.dp_optimizer, "original_optimizer", dp_step.dp_optimizer)
    handle = optimizer.register_step_pre_hook(before_update)
    dp_step.reservation = reservation
    try:
        for _ in range(steps):
            trainer.train_step(images, labels)
    finally:
        handle.remove()
        dp_step.reservation = None
    reservation.settle()
    taken = max(len(columns), int(dp_step.steps_taken))
    return columns, taken, _ledger_steps(engine), late
