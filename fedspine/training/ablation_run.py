"""One DP ablation run's bookkeeping: its config, trainer, batches and not-private summaries.

The counterpart of :class:`fedspine.training.dp_run.RunPrivacy` for `fedspine train
--dp-scheme`, without its ledger: nothing here is a DP mechanism. The schemes themselves (their
D steps and the paper scheme's ε) are :mod:`fedspine.training.dp_ablation`'s.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from fedspine.fileio import RUN_ABLATION, write_json_atomic
from fedspine.privacy.accounting import PLAN_ACCOUNTANT, REPORT_ACCOUNTANT
from fedspine.privacy.report import write_privacy_summary
from fedspine.training.batches import BatchSampler
from fedspine.training.config import TrainConfig
from fedspine.training.dp import DPConfig, plan_noise
from fedspine.training.dp_ablation import (
    ABLATION_FORMAT,
    NOT_PRIVATE_REASONS,
    PAPER_BATCH,
    PAPER_CLIP_NORM,
    PAPER_NOISE_STD,
    AblationOptions,
    check_scheme,
    paper_scheme_epsilon,
    paper_settings_epsilon,
    paper_train_config,
)
from fedspine.training.dp_trainer import dp_train_config, planned_d_steps
from fedspine.training.factory import Ablation, PaperScheme, TrainerSpec, build_trainer
from fedspine.training.gan_trainer import GanTrainer


class AblationRun:
    """One ablation run of `fedspine train --dp-scheme`: config, trainer, batches and the
    not-private summaries. The counterpart of :class:`fedspine.training.dp_run.RunPrivacy`,
    without its ledger: nothing here is a DP mechanism."""

    def __init__(self, options: AblationOptions, dataset: Any, train: Any, out: Path) -> None:
        self.options = options
        self.scheme = options.scheme
        self.out = Path(out)
        self.dataset_hash = dataset.content_hash
        self.patient_ids = np.asarray(train.patient_ids).astype(str)
        self.num_patients = len(np.unique(self.patient_ids))
        self.num_images = len(self.patient_ids)
        self.dp = options.dp_config(self.num_patients) if self.scheme != "paper" else None
        self.sigma = 0.0
        self.q: float | None = None
        self.calibration: dict[str, Any] | None = None

    def adjust_config(self, config: TrainConfig) -> TrainConfig:
        if self.scheme == "paper":
            return paper_train_config(config)
        return dp_train_config(config, self.dp)

    def make_trainer(
        self, config: TrainConfig, data: Any, device: Any, state: dict | None
    ) -> GanTrainer:
        if state is not None:
            check_scheme(state, self.scheme)
        if self.scheme == "paper":
            return build_trainer(TrainerSpec(PaperScheme()), config, data.label_prior(), device)
        uniform = np.full(data.num_classes, 1.0 / data.num_classes)
        self.q = min(1.0, self.dp.expected_patients_per_step / self.num_patients)
        if self.scheme == "noise-only":
            self.sigma = self._noise_multiplier(config, state)
        spec = TrainerSpec(Ablation(self.scheme, self.dp, self.sigma, self.q, self.patient_ids))
        return build_trainer(spec, config, uniform, device)

    def batches(
        self, data: Any, device: Any, rng: np.random.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Clip-only / noise-only sample patients themselves (the whole train set each step);
        the paper scheme takes uniform minibatches of one image."""
        if self.scheme == "paper":
            return BatchSampler(data, PAPER_BATCH, rng, device=device)
        return itertools.repeat((data.images.to(device), data.labels.to(device)))

    def start(self) -> None:
        """Mark the run folder not private before the first step, so an interrupted run is
        never mistaken for a DP one."""
        self._write(None)

    def finish(self, trainer: GanTrainer) -> dict[str, Any]:
        """Write RUN/privacy.json (not private) and RUN/ablation.json; returns the latter."""
        return self._write(trainer)

    def not_private_reason(self, summary: dict[str, Any]) -> str:
        reason = NOT_PRIVATE_REASONS[self.scheme]
        accounting = summary.get("accounting")
        if accounting:
            reason += f": ε = {accounting['epsilon']:.3g} ({accounting['accountant'].upper()})"
        return reason

    def _noise_multiplier(self, config: TrainConfig, state: dict | None) -> float:
        if state is not None:
            return float(state["dp"]["noise_multiplier"])
        if self.options.noise_multiplier is not None:
            return float(self.options.noise_multiplier)
        target = DPConfig(
            target_epsilon=float(self.options.noise_for_epsilon),
            delta=self.dp.delta,
            max_grad_norm=self.dp.max_grad_norm,
            expected_patients_per_step=self.dp.expected_patients_per_step,
            d_steps_per_g=self.dp.d_steps_per_g,
            ada_p=self.dp.ada_p,
            accountant=PLAN_ACCOUNTANT,
        )
        steps = planned_d_steps(config, target, config.total_kimg)
        sigma, q, delta = plan_noise(target, self.num_patients, steps)
        self.calibration = {
            "noise_for_epsilon": target.target_epsilon,
            "delta": delta,
            "sample_rate": q,
            "planned_d_steps": steps,
            "accountant": PLAN_ACCOUNTANT,
            "how": "the σ `--dp --epsilon` calibrates for this data and run length with an "
            "empty ledger (what each DP arm of `fedspine reproduce` uses)",
        }
        return float(sigma)

    def _write(self, trainer: GanTrainer | None) -> dict[str, Any]:
        summary = self._summary(trainer)
        write_privacy_summary(
            self.out,
            {},
            self._components(),
            accountant=summary.get("accounting", {}).get("accountant", REPORT_ACCOUNTANT),
            not_private_reasons=[self.not_private_reason(summary)],
            unit="image" if self.scheme == "paper" else "patient",
        )
        write_json_atomic(self.out / RUN_ABLATION, summary)
        return summary

    def _summary(self, trainer: GanTrainer | None) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "format": ABLATION_FORMAT,
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
            "scheme": self.scheme,
            "private": False,
            "complete": trainer is not None,
            "dataset_hash": self.dataset_hash,
            "train_images": self.num_images,
            "patients": self.num_patients,
            "why_not_private": NOT_PRIVATE_REASONS[self.scheme],
        }
        if self.scheme == "paper":
            steps = trainer.d_releases if trainer is not None else 0
            summary["mechanism"] = {
                "noise_std": PAPER_NOISE_STD,
                "clip_norm": PAPER_CLIP_NORM,
                "clip": "whole-model gradient norm, after the noise",
                "networks": "G and D",
                "batch": PAPER_BATCH,
                "d_optimizer_steps": steps,
                "g_optimizer_steps": trainer.opt_steps["G"] if trainer is not None else 0,
            }
            summary["epsilon"] = None
            summary["epsilon_text"] = "not computed yet (run incomplete)"
            if steps > 0:
                accounting = paper_scheme_epsilon(self.num_images, steps)
                summary["accounting"] = asdict(accounting)
                summary["epsilon"] = accounting.epsilon
                summary["epsilon_text"] = accounting.text()
            paper = paper_settings_epsilon()
            summary["paper_settings"] = {**asdict(paper), "text": paper.text()}
            return summary
        steps = trainer.dp_step.steps_taken if trainer is not None else 0
        summary["mechanism"] = {
            "clip_norm": self.dp.max_grad_norm if self.scheme == "clip-only" else None,
            "clip": "per patient, before summing" if self.scheme == "clip-only" else "none",
            "noise_multiplier": self.sigma,
            "noise_std": self.sigma * self.dp.max_grad_norm,
            "noise_scale_c": self.dp.max_grad_norm,
            "sample_rate": self.q,
            "expected_patients_per_step": self.dp.expected_patients_per_step,
            "d_steps": steps,
            "networks": "D only (G is trained as in DP-SGD)",
        }
        if self.calibration is not None:
            summary["noise_calibration"] = self.calibration
        summary["epsilon"] = None
        summary["epsilon_text"] = (
            "ε = ∞ (no noise)"
            if self.scheme == "clip-only"
            else "ε = ∞ (no clipping: unbounded sensitivity)"
        )
        return summary

    def _components(self) -> dict[str, str]:
        if self.scheme == "paper":
            return {
                "discriminator": "NOT private: the paper's scheme (noise std 0.02 on every "
                "gradient element, then whole-model clip to 1.5, batch 1)",
                "generator": "the same noise-then-clip hook; trained on D's signal",
                "ada_p": "adaptive, steered by D(real) (as in the paper)",
                "privacy ledger": "not written: this is not a DP mechanism",
            }
        what = (
            "per-patient clipping to C, no noise"
            if self.scheme == "clip-only"
            else "DP-SGD's noise N(0, σ²C²) on the unclipped sum of per-patient gradients"
        )
        return {
            "discriminator": f"NOT private: DP ablation {self.scheme} ({what})",
            "generator": "post-processing of the discriminator (as in DP-SGD)",
            "label_prior": "public: uniform over the classes",
            "ada_p": f"fixed at {self.dp.ada_p}",
            "privacy ledger": "not written: this is not a DP mechanism",
        }
