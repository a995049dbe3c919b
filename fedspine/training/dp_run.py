"""A DP training run's privacy bookkeeping: plan σ against the ledger, check the cap, record.

Shared by `fedspine train --dp` and the federated site, so both spend budget the same way: the
ledger lives with the data (default ``PREPARED/privacy_ledger.json``) and is keyed by the prepared
dataset's content hash; every DP discriminator step taken is recorded there, and the run folder
gets a ``privacy.json`` that `fedspine privacy report` and `fedspine release` read.
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fedspine.privacy.accounting import default_delta
from fedspine.training.dp import DPConfig, mechanism, plan_noise
from fedspine.training.dp_trainer import DPGanTrainer, dp_train_config, planned_d_steps

LEDGER_FILE = "privacy_ledger.json"


class PrivacyCapExceeded(ValueError):
    """Training would push the data's ε past its cap; the message says spent and remaining."""


class RunPrivacy:
    """σ planning, the cap check and the ledger record for one DP run on one prepared dataset."""

    def __init__(self, prepared: Path, dataset, train, out: Path, options: dict[str, Any]):
        self.dataset_hash = dataset.content_hash
        self.site = Path(prepared).resolve().name
        self.out = Path(out)
        self.patient_ids = np.asarray(train.patient_ids).astype(str)
        self.num_patients = len(np.unique(self.patient_ids))
        self.dp = DPConfig(
            target_epsilon=options.get("target_epsilon"),
            noise_multiplier=options.get("noise_multiplier"),
            delta=options.get("delta"),
            max_grad_norm=float(options.get("max_grad_norm", 1.0)),
            expected_patients_per_step=min(
                int(options.get("expected_patients_per_step", 64)), self.num_patients
            ),
            d_steps_per_g=int(options.get("d_steps_per_g", 1)),
            ada_p=float(options.get("ada_p", 0.0)),
            # Plan σ with RDP, the accountant the cap check uses: a plan made with the tighter
            # PRV could pass the plan and then fail the cap on the last round.
            accountant="rdp",
        )
        self.cap = options.get("max_epsilon")
        self.ledger_path = Path(options.get("ledger") or Path(prepared) / LEDGER_FILE)
        self.run_id = f"{self.out.name}-{uuid.uuid4().hex[:8]}"
        self.steps_at_start = 0
        self.recorded = False

    def adjust_config(self, config):
        return dp_train_config(config, self.dp)

    def make_trainer(self, config, data, device, state: dict | None) -> DPGanTrainer:
        """Plan σ for the rest of the run (composed with the ledger), check the cap, build."""
        from fedspine.privacy.ledger import PrivacyLedger

        self.ledger = PrivacyLedger.open(self.ledger_path, create=True)
        prior = self.ledger.mechanisms(self.dataset_hash)
        uniform = np.full(data.num_classes, 1.0 / data.num_classes)
        if state is not None:
            sigma = float(state["dp"]["noise_multiplier"])
            q = float(state["dp"]["sample_rate"])
            delta = self.dp.delta or default_delta(self.num_patients)
            done = int(state["dp"]["step"]["steps_taken"])
        else:
            remaining_kimg = config.total_kimg
            steps = planned_d_steps(config, self.dp, remaining_kimg)
            sigma, q, delta = plan_noise(self.dp, self.num_patients, steps, prior=prior)
            done = 0
        self.delta = float(delta)
        self.sigma, self.q = sigma, q
        remaining = planned_d_steps(config, self.dp, config.total_kimg) - done
        if self.cap is not None:
            decision = self.ledger.check_cap(
                self.dataset_hash, mechanism(sigma, q, max(remaining, 1)), self.delta, self.cap
            )
            if not decision.allowed:
                raise PrivacyCapExceeded(decision.message)
        trainer = DPGanTrainer(config, self.dp, uniform, self.patient_ids, sigma, q, device=device)
        self.steps_at_start = done
        return trainer

    def batches(self, data, device):
        """The DP trainer samples patients itself: it gets the whole training set every step."""
        return itertools.repeat((data.images.to(device), data.labels.to(device)))

    def finish(self, trainer: DPGanTrainer) -> float:
        """Record the steps this invocation took and write RUN/privacy.json; returns ε spent."""
        from fedspine.privacy.report import ledger_mechanisms, site_entry, write_privacy_summary

        new_steps = trainer.dp_step.steps_taken - self.steps_at_start
        if new_steps > 0 and not self.recorded:
            self.ledger.record(
                self.dataset_hash,
                mechanism(self.sigma, self.q, new_steps),
                self.run_id,
                self.dp.max_grad_norm,
            )
            self.recorded = True
        mechanisms = ledger_mechanisms(self.ledger, self.dataset_hash, self.dp.max_grad_norm)
        spent = self.ledger.spent(self.dataset_hash, self.delta, "prv") if mechanisms else 0.0
        write_privacy_summary(
            self.out,
            {self.site: site_entry(spent, self.delta, self.dataset_hash, mechanisms)},
            components={
                "discriminator": "DP-SGD, patient-level Poisson sampling, per-patient clipping",
                "generator": "post-processing of the private discriminator (never sees real data)",
                "label_prior": "public: uniform over the classes",
                "ada_p": f"fixed at {self.dp.ada_p} (not adapted to real data)",
                "clinical_classifier": "none (conditional GAN)",
                "pretraining": "none",
                "snapshots and sample grids": "from G_ema only",
            },
            accountant="prv",
        )
        return spent
