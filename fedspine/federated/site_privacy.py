"""Differential privacy at a site: the site's ledger, its ε cap, σ for the whole federation.

The server asks for DP and says how (patients per step, clip, D steps per G step, target ε);
the site decides whether to take part. σ is planned once, on the site's first round, for every
round the federation announced, composed with what the site's ledger already holds and capped
by the smaller of the server's target and the site's own cap. Each round is checked against the
cap before any real image is touched, and recorded in the ledger after.

A SpineGAN federation spends from the same ledger twice: its classifier rounds first
(:class:`ClassifierSitePrivacy`, label ``clinical-classifier``), then the GAN rounds
(:class:`SitePrivacy`), whose σ is planned against everything the ledger holds, classifier
steps included. Every record notes its phase, and the summary a site sends after each round
gives ε of each phase alone beside the ledger's total (:func:`site_summary`).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedspine.federated.site import RoundConfig, SiteConfig, SiteRefusal
from fedspine.training.dp import DPConfig, mechanism, plan_noise
from fedspine.training.dp_trainer import DPGanTrainer, dp_train_config, planned_d_steps

LEDGER_FILE = "privacy_ledger.json"
GAN_PHASE = "gan"
CLASSIFIER_PHASE = "classifier"


class _RoundLedger:
    """What both phases do around a round: σ and q for it (kept from the phase's first round,
    else planned for every round left), the cap check, and afterwards the ledger record and the
    summary for the server. Subclasses set site, rc, dataset_hash, num_patients, delta, target
    and ledger."""

    def _plan_round(self, dp: DPConfig, state: dict | None, round_steps: int, mech_of):
        """(σ, q) of this round; refuses a round whose ``mech_of(σ, q, round_steps)`` would
        pass the target."""
        if state is not None and state.get("dp"):
            sigma = float(state["dp"]["noise_multiplier"])
            q = float(state["dp"]["sample_rate"])
        else:
            rounds_left = max(self.rc.total_rounds - self.rc.server_round + 1, 1)
            try:
                sigma, q, _ = plan_noise(
                    dp,
                    self.num_patients,
                    round_steps * rounds_left,
                    prior=self.ledger.mechanisms(self.dataset_hash),
                )
            except ValueError as err:
                raise SiteRefusal(f"site {self.site.site_name}: {err}") from None
        decision = self.ledger.check_cap(
            self.dataset_hash, mech_of(sigma, q, round_steps), self.delta, self.target
        )
        if not decision.allowed:
            raise SiteRefusal(f"site {self.site.site_name}: {decision.message}")
        return float(sigma), float(q)

    def _record_round(self, mech, clip: float, phase: str) -> dict[str, float]:
        if mech.steps > 0:
            self.ledger.record(
                self.dataset_hash,
                mech,
                self.rc.federation,
                clip,
                round=self.rc.server_round,
                extra={"phase": phase},
            )
        self.summary = site_summary(
            self.ledger, self.dataset_hash, self.delta, self.target, self.rc.federation
        )
        return {"epsilon": self.summary["epsilon"], "delta": self.delta}

    def summary_json(self) -> str:
        return json.dumps(self.summary)


class SitePrivacy(_RoundLedger):
    """DP of a GAN round at a site: σ planned once for the federation, cap, ledger record."""

    def __init__(self, site: SiteConfig, rc: RoundConfig, dataset, train) -> None:
        from fedspine.privacy.accounting import default_delta
        from fedspine.privacy.ledger import PrivacyLedger

        options = dict(rc.dp or {})
        self.site = site
        self.rc = rc
        self.dataset_hash = dataset.content_hash
        self.patient_ids = np.asarray(train.patient_ids).astype(str)
        self.num_patients = len(np.unique(self.patient_ids))
        targets = [float(t) for t in (options.get("epsilon"), site.max_epsilon) if t is not None]
        if not targets:
            raise SiteRefusal("DP was requested without a target ε and the site has no ε cap")
        self.target = min(targets)
        self.dp = DPConfig(
            target_epsilon=self.target,
            delta=options.get("delta") or default_delta(self.num_patients),
            max_grad_norm=float(options.get("clip", 1.0)),
            expected_patients_per_step=min(
                int(options.get("patients-per-step", 64)), self.num_patients
            ),
            d_steps_per_g=int(options.get("d-steps-per-g", 1)),
            ada_p=float(options.get("ada-p", 0.0)),
            # Plan σ with RDP, the accountant the cap check uses: a plan made with the tighter
            # PRV could pass the plan and then fail the cap on the last round.
            accountant="rdp",
        )
        self.delta = float(self.dp.delta)
        self.ledger_path = Path(site.ledger_path or Path(site.data_path) / LEDGER_FILE)
        self.ledger = PrivacyLedger.open(self.ledger_path, create=True)

    def make_trainer(self, config, data, state: dict | None, clinical=None) -> DPGanTrainer:
        """The DP trainer of this round (a DPSpineGanTrainer where ``clinical`` is given)."""
        config = dp_train_config(config, self.dp)
        uniform = np.asarray(self.rc.label_prior, dtype=np.float64)
        round_steps = planned_d_steps(config, self.dp, self.rc.local_kimg)
        sigma, q = self._plan_round(self.dp, state, round_steps, mechanism)
        self.sigma, self.q = sigma, q
        if clinical is not None:
            from fedspine.training.clinical import DPSpineGanTrainer

            trainer = DPSpineGanTrainer(
                config, self.dp, uniform, self.patient_ids, sigma, q, clinical
            )
        else:
            trainer = DPGanTrainer(config, self.dp, uniform, self.patient_ids, sigma, q)
        if state is not None:
            trainer.load_state_dict(state)
        self.steps_at_start = trainer.dp_step.steps_taken
        return trainer

    def batches(self, data, device):
        return itertools.repeat((data.images.to(device), data.labels.to(device)))

    def record_round(self, trainer: DPGanTrainer) -> dict[str, float]:
        """Write this round's steps to the ledger; the numbers and JSON the server may see."""
        steps = trainer.dp_step.steps_taken - self.steps_at_start
        return self._record_round(
            mechanism(self.sigma, self.q, steps), self.dp.max_grad_norm, GAN_PHASE
        )


class ClassifierSitePrivacy(_RoundLedger):
    """DP of a classifier round at a site: σ planned once for the phase, cap, ledger record.

    The target is the smaller of the federation's ``classifier.dp_epsilon`` and the site's cap,
    for the ledger's total (every earlier run on this dataset composed in). δ is the one the GAN
    phase uses (from the same training patients), so both phases add up in one ledger.
    """

    def __init__(self, site: SiteConfig, rc, dataset, train) -> None:
        from fedspine.privacy.accounting import default_delta
        from fedspine.privacy.ledger import PrivacyLedger

        options = dict(rc.dp or {})
        self.site = site
        self.rc = rc
        self.dataset_hash = dataset.content_hash
        self.num_patients = len(np.unique(np.asarray(train.patient_ids).astype(str)))
        targets = [float(t) for t in (options.get("epsilon"), site.max_epsilon) if t is not None]
        if not targets:
            raise SiteRefusal(
                "DP was requested for the classifier without a target ε and the site has no ε cap"
            )
        self.target = min(targets)
        self.delta = float(options.get("delta") or default_delta(self.num_patients))
        self.clip = float(options.get("clip", 1.0))
        self.patients_per_step = min(int(options.get("patients-per-step", 32)), self.num_patients)
        self.ledger_path = Path(site.ledger_path or Path(site.data_path) / LEDGER_FILE)
        self.ledger = PrivacyLedger.open(self.ledger_path, create=True)

    def plan(self, state: dict | None) -> float:
        """σ for this round: kept from the site's first classifier round, else planned now for
        every classifier round left; refuses a round that would pass the target."""
        dp = DPConfig(
            target_epsilon=self.target,
            delta=self.delta,
            max_grad_norm=self.clip,
            expected_patients_per_step=self.patients_per_step,
            accountant="rdp",
        )
        self.sigma, self.q = self._plan_round(dp, state, self.rc.local_steps, classifier_mechanism)
        return self.sigma

    def record_round(self, result: dict[str, Any]) -> dict[str, float]:
        """Record the steps that ran, as the DP step reports them (σ, q, clip and count)."""
        mech = classifier_mechanism(
            float(result["noise_multiplier"]), float(result["sample_rate"]), int(result["steps"])
        )
        return self._record_round(mech, float(result["clip"]), CLASSIFIER_PHASE)


def classifier_mechanism(sigma: float, q: float, steps: int):
    """The ledger entry of ``steps`` DP-SGD steps of the clinical classifier."""
    from fedspine.training.classifier_dp import MECHANISM_LABEL

    return replace(mechanism(sigma, q, steps), label=MECHANISM_LABEL)


def site_summary(
    ledger, dataset_hash: str, delta: float, cap: float, federation: str
) -> dict[str, Any]:
    """What a site tells the server about its privacy after a round: ε in total (the whole
    ledger of this dataset, every run and phase composed), and ε of each phase of this
    federation alone, so the report can show both phases per site."""
    from fedspine.privacy.accounting import epsilon

    all_records = ledger.records(dataset_hash)
    records = [r for r in all_records if r["run_id"] == federation]
    phases: dict[str, dict[str, Any]] = {}
    for phase in (CLASSIFIER_PHASE, GAN_PHASE):
        mine = [r for r in records if (r.get("notes") or {}).get("phase", GAN_PHASE) == phase]
        if mine:
            mechanisms = [_record_mechanism(r) for r in mine]
            phases[phase] = {
                "epsilon": epsilon(mechanisms, delta, "prv"),
                "steps": sum(m.steps for m in mechanisms),
                "rounds": sorted({int(r["round"]) for r in mine if r.get("round") is not None}),
                "clip_norm": float(mine[-1]["clip_norm"]),
            }
    return {
        "epsilon": epsilon([_record_mechanism(r) for r in all_records], delta, "prv"),
        "delta": float(delta),
        "dataset_hash": dataset_hash,
        "cap": float(cap),
        "phases": phases,
        "mechanisms": [
            {
                "label": str(r.get("label", "")),
                "noise_multiplier": float(r["noise_multiplier"]),
                "sample_rate": float(r["sample_rate"]),
                "steps": int(r["steps"]),
                "clip_norm": float(r["clip_norm"]),
            }
            for r in all_records
        ],
    }


def _record_mechanism(record: dict[str, Any]):
    from fedspine.privacy.accounting import Mechanism

    return Mechanism(
        float(record["noise_multiplier"]),
        float(record["sample_rate"]),
        int(record["steps"]),
        label=str(record.get("label", "")),
    )
