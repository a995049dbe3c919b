"""The privacy engine: the one way a private computation in fedspine spends budget.

Every DP mechanism (the centralised and federated GAN discriminator, the DP classifier, both
phases of a DP SpineGAN) goes through :class:`PrivacyEngine`, over the parts beside it: the
site's privacy home (:mod:`.home`: where the ledger is, how patients are named), the ledger
(:mod:`.ledger`: what each patient went through) and the accountants (:mod:`.accounting`).
Its verbs, in the order a run uses them:

- **plan**: σ and q for the steps asked, against the worst patient's history and the cap, at
  the site's δ (:func:`site_delta`: never larger than 1/(10·N), whoever asks);
- **reserve**: write the steps into the ledger, durably, before they run (:class:`Reservation`);
- run: the caller takes its steps, calling :meth:`Reservation.take` before each one, which
  reserves further blocks ahead when needed (each block re-checked against the plan);
- **settle**: a clean end lowers the reservation to the steps that ran. A crash leaves it
  counted in full, so it can only over-count.

``spent`` and ``summary`` then state ε of the run's worst patient with the reporting accountant.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedspine.privacy.accounting import (
    PLAN_ACCOUNTANT,
    REPORT_ACCOUNTANT,
    Accountant,
    Mechanism,
    PrivacyAccountingError,
    calibrate_noise,
    default_delta,
    epsilon,
)
from fedspine.privacy.home import PrivacyHome
from fedspine.privacy.ledger import CapDecision, PrivacyLedger, mechanisms_of

RESERVE_BLOCK = 16
"""Steps reserved ahead at a time: the write's cost shared over them, and at most this many
steps over-counted by a crash."""


class PrivacyError(ValueError):
    """A private computation refused: the message says what, why, and what to do."""


class PrivacyCapExceeded(PrivacyError):
    """Training would push the worst patient's ε past the cap; says spent and remaining."""


def site_delta(num_patients: int, requested: float | None = None, source: str = "--delta") -> float:
    """δ of a mechanism on ``num_patients`` units: the site's, min(1e-5, 1/(10·N)).

    A smaller ``requested`` δ is allowed (a stricter claim); a larger one is refused, whoever
    asks for it (``source`` names them in the message): δ is the chance that the guarantee
    fails outright, and at δ ≥ 1/N a mechanism that publishes one patient's record is "private".
    """
    limit = default_delta(num_patients)
    if requested is None:
        return limit
    value = float(requested)
    if not (math.isfinite(value) and 0 < value <= limit):
        raise PrivacyError(
            f"{source} {requested:g}: δ must be in (0, {limit:.3g}] for {num_patients} patients "
            "(the site's δ is min(1e-5, 1/(10·patients)); a larger δ would let the guarantee "
            "fail for a patient outright); omit it to use the site's δ"
        )
    return value


def new_run_id(kind: str = "run") -> str:
    """A random run identifier. It reaches the server and reports, so nothing in it comes from
    the site: not the data, and not the run folder's name, which a user may have chosen."""
    return f"{kind}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class PrivacyPlan:
    """σ, q and steps of one mechanism, checked against the worst patient and the cap."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    clip_norm: float
    label: str
    patients: int
    spent_before: float
    projected: float
    cap: float | None

    def mechanism(self, steps: int | None = None) -> Mechanism:
        """``steps`` (default: the planned number) steps of this plan."""
        count = self.steps if steps is None else int(steps)
        return Mechanism(self.noise_multiplier, self.sample_rate, count, label=self.label)


class PrivacyEngine:
    """Plan, reserve, settle and report the mechanisms of one run on one set of patients.

    ``patient_ids`` has one entry per training image (the unit ingest recorded); the engine
    keeps only their keyed hashes. ``delta`` is refused above the site's δ (:func:`site_delta`).
    """

    def __init__(
        self,
        patient_ids: np.ndarray | Sequence[str],
        *,
        unit: str,
        home: PrivacyHome | str | os.PathLike | None = None,
        run_id: str | None = None,
        delta: float | None = None,
        delta_source: str = "--delta",
    ) -> None:
        self.home = home if isinstance(home, PrivacyHome) else PrivacyHome(home)
        self.patients = self.home.keys_of(patient_ids)
        if not self.patients:
            raise PrivacyError("no training patients: nothing to train privately")
        self.num_patients = len(self.patients)
        self.unit = str(unit)
        self.delta = site_delta(self.num_patients, delta, delta_source)
        self.run_id = run_id or new_run_id()
        self.ledger: PrivacyLedger = self.home.ledger()

    # -- plan ----------------------------------------------------------------------------------

    def sample_rate(self, expected_per_step: int) -> float:
        """q = expected units per step / units, at most 1."""
        if int(expected_per_step) < 1:
            raise PrivacyError(f"expected patients per step must be >= 1, got {expected_per_step}")
        return min(1.0, int(expected_per_step) / self.num_patients)

    def plan(
        self,
        *,
        steps: int,
        expected_per_step: int | None = None,
        sample_rate: float | None = None,
        clip_norm: float,
        label: str,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        cap: float | None = None,
    ) -> PrivacyPlan:
        """σ for ``steps`` further steps: the given ``noise_multiplier``, else calibrated so
        the worst patient ends at ``target_epsilon``. Refused over ``cap``, or over
        ``target_epsilon`` where both are given (a resumed run keeps its σ)."""
        if target_epsilon is None and noise_multiplier is None:
            raise PrivacyError("give a target ε or a noise multiplier σ")
        steps = int(steps)
        if steps < 1:
            raise PrivacyError(f"a private run needs at least one step, got {steps}")
        q = float(sample_rate) if sample_rate is not None else self.sample_rate(expected_per_step)
        histories = self.ledger.histories(self.patients)
        spent = max(epsilon(h, self.delta, PLAN_ACCOUNTANT) for h in histories)
        if noise_multiplier is not None:
            sigma = float(noise_multiplier)
            if not (math.isfinite(sigma) and sigma > 0):
                raise PrivacyError(f"σ must be a positive finite number, got {noise_multiplier}")
        else:
            try:
                sigma = max(
                    calibrate_noise(
                        target_epsilon,
                        self.delta,
                        q,
                        steps,
                        accountant=PLAN_ACCOUNTANT,
                        prior=h,
                        label=label,
                    )
                    for h in histories
                )
            except ValueError as err:
                raise PrivacyError(f"{err} (privacy home {self.home.path})") from None
        new = Mechanism(sigma, q, steps, label=label)
        projected = max(epsilon([*h, new], self.delta, PLAN_ACCOUNTANT) for h in histories)
        plan = PrivacyPlan(
            sigma, q, steps, self.delta, float(clip_norm), label, self.num_patients,
            float(spent), float(projected), cap,
        )  # fmt: skip
        if target_epsilon is not None and projected > float(target_epsilon) * (1 + 1e-9):
            raise PrivacyCapExceeded(
                f"the worst of these {self.num_patients} patients would reach ε="
                f"{projected:.3f} at δ={self.delta:.3g} ({PLAN_ACCOUNTANT.upper()}), past the "
                f"target ε={target_epsilon:g}; shorten the run, or start a new run with a larger "
                "target"
            )
        if cap is not None:
            self.check(new, cap)
        return plan

    def check(self, mechanism: Mechanism, cap: float) -> CapDecision:
        """Refuse ``mechanism`` (PrivacyCapExceeded) if it would take the worst patient past
        ``cap``; returns the decision otherwise."""
        decision = self.ledger.check_cap(self.patients, mechanism, self.delta, cap)
        if not decision.allowed:
            raise PrivacyCapExceeded(decision.message)
        return decision

    # -- reserve and settle --------------------------------------------------------------------

    def reserve(
        self,
        plan: PrivacyPlan,
        steps: int | None = None,
        *,
        block: int | None = None,
        round: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Reservation:
        """Write steps of ``plan`` ahead into the ledger and return the open reservation.

        With ``block`` only that many are reserved now and more, a block at a time, as
        :meth:`Reservation.take` needs them, up to ``steps`` (default: the plan's); otherwise
        all ``steps`` at once.
        """
        limit = plan.steps if steps is None else int(steps)
        reservation = Reservation(self, plan, limit, block or limit, round=round, extra=extra)
        if block is None:
            reservation.open(limit)
        return reservation

    # -- report --------------------------------------------------------------------------------

    def histories(self) -> list[list[Mechanism]]:
        return self.ledger.histories(self.patients)

    def spent(self, accountant: Accountant = REPORT_ACCOUNTANT) -> float:
        """ε of the worst patient of this run, every mechanism that touched them composed."""
        return worst_epsilon(self.histories(), self.delta, accountant)[0]

    def reported(
        self, extra_patients: Sequence[str] = (), accountant: Accountant = REPORT_ACCOUNTANT
    ) -> tuple[float, str, list[dict[str, Any]]]:
        """(ε, accountant, mechanism rows) for privacy.json: every mechanism that touched any
        of the run's patients (and ``extra_patients``, e.g. a classifier's) composed.

        That bounds the worst patient from above and equals it when the patients' histories
        nest (the usual case); anyone can recompute it from the rows, which is what a release
        checks. Plans and caps use the exact worst patient instead.
        """
        patients = sorted({*self.patients, *extra_patients})
        records = self.ledger.records(patients=patients)
        eps, used = worst_epsilon([mechanisms_of(records)], self.delta, accountant)
        return eps, used, [_row(r) for r in records]

    def records(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Ledger records touching this run's patients (of ``run_id`` only, if given)."""
        return self.ledger.records(run_id=run_id, patients=self.patients)


class Reservation:
    """Steps written ahead in the ledger for one run (or round). Call :meth:`take` before each
    step; :meth:`settle` once at a clean end. Never settled, it stays counted in full.

    A block-wise reservation writes nothing until its first :meth:`take`, so a run that fails
    before its first step spends nothing.
    """

    def __init__(
        self,
        engine: PrivacyEngine,
        plan: PrivacyPlan,
        limit: int,
        block: int,
        *,
        round: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.plan = plan
        self.limit = int(limit)
        self.block = max(int(block), 1)
        self.round = round
        self.extra = dict(extra or {})
        self.record_id: str | None = None
        self.reserved = 0
        self.taken = 0
        self.settled = False

    def open(self, steps: int) -> None:
        """Write the record with its first ``steps`` steps."""
        self.record_id = self.engine.ledger.reserve(
            self.engine.patients,
            self.plan.mechanism(steps),
            self.engine.run_id,
            self.plan.clip_norm,
            unit=self.engine.unit,
            round=self.round,
            extra=self.extra,
        )
        self.reserved = int(steps)

    def take(self, steps: int = 1) -> None:
        """Account for ``steps`` steps about to run: reserve further ahead if needed, and
        refuse (PrivacyCapExceeded) a step past the planned total."""
        if self.settled:
            raise PrivacyError("this reservation is settled; reserve again for further steps")
        need = self.taken + int(steps)
        if need > self.limit:
            raise PrivacyCapExceeded(
                f"the run asked for step {need} but only {self.limit} were planned and checked "
                "against the cap; re-plan (e.g. --resume with a new --kimg) to go on"
            )
        if need > self.reserved:
            more = min(max(self.block, need - self.reserved), self.limit - self.reserved)
            if self.record_id is None:
                self.open(more)
            else:
                self.reserved = self.engine.ledger.extend(self.record_id, more)
        self.taken = need

    def settle(self) -> dict[str, Any] | None:
        """Lower the record to the steps taken; release the ones that provably never ran."""
        self.settled = True
        if self.record_id is None:
            return None
        return self.engine.ledger.settle(self.record_id, self.taken)


def _row(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "label": record["label"],
        "noise_multiplier": record["noise_multiplier"],
        "sample_rate": record["sample_rate"],
        "steps": record["steps"],
        "clip_norm": record["clip_norm"],
        "state": record["state"],
        "run_id": record["run_id"],
        "round": record["round"],
        "unit": record["unit"],
    }


def worst_epsilon(
    histories: Sequence[Sequence[Mechanism]], delta: float, accountant: Accountant
) -> tuple[float, str]:
    """(ε, accountant used) of the worst history; falls back to RDP (also an upper bound)
    where PRV would need too much memory."""
    try:
        return max(epsilon(h, delta, accountant) for h in histories), accountant
    except PrivacyAccountingError:
        return max(epsilon(h, delta, PLAN_ACCOUNTANT) for h in histories), PLAN_ACCOUNTANT
