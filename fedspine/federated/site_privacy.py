"""Differential privacy at a site: the site's ledger, its ε cap, σ for the whole federation.

The server asks for DP and says how (patients per step, clip, D steps per G step, target ε);
the site decides whether to take part. σ is planned once, on the site's first round, for every
round the federation announced, composed with what the site's ledger already holds and capped
by the smaller of the server's target and the site's own cap. Each round is checked against the
cap before any real image is touched, and recorded in the ledger after.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from fedspine.federated.site import RoundConfig, SiteConfig, SiteRefusal
from fedspine.training.dp import DPConfig, mechanism, plan_noise
from fedspine.training.dp_trainer import DPGanTrainer, dp_train_config, planned_d_steps

LEDGER_FILE = "privacy_ledger.json"


class SitePrivacy:
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

    def make_trainer(self, config, data, state: dict | None) -> DPGanTrainer:
        config = dp_train_config(config, self.dp)
        uniform = np.asarray(self.rc.label_prior, dtype=np.float64)
        round_steps = planned_d_steps(config, self.dp, self.rc.local_kimg)
        if state is not None and "dp" in state:
            sigma = float(state["dp"]["noise_multiplier"])
            q = float(state["dp"]["sample_rate"])
        else:
            rounds_left = max(self.rc.total_rounds - self.rc.server_round + 1, 1)
            try:
                sigma, q, _ = plan_noise(
                    self.dp,
                    self.num_patients,
                    round_steps * rounds_left,
                    prior=self.ledger.mechanisms(self.dataset_hash),
                )
            except ValueError as err:
                raise SiteRefusal(f"site {self.site.site_name}: {err}") from None
        self.sigma, self.q = sigma, q
        decision = self.ledger.check_cap(
            self.dataset_hash, mechanism(sigma, q, round_steps), self.delta, self.target
        )
        if not decision.allowed:
            raise SiteRefusal(f"site {self.site.site_name}: {decision.message}")
        trainer = DPGanTrainer(config, self.dp, uniform, self.patient_ids, sigma, q)
        if state is not None:
            trainer.load_state_dict(state)
        self.steps_at_start = trainer.dp_step.steps_taken
        return trainer

    def batches(self, data, device):
        return itertools.repeat((data.images.to(device), data.labels.to(device)))

    def record_round(self, trainer: DPGanTrainer) -> dict[str, float]:
        """Write this round's steps to the ledger; the numbers and JSON the server may see."""
        from fedspine.privacy.report import ledger_mechanisms

        steps = trainer.dp_step.steps_taken - self.steps_at_start
        if steps > 0:
            self.ledger.record(
                self.dataset_hash,
                mechanism(self.sigma, self.q, steps),
                self.rc.federation,
                self.dp.max_grad_norm,
                round=self.rc.server_round,
            )
        spent = self.ledger.spent(self.dataset_hash, self.delta, "prv")
        self.summary = {
            "epsilon": spent,
            "delta": self.delta,
            "dataset_hash": self.dataset_hash,
            "cap": self.target,
            "mechanisms": ledger_mechanisms(self.ledger, self.dataset_hash, self.dp.max_grad_norm),
        }
        return {"epsilon": spent, "delta": self.delta}

    def summary_json(self) -> str:
        return json.dumps(self.summary)
