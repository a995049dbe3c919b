"""A DP training run's privacy bookkeeping, through the privacy engine.

Shared by `fedspine train --dp` and its SpineGAN variant: σ is planned against the worst
training patient's history in the site's privacy home, the cap and the target ε are checked (on
a fresh start and again on every ``--resume``), the steps are reserved in the ledger ahead of the
discriminator steps that take them, and a clean end settles the reservation and writes
``RUN/privacy.json`` (which `fedspine privacy report` and `fedspine release` read). A crash leaves
the reservation counted in full.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from fedspine.data.prepared import unit_plural
from fedspine.dp_options import TRAINABLE_HEAD
from fedspine.privacy.accounting import PLAN_ACCOUNTANT
from fedspine.privacy.engine import (
    RESERVE_BLOCK,
    PrivacyCapExceeded,
    PrivacyEngine,
    PrivacyError,
    new_run_id,
)
from fedspine.privacy.migrate import check_no_v1_ledger
from fedspine.privacy.report import site_entry, write_privacy_summary
from fedspine.training.clinical import (
    ClinicalLoss,
    ClinicalPrivacy,
    classifier_patients_on_record,
)
from fedspine.training.dp import (
    MECHANISM_LABEL,
    TRAINABLE_ALL,
    DPConfig,
    top_stages,
)
from fedspine.training.dp_trainer import check_resume, dp_train_config, planned_d_steps
from fedspine.training.factory import DPSGD, TrainerSpec, build_trainer
from fedspine.training.gan_trainer import GanTrainer
from fedspine.training.public_init import pretraining_component

IMAGE_UNIT_CAVEAT = (
    "each image is its own unit, keyed by its file path (declared with --privacy-unit image): "
    "a person with several images is protected only as one image each, and spend recorded "
    "for the same people under patient identifiers is not linked to these images"
)

__all__ = ["PrivacyCapExceeded", "PrivacyError", "RunPrivacy", "dp_unit_of"]


def dp_unit_of(dataset, declared: str | None) -> str:
    """The privacy unit of a DP run on ``dataset``, refusing an implicit per-image unit, and
    refusing a folder whose version-1 ledger has not been imported into the privacy home.

    Data without patient identifiers would make every image its own "person", which silently
    multiplies a patient's weight by their image count; only ``--privacy-unit image`` accepts it.
    """
    check_no_v1_ledger(dataset.root)
    unit = str(getattr(dataset, "privacy_unit", "patient"))
    if unit == "image" and declared != "image":
        raise PrivacyError(
            f"{dataset.root}: the data has no patient identifiers, so each image would count as "
            "its own person (wrong when a patient has several images); re-ingest with a "
            "patient_id column, or pass --privacy-unit image to accept that each image is one "
            "person"
        )
    if declared is not None and declared != unit:
        raise PrivacyError(
            f"--privacy-unit {declared}: the data's unit is {unit} (recorded at ingest); omit it"
        )
    return unit


class RunPrivacy:
    """σ planning, the cap check and the write-ahead ledger for one DP GAN run.

    For a DP SpineGAN run (``clinical`` and its privacy ``status`` given), the classifier joins
    the ledger's accounting too. A DP classifier is accepted only where the privacy home's
    ledger holds its mechanisms (by the run id in its metadata): its metadata alone proves
    nothing, and a classifier trained from another home, or on another preparation whose spend
    is not on record, would add ε that no cap saw. Its patients then count in this run's ε (the
    generator depends on them through C), and where they are this run's patients too, its steps
    are in their history already, so σ, the cap and the report compose both phases.
    """

    def __init__(
        self,
        prepared: Path,
        dataset,
        train,
        out: Path,
        options: dict[str, Any],
        clinical: ClinicalLoss | None = None,
        status: ClinicalPrivacy | None = None,
    ) -> None:
        self.site = Path(prepared).resolve().name
        self.out = Path(out)
        self.patient_ids = train.privacy_ids
        self.unit = dp_unit_of(dataset, options.get("privacy_unit"))
        self.engine = PrivacyEngine(
            self.patient_ids,
            unit=self.unit,
            home=options.get("privacy_home"),
            run_id=new_run_id("gan"),
            delta=options.get("delta"),
        )
        self.num_patients = self.engine.num_patients
        self.delta = self.engine.delta
        self.dp = DPConfig(
            target_epsilon=options.get("target_epsilon"),
            noise_multiplier=options.get("noise_multiplier"),
            delta=self.delta,
            max_grad_norm=float(options.get("max_grad_norm", 1.0)),
            expected_patients_per_step=min(
                int(options.get("expected_patients_per_step", 64)), self.num_patients
            ),
            d_steps_per_g=int(options.get("d_steps_per_g", 1)),
            ada_p=float(options.get("ada_p", 0.0)),
            accountant=PLAN_ACCOUNTANT,
            trainable_d=str(options.get("trainable_d") or TRAINABLE_ALL),
            augment_views=int(options.get("augment_views") or 1),
        )
        self.cap = options.get("max_epsilon")
        self.reservation = None
        self.clinical = clinical
        self.status = status
        self.classifier_patients: list[str] = []
        self.pretraining: dict[str, Any] | None = None
        """A public checkpoint's record (training.public_init) when the run starts from one."""
        self.trainable_fraction: float | None = None
        """Share of D's parameters the DP step trains (set when the trainer is built)."""
        if clinical is not None and status is not None and status.basis == "dp":
            self.classifier_patients = classifier_patients_on_record(
                self.engine.ledger, clinical.meta, where=f"the classifier {clinical.path}"
            )

    @property
    def home(self) -> Path:
        return self.engine.home.path

    def adjust_config(self, config):
        return dp_train_config(config, self.dp)

    def make_trainer(self, config, data, device, state: dict | None) -> GanTrainer:
        """Plan σ for the rest of the run against the worst patient (on resume: keep the run's
        σ and q, and check the steps left against the target ε and the cap), then build."""
        uniform = np.full(data.num_classes, 1.0 / data.num_classes)
        if state is not None:
            check_resume(state["dp"], self.dp)  # the same part of D, the same views
        total = planned_d_steps(config, self.dp, config.total_kimg)
        done = int(state["dp"]["step"]["steps_taken"]) if state is not None else 0
        remaining = total - done
        if remaining < 1:
            raise PrivacyError(
                f"the run has taken all {total} planned DP steps; pass a larger --kimg to go on"
            )
        common = {
            "steps": remaining,
            "clip_norm": self.dp.max_grad_norm,
            "label": MECHANISM_LABEL,
            "cap": self.cap,
            "target_epsilon": self.dp.target_epsilon,
        }
        if state is not None:
            # The run's σ and q stand; the steps left are checked against the target and cap
            # again, with everything the ledger holds now (other runs on these patients too).
            self.plan = self.engine.plan(
                sample_rate=float(state["dp"]["sample_rate"]),
                noise_multiplier=float(state["dp"]["noise_multiplier"]),
                **common,
            )
        else:
            self.plan = self.engine.plan(
                expected_per_step=self.dp.expected_patients_per_step,
                noise_multiplier=self.dp.noise_multiplier,
                **common,
            )
        self.sigma, self.q = self.plan.noise_multiplier, self.plan.sample_rate
        trainer = build_trainer(self.spec(), config, uniform, device)
        self.trainable_fraction = float(trainer.dp_step.trainable_fraction)
        self.attach(trainer)
        return trainer

    def settings(self) -> dict[str, Any]:
        """The DP step's settings as config.toml records them (σ and q are in privacy.json)."""
        record: dict[str, Any] = {
            "max_grad_norm": self.dp.max_grad_norm,
            "expected_patients_per_step": self.dp.expected_patients_per_step,
            "d_steps_per_g": self.dp.d_steps_per_g,
            "ada_p": self.dp.ada_p,
            "trainable_d": self.dp.trainable_d,
            "augment_views": self.dp.augment_views,
        }
        if self.trainable_fraction is not None:
            record["trainable_fraction"] = round(self.trainable_fraction, 6)
        return record

    def trainable_text(self) -> str:
        """What of D is trained and privatised, in words (the run's start line, privacy.json)."""
        share = (
            f"{self.trainable_fraction:.1%} of D's parameters"
            if self.trainable_fraction is not None
            else "the selected part of D's parameters"
        )
        if self.dp.trainable_d == TRAINABLE_ALL:
            return f"all of D ({share}) is trained and privatised"
        g_part = (
            "; G trains its mapping network only (its synthesis network keeps its starting "
            "weights: against a partly frozen D a fully trained G collapses)"
        )
        if self.dp.trainable_d == TRAINABLE_HEAD:
            return (
                f"head: {share} (D's projection head: the label mapping and the epilogue's "
                "output layer) are trained and privatised; the rest of D stays frozen at its "
                "starting weights, outside the gradient rows and the noise" + g_part
            )
        k = top_stages(self.dp.trainable_d)
        blocks = f" and its {k - 1} lowest-resolution block(s)" if k > 1 else ""
        return (
            f"{self.dp.trainable_d}: {share} (the 4x4 epilogue, the label mapping{blocks}) are "
            "trained and privatised; the rest of D stays frozen at its starting weights, outside "
            "the gradient rows and the noise" + g_part
        )

    def spec(self) -> TrainerSpec:
        """The variant of the planned σ and q: DP-SGD on D, with C's loss for SpineGAN."""
        return TrainerSpec(
            DPSGD(self.dp, self.sigma, self.q, self.patient_ids), clinical=self.clinical
        )

    def attach(self, trainer: GanTrainer) -> None:
        """Reserve the run's steps ahead, a block at a time, as the D steps take them."""
        # The ledger's record names the public checkpoint the networks started from (no ε).
        extra = {"pretraining": self.pretraining} if self.pretraining else None
        self.reservation = self.engine.reserve(self.plan, block=RESERVE_BLOCK, extra=extra)
        trainer.dp_step.reservation = self.reservation

    def batches(self, data, device):
        """The DP trainer samples patients itself: it gets the whole training set every step."""
        return itertools.repeat((data.images.to(device), data.labels.to(device)))

    def finish(self, trainer: GanTrainer) -> float:
        """Settle the reservation and write RUN/privacy.json; returns ε of the worst patient."""
        if self.reservation is not None and not self.reservation.settled:
            self.reservation.settle()
        spent, accountant, rows = self.engine.reported(self.report_extra_patients())
        write_privacy_summary(
            self.out,
            {
                self.site: site_entry(
                    spent, self.delta, rows, unit=self.unit, patients=self.num_patients
                )
            },
            components=self.components(),
            accountant=accountant,
            not_private_reasons=self.not_private_reasons(),
            unit=self.unit,
            run_id=self.engine.run_id,
        )
        return spent

    def report_extra_patients(self) -> list[str]:
        """Patients beyond the training ones whose ε this run's output carries: a DP
        classifier's (the generator depends on them through C)."""
        return self.classifier_patients

    def not_private_reasons(self) -> list[str]:
        reason = self.status.not_private_reason if self.status is not None else None
        return [reason] if reason else []

    def components(self) -> dict[str, str]:
        return {
            "discriminator": f"DP-SGD, {self.unit}-level Poisson sampling, per-{self.unit} "
            "clipping, non-finite rows zeroed before clipping",
            "discriminator_parameters": self.trainable_text(),
            "augmentation_views": f"{self.dp.augment_views} per image, averaged inside each "
            f"{self.unit}'s gradient row before clipping (no privacy cost)",
            "d_steps": f"{self.dp.d_steps_per_g} per G step, "
            f"{self.dp.expected_patients_per_step} expected {unit_plural(self.unit)} each",
            "generator": "post-processing of the private discriminator (never sees real data)",
            "label_prior": "public: uniform over the classes",
            "ada_p": f"fixed at {self.dp.ada_p} (not adapted to real data)",
            "clinical_classifier": self.status.component
            if self.status is not None
            else "none (conditional GAN)",
            "pretraining": pretraining_component(self.pretraining),
            "snapshots and sample grids": "from G_ema only",
            "dataset sizes": "treated as public (as in Opacus): q = patients per step / patients",
            **({"privacy unit": IMAGE_UNIT_CAVEAT} if self.unit == "image" else {}),
        }
