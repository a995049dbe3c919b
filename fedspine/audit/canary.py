"""Privacy audits of the DP discriminator step with canaries: empirical lower bounds on ε.

Both audits rest on Steinke, Nasr and Jagielski (2023), "Privacy Auditing with One (1) Training
Run", whose statistics (:func:`audit_p_value`, :func:`eps_lower_bound`) and what they can and
cannot show are in :mod:`fedspine.audit.one_run_bound`. The first audit,
:func:`audit_dp_step`, checks the clip-and-noise code alone (:mod:`fedspine.audit.step_canary`);
both are importable from here. This module holds the second, :func:`engine_canary_audit`: the
whole private path against the ledger.

The real path of a DP run, on a tiny conditional GAN (8 px, a few thousand parameters, CPU, a
few seconds): the DP trainer's ``train_step`` (``build_trainer(TrainerSpec(DPSGD(...)))``) →
:class:`~fedspine.training.dp.PatientPoissonSampler` →
:class:`~fedspine.training.dp.DPDiscriminatorStep` (per-patient vmap rows, Opacus clip and
noise) with a :class:`~fedspine.privacy.engine.PrivacyEngine` reservation attached, whose
``take`` must write each step into the ledger before D is updated. It repeats ``runs`` short trainings, each under
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
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedspine.audit.one_run_bound import (
    DEFAULT_BETA,
    audit_p_value,
    eps_lower_bound,
    guess_members,
)
from fedspine.audit.step_canary import AuditResult, audit_dp_step
from fedspine.models import NetworkConfig
from fedspine.privacy.accounting import REPORT_ACCOUNTANT
from fedspine.privacy.engine import PrivacyEngine, site_delta
from fedspine.training.config import preset_config
from fedspine.training.dp import MECHANISM_LABEL, DPConfig, flatten_units
from fedspine.training.dp_trainer import dp_train_config
from fedspine.training.factory import DPSGD, TrainerSpec, build_trainer

__all__ = [
    "AUDIT_RESOLUTION",
    "DEFAULT_BETA",
    "AuditResult",
    "EngineAuditResult",
    "audit_dp_step",
    "audit_p_value",
    "engine_canary_audit",
    "eps_lower_bound",
]


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
    tiny DP trainer (``build_trainer(TrainerSpec(DPSGD(...)))``), each on ``background_patients``
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
    guess_in, guess_out = guess_members(score_all, k_plus, k_minus)
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
    """The audited DP trainer, built as every DP run builds it."""
    spec = TrainerSpec(DPSGD(dp, noise_multiplier, sample_rate, ids))
    return build_trainer(spec, config, prior)


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
