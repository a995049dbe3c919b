"""Differential privacy at a site: the site's privacy home, its ε cap and δ, σ for the federation.

The server asks for DP and says how (patients per step, clip, D steps per G step, target ε);
the site decides whether to take part, on its own terms: its privacy home (ledger and patient
key), its ε cap and its δ come from its node config, never from the message. A server δ larger
than the site's (min(1e-5, 1/(10·patients))) is refused; a smaller one is used as is.

σ is planned once, on the site's first round, for every round the federation announced, against
the worst training patient's history in the site's ledger (every run and ingest of the same
patients), capped by the smaller of the server's target and the site's cap. Each round is
checked against the cap before any real image is touched, its steps are written into the ledger
before the first one runs (:meth:`fedspine.privacy.engine.PrivacyEngine.reserve`), and the
reservation is settled only after the round's state is saved: a site killed mid-round has its
whole round counted.

A SpineGAN federation spends twice on the same patients: its classifier rounds first
(:class:`ClassifierSitePrivacy`, label ``clinical-classifier``), then the GAN rounds
(:class:`SitePrivacy`), whose σ is planned against everything the ledger holds, classifier steps
included. Every record notes its phase, and the summary a site sends after each round gives ε of
each phase alone beside the worst patient's total (:func:`site_summary`).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np

from fedspine.dp_options import TRAINABLE_D_FORMS
from fedspine.federated.site_config import RoundConfig, SiteConfig, SiteRefusal
from fedspine.privacy.accounting import PLAN_ACCOUNTANT, REPORT_ACCOUNTANT, epsilon
from fedspine.privacy.engine import PrivacyEngine, PrivacyError, Reservation
from fedspine.privacy.home import PrivacyHomeError
from fedspine.privacy.ledger import LedgerError, mechanisms_of
from fedspine.training.classifier_dp import MECHANISM_LABEL as CLASSIFIER_LABEL
from fedspine.training.dp import MECHANISM_LABEL, TRAINABLE_ALL, DPConfig, top_stages
from fedspine.training.dp_run import dp_unit_of
from fedspine.training.dp_trainer import check_resume, dp_train_config, planned_d_steps
from fedspine.training.factory import DPSGD, TrainerSpec, build_trainer
from fedspine.training.gan_trainer import GanTrainer

GAN_PHASE = "gan"
CLASSIFIER_PHASE = "classifier"


class _RoundLedger:
    """What both phases do around a round: the engine on the site's patients, σ and q for the
    round (kept from the phase's first round, else planned for every round left), the cap
    check, the write-ahead reservation, and afterwards the settlement and the summary for the
    server."""

    def _open_engine(self, site: SiteConfig, rc, dataset, patient_ids: np.ndarray) -> None:
        options = dict(rc.dp or {})
        self.site = site
        self.rc = rc
        targets = [float(t) for t in (options.get("epsilon"), site.max_epsilon) if t is not None]
        if not targets:
            raise SiteRefusal(
                f"site {site.site_name}: DP was requested without a target ε and the site has "
                "no ε cap"
            )
        self.target = min(targets)
        try:
            self.engine = PrivacyEngine(
                patient_ids,
                unit=dp_unit_of(dataset, site.privacy_unit),
                home=site.privacy_home,
                run_id=rc.federation,
                delta=options.get("delta"),
                delta_source="the server's δ",
            )
        except (PrivacyError, PrivacyHomeError, LedgerError) as err:
            raise SiteRefusal(f"site {site.site_name}: {err}") from None
        self.num_patients = self.engine.num_patients
        self.delta = self.engine.delta
        self.reservation: Reservation | None = None

    def _plan_round(
        self, state: dict | None, round_steps: int, per_step: int, clip: float, label: str
    ):
        """The plan of this round; refuses a round that would pass the target or the cap."""
        rounds_left = max(self.rc.total_rounds - self.rc.server_round + 1, 1)
        try:
            if state is not None and state.get("dp"):
                plan = self.engine.plan(
                    steps=round_steps,
                    sample_rate=float(state["dp"]["sample_rate"]),
                    noise_multiplier=float(state["dp"]["noise_multiplier"]),
                    clip_norm=clip,
                    label=label,
                    cap=self.target,
                )
            else:
                full = self.engine.plan(
                    steps=round_steps * rounds_left,
                    expected_per_step=per_step,
                    target_epsilon=self.target,
                    clip_norm=clip,
                    label=label,
                )
                plan = self.engine.plan(
                    steps=round_steps,
                    sample_rate=full.sample_rate,
                    noise_multiplier=full.noise_multiplier,
                    clip_norm=clip,
                    label=label,
                    cap=self.target,
                )
        except (PrivacyError, LedgerError) as err:
            raise SiteRefusal(f"site {self.site.site_name}: {err}") from None
        self.plan = plan
        self.sigma, self.q = plan.noise_multiplier, plan.sample_rate
        return plan

    def _notes(self, phase: str) -> dict[str, Any]:
        """What the ledger record says beside the steps: the phase and, when round 1 started
        from one, the public checkpoint as the server declared it."""
        notes: dict[str, Any] = {"phase": phase}
        pretraining = getattr(self.rc, "pretraining", None)
        if pretraining:
            notes["pretraining"] = {**pretraining, "as_declared_by": "the server"}
        return notes

    def _reserve(self, phase: str) -> Reservation:
        self.reservation = self.engine.reserve(
            self.plan, round=self.rc.server_round, extra=self._notes(phase)
        )
        return self.reservation

    def _settle(self) -> dict[str, float]:
        if self.reservation is not None and not self.reservation.settled:
            self.reservation.settle()
        self.summary = site_summary(self.engine, self.target)
        return {"epsilon": self.summary["epsilon"], "delta": self.delta}

    def summary_json(self) -> str:
        return json.dumps(self.summary)


class SitePrivacy(_RoundLedger):
    """DP of a GAN round at a site: σ planned once for the federation, cap, reservation."""

    def __init__(self, site: SiteConfig, rc: RoundConfig, dataset, train) -> None:
        options = dict(rc.dp or {})
        self.patient_ids = train.privacy_ids
        self._open_engine(site, rc, dataset, self.patient_ids)
        trainable_d = options.get("trainable-d", TRAINABLE_ALL)
        views = options.get("augment-views", 1)
        try:
            # The server's values, as sent: a string and a whole number, checked by DPConfig
            # (K against the network when D is built; views bounded, and only with ada_p > 0).
            if not isinstance(trainable_d, str) or len(trainable_d) > 20:
                raise ValueError(
                    f"trainable-d must be {TRAINABLE_D_FORMS}, not {trainable_d!r:.40}"
                )
            if not isinstance(views, int) or isinstance(views, bool):
                raise ValueError(f"augment-views must be a whole number, not {views!r:.40}")
            self.dp = DPConfig(
                target_epsilon=self.target,
                delta=self.delta,
                max_grad_norm=float(options.get("clip", 1.0)),
                expected_patients_per_step=min(
                    int(options.get("patients-per-step", 64)), self.num_patients
                ),
                d_steps_per_g=int(options.get("d-steps-per-g", 1)),
                ada_p=float(options.get("ada-p", 0.0)),
                accountant=PLAN_ACCOUNTANT,
                trainable_d=trainable_d,
                augment_views=views,
            )
        except (TypeError, ValueError) as err:
            raise SiteRefusal(
                f"site {site.site_name}: the server's DP settings are refused: {err}"
            ) from None

    def make_trainer(self, config, data, state: dict | None, clinical=None) -> GanTrainer:
        """The DP trainer of this round (SpineGAN's where ``clinical`` is given), with the
        round's steps already written into the ledger."""
        config = dp_train_config(config, self.dp)
        stages = top_stages(self.dp.trainable_d)
        blocks = len(config.network.block_resolutions) - 1  # D's blocks (fedspine.models)
        if stages is not None and stages > blocks:
            raise SiteRefusal(
                f"site {self.site.site_name}: the server asks for trainable-d "
                f"{self.dp.trainable_d}, but this network's D has {blocks} blocks (K from 1 "
                f"to {blocks})"
            )
        if state is not None and state.get("dp"):
            try:  # the site's state from earlier rounds: the same part of D, the same views
                check_resume(state["dp"], self.dp)
            except ValueError as err:
                raise SiteRefusal(f"site {self.site.site_name}: {err}") from None
        uniform = np.asarray(self.rc.label_prior, dtype=np.float64)
        round_steps = planned_d_steps(config, self.dp, self.rc.local_kimg)
        self._plan_round(
            state,
            round_steps,
            self.dp.expected_patients_per_step,
            self.dp.max_grad_norm,
            MECHANISM_LABEL,
        )
        spec = TrainerSpec(DPSGD(self.dp, self.sigma, self.q, self.patient_ids), clinical=clinical)
        trainer = build_trainer(spec, config, uniform, state=state)
        trainer.dp_step.reservation = self._reserve(GAN_PHASE)
        return trainer

    def batches(self, data, device):
        return itertools.repeat((data.images.to(device), data.labels.to(device)))

    def record_round(self, trainer: GanTrainer) -> dict[str, float]:
        """Settle the round's reservation (after its state is saved); the numbers and JSON the
        server may see."""
        return self._settle()


class ClassifierSitePrivacy(_RoundLedger):
    """DP of a classifier round at a site: σ planned once for the phase, cap, reservation.

    The target is the smaller of the federation's ``classifier.dp_epsilon`` and the site's cap,
    for the worst patient's total (every earlier run on these patients composed in).
    """

    def __init__(self, site: SiteConfig, rc, dataset, train) -> None:
        options = dict(rc.dp or {})
        self._open_engine(site, rc, dataset, train.privacy_ids)
        self.clip = float(options.get("clip", 1.0))
        self.patients_per_step = min(int(options.get("patients-per-step", 32)), self.num_patients)

    def plan(self, state: dict | None) -> float:
        """σ for this round (kept from the site's first classifier round, else planned now for
        every classifier round left), its steps reserved in the ledger; refuses a round that
        would pass the target."""
        self._plan_round(
            state, self.rc.local_steps, self.patients_per_step, self.clip, CLASSIFIER_LABEL
        )
        self._reserve(CLASSIFIER_PHASE)
        return self.sigma

    def record_round(self, result: dict[str, Any]) -> dict[str, float]:
        """Settle the round to the steps that ran, as the DP step reports them."""
        if (float(result["noise_multiplier"]), float(result["sample_rate"])) != (
            self.sigma,
            self.q,
        ):
            raise SiteRefusal("the classifier's DP step ran at another σ or q than planned")
        return self._settle()


def site_summary(engine: PrivacyEngine, cap: float) -> dict[str, Any]:
    """What a site tells the server about its privacy after a round: ε of its worst patient in
    total (every run and phase on record composed), ε of each phase of this federation alone,
    and the mechanisms behind them. Nothing that fingerprints its data."""
    delta = engine.delta
    records = [r for r in engine.records() if r["run_id"] == engine.run_id]
    phases: dict[str, dict[str, Any]] = {}
    for phase in (CLASSIFIER_PHASE, GAN_PHASE):
        mine = [r for r in records if (r.get("notes") or {}).get("phase", GAN_PHASE) == phase]
        if mine:
            phases[phase] = {
                "epsilon": epsilon(mechanisms_of(mine), delta, REPORT_ACCOUNTANT),
                "steps": sum(int(r["steps"]) for r in mine),
                "rounds": sorted({int(r["round"]) for r in mine if r.get("round") is not None}),
                "clip_norm": float(mine[-1]["clip_norm"]),
            }
    total, _, rows = engine.reported()
    return {
        "epsilon": total,
        "delta": float(delta),
        "unit": engine.unit,
        "patients": engine.num_patients,
        "cap": float(cap),
        "phases": phases,
        "mechanisms": rows,
    }
