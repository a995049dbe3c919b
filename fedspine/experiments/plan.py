"""The arms of a reproduction as data: what each trains, on which data, and whether it runs.

An arm's :class:`ArmKind` carries its behaviour (does it train a clinical classifier first, is
it DP-SGD, which DP ablation scheme it is), so the code that runs, prints and reports arms asks
the kind instead of comparing strings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedspine.experiments.budgets import ReproduceBudget, get_budget
from fedspine.experiments.public_run import PublicRun, read_public_run
from fedspine.training.run import MODELS

DATA_DIR = "data"
ARMS_DIR = "arms"
LOGS_DIR = "logs"
PRIVACY_HOME_DIR = "privacy"
"""Each DP arm's privacy home, inside the arm's own folder."""
# The other folders of an arm: SpineGAN's classifier, the GAN run, its images, their evaluation.
CLASSIFIER_DIR = "classifier"
RUN_DIR = "run"
SYNTHETIC_DIR = "synthetic"
EVALUATION_DIR = "evaluation"
CEILING_DIR = "dp_classifier"
"""A DP arm's DP-SGD classifier trained directly at the arm's ε (issue 15's ceiling), with its
own privacy home inside: an alternative use of the same patients, not composed with the GAN."""
CEILING_ARM = "DP classifier (same ε)"
"""Its name as an arm of the DP arm's evaluation."""
CLINICAL_WEIGHT = 0.1  # the paper's λ
SPINEGAN_UNAVAILABLE = "not run: SpineGAN not available in this build"
ABLATION_ARMS = ("dp_clip_only", "dp_noise_only", "dp_paper")
DP_ARM_PREFIX = "dp_eps"  # a DP-SGD arm is named by its ε: dp_eps10, dp_eps0p5
# The arms of a public checkpoint (--public-run): its own generator, and per ε DP-SGD from it
# and the DP mean-embedding route fitted from it.
PUBLIC_ONLY_ARM = "public_only"
DP_PUBLIC_PREFIX = "dp_public_eps"
DP_EMBEDDING_PREFIX = "dp_embedding_eps"
RELEASE_DIR = "release"
"""A DP mean-embedding arm's release (the one output that read private data)."""
RELEASE_FILE = "abnormality.npz"


class ArmKind(StrEnum):
    """What an arm trains; the value is what ``arm.json`` and the plan file record."""

    CGAN = "cgan"
    SPINEGAN = "spinegan"
    DP = "dp"
    DP_SPINEGAN = "dp-spinegan"
    CLIP_ONLY = "clip-only"
    NOISE_ONLY = "noise-only"
    PAPER = "paper"
    PUBLIC_ONLY = "public-only"
    DP_PUBLIC = "dp-public"
    DP_EMBEDDING = "dp-embedding"

    @property
    def clinical(self) -> bool:
        """SpineGAN: a clinical classifier is trained first and steers the generator."""
        return self in (ArmKind.SPINEGAN, ArmKind.DP_SPINEGAN)

    @property
    def private(self) -> bool:
        """Patient-level DP with its own ledger in the arm's privacy home: DP-SGD (the
        classifier too, for DP SpineGAN; from the public checkpoint, for dp-public) or the one
        mean-embedding release."""
        return self in (ArmKind.DP, ArmKind.DP_SPINEGAN, ArmKind.DP_PUBLIC, ArmKind.DP_EMBEDDING)

    @property
    def trains_gan(self) -> bool:
        """Whether the arm trains a GAN (`fedspine train`): not the public checkpoint's own
        generator, nor the mean-embedding route's fitted one."""
        return self not in (ArmKind.PUBLIC_ONLY, ArmKind.DP_EMBEDDING)

    @property
    def public(self) -> bool:
        """Planned only with a public checkpoint (``--public-run``), which it starts from."""
        return self in (ArmKind.PUBLIC_ONLY, ArmKind.DP_PUBLIC, ArmKind.DP_EMBEDDING)

    @property
    def ceiling(self) -> bool:
        """A DP arm of one ε whose table row shows the DP-SGD classifier at that ε beside it
        (for DP SpineGAN: at its total ε, apart from the clinical classifier it spends ε on)."""
        return self in (ArmKind.DP, ArmKind.DP_SPINEGAN, ArmKind.DP_PUBLIC, ArmKind.DP_EMBEDDING)

    @property
    def ablation(self) -> bool:
        """One of the paper's DP ablation schemes: not private, no ledger."""
        return self in (ArmKind.CLIP_ONLY, ArmKind.NOISE_ONLY, ArmKind.PAPER)

    @property
    def model(self) -> str | None:
        """The ``--model`` the arm trains; None for the preset's cGAN."""
        return "spinegan" if self.clinical else None

    @property
    def keeps_batch(self) -> bool:
        """Whether the budget's GAN batch applies; the paper's scheme trains at batch 1."""
        return self is not ArmKind.PAPER

    @property
    def dp_scheme(self) -> str:
        """``dpsgd``, ``dp-mean-embedding``, the ablation scheme's name, or ``none``: the arm
        record's ``dp_scheme``."""
        if self is ArmKind.DP_EMBEDDING:
            return "dp-mean-embedding"
        if self.private:
            return "dpsgd"
        return self.value if self.ablation else "none"


@dataclass(frozen=True)
class ArmPlan:
    """One arm: what it trains, on which prepared data, and whether this budget runs it.

    ``replicate`` counts the training seeds of the arm from 0 and ``seed`` is the one it trains
    with; replicates of an arm share ``name`` and differ in :attr:`folder`.
    """

    name: str
    title: str
    kind: ArmKind
    data: str
    kimg: float | None
    epsilon: float | None = None
    not_run: str | None = None
    mixed: bool = False
    noise_epsilon: float | None = None
    seed: int = 0
    replicate: int = 0

    @property
    def folder(self) -> str:
        """The arm's folder under ``OUT/arms``, its log's name and its key in the results."""
        return arm_folder(self.name, self.replicate, self.seed)

    @property
    def evaluation_note(self) -> str:
        """What the arm's evaluation measures, for the plan and the progress lines."""
        task = (
            "8-class lesion task, one-vs-rest mean AUC" if self.data == "lesion" else "abnormality"
        )
        parts = "TRTR + TSTR + mixed" if self.mixed else "TRTR + TSTR"
        return f"{parts} on the {task}, GAN metrics, memorisation audit"


def arm_folder(name: str, replicate: int, seed: int) -> str:
    """``NAME`` for replicate 0 (the folder name before seeds existed, so old outputs resume),
    ``NAME-seedS`` for the others."""
    return name if replicate == 0 else f"{name}-seed{seed}"


@dataclass(frozen=True)
class ReproducePlan:
    """The arms of a reproduction and the settings they run with."""

    root: Path
    out: Path
    budget: ReproduceBudget
    arms: tuple[ArmPlan, ...]
    spinegan: tuple[bool, str]
    inception: str | None = None
    classifier_weights: str | None = None
    public: PublicRun | None = None
    """The public checkpoint the public arms start from (``--public-run``), None without."""

    def to_dict(self) -> dict[str, Any]:
        """What ``reproduce_plan.json`` holds, read back by a rerun's check."""
        return {
            "root": str(self.root),
            "budget": self.budget.to_json(),
            "arms": [
                {**dataclasses.asdict(a), "kind": a.kind.value, "folder": a.folder}
                for a in self.arms
            ],
            "inception": self.inception,
            "classifier_weights": self.classifier_weights,
            "public_run": self.public.to_json() if self.public else None,
        }

    def shared_ceiling(self, arm: ArmPlan) -> ArmPlan | None:
        """The DP-SGD arm whose ceiling ``arm`` shares: the same ε and seed, so the same DP
        classifier recipe on the same patients (None for a DP-SGD arm itself, or none planned)."""
        if arm.kind is ArmKind.DP or not arm.kind.ceiling:
            return None
        return next(
            (
                a
                for a in self.arms
                if a.kind is ArmKind.DP
                and not a.not_run
                and a.epsilon == arm.epsilon
                and a.replicate == arm.replicate
            ),
            None,
        )

    @property
    def runs_ablation(self) -> bool:
        """Whether any DP ablation arm runs (their rows and notes say they are not private)."""
        return any(a.kind.ablation and not a.not_run for a in self.arms)


def spinegan_available() -> tuple[bool, str]:
    """Whether this build's training library offers SpineGAN (the clinical-loss model)."""
    if "spinegan" in MODELS:
        return (
            True,
            "fedspine.training.run offers model spinegan (`fedspine train --model spinegan`)",
        )
    return False, "fedspine.training.run offers no model spinegan"


def make_plan(
    root: str | os.PathLike,
    out: str | os.PathLike,
    budget: str | ReproduceBudget,
    overrides: Mapping[str, Any] | None = None,
    inception: str | None = None,
    classifier_weights: str | None = None,
    public_run: str | os.PathLike | PublicRun | None = None,
) -> ReproducePlan:
    """The arms ``budget`` runs on ``root``; asks the training library whether it has SpineGAN.

    With ``public_run`` (checked here: a finished run trained on data declared public) the
    public arms are added: the checkpoint's own generator, and per ε of the budget DP-SGD from
    it and the DP mean-embedding route fitted from it.
    """
    b = get_budget(budget, overrides)
    public = (
        public_run
        if isinstance(public_run, PublicRun) or public_run is None
        else read_public_run(public_run)
    )
    spinegan = spinegan_available()
    arms: list[ArmPlan] = [
        ArmPlan(
            "cgan",
            "conditional StyleGAN2-ADA on abnormality (normal / abnormal)",
            ArmKind.CGAN,
            "abnormality",
            b.kimg,
            mixed=True,
        ),
        ArmPlan(
            "lesion",
            "conditional StyleGAN2-ADA on lesion type (8 classes)",
            ArmKind.CGAN,
            "lesion",
            b.lesion_kimg,
            not_run=None if b.lesion_kimg else b.left_out,
        ),
        ArmPlan(
            "spinegan",
            "SpineGAN: abnormality cGAN + clinical loss (λ = 0.1)",
            ArmKind.SPINEGAN,
            "abnormality",
            b.spinegan_kimg,
            not_run=_spinegan_skip(spinegan, b, b.spinegan_kimg),
        ),
    ]
    arms += [
        ArmPlan(
            f"{DP_ARM_PREFIX}{_eps_tag(eps)}",
            f"abnormality cGAN, patient-level DP-SGD on D, ε = {eps:g}",
            ArmKind.DP,
            "abnormality",
            b.dp_kimg,
            epsilon=eps,
        )
        for eps in b.dp_epsilons
    ]
    arms.append(_dp_spinegan_arm(b, spinegan))
    arms += _ablation_arms(b)
    if public is not None:
        arms += _public_arms(b, public)
    first = [dataclasses.replace(a, seed=b.seed) for a in arms]
    # Replicate-major: the first seed's whole table is complete before the next seed starts.
    replicas = [
        dataclasses.replace(a, seed=seed, replicate=r)
        for r, seed in enumerate(b.training_seeds)
        if r > 0
        for a in first
        if not a.not_run
    ]
    return ReproducePlan(
        root=Path(root),
        out=Path(out),
        budget=b,
        arms=tuple(first + replicas),
        spinegan=spinegan,
        inception=inception,
        classifier_weights=classifier_weights,
        public=public,
    )


def _public_arms(b: ReproduceBudget, public: PublicRun) -> list[ArmPlan]:
    """The arms of a public checkpoint (issue 15): what it gives without private data, and
    per ε the two DP routes that start from it. What DP contributes is each DP arm's TSTR
    minus the public-only arm's."""
    arms = [
        ArmPlan(
            PUBLIC_ONLY_ARM,
            f"the public checkpoint's own generator ({public.short}), no private data (ε 0)",
            ArmKind.PUBLIC_ONLY,
            "abnormality",
            None,
        )
    ]
    for eps in b.dp_epsilons:
        arms.append(
            ArmPlan(
                f"{DP_PUBLIC_PREFIX}{_eps_tag(eps)}",
                f"abnormality cGAN from the public checkpoint, patient-level DP-SGD on D's "
                f"{b.dp_public_trainable_d} only, ε = {eps:g}",
                ArmKind.DP_PUBLIC,
                "abnormality",
                b.dp_kimg,
                epsilon=eps,
            )
        )
    for eps in b.dp_epsilons:
        arms.append(
            ArmPlan(
                f"{DP_EMBEDDING_PREFIX}{_eps_tag(eps)}",
                f"one DP mean-embedding release at ε = {eps:g}, then G fitted to it from the "
                f"public checkpoint ({b.embedding_steps} steps, no further ε)",
                ArmKind.DP_EMBEDDING,
                "abnormality",
                None,
                epsilon=eps,
            )
        )
    return arms


def _spinegan_skip(
    spinegan: tuple[bool, str], b: ReproduceBudget, size: float | None
) -> str | None:
    """Why a SpineGAN arm does not run: no SpineGAN in this build, or none in this budget."""
    if not spinegan[0]:
        return SPINEGAN_UNAVAILABLE
    return None if size else b.left_out


def _dp_spinegan_arm(b: ReproduceBudget, spinegan: tuple[bool, str]) -> ArmPlan:
    """SpineGAN with its privacy fixed: the classifier that steers G is DP too (error 7)."""
    eps = b.dp_spinegan_epsilon
    total = f"{eps:g}" if eps is not None else "?"
    return ArmPlan(
        "dp_spinegan",
        f"SpineGAN under DP: a DP-SGD clinical classifier (ε = "
        f"{b.dp_spinegan_classifier_epsilon:g}), then DP-SGD on D with the clinical loss, "
        f"ε = {total} for both together (one ledger)",
        ArmKind.DP_SPINEGAN,
        "abnormality",
        b.dp_kimg,
        epsilon=eps,
        not_run=_spinegan_skip(spinegan, b, eps),
    )


def _ablation_arms(b: ReproduceBudget) -> list[ArmPlan]:
    """The paper's DP ablation on the DP arms' data: clip-only, noise-only, the paper's scheme."""
    return [
        ArmPlan(
            "dp_clip_only",
            "abnormality cGAN, DP-SGD's per-patient clipping without noise (NOT private: ε = ∞)",
            ArmKind.CLIP_ONLY,
            "abnormality",
            b.dp_kimg,
            not_run=None if b.dp_ablation else b.left_out,
        ),
        ArmPlan(
            "dp_noise_only",
            f"abnormality cGAN, the noise σC of the ε = {b.ablation_noise_epsilon:g} DP-SGD arm "
            "without clipping (NOT private: ε = ∞)",
            ArmKind.NOISE_ONLY,
            "abnormality",
            b.dp_kimg,
            not_run=None if b.dp_ablation else b.left_out,
            noise_epsilon=b.ablation_noise_epsilon,
        ),
        ArmPlan(
            "dp_paper",
            "abnormality cGAN, the paper's own 'DP': N(0, 0.02²) on every gradient element of G "
            "and D, then whole-model clip to 1.5, batch 1 (NOT private: ε from standard "
            "accounting)",
            ArmKind.PAPER,
            "abnormality",
            b.paper_dp_kimg,
            not_run=None if b.paper_dp_kimg else b.left_out,
        ),
    ]


def _eps_tag(eps: float) -> str:
    return f"{eps:g}".replace(".", "p")
