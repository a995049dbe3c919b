"""`fedspine reproduce`: the paper's experiment table, rebuilt on one dataset at a chosen budget.

Schonfeld & Veeravagu trained a real abnormality classifier, conditional StyleGAN2-ADAs on
abnormality and on lesion type, SpineGAN (a cGAN with a clinical loss) and a "DP" GAN, and
reported test AUCs of classifiers trained on each GAN's images (reference/paper.md). This module
runs the same arms with fedspine's parts, on the same prepared data, and writes one table with
our numbers beside theirs:

1. the real classifier (TRTR) and 2. the abnormality cGAN (TSTR, mixed, GAN metrics) come from
   one `evaluate` call; 3. the lesion-type cGAN is scored on the 8-class lesion task;
4. SpineGAN runs only when this build's `fedspine train` accepts ``--model spinegan``;
5. patient-level DP-SGD arms at several ε, each with its own ledger, ε read from the run, and
   the paper's DP ablation beside them on the same data and budget (not private, and marked so
   in their privacy.json): DP-SGD's clipping without noise, DP-SGD's noise (the σ of one DP
   arm) without clipping, and the paper's own noise-then-clip scheme at batch 1, with the ε
   standard accounting gives it.

Nothing is re-implemented here: the arms drive `fedspine train`, `fedspine classifier train`
(in-process, through the CLI app), `generate_dataset`, `evaluate` and the privacy report. The
budget (``smoke`` for two CPU cores, ``quick``, ``full`` for the paper's GPU configuration) is
one typed row of :data:`BUDGETS`. Each arm is built in a hidden work folder and renamed into
``OUT/arms/NAME`` when complete, so an arm folder is either complete or absent, and a rerun
skips complete arms and continues an interrupted one from its last finished stage.

``seeds`` > 1 repeats every arm with the next training seeds (GAN, generation, classifiers,
evaluation) in ``OUT/arms/NAME-seedS``; replicate 0 keeps ``OUT/arms/NAME``, so a folder made
with one seed is continued by a run with more. The table gives replicate 0 with its interval
and the mean and range across seeds, the variation the test-set intervals do not cover.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedspine import __version__

PLAN_FILE = "reproduce_plan.json"
REPORT_MD = "reproduce.md"
REPORT_JSON = "reproduce.json"
ARM_FILE = "arm.json"
DATA_DIR = "data"
ARMS_DIR = "arms"
LOGS_DIR = "logs"
CLINICAL_WEIGHT = 0.1  # the paper's λ
SPINEGAN_UNAVAILABLE = "not run: SpineGAN not available in this build"

Stage = Callable[[str], None]


PRIVACY_HOME_DIR = "privacy"
"""Each DP arm's privacy home, inside the arm's own folder."""


class ReproduceError(Exception):
    """The reproduction cannot start or a stage failed; the message says where and why."""


@dataclass(frozen=True)
class ReproduceBudget:
    """Every size of a reproduction; one row of :data:`BUDGETS`, written into the report.

    ``lesion_kimg`` / ``spinegan_kimg`` None leave that arm out; an empty ``dp_epsilons`` leaves
    the DP arms out. ``dp_ablation`` adds the clip-only and noise-only arms (``dp_kimg`` long, the
    noise of the ``ablation_noise_epsilon`` arm); ``paper_dp_kimg`` None leaves out the paper's
    own scheme (batch 1, so a kimg costs a thousand steps). ``gan_batch`` None keeps the preset's batch; ``classifier_input_size`` None
    uses the prepared resolution. ``max_metric_images`` caps each image set of FID and friends.
    ``seeds`` replicates every arm with training seeds ``seed``, ``seed + 1``, ...: the test-set
    intervals do not show how much a result moves from one training run to the next.
    """

    name: str
    purpose: str
    resolution: int
    gan_preset: str
    kimg: float
    lesion_kimg: float | None
    spinegan_kimg: float | None
    dp_kimg: float
    dp_epsilons: tuple[float, ...]
    dp_patients_per_step: int
    dp_ada_p: float
    gan_batch: int | None
    per_class: int
    classifier_arch: str
    classifier_input_size: int | None
    classifier_epochs: int
    classifier_patience: int
    spinegan_classifier_epochs: int
    domain_epochs: int
    bootstrap: int
    kid_subsets: int
    max_metric_images: int | None
    dp_ablation: bool = False
    ablation_noise_epsilon: float = 10.0
    paper_dp_kimg: float | None = None
    # SpineGAN made private: a DP-SGD clinical classifier (ε dp_spinegan_classifier_epsilon),
    # then a DP SpineGAN, both in one ledger, to ε dp_spinegan_epsilon in all (None: left out).
    dp_spinegan_epsilon: float | None = None
    dp_spinegan_classifier_epsilon: float = 3.0
    ingest_workers: int = 2
    # One torch thread: on a shared 2-core machine two threads made a 32 px GAN step 3.4x
    # slower in wall time and CPU time (OpenMP threads wait on each other); 0 = all cores.
    threads: int = 1
    seed: int = 0
    seeds: int = 1
    device: str = "auto"

    def validate(self) -> None:
        """Reject sizes the commands would refuse later, before anything runs."""
        if self.gan_preset not in ("cpu", "auto", "paper"):
            raise ReproduceError(f"budget {self.name}: gan_preset {self.gan_preset!r} unknown")
        if self.gan_preset == "paper" and self.resolution != 256:
            raise ReproduceError(f"budget {self.name}: the paper preset is 256 px")
        if self.gan_preset == "cpu" and not 16 <= self.resolution <= 64:
            raise ReproduceError(f"budget {self.name}: the cpu preset is for 16-64 px")
        if self.classifier_arch not in ("small", "densenet121"):
            raise ReproduceError(f"budget {self.name}: classifier_arch must be small/densenet121")
        kimgs = (
            self.kimg,
            self.dp_kimg,
            self.lesion_kimg,
            self.spinegan_kimg,
            self.paper_dp_kimg,
        )
        if any(k is not None and k <= 0 for k in kimgs):
            raise ReproduceError(f"budget {self.name}: every kimg must be positive")
        if any(e <= 0 for e in self.dp_epsilons):
            raise ReproduceError(f"budget {self.name}: every ε must be positive")
        if self.dp_spinegan_epsilon is not None and not (
            0 < self.dp_spinegan_classifier_epsilon < self.dp_spinegan_epsilon
        ):
            raise ReproduceError(
                f"budget {self.name}: the DP SpineGAN's classifier ε "
                f"({self.dp_spinegan_classifier_epsilon:g}) must be positive and below its "
                f"total ε ({self.dp_spinegan_epsilon:g}), which both phases share"
            )
        if self.dp_ablation and self.ablation_noise_epsilon not in self.dp_epsilons:
            raise ReproduceError(
                f"budget {self.name}: the noise-only arm adds the noise of the ε = "
                f"{self.ablation_noise_epsilon:g} DP arm, which is not among dp_epsilons "
                f"{_fmt_setting(self.dp_epsilons)}; add it or change ablation_noise_epsilon"
            )
        positive = {
            "per_class": self.per_class,
            "classifier_epochs": self.classifier_epochs,
            "classifier_patience": self.classifier_patience,
            "spinegan_classifier_epochs": self.spinegan_classifier_epochs,
            "domain_epochs": self.domain_epochs,
            "bootstrap": self.bootstrap,
            "kid_subsets": self.kid_subsets,
            "dp_patients_per_step": self.dp_patients_per_step,
            "ingest_workers": self.ingest_workers,
            "seeds": self.seeds,
        }
        for name, value in positive.items():
            if value < 1:
                raise ReproduceError(f"budget {self.name}: {name} must be at least 1")
        if self.threads < 0:
            raise ReproduceError(f"budget {self.name}: threads must be 0 (all cores) or more")


# The one table of budgets. smoke, measured on a 300-image phantom site on a shared 2-core machine
# (load 4-6): 10.7 min wall, 6.5 CPU-min (cgan 2 kimg 163 s, lesion 1 kimg 130 s, DP 1 kimg 261 s,
# each evaluation 11-21 s, each ingest 17 s); SpineGAN and the DP ablation are left to quick (the
# paper scheme's batch 1 ran 0.31 s a step at 32 px under load 6.5: about 5 min a kimg). quick:
# every arm. full: the paper's configuration for a GPU (256 px, paper preset, 8000 kimg,
# DenseNet-121 at 224 px, 1,000 images per class; the paper scheme at batch 1, as they ran it),
# three training seeds, so the table shows how far each number moves between training runs.
BUDGETS: dict[str, ReproduceBudget] = {
    b.name: b
    for b in (
        ReproduceBudget(
            name="smoke",
            purpose="does every stage run: two CPU cores, under 15 minutes on phantom data",
            resolution=32,
            gan_preset="cpu",
            kimg=2.0,
            lesion_kimg=1.0,
            spinegan_kimg=None,
            dp_kimg=1.0,
            dp_epsilons=(10.0,),
            dp_patients_per_step=32,
            dp_ada_p=0.0,
            gan_batch=None,
            per_class=100,
            classifier_arch="small",
            classifier_input_size=None,
            classifier_epochs=10,
            classifier_patience=5,
            spinegan_classifier_epochs=10,
            domain_epochs=3,
            bootstrap=200,
            kid_subsets=20,
            max_metric_images=500,
        ),
        ReproduceBudget(
            name="quick",
            purpose="every arm, ε ∈ {1, 3, 10} and the DP ablation on CPU: a few times smoke",
            resolution=32,
            gan_preset="cpu",
            kimg=5.0,
            lesion_kimg=3.0,
            spinegan_kimg=5.0,
            dp_kimg=2.0,
            dp_epsilons=(1.0, 3.0, 10.0),
            dp_patients_per_step=32,
            dp_ada_p=0.0,
            gan_batch=None,
            per_class=200,
            classifier_arch="small",
            classifier_input_size=None,
            classifier_epochs=15,
            classifier_patience=5,
            spinegan_classifier_epochs=15,
            domain_epochs=5,
            bootstrap=500,
            kid_subsets=50,
            max_metric_images=1000,
            dp_ablation=True,
            paper_dp_kimg=2.0,
            dp_spinegan_epsilon=10.0,
        ),
        ReproduceBudget(
            name="full",
            purpose="the paper's configuration, for a CUDA GPU: days of training",
            resolution=256,
            gan_preset="paper",
            kimg=8000.0,
            lesion_kimg=8000.0,
            spinegan_kimg=8000.0,
            dp_kimg=8000.0,
            dp_epsilons=(1.0, 3.0, 10.0),
            dp_patients_per_step=256,
            dp_ada_p=0.0,
            gan_batch=None,
            per_class=1000,
            classifier_arch="densenet121",
            classifier_input_size=224,
            classifier_epochs=30,
            classifier_patience=5,
            spinegan_classifier_epochs=30,
            domain_epochs=10,
            bootstrap=1000,
            kid_subsets=100,
            max_metric_images=None,
            dp_ablation=True,
            paper_dp_kimg=8000.0,
            dp_spinegan_epsilon=10.0,
            ingest_workers=8,
            threads=0,
            seeds=3,
        ),
    )
}

# What the paper published (reference/paper.md); derived values are marked as such.
PAPER = {
    "trtr": "0.856 (journal); 0.886 (preprint)",
    "cgan_tstr": "0.814",
    "cgan_ratio": "0.951 (derived: 0.814 / 0.856, journal TRTR) or 0.919 (derived: "
    "0.814 / 0.886, preprint TRTR)",
    "cgan_signal": "0.882 (derived: (0.814 − 0.5) / (0.856 − 0.5), journal TRTR)",
    "mixed": "trained, no AUC published",
    "cgan_metrics": "no numbers published",
    "lesion": "trained, no AUC published",
    "spinegan_tstr": "0.830",
    "spinegan_ratio": "0.970 (derived: 0.830 / 0.856, journal TRTR) or 0.937 (derived: "
    "0.830 / 0.886, preprint TRTR)",
    "spinegan_signal": "0.927 (derived: (0.830 − 0.5) / (0.856 − 0.5), journal TRTR)",
    "spinegan_metrics": "higher FID, lower precision, higher recall than the cGAN (no numbers)",
    "dp": '"differential privacy impositions severely impede GAN training" (no numbers)',
    "dp_ablation": "ablated clipping, noise and micro-batch of 1; blamed the failure on the "
    "noise (no numbers)",
    "dp_paper": '"severely impede GAN training"; its ε never stated (error 6)',
}
ABLATION_KINDS = ("clip-only", "noise-only", "paper")
SPINEGAN_KINDS = ("spinegan", "dp-spinegan")
DP_KINDS = ("dp", "dp-spinegan")
ABLATION_ARMS = ("dp_clip_only", "dp_noise_only", "dp_paper")


@dataclass(frozen=True)
class ArmPlan:
    """One arm: what it trains, on which prepared data, and whether this budget runs it.

    ``replicate`` counts the training seeds of the arm from 0 and ``seed`` is the one it trains
    with; replicates of an arm share ``name`` and differ in :attr:`folder`.
    """

    name: str
    title: str
    kind: str
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "budget": _plain(asdict(self.budget)),
            "arms": [{**asdict(a), "folder": a.folder} for a in self.arms],
            "inception": self.inception,
            "classifier_weights": self.classifier_weights,
        }


@dataclass
class _Context:
    plan: ReproducePlan
    stage: Stage
    data: dict[str, Path] = field(default_factory=dict)
    data_info: dict[str, dict[str, Any]] = field(default_factory=dict)


def get_budget(
    budget: str | ReproduceBudget, overrides: Mapping[str, Any] | None = None
) -> ReproduceBudget:
    """The budget named (or given), with ``overrides`` replacing fields (tests, experiments)."""
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ReproduceError(f"--budget {budget}: choose one of {', '.join(BUDGETS)}")
        budget = BUDGETS[budget]
    if overrides:
        known = {f.name for f in dataclasses.fields(ReproduceBudget)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ReproduceError(f"unknown budget field(s) {unknown}; known: {sorted(known)}")
        values = dict(overrides)
        if "dp_epsilons" in values:
            values["dp_epsilons"] = tuple(float(e) for e in values["dp_epsilons"])
        budget = dataclasses.replace(budget, **values)
    budget.validate()
    return budget


def make_plan(
    root: str | os.PathLike,
    out: str | os.PathLike,
    budget: str | ReproduceBudget,
    overrides: Mapping[str, Any] | None = None,
    inception: str | None = None,
    classifier_weights: str | None = None,
) -> ReproducePlan:
    """The arms ``budget`` runs on ``root``; asks `fedspine train` whether it has SpineGAN."""
    b = get_budget(budget, overrides)
    spinegan = spinegan_available()
    arms: list[ArmPlan] = [
        ArmPlan(
            "cgan",
            "conditional StyleGAN2-ADA on abnormality (normal / abnormal)",
            "cgan",
            "abnormality",
            b.kimg,
            mixed=True,
        ),
        ArmPlan(
            "lesion",
            "conditional StyleGAN2-ADA on lesion type (8 classes)",
            "cgan",
            "lesion",
            b.lesion_kimg,
            not_run=None if b.lesion_kimg else f"not run: left out of the {b.name} budget",
        ),
    ]
    if not spinegan[0]:
        spinegan_skip: str | None = SPINEGAN_UNAVAILABLE
    elif not b.spinegan_kimg:
        spinegan_skip = f"not run: left out of the {b.name} budget"
    else:
        spinegan_skip = None
    arms.append(
        ArmPlan(
            "spinegan",
            "SpineGAN: abnormality cGAN + clinical loss (λ = 0.1)",
            "spinegan",
            "abnormality",
            b.spinegan_kimg,
            not_run=spinegan_skip,
        )
    )
    for eps in b.dp_epsilons:
        arms.append(
            ArmPlan(
                f"dp_eps{_eps_tag(eps)}",
                f"abnormality cGAN, patient-level DP-SGD on D, ε = {eps:g}",
                "dp",
                "abnormality",
                b.dp_kimg,
                epsilon=eps,
            )
        )
    arms.append(_dp_spinegan_arm(b, spinegan))
    arms += _ablation_arms(b)
    first = [dataclasses.replace(a, seed=b.seed) for a in arms]
    # Replicate-major: the first seed's whole table is complete before the next seed starts.
    replicas = [
        dataclasses.replace(a, seed=b.seed + r, replicate=r)
        for r in range(1, b.seeds)
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
    )


def _dp_spinegan_arm(b: ReproduceBudget, spinegan: tuple[bool, str]) -> ArmPlan:
    """SpineGAN with its privacy fixed: the classifier that steers G is DP too (error 7)."""
    eps = b.dp_spinegan_epsilon
    if not spinegan[0]:
        skip: str | None = SPINEGAN_UNAVAILABLE
    elif eps is None:
        skip = f"not run: left out of the {b.name} budget"
    else:
        skip = None
    total = f"{eps:g}" if eps is not None else "?"
    return ArmPlan(
        "dp_spinegan",
        f"SpineGAN under DP: a DP-SGD clinical classifier (ε = "
        f"{b.dp_spinegan_classifier_epsilon:g}), then DP-SGD on D with the clinical loss, "
        f"ε = {total} for both together (one ledger)",
        "dp-spinegan",
        "abnormality",
        b.dp_kimg,
        epsilon=eps,
        not_run=skip,
    )


def _ablation_arms(b: ReproduceBudget) -> list[ArmPlan]:
    """The paper's DP ablation on the DP arms' data: clip-only, noise-only, the paper's scheme."""
    left_out = f"not run: left out of the {b.name} budget"
    return [
        ArmPlan(
            "dp_clip_only",
            "abnormality cGAN, DP-SGD's per-patient clipping without noise (NOT private: ε = ∞)",
            "clip-only",
            "abnormality",
            b.dp_kimg,
            not_run=None if b.dp_ablation else left_out,
        ),
        ArmPlan(
            "dp_noise_only",
            f"abnormality cGAN, the noise σC of the ε = {b.ablation_noise_epsilon:g} DP-SGD arm "
            "without clipping (NOT private: ε = ∞)",
            "noise-only",
            "abnormality",
            b.dp_kimg,
            not_run=None if b.dp_ablation else left_out,
            noise_epsilon=b.ablation_noise_epsilon,
        ),
        ArmPlan(
            "dp_paper",
            "abnormality cGAN, the paper's own 'DP': N(0, 0.02²) on every gradient element of G "
            "and D, then whole-model clip to 1.5, batch 1 (NOT private: ε from standard "
            "accounting)",
            "paper",
            "abnormality",
            b.paper_dp_kimg,
            not_run=None if b.paper_dp_kimg else left_out,
        ),
    ]


def format_plan(plan: ReproducePlan) -> str:
    """The plan as text: data, budget settings, then each arm with its commands."""
    b = plan.budget
    lines = [
        f"fedspine reproduce: budget {b.name} ({b.purpose})",
        f"  data: {plan.root} -> {plan.out / DATA_DIR}/{{abnormality,lesion}} "
        f"at {b.resolution} px (label rule: correct; val split carved by patient)",
        f"  GAN: preset {b.gan_preset}, {b.resolution} px"
        + (f", batch {b.gan_batch}" if b.gan_batch else "")
        + f", {_seeds_text(b)}, device {b.device}",
        f"  classifiers: {b.classifier_arch}"
        + (f" at {b.classifier_input_size} px" if b.classifier_input_size else "")
        + f", ≤ {b.classifier_epochs} epochs (patience {b.classifier_patience}), "
        f"{b.per_class} synthetic images per class, bootstrap {b.bootstrap}, "
        + (
            f"starting from {plan.classifier_weights}"
            if plan.classifier_weights
            else "from scratch (--classifier-weights FILE for an ImageNet start, as the paper)"
        ),
        "  (paths below are relative to OUT)",
        f"  SpineGAN in this build: {'yes' if plan.spinegan[0] else 'no'} ({plan.spinegan[1]})",
    ]
    if b.seeds > 1:
        lines.append(
            f"  {b.seeds} training seeds: each trains, generates, classifies and evaluates every "
            f"arm that runs; seed {b.seed} in {ARMS_DIR}/NAME, the others in {ARMS_DIR}/NAME-seedS"
        )
    replicate = -1
    for arm in plan.arms:
        if arm.replicate != replicate:
            replicate = arm.replicate
            lines.append(
                f"  arms, replicate {replicate + 1} of {b.seeds} (seed {arm.seed}):"
                if b.seeds > 1
                else "  arms:"
            )
        if arm.not_run:
            lines.append(f"    - {arm.folder}: {arm.title} -- {arm.not_run}")
            continue
        lines.append(f"    - {arm.folder}: {arm.title}")
        folder = Path(ARMS_DIR) / arm.folder
        data = Path(DATA_DIR) / arm.data
        if arm.kind in SPINEGAN_KINDS:
            lines.append(
                "        fedspine classifier train "
                + " ".join(_classifier_args(plan, data, folder / "classifier", arm))
            )
        lines.append(
            "        fedspine train " + " ".join(_train_args(plan, arm, data, folder / "run"))
        )
        lines.append(
            f"        generate {b.per_class} per class, seed {arm.seed}; evaluate "
            + _eval_note(arm)
        )
    if any(a.kind in ABLATION_KINDS and not a.not_run for a in plan.arms):
        lines.append(
            "  the DP ablation arms (dp_clip_only, dp_noise_only, dp_paper) are NOT private: each "
            "run's privacy.json says so and no privacy ledger is written"
        )
    return "\n".join(lines) + "\n"


def _seeds_text(b: ReproduceBudget) -> str:
    if b.seeds == 1:
        return f"seed {b.seed}"
    return f"seeds {', '.join(str(b.seed + r) for r in range(b.seeds))}"


def reproduce(
    root: str | os.PathLike,
    out: str | os.PathLike,
    budget: str | ReproduceBudget = "smoke",
    overrides: Mapping[str, Any] | None = None,
    stage: Stage | None = None,
    inception: str | None = None,
    classifier_weights: str | None = None,
) -> dict[str, Any]:
    """Run every arm of the plan under ``out`` (skipping complete ones) and write the report.

    Returns what ``reproduce.json`` holds. An arm that fails is recorded as failed with its
    reason and the others still run; its work folder stays for a rerun to continue.
    """
    stage = stage or (lambda _msg: None)
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ReproduceError(f"{root}: no such folder (a VinDr-SpineXR root or a phantom site)")
    plan = make_plan(root, out, budget, overrides, inception, classifier_weights)
    _check_previous(plan)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / LOGS_DIR).mkdir(exist_ok=True)
    _write_json(out / PLAN_FILE, plan.to_dict())
    ctx = _Context(plan=plan, stage=stage)
    stage(f"budget {plan.budget.name}: {sum(1 for a in plan.arms if not a.not_run)} arms to run")

    with _threads(plan.budget.threads):
        _prepare_data(ctx)
        results: dict[str, dict[str, Any]] = {}
        for arm in plan.arms:
            if arm.not_run:
                stage(f"{arm.folder}: {arm.not_run}")
                results[arm.folder] = {"status": "not run", "reason": arm.not_run}
                continue
            if arm.data not in ctx.data:
                reason = ctx.data_info.get(arm.data, {}).get("not_run", "no prepared data")
                results[arm.folder] = {"status": "not run", "reason": reason}
                stage(f"{arm.folder}: {reason}")
                continue
            results[arm.folder] = _run_arm(ctx, arm)

    report = _build_report(ctx, results, time.perf_counter() - started)
    _write_json(out / REPORT_JSON, report)
    _write_text(out / REPORT_MD, render_markdown(report))
    stage(f"wrote {out / REPORT_MD} and {out / REPORT_JSON}")
    return report


def spinegan_available() -> tuple[bool, str]:
    """Whether this build's training library offers SpineGAN (the clinical-loss model)."""
    from fedspine.training.run import MODELS

    if "spinegan" in MODELS:
        return (
            True,
            "fedspine.training.run offers model spinegan (`fedspine train --model spinegan`)",
        )
    return False, "fedspine.training.run offers no model spinegan"


def render_markdown(report: dict[str, Any]) -> str:
    """reproduce.md: the one table (paper beside ours), then data, budget and the 7 errors."""
    b = report["budget"]
    data = report["data"]
    lines = [
        "# fedspine reproduction of Schonfeld & Veeravagu (arXiv:2205.02843; Sci. Rep. 2023)",
        "",
        f"Budget **{b['name']}** ({b['purpose']}); data: **{data['kind']}**, "
        f"{data['abnormality'].get('images', '?')} images; wall time "
        f"{report['seconds'] / 60:.1f} min"
        + (
            f" for this invocation, which reused arms built earlier (all arms together took "
            f"{_arm_minutes(report['arms']):.1f} min to build)"
            if any(a.get("skipped_this_time") for a in report["arms"].values())
            else ""
        )
        + f"; fedspine {report['fedspine_version']}.",
        "",
    ]
    if data["kind"].startswith("phantom"):
        lines += [
            "These numbers come from phantom radiographs, not from VinDr-SpineXR, at a "
            f"{b['name']} budget: they show that each stage runs end to end, not how well the "
            "method works on real spines. Low TSTR AUCs here are the honest result of a "
            "generator trained for minutes on a CPU.",
            "",
        ]
    lines += [
        "| experiment | paper (published) | ours: test AUC [95 % CI] | signal retained [95 % CI] "
        "| ε | details |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [_md_row(row) for row in report["table"]]
    if any(report["arms"].get(n, {}).get("status") == "done" for n in ABLATION_ARMS):
        lines += [
            "",
            "Read rows 5 together: the DP-SGD rows are private at the ε shown; the ablation "
            "rows keep one of DP-SGD's two impositions on the same data, patients per step and "
            "length (clipping only, or the ε = "
            f"{report['budget'].get('ablation_noise_epsilon', 10):g} arm's noise only), and the "
            "paper's own scheme is run as its code did. None of the ablation rows is private: "
            "with no noise, or with unbounded sensitivity, ε = ∞, and the paper's scheme has the "
            "astronomical ε shown.",
        ]
    lines += [
        "",
        "**Signal retained** = (TSTR AUC − 0.5) / (TRTR AUC − 0.5): the share of the real-data "
        "classifier's lead over chance that a classifier trained on synthetic images keeps; "
        "0 = chance, 1 = as good as real data, with its interval from the evaluation's "
        "bootstrap. Where TSTR's own interval contains chance the cell says so: there is then no "
        "evidence of any signal, whatever the point estimate. The plain ratio TSTR/TRTR is in "
        "the details; it flatters, since a classifier at chance already scores 0.5 / TRTR on it. "
        "The paper's signal retained is derived from its published AUCs.",
        "",
        "AUCs are on the real test split (VinDr's own test images, or the phantom site's), with "
        "patient-level bootstrap intervals; each classifier's epoch and threshold were chosen on "
        "a validation split carved by patient from the training data. One TRTR classifier per "
        f"task and seed is trained once (`{DATA_DIR}/trtr/`) and shared by every arm's "
        "evaluation, so every row is measured against the same real-data reference. TRTS "
        "(in the details) scores each arm's synthetic images with that real-trained classifier "
        "against the class they were generated for: 0.5 means the generator has not learned "
        "its classes yet, whatever its TSTR.",
        "",
        _seeds_paragraph(b),
        "",
    ]
    budgets = {
        (arm.get("evaluation") or {}).get("classifier_budget", {}).get("rule")
        for arm in report["arms"].values()
        if arm.get("status") == "done"
    } - {None}
    if budgets:
        lines += [
            "Classifier training budget (matched in optimizer steps, not epochs, so an arm with "
            "more rows gets no more steps): " + "; ".join(sorted(budgets)) + ".",
            "",
        ]
    weak = _weak_references(report["arms"])
    if weak:
        lines += [
            "**Signal retained means little here:** the real-data classifier is itself near "
            f"chance ({weak}), so the real images at this size teach it little; with TRTR − 0.5 "
            "that small, signal retained and TSTR/TRTR can leave [0, 1] by noise alone.",
            "",
        ]
    lines += [
        "## Data",
        "",
    ]
    for schema in ("abnormality", "lesion"):
        info = data.get(schema, {})
        if "not_run" in info:
            lines.append(f"- {schema}: {info['not_run']}")
            continue
        counts = info.get("counts", {})
        parts = "; ".join(
            f"{split} {c.get('total', 0)} ("
            + ", ".join(f"{k} {v}" for k, v in c.items() if k != "total" and v)
            + ")"
            for split, c in sorted(counts.items(), key=lambda kv: _SPLIT_ORDER.get(kv[0], 9))
        )
        lines.append(
            f"- {schema}: {info.get('images', '?')} images decoded, {info.get('rejected', 0)} "
            f"rejected (listed with reasons in `{info.get('ingested')}/rejected.csv`); {parts}"
        )
        if info.get("classes_dropped"):
            lines.append(
                f"  - the lesion arm uses {len(info['class_names'])} classes "
                f"({', '.join(info['class_names'])}); dropped for want of train and val images: "
                + "; ".join(f"{k} ({v})" for k, v in info["classes_dropped"].items())
            )
    lines += [
        f"- source: `{data['root']}` ({data['kind']})",
        "",
        "## Budget",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {_fmt_setting(v)} |" for k, v in b.items()]
    lines += ["", "## The paper's seven errors and what this reproduction does instead", ""]
    lines += [f"{i}. **{e['error']}** {e['here']}" for i, e in enumerate(report["errors"], 1)]
    lines += ["", "## Arms", ""]
    for name, arm in report["arms"].items():
        if arm["status"] == "done":
            secs = sum(arm.get("seconds", {}).values())
            lines.append(
                f"- `{name}`: done in {secs / 60:.1f} min; "
                f"evaluation `{ARMS_DIR}/{name}/evaluation/report.md`"
                + ("" if not arm.get("skipped_this_time") else " (complete from an earlier run)")
            )
        else:
            reason = arm.get("reason", "")
            status = "" if reason.startswith(arm["status"]) else f"{arm['status']}: "
            lines.append(f"- `{name}`: {status}{reason}")
    lines.append("")
    return "\n".join(lines)


def _seeds_paragraph(budget: dict[str, Any]) -> str:
    """What the intervals cover, and where the training-seed variation they leave out is."""
    n, first = budget.get("seeds", 1), budget.get("seed", 0)
    if n < 2:
        return (
            "The intervals cover test sampling only: they resample the test patients of one "
            "trained model and leave out the training-seed variation (how far a number moves "
            "when the GAN and classifiers are trained again with another seed). This run trained "
            "each arm once; `--seeds N` trains every arm with N seeds and gives the spread."
        )
    listed = ", ".join(str(first + r) for r in range(n))
    return (
        "The intervals cover test sampling only: they resample the test patients of one trained "
        f"model. Every arm was trained {n} times, with seeds {listed} (GAN, synthetic images, "
        'classifiers and evaluation); "mean over N seeds X (min–max)" is the spread across '
        "them: the training-seed variation the intervals do not cover. The cells' AUC and "
        f"interval are seed {first}'s; every replicate is in {REPORT_JSON} (`arms`, by folder; "
        "`seeds`, by arm)."
    )


def _arm_minutes(arms: dict[str, dict[str, Any]]) -> float:
    return sum(sum(a.get("seconds", {}).values()) for a in arms.values()) / 60


def _weak_references(arms: dict[str, dict[str, Any]]) -> str:
    """The TRTR AUCs below 0.6, named by task."""
    weak = []
    for name, task in (("cgan", "abnormality"), ("lesion", "lesion type")):
        ev = arms.get(name, {}).get("evaluation")
        auc = (ev or {}).get("trtr", {}).get("auc") if ev else None
        if auc is not None and auc < 0.6:
            weak.append(f"{task} TRTR {auc:.3f}")
    return ", ".join(weak)


# ---------------------------------------------------------------------------- data


def _prepare_data(ctx: _Context) -> None:
    """Ingest ROOT twice (abnormality, lesion) unless the prepared folder is already there."""
    from fedspine.data.ingest import IngestConfig, ingest
    from fedspine.data.prepared import load_prepared
    from fedspine.data.sources import SourceLayoutError

    plan, b = ctx.plan, ctx.plan.budget
    needed = ["abnormality"]
    if any(a.data == "lesion" and not a.not_run for a in plan.arms):
        needed.append("lesion")
    for schema in needed:
        target = plan.out / DATA_DIR / schema
        if (target / "manifest.json").is_file():
            ctx.stage(f"data/{schema}: prepared earlier, reused")
        else:
            ctx.stage(f"data/{schema}: ingesting {plan.root} at {b.resolution} px")
            t0 = time.perf_counter()
            try:
                ingest(
                    plan.root,
                    target,
                    IngestConfig(
                        resolution=b.resolution,
                        labels=schema,
                        label_rule="correct",
                        seed=b.seed,
                        workers=b.ingest_workers,
                    ),
                )
            except SourceLayoutError as err:
                if schema == "abnormality":
                    raise ReproduceError(f"ingest of {plan.root}: {err}") from None
                ctx.data_info[schema] = {"not_run": f"not run: lesion ingest failed: {err}"}
                ctx.stage(f"data/{schema}: {err}")
                continue
            ctx.stage(f"data/{schema}: done in {time.perf_counter() - t0:.0f} s")
        prepared = load_prepared(target)
        manifest = prepared.manifest
        if schema == "lesion" and manifest.get("layout") != "vindr":
            ctx.data_info[schema] = {
                "not_run": "not run: the lesion task needs VinDr-layout annotations"
            }
            continue
        ctx.data[schema] = target
        ctx.data_info[schema] = {
            "path": str(target),
            "ingested": str(target),
            "images": len(prepared),
            "rejected": manifest.get("num_rejected", 0),
            "patients": manifest.get("num_patients"),
            "layout": manifest.get("layout"),
            "class_names": list(prepared.class_names),
            "counts": manifest.get("counts", {}),
            "content_hash": prepared.content_hash,
        }
        if schema == "lesion":
            _lesion_classes(ctx, prepared)


def _lesion_classes(ctx: _Context, prepared: Any) -> None:
    """Keep the lesion classes the classifiers can learn and select: each needs train and val
    images. VinDr-SpineXR has all 8; a small phantom site lacks some, and the arm then runs on
    the classes it has (rows of the others become not eligible) and says which it dropped."""
    from fedspine.data.prepared import load_prepared, write_prepared

    train = prepared.select("train").labels
    val = prepared.select("val").labels
    dropped = {}
    for k, name in enumerate(prepared.class_names):
        n_train, n_val = int((train == k).sum()), int((val == k).sum())
        if n_train == 0 or n_val == 0:
            dropped[name] = f"{n_train} train / {n_val} val images"
    info = ctx.data_info["lesion"]
    info["classes_dropped"] = dropped
    kept = [k for k, name in enumerate(prepared.class_names) if name not in dropped]
    if not dropped:
        return
    if len(kept) < 2:
        ctx.data.pop("lesion")
        info["not_run"] = (
            "not run: fewer than two lesion classes have both train and val images "
            f"(missing: {', '.join(dropped)})"
        )
        return
    target = ctx.plan.out / DATA_DIR / "lesion_classes_present"
    if not (target / "manifest.json").is_file():
        ctx.stage(
            f"data/lesion: {len(kept)} of {len(prepared.class_names)} classes have train and "
            f"val images; dropping {', '.join(dropped)}"
        )
        remap = np.full(len(prepared.class_names), -1, dtype=np.int64)
        remap[kept] = np.arange(len(kept))
        labels = np.where(prepared.labels >= 0, remap[np.maximum(prepared.labels, 0)], -1)
        manifest = {
            **prepared.manifest,
            "derived_from": str(prepared.root),
            "classes_dropped": dropped,
        }
        for key in ("class_names", "content_hash", "num_images", "resolution", "finding_names"):
            manifest.pop(key, None)
        write_prepared(
            target,
            images=np.asarray(prepared.images),
            files=prepared.files,
            patient_ids=list(prepared.patient_ids),
            splits=list(prepared.splits),
            labels=labels,
            findings=prepared.findings,
            finding_names=prepared.finding_names,
            class_names=[prepared.class_names[k] for k in kept],
            rejected=[],
            manifest=manifest,
        )
    subset = load_prepared(target)
    ctx.data["lesion"] = target
    info.update(
        {
            "path": str(target),
            "class_names": list(subset.class_names),
            "content_hash": subset.content_hash,
            "derived_from": str(prepared.root),
        }
    )


# ---------------------------------------------------------------------------- arms


def _run_arm(ctx: _Context, arm: ArmPlan) -> dict[str, Any]:
    """Build one arm in its work folder (continuing what an earlier run finished), then rename."""
    plan = ctx.plan
    final = plan.out / ARMS_DIR / arm.folder
    if (final / ARM_FILE).is_file():
        ctx.stage(f"{arm.folder}: complete from an earlier run, skipped")
        record = json.loads((final / ARM_FILE).read_text())
        record["skipped_this_time"] = True
        return record
    if final.exists():
        raise ReproduceError(f"{final}: an arm folder without {ARM_FILE}; remove it and rerun")
    work = plan.out / ARMS_DIR / f".{arm.folder}.partial"
    work.mkdir(parents=True, exist_ok=True)
    log_path = plan.out / LOGS_DIR / f"{arm.folder}.log"
    seconds: dict[str, float] = {}
    data = ctx.data[arm.data]
    ctx.stage(f"{arm.folder}: {arm.title}" + (f" (seed {arm.seed})" if arm.replicate else ""))
    try:
        with _timed(seconds, "classifier"):
            if arm.kind in SPINEGAN_KINDS:
                _clinical_classifier(ctx, arm, data, work, log_path)
        with _timed(seconds, "train"):
            _train_gan(ctx, arm, data, work, log_path)
        with _timed(seconds, "generate"):
            _generate(ctx, arm, work)
        with _timed(seconds, "evaluate"):
            _evaluate(ctx, arm, data, work)
    except ReproduceError as err:
        ctx.stage(f"{arm.folder}: FAILED: {err}")
        return {"status": "failed", "reason": str(err), "log": str(log_path)}
    record: dict[str, Any] = {
        "status": "done",
        "name": arm.name,
        "folder": arm.folder,
        "seed": arm.seed,
        "replicate": arm.replicate,
        "title": arm.title,
        "kind": arm.kind,
        "data": arm.data,
        "kimg": arm.kimg,
        "epsilon_target": arm.epsilon,
        "dp_scheme": _scheme(arm),
        "train_args": _train_args(plan, arm, data, final / "run"),
        "evaluation": _summarise_evaluation(work / "evaluation" / "report.json"),
        "privacy": _privacy(work / "run"),
        "ablation": _ablation(work / "run"),
        "seconds": {k: round(v, 1) for k, v in seconds.items() if v >= 0.05},
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "built_in": work.name,
    }
    _write_json(work / ARM_FILE, record)
    os.replace(work, final)
    auc = record["evaluation"]["tstr"]["auc"]
    ctx.stage(f"{arm.folder}: done, TSTR AUC {_num(auc)} ({sum(seconds.values()) / 60:.1f} min)")
    return record


def _clinical_classifier(
    ctx: _Context, arm: ArmPlan, data: Path, work: Path, log_path: Path
) -> None:
    target = work / "classifier"
    if (target / "classifier.pt").is_file():
        ctx.stage(f"{arm.folder}: clinical classifier trained earlier, reused")
        return
    if target.exists():
        shutil.rmtree(target)
    if arm.kind == "dp-spinegan":
        # A new classifier starts the arm's privacy account afresh: nothing else has run yet.
        shutil.rmtree(work / "run", ignore_errors=True)
        shutil.rmtree(work / PRIVACY_HOME_DIR, ignore_errors=True)
        ctx.stage(f"{arm.folder}: training the clinical classifier with DP-SGD")
    else:
        ctx.stage(f"{arm.folder}: training the clinical classifier on the real training split")
    from fedspine.training.classifier_run import ClassifierRunError, train_classifier_run

    command = "fedspine classifier train " + " ".join(_classifier_args(ctx.plan, data, target, arm))
    with _logged(log_path, command, "`fedspine classifier train`"):
        try:
            train_classifier_run(
                _classifier_request(ctx.plan, data, target, arm), _PlainClassifierReporter()
            )
        except ClassifierRunError as err:
            raise ReproduceError(f"`fedspine classifier train` stopped: {err}") from None


def _classifier_request(plan: ReproducePlan, data: Path, out: Path, arm: ArmPlan) -> Any:
    """The clinical classifier as a typed request: what :func:`_classifier_args` spells."""
    from fedspine.training.classifier_run import ClassifierDPRequest, ClassifierRequest

    b = plan.budget
    dp = None
    if arm.kind == "dp-spinegan":
        dp = ClassifierDPRequest(
            target_epsilon=b.dp_spinegan_classifier_epsilon,
            patients_per_step=b.dp_patients_per_step,
            privacy_home=out.parent / PRIVACY_HOME_DIR,
        )
    return ClassifierRequest(
        data=data,
        out=out,
        arch=b.classifier_arch,
        epochs=b.spinegan_classifier_epochs,
        patience=b.classifier_patience,
        seed=arm.seed,
        device=b.device,
        threads=b.threads,
        input_size=b.classifier_input_size,
        weights=Path(plan.classifier_weights) if plan.classifier_weights else None,
        dp=dp,
    )


class _PlainClassifierReporter:
    """A classifier run's lines and one line per epoch, as plain text for the arm's log."""

    def message(self, text: str) -> None:
        print(text)

    def event(self, event: dict[str, Any]) -> None:
        if event["event"] == "epoch":
            auc = event["val_auc"]
            print(
                f"epoch {event['epoch']:3d}  train loss {event['train_loss']:.4f}  val AUC "
                + ("n/a" if auc is None else f"{auc:.3f}")
            )

    def dp_start(self, steps: int) -> None:
        print(f"DP training: {steps} steps")

    def dp_step(self, step: int) -> None:
        pass


def _train_gan(ctx: _Context, arm: ArmPlan, data: Path, work: Path, log_path: Path) -> None:
    """Train (or continue) the arm's GAN through the library's one training call."""
    from fedspine.training.run import TrainRunError, train

    run = work / "run"
    if (run / "generator.pt").is_file():
        ctx.stage(f"{arm.folder}: GAN trained earlier, reused")
        return
    resume = (run / "latest.json").is_file()
    if resume:
        ctx.stage(f"{arm.folder}: continuing the interrupted GAN run")
    else:
        if run.exists():
            shutil.rmtree(run)
        if arm.kind == "dp":
            shutil.rmtree(work / PRIVACY_HOME_DIR, ignore_errors=True)
        if arm.kind == "dp-spinegan":
            _check_only_the_classifier_spent(work / PRIVACY_HOME_DIR / "ledger.json")
        ctx.stage(f"{arm.folder}: training the GAN ({arm.kimg:g} kimg)")
    request = _train_request(ctx.plan, arm, data, run, resume)
    command = "fedspine train " + " ".join(_train_args(ctx.plan, arm, data, run))
    with _logged(log_path, command + (" (resumed)" if resume else ""), "`fedspine train`"):
        try:
            train(request, _PlainReporter())
        except TrainRunError as err:
            raise ReproduceError(f"`fedspine train` stopped: {err}") from None


def _train_request(
    plan: ReproducePlan, arm: ArmPlan, data: Path, run: Path, resume: bool = False
) -> Any:
    """The arm's training as a typed request: what :func:`_train_args` spells as a command."""
    from fedspine.training.dp_ablation import AblationOptions
    from fedspine.training.run import ClinicalRequest, DPRequest, TrainRequest

    b = plan.budget
    dp = ablation = clinical = None
    if arm.kind in DP_KINDS:
        dp = DPRequest(
            target_epsilon=arm.epsilon,
            expected_patients_per_step=b.dp_patients_per_step,
            ada_p=b.dp_ada_p,
            privacy_home=run.parent / PRIVACY_HOME_DIR,
        )
    elif arm.kind == "paper":
        ablation = AblationOptions("paper")
    elif arm.kind in ABLATION_KINDS:
        ablation = AblationOptions(
            arm.kind,
            noise_for_epsilon=arm.noise_epsilon if arm.kind == "noise-only" else None,
            expected_patients_per_step=b.dp_patients_per_step,
            ada_p=b.dp_ada_p,
        )
    if arm.kind in SPINEGAN_KINDS and not resume:
        clinical = ClinicalRequest(
            classifier=run.parent / "classifier", weight=CLINICAL_WEIGHT, mapping="default"
        )
    if resume:
        return TrainRequest(
            prepared=data,
            out=run,
            resume=True,
            kimg=arm.kimg,
            device=b.device,
            dp=dp,
            ablation=ablation,
        )
    return TrainRequest(
        prepared=data,
        out=run,
        preset=b.gan_preset,
        kimg=arm.kimg,
        resolution=b.resolution,
        seed=arm.seed,
        batch=b.gan_batch if b.gan_batch and arm.kind != "paper" else None,
        device=b.device,
        model="spinegan" if arm.kind in SPINEGAN_KINDS else None,
        dp=dp,
        clinical=clinical,
        ablation=ablation,
    )


class _PlainReporter:
    """A training run's lines and a tick line per tick, as plain text for the arm's log."""

    def message(self, text: str) -> None:
        print(text)

    def start(self, total_kimg: float, done_kimg: float, ada_p: float, private: bool) -> None:
        print(f"training from {done_kimg:.3f} to {total_kimg:g} kimg")

    def step(self, kimg: float) -> None:
        pass

    def tick(self, record: dict[str, Any], private: bool) -> None:
        spk = record.get("sec_per_kimg")
        print(
            f"kimg {record['cur_nimg'] / 1000:.3f}  loss G {record['loss_g']:.3f}  "
            f"p {record['ada_p']:.3f}" + (f"  {spk:.1f} s/kimg" if spk else "")
        )

    def stop(self) -> None:
        pass


def _generate(ctx: _Context, arm: ArmPlan, work: Path) -> None:
    from fedspine.training.checkpoint import CheckpointError
    from fedspine.training.gan_trainer import resolve_device
    from fedspine.training.generate import GenerationError, generate_dataset

    target = work / "synthetic"
    if (target / "labels.csv").is_file():
        ctx.stage(f"{arm.folder}: synthetic images generated earlier, reused")
        return
    b = ctx.plan.budget
    ctx.stage(f"{arm.folder}: generating {b.per_class} images per class")
    if target.exists():
        shutil.rmtree(target)
    try:
        generate_dataset(
            work / "run",
            target,
            per_class=b.per_class,
            seed=arm.seed,
            device=resolve_device(b.device),
        )
    except (GenerationError, CheckpointError) as err:
        raise ReproduceError(f"generate: {err}") from None


def _evaluate(ctx: _Context, arm: ArmPlan, data: Path, work: Path) -> None:
    from fedspine.evaluation.report import EvaluateConfig, EvaluateError, evaluate

    target = work / "evaluation"
    if (target / "report.json").is_file():
        ctx.stage(f"{arm.folder}: evaluated earlier, reused")
        return
    b = ctx.plan.budget
    cfg = EvaluateConfig(
        arch=b.classifier_arch,
        weights=ctx.plan.classifier_weights,
        epochs=b.classifier_epochs,
        patience=b.classifier_patience,
        input_size=b.classifier_input_size,
        seed=arm.seed,
        mix_per_class=None if arm.mixed else 0,
        bootstrap=b.bootstrap,
        inception=ctx.plan.inception,
        domain_epochs=b.domain_epochs,
        kid_subsets=b.kid_subsets,
        device=b.device,
        threads=b.threads,
        max_metric_images=b.max_metric_images,
    )
    ctx.stage(f"{arm.folder}: evaluating ({_eval_note(arm)})")

    def progress(event: dict[str, Any]) -> None:
        if event.get("stage") == "classifier" and event.get("event") in ("start", "end"):
            what = "training" if event["event"] == "start" else f"test AUC {_num(event['auc'])}"
            ctx.stage(f"{arm.folder}: evaluate: {event['arm']} classifier {what}")
        elif event.get("event") == "extractor":
            ctx.stage(f"{arm.folder}: evaluate: GAN metrics with {event['description']}")

    # One TRTR per task and seed: the first evaluation trains it, every later arm reuses it, so
    # the whole table is measured against the same real-data classifier.
    trtr_cache = ctx.plan.out / DATA_DIR / "trtr" / f"{arm.data}-seed{arm.seed}"
    try:
        evaluate(
            work / "synthetic",
            data,
            data,
            target,
            cfg,
            progress=progress,
            trtr_cache=trtr_cache,
        )
    except EvaluateError as err:
        raise ReproduceError(f"evaluate: {err}") from None


# ---------------------------------------------------------------------------- arguments


def _train_args(plan: ReproducePlan, arm: ArmPlan, data: Path, run: Path) -> list[str]:
    b = plan.budget
    args = [str(data), "--out", str(run), "--preset", b.gan_preset]
    args += ["--kimg", f"{arm.kimg:g}", "--resolution", str(b.resolution), "--seed", str(arm.seed)]
    if b.gan_batch and arm.kind != "paper":  # the paper scheme is batch 1
        args += ["--batch", str(b.gan_batch)]
    args += ["--device", b.device]
    if arm.kind in SPINEGAN_KINDS:
        args += ["--model", "spinegan", "--classifier", str(run.parent / "classifier")]
        args += ["--clinical-weight", f"{CLINICAL_WEIGHT:g}", "--clinical-input", "default"]
    if arm.kind in DP_KINDS:
        args += _dp_args(b, arm, run.parent)
    elif arm.kind in ABLATION_KINDS:
        args += _ablation_args(b, arm)
    return args


def _check_only_the_classifier_spent(ledger_path: Path) -> None:
    """A fresh DP SpineGAN run must compose with its classifier alone; GAN steps of an earlier
    attempt would be counted again (safe, but not what the table says)."""
    from fedspine.privacy.ledger import PrivacyLedger
    from fedspine.training.classifier_dp import MECHANISM_LABEL

    if not ledger_path.is_file():
        raise ReproduceError(
            f"{ledger_path}: missing, so the DP classifier's ε is not on record; remove the "
            "arm's folder and rerun"
        )
    ledger = PrivacyLedger.open(ledger_path, create=False)
    stale = [r for r in ledger.records() if r["label"] != MECHANISM_LABEL]
    if stale:
        raise ReproduceError(
            f"{ledger_path}: holds {len(stale)} GAN record(s) of an earlier attempt beside the "
            "classifier's; remove the arm's folder and rerun to start its privacy account afresh"
        )


def _dp_args(b: ReproduceBudget, arm: ArmPlan, work: Path) -> list[str]:
    """Each DP arm is its own experiment, so it gets its own privacy home inside its folder (ε
    does not compose across arms; releasing several of them would, and a user's real ledger
    is never touched). The DP SpineGAN's home already holds its classifier's steps, so its
    target ε covers both."""
    return [
        "--dp",
        "--epsilon",
        f"{arm.epsilon:g}",
        "--patients-per-step",
        str(b.dp_patients_per_step),
        "--ada-p",
        f"{b.dp_ada_p:g}",
        "--privacy-home",
        str(work / PRIVACY_HOME_DIR),
    ]


def _ablation_args(b: ReproduceBudget, arm: ArmPlan) -> list[str]:
    """`fedspine train --dp-scheme ...` for an ablation arm: the DP arms' patients per step and
    ADA p (clip C = 1 and δ are the defaults both use); no --dp, no ledger: not private."""
    if arm.kind == "paper":
        return ["--dp-scheme", "paper"]
    args = ["--dp-scheme", arm.kind]
    if arm.kind == "noise-only":
        args += ["--noise-for-epsilon", f"{arm.noise_epsilon:g}"]
    return args + [
        "--patients-per-step",
        str(b.dp_patients_per_step),
        "--ada-p",
        f"{b.dp_ada_p:g}",
    ]


def _classifier_args(
    plan: ReproducePlan, data: Path, out: Path, arm: ArmPlan | None = None
) -> list[str]:
    b = plan.budget
    args = [str(data), "--out", str(out), "--arch", b.classifier_arch]
    if arm is not None and arm.kind == "dp-spinegan":
        args += ["--dp", "--epsilon", f"{b.dp_spinegan_classifier_epsilon:g}"]
        args += ["--patients-per-step", str(b.dp_patients_per_step)]
        args += ["--privacy-home", str(out.parent / PRIVACY_HOME_DIR)]
    args += ["--epochs", str(b.spinegan_classifier_epochs)]
    seed = arm.seed if arm is not None else b.seed
    args += ["--patience", str(b.classifier_patience), "--seed", str(seed)]
    args += ["--device", b.device, "--threads", str(b.threads)]
    if b.classifier_input_size:
        args += ["--input-size", str(b.classifier_input_size)]
    if plan.classifier_weights:
        args += ["--weights", str(plan.classifier_weights)]
    return args


def _eval_note(arm: ArmPlan) -> str:
    task = "8-class lesion task, one-vs-rest mean AUC" if arm.data == "lesion" else "abnormality"
    parts = "TRTR + TSTR + mixed" if arm.mixed else "TRTR + TSTR"
    return f"{parts} on the {task}, GAN metrics, memorisation audit"


# ---------------------------------------------------------------------------- invoking the CLI


@contextlib.contextmanager
def _logged(log_path: Path, title: str, what: str) -> Iterator[None]:
    """Run a library call with its output shown and appended to ``log_path``.

    A crash costs this arm, not the whole reproduction: it is logged with its traceback and
    becomes a ReproduceError; Ctrl-C goes through.
    """
    tail: deque[str] = deque(maxlen=40)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {title}\n")
        log.flush()
        out_tee = _Tee(sys.stdout, log, tail)
        err_tee = _Tee(sys.stderr, log, tail)
        with contextlib.redirect_stdout(out_tee), contextlib.redirect_stderr(err_tee):
            try:
                yield
            except (ReproduceError, KeyboardInterrupt):
                raise
            except Exception as err:
                log.write(traceback.format_exc())
                raise ReproduceError(f"{what} failed: {type(err).__name__}: {err}") from None


class _Tee(io.TextIOBase):
    """A text stream that writes to the console and, without terminal codes, to a log."""

    def __init__(self, console: Any, log: Any, tail: deque[str]) -> None:
        self._console, self._log, self._tail = console, log, tail

    def write(self, text: str) -> int:
        self._console.write(text)
        plain = _strip_ansi(text)
        self._log.write(plain)
        self._tail.extend(line for line in plain.splitlines() if line.strip())
        return len(text)

    def flush(self) -> None:
        self._console.flush()
        self._log.flush()

    def isatty(self) -> bool:
        return bool(getattr(self._console, "isatty", lambda: False)())

    @property
    def encoding(self) -> str:
        return getattr(self._console, "encoding", None) or "utf-8"


# ---------------------------------------------------------------------------- results


def _summarise_evaluation(path: Path) -> dict[str, Any]:
    """The numbers the table needs from an evaluation report."""
    report = json.loads(path.read_text())
    arms = report["arms"]

    def arm(name: str) -> dict[str, Any] | None:
        if name not in arms:
            return None
        a = arms[name]
        return {
            "auc": a["auc"],
            "ci": a["ci"],
            "sensitivity": a.get("sensitivity"),
            "specificity": a.get("specificity"),
            "best_epoch": a["history"].get("best_epoch"),
            "test_images": a.get("test_images"),
            "skipped_outputs": a.get("skipped_outputs", []),
        }

    generative = report["generative"]
    primary = [
        r
        for r in generative["results"]
        if r["compared"].startswith("synthetic vs real") and not r["extractor"].startswith("pixel")
    ]
    reference = [
        r
        for r in generative["results"]
        if r["compared"].startswith("real val vs real") and not r["extractor"].startswith("pixel")
    ]
    return {
        "task": report["task"],
        "class_names": report["class_names"],
        "trtr": arm("TRTR"),
        "tstr": arm("TSTR"),
        "mixed": arm("mixed"),
        "ratios": report["ratios"],
        "trts": (report.get("class_fidelity") or {}).get("auc"),
        "trts_judge": (report.get("class_fidelity") or {}).get("classifier"),
        "classifier_budget": report.get("classifier_budget"),
        "trts_scores": [
            [o.get("mean_score_positive"), o.get("mean_score_negative")]
            for o in ((report.get("class_fidelity") or {}).get("per_output") or {}).values()
            if o.get("auc") is not None
        ],
        "gan_metrics": _metric_subset(primary[0]) if primary else None,
        "gan_metrics_real_reference": _metric_subset(reference[0]) if reference else None,
        "memorisation": {
            k: v for k, v in report["memorisation"].items() if isinstance(v, (int, float, str))
        },
        "test_images": report["test_set"]["images"],
        # Signal retained per arm, with intervals; None in reports written before it existed.
        "utility": report.get("utility"),
        "report": str(path.parent.name + "/report.md"),
    }


def _metric_subset(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("extractor", "fid", "kid", "precision", "recall", "density", "coverage")
    return {k: result.get(k) for k in keys}


def _scheme(arm: ArmPlan) -> str:
    if arm.kind in DP_KINDS:
        return "dpsgd"
    return arm.kind if arm.kind in ABLATION_KINDS else "none"


def _ablation(run: Path) -> dict[str, Any] | None:
    """RUN/ablation.json of an ablation arm (scheme, mechanism, ε), None for the others."""
    from fedspine.training.dp_ablation import AblationError, read_ablation_summary

    try:
        return read_ablation_summary(run)
    except (AblationError, ValueError) as err:
        return {"error": str(err), "private": False}


def _privacy(run: Path) -> dict[str, Any]:
    """ε and δ of the run from its privacy.json (recomputed from its mechanisms by the report)."""
    from fedspine.privacy.report import PrivacyReportError, build_report

    try:
        report = build_report(run)
    except PrivacyReportError as err:
        return {"private": False, "error": str(err)}
    sites = report.get("sites", {})
    mechanisms = [m for s in sites.values() for m in s.get("mechanisms", [])]
    return {
        "private": report["private"],
        "not_private_reasons": report.get("not_private_reasons", []),
        "epsilon": report.get("overall_epsilon"),
        "epsilon_recomputed": next((s.get("epsilon_recomputed") for s in sites.values()), None),
        "delta": report.get("delta"),
        "accountant": report.get("accountant"),
        "mechanisms": mechanisms,
        "components": report.get("components", {}),
    }


def _build_report(
    ctx: _Context, results: dict[str, dict[str, Any]], seconds: float
) -> dict[str, Any]:
    plan = ctx.plan
    phantom = (plan.root / "phantom_site.json").is_file()
    data = {
        "root": str(plan.root),
        "kind": "phantom (synthetic DICOMs from `fedspine phantom`)"
        if phantom
        else "VinDr-SpineXR layout (real radiographs)",
        "abnormality": ctx.data_info.get("abnormality", {}),
        "lesion": ctx.data_info.get(
            "lesion", {"not_run": "not prepared: no arm of this budget uses it"}
        ),
    }
    seeds = _seed_summary(plan.arms, results)
    return _plain(
        {
            "format": "fedspine-reproduce/2",
            "fedspine_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
            "budget": asdict(plan.budget),
            "spinegan_available": {"available": plan.spinegan[0], "how": plan.spinegan[1]},
            "data": data,
            "table": _table(results, ctx.data_info, seeds),
            "paper": PAPER,
            "errors": _errors(plan, results, ctx.data_info),
            "arms": results,
            "seeds": seeds,
            "options": {
                "inception": plan.inception,
                "classifier_weights": plan.classifier_weights,
            },
        }
    )


SEED_METRICS = ("tstr_auc", "signal_retained", "trtr_auc", "mixed_auc")
_REPLICATE_SUFFIX = re.compile(r"-seed\d+$")


def _seed_summary(
    arms: Sequence[ArmPlan], results: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per arm: its replicates' seeds and folders, and each of :data:`SEED_METRICS` across them.

    The patient-level intervals resample the test set of one trained model; how far a result
    moves when the training seed changes is only seen here.
    """
    groups: dict[str, list[ArmPlan]] = {}
    for arm in arms:
        groups.setdefault(arm.name, []).append(arm)
    summary: dict[str, dict[str, Any]] = {}
    for name, replicates in groups.items():
        replicates.sort(key=lambda a: a.replicate)
        entry: dict[str, Any] = {
            "replicates": len(replicates),
            "seeds": [a.seed for a in replicates],
            "folders": [a.folder for a in replicates],
        }
        for metric in SEED_METRICS:
            found = [(a.seed, _seed_metric(results.get(a.folder), metric)) for a in replicates]
            entry[metric] = _spread_stats([(s, v) for s, v in found if v is not None])
        summary[name] = entry
    return summary


def _seed_metric(result: dict[str, Any] | None, metric: str) -> float | None:
    """One replicate's value of a :data:`SEED_METRICS` entry; None when it has none."""
    ev = _done(result)
    if ev is None:
        return None
    if metric == "signal_retained":
        return _utility(ev, "TSTR").get("signal_retained")
    arm = ev.get(metric.removesuffix("_auc"))
    return arm.get("auc") if arm else None


def _spread_stats(pairs: list[tuple[int, float]]) -> dict[str, Any]:
    """n, the seeds and their values, mean, sample SD (None under two values), min and max."""
    values = [float(v) for _, v in pairs]
    n = len(values)
    return {
        "n": n,
        "seeds": [s for s, _ in pairs],
        "values": values,
        "mean": float(np.mean(values)) if n else None,
        "sd": float(np.std(values, ddof=1)) if n > 1 else None,
        "min": min(values) if n else None,
        "max": max(values) if n else None,
    }


def _table(
    results: dict[str, dict[str, Any]],
    data_info: dict[str, dict[str, Any]],
    seeds: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, str]]:
    """The rows of the one table, each with the paper's value beside ours and the ε it has.

    Cells hold replicate 0 with its patient-level interval; with several training seeds
    (``seeds``, from :func:`_seed_summary`) they add the mean and range across them.
    """
    seeds = seeds or {}
    rows: list[dict[str, str]] = []
    cgan = results.get("cgan", {})
    ev = _done(cgan)
    no_dp = "∞ (no DP)"
    rows.append(
        _row(
            "1. real classifier (TRTR), normal vs abnormal",
            PAPER["trtr"],
            _join(
                _auc_ci(ev["trtr"]) if ev else _status(cgan),
                _over_seeds(seeds.get("cgan"), "trtr_auc"),
            ),
            "1 (reference)" if ev else "",
            "trained once per seed on the real training split and shared by every arm's "
            f"evaluation; {ev['test_images']} test images"
            if ev
            else "",
            "— (real images, nothing released)",
        )
    )
    ours, signal = _tstr_cells(cgan, seeds.get("cgan"))
    rows.append(
        _row(
            "2. cGAN (abnormality): TSTR",
            _paper_tstr("cgan"),
            ours,
            signal,
            _join(_ratio_note(ev), _gan_metrics(ev)) if ev else "",
            no_dp,
        )
    )
    rows.append(
        _row(
            "2. cGAN (abnormality): mixed, real + synthetic",
            PAPER["mixed"],
            _join(
                _auc_ci(ev.get("mixed")) if ev else _status(cgan),
                _over_seeds(seeds.get("cgan"), "mixed_auc"),
            ),
            _signal_cell(ev, "mixed") if ev and ev.get("mixed") else "",
            _join(
                _ratio_note(ev, key="mixed_over_trtr", label="mixed/TRTR"),
                "all synthetic images added to the real training split",
            )
            if ev
            else "",
            no_dp,
        )
    )
    lesion = results.get("lesion", {})
    lev = _done(lesion)
    ours, signal = _tstr_cells(lesion, seeds.get("lesion"))
    rows.append(
        _row(
            "3. cGAN (lesion type; the paper's 8 classes): TSTR, one-vs-rest mean AUC",
            PAPER["lesion"],
            ours,
            signal,
            _join(_ratio_note(lev), _lesion_details(lev, data_info.get("lesion", {})))
            if lev
            else "",
            no_dp,
        )
    )
    spine = results.get("spinegan", {})
    sev = _done(spine)
    ours, signal = _tstr_cells(spine, seeds.get("spinegan"))
    rows.append(
        _row(
            "4. SpineGAN (abnormality, clinical loss): TSTR",
            _paper_tstr("spinegan"),
            ours,
            signal,
            _join(
                _ratio_note(sev),
                f"paper: {PAPER['spinegan_metrics']}; ours: " + _gan_metrics(sev),
                "not private: its classifier saw the real images (error 7)",
            )
            if sev
            else "",
            no_dp,
        )
    )
    rows.append(_dp_spinegan_row(results.get("dp_spinegan", {}), seeds.get("dp_spinegan")))
    sigmas: dict[float, float] = {}
    for name, result in results.items():
        if not name.startswith("dp_eps") or _REPLICATE_SUFFIX.search(name):
            continue
        dev = _done(result)
        eps = result.get("epsilon_target")
        title = f"5. DP-SGD cGAN, target ε = {eps:g}" if eps else f"5. DP-SGD cGAN ({name})"
        details = ""
        spent = ""
        if dev:
            p = result.get("privacy", {})
            mech = (p.get("mechanisms") or [{}])[-1]
            if eps and mech.get("noise_multiplier") is not None:
                sigmas[float(eps)] = float(mech["noise_multiplier"])
            spent = _spent(p)
            details = _join(
                f"spent ε = {spent} ({p.get('accountant')}, patient level), σ = "
                f"{_num(mech.get('noise_multiplier'), 3)}, q = "
                f"{_num(mech.get('sample_rate'), 3)}, {mech.get('steps', '?')} D steps",
                _ratio_note(dev),
                _gan_metrics(dev),
            )
        ours, signal = _tstr_cells(result, seeds.get(name))
        rows.append(_row(title, PAPER["dp"], ours, signal, details, spent))
    rows += _ablation_rows(results, sigmas, seeds)
    return rows


def _done(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The evaluation summary of a completed arm; None for one not run or failed."""
    result = result or {}
    return result.get("evaluation") if result.get("status") == "done" else None


def _tstr_cells(result: dict[str, Any], summary: dict[str, Any] | None) -> tuple[str, str]:
    """(ours, signal retained) of a generator arm: replicate 0 with its intervals, then the mean
    and range across training seeds when there are several."""
    ev = _done(result)
    return (
        _join(
            _auc_ci(ev["tstr"]) if ev else _status(result),
            _over_seeds(summary, "tstr_auc"),
        ),
        _join(
            _signal_cell(ev, "TSTR") if ev else "",
            _over_seeds(summary, "signal_retained", digits=2),
        ),
    )


def _utility(ev: dict[str, Any], arm: str) -> dict[str, Any]:
    """One arm of the evaluation's utility block; empty for reports written before it."""
    return ((ev.get("utility") or {}).get("arms") or {}).get(arm) or {}


def _signal_cell(ev: dict[str, Any], arm: str) -> str:
    """Signal retained [95 % CI]; an interval containing chance, or none at all, is said in
    words, since the point estimate alone would read as a result."""
    u = _utility(ev, arm)
    value, ci = u.get("signal_retained"), u.get("signal_retained_ci")
    if value is None:
        cell = "n/a (TRTR's own interval contains chance)" if u else "n/a"
    else:
        bounds = f"{_signed(ci[0])}, {_signed(ci[1])}" if ci else "interval unbounded"
        cell = f"{_signed(value)} [{bounds}]"
    if u.get("ci_contains_chance"):
        cell += f"; {arm}'s interval contains chance: no evidence of signal"
    return cell


def _paper_tstr(arm: str) -> str:
    """The paper's TSTR with the signal retained and ratio derived from it, marked derived."""
    return (
        f"{PAPER[f'{arm}_tstr']}; signal retained {PAPER[f'{arm}_signal']}; "
        f"TSTR/TRTR {PAPER[f'{arm}_ratio']}"
    )


def _ratio_note(ev: dict[str, Any], key: str = "tstr_over_trtr", label: str = "TSTR/TRTR") -> str:
    """The plain ratio, for the details: a chance-level TSTR already scores 0.5 / TRTR on it."""
    return f"{label} {_num(ev['ratios'].get(key))}"


def _over_seeds(summary: dict[str, Any] | None, metric: str, digits: int = 3) -> str:
    """'mean over N seeds X (min–max)' of one metric; empty when the arm has one replicate."""
    if not summary or summary.get("replicates", 1) < 2:
        return ""
    stats = summary.get(metric) or {}
    n, planned = stats.get("n", 0), summary["replicates"]
    if not n:
        return ""
    low, high = _signed(stats["min"], digits), _signed(stats["max"], digits)
    span = f"{low} to {high}" if stats["min"] < 0 else f"{low}–{high}"
    of = f" of {planned}" if n < planned else ""
    return f"mean over {n}{of} seeds {_signed(stats['mean'], digits)} ({span})"


def _spent(privacy: dict[str, Any]) -> str:
    """'ε at δ = δ' of an arm's privacy summary."""
    return f"{_num(privacy.get('epsilon'), 2)} at δ = {_num(privacy.get('delta'), 2, 'g')}"


def _dp_spinegan_row(
    result: dict[str, Any], summary: dict[str, Any] | None = None
) -> dict[str, str]:
    """SpineGAN with a DP classifier and DP-SGD on D: ε of both phases from the arm's ledger."""
    ev = _done(result)
    details = spent = ""
    if ev:
        p = result.get("privacy", {})
        mechs = p.get("mechanisms") or []
        phases = "; ".join(
            f"{m.get('label', '?')}: σ = {_num(m.get('noise_multiplier'), 3)}, q = "
            f"{_num(m.get('sample_rate'), 3)}, {m.get('steps', '?')} steps"
            for m in mechs
        )
        spent = _spent(p)
        details = _join(
            f"classifier and GAN in one ledger, spent ε = {spent} ({p.get('accountant')}, "
            f"patient level; {phases})",
            _ratio_note(ev),
            _gan_metrics(ev),
        )
    eps = result.get("epsilon_target")
    ours, signal = _tstr_cells(result, summary)
    return _row(
        "4. SpineGAN under DP (DP classifier, DP-SGD on D)"
        + (f", target ε = {eps:g} in all" if eps else ""),
        "not in the paper (its SpineGAN had no DP)",
        ours,
        signal,
        details,
        spent,
    )


def _ablation_rows(
    results: dict[str, dict[str, Any]],
    dp_sigmas: dict[float, float],
    seeds: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, str]]:
    """The DP ablation rows: ε = ∞ for clip-only and noise-only, the paper scheme's ε from
    standard accounting, each with its mechanism and GAN metrics."""
    seeds = seeds or {}
    rows = []
    titles = {
        "dp_clip_only": (
            "5. ablation: clipping only (DP-SGD's per-patient clip, no noise), NOT private",
            PAPER["dp_ablation"],
        ),
        "dp_noise_only": (
            "5. ablation: noise only (DP-SGD's noise σC, no clipping), NOT private",
            PAPER["dp_ablation"],
        ),
        "dp_paper": (
            "5. the paper's own 'DP' (noise before whole-model clipping, G and D, batch 1), "
            "NOT private",
            PAPER["dp_paper"],
        ),
    }
    for name, (title, paper) in titles.items():
        result = results.get(name)
        if result is None:
            continue
        ev = _done(result)
        details, eps = "", ""
        if ev:
            details, eps = _ablation_details(name, result.get("ablation") or {}, dp_sigmas)
            details = _join(details, _ratio_note(ev), _gan_metrics(ev))
        ours, signal = _tstr_cells(result, seeds.get(name))
        rows.append(_row(title, paper, ours, signal, details, eps))
    return rows


def _ablation_details(
    name: str, ablation: dict[str, Any], dp_sigmas: dict[float, float]
) -> tuple[str, str]:
    """(details, ε cell) of an ablation row, from the run's ablation.json."""
    mech = ablation.get("mechanism") or {}
    if "error" in ablation or not mech:
        return f"no ablation.json: {ablation.get('error', 'missing')}", "?"
    if name == "dp_paper":
        acc = ablation.get("accounting") or {}
        paper = ablation.get("paper_settings") or {}
        eps = (
            f"{acc['epsilon']:.2g} ({acc['accountant'].upper()}, per image)"
            if acc.get("epsilon") is not None
            else "?"
        )
        text = ablation.get("epsilon_text", "")
        if paper.get("epsilon") is not None:
            text += (
                f"; at the paper's own settings ({paper['images']:,} images, 8000 kimg at batch "
                f"1, {paper['steps']:,} D steps): ε = {paper['epsilon']:.3g} "
                f"({paper['accountant'].upper()})"
            )
        return text, eps
    q = f"q = {_num(mech.get('sample_rate'), 3)}, {mech.get('d_steps', '?')} D steps"
    if name == "dp_clip_only":
        return f"per-patient clip C = {mech.get('clip_norm')}, no noise; {q}", "∞ (no noise)"
    sigma = mech.get("noise_multiplier")
    calib = ablation.get("noise_calibration") or {}
    ref = calib.get("noise_for_epsilon")
    same = ""
    if ref is not None and float(ref) in dp_sigmas and sigma is not None:
        theirs = dp_sigmas[float(ref)]
        same = (
            f", the same σ as the ε = {ref:g} arm"
            if abs(theirs - sigma) <= 1e-9 * max(1.0, theirs)
            else f"; NOTE the ε = {ref:g} arm used σ = {theirs:.4g}"
        )
    return (
        f"noise std σC = {_num(mech.get('noise_std'), 3)} (σ = {_num(sigma, 3)}"
        + (f" calibrated for ε = {ref:g}" if ref is not None else "")
        + f", C = {mech.get('noise_scale_c')}{same}), no clipping; {q}",
        "∞ (no clipping)",
    )


def _lesion_details(ev: dict[str, Any], info: dict[str, Any]) -> str:
    dropped = info.get("classes_dropped") or {}
    classes = (
        f"{len(ev['class_names'])} of 8 classes (dropped, too few images: "
        + "; ".join(f"{name}: {why}" for name, why in dropped.items())
        + ")"
        if dropped
        else "all 8 classes"
    )
    skipped = ev["tstr"].get("skipped_outputs") or []
    return f"TRTR on the lesion task {_auc_ci(ev['trtr'])}; {classes}" + (
        f"; left out of the mean, no test positives: {', '.join(map(str, skipped))}"
        if skipped
        else ""
    )


def _errors(
    plan: ReproducePlan, results: dict[str, dict[str, Any]], data_info: dict[str, Any]
) -> list[dict[str, str]]:
    """Which of the paper's seven errors each of our settings corrects (paper.md's list)."""
    ab = data_info.get("abnormality", {})
    spine = results.get("spinegan", {})
    dp_done = [
        r
        for n, r in results.items()
        if n.startswith("dp_eps") and not _REPLICATE_SUFFIX.search(n) and r["status"] == "done"
    ]
    if spine.get("status") == "done":
        clinical = (
            "Corrected: SpineGAN's frozen classifier receives the generator's output mapped to "
            "its own training input ([0, 1], resized to its input size) — `fedspine train "
            "--model spinegan` with the default `--clinical-input default`."
        )
        private_cls = (
            "Not corrected in the `spinegan` arm, and said so: it is the paper's comparison, not "
            "private (no DP), and its classifier was trained on the real images, which its "
            "privacy.json records. The DP arms have no clinical loss, so no classifier touches "
            "their generator."
        )
    else:
        clinical = (
            f"Not exercised in this run (SpineGAN arm: {_status(spine)}). "
            "`fedspine train --model spinegan` maps the generator output to the classifier's "
            "own [0, 1] resized input by default."
        )
        private_cls = (
            "Not exercised (no SpineGAN arm ran). The DP arms have no clinical loss, so no "
            "classifier trained on real images steers their generator."
        )
    dp_spine = results.get("dp_spinegan", {})
    if dp_spine.get("status") == "done":
        p = dp_spine.get("privacy", {})
        private_cls = (
            "Corrected in the `dp_spinegan` arm: its clinical classifier was trained with "
            f"patient-level DP-SGD (target ε = {plan.budget.dp_spinegan_classifier_epsilon:g}), "
            "and the DP SpineGAN composed with it in one ledger, so ε = "
            f"{_num(p.get('epsilon'), 2)} covers both. "
            + (
                "The `spinegan` arm beside it is the paper's non-private comparison and its "
                "privacy.json says so."
                if spine.get("status") == "done"
                else ""
            )
        ).strip()
    if dp_done:
        dp_text = (
            "Corrected: DP-SGD on the discriminator only, per-patient clipping then Gaussian "
            "noise N(0, σ²C²), Poisson sampling of patients, no minibatch-std, fixed ADA p, "
            "fake labels from a public prior; σ calibrated to the target ε and the ε spent "
            "read back from each run's privacy.json (PRV accountant). Arms: "
            + ", ".join(
                f"target {r['epsilon_target']:g} → spent {_num(r['privacy'].get('epsilon'), 2)}"
                for r in dp_done
            )
            + ". Each arm has its own ledger: they are separate experiments, and releasing "
            "several would compose their ε."
        )
    else:
        dp_text = (
            "Not exercised in this run: no DP arm completed. `fedspine train --dp` is real "
            "DP-SGD with accounting."
        )
    paper_arm = results.get("dp_paper", {})
    accounting = ((paper_arm.get("ablation") or {}).get("accounting") or {}) if paper_arm else {}
    if paper_arm.get("status") == "done" and accounting.get("epsilon") is not None:
        dp_text += (
            " The paper's scheme itself ran as the arm `dp_paper` (`fedspine train --dp-scheme "
            f"paper`), marked not private; standard accounting gives it ε = "
            f"{accounting['epsilon']:.3g} here ({accounting['accountant'].upper()}, per image)."
        )
    ablated = [n for n in ("dp_clip_only", "dp_noise_only") if results.get(n, {}).get("status")]
    if any(results[n]["status"] == "done" for n in ablated):
        dp_text += (
            " Its clipping-only / noise-only ablation is redone with DP-SGD's own clipping and "
            "noise (arms `dp_clip_only`, `dp_noise_only`; ε = ∞, not private)."
        )
    return [
        {
            "error": "Labels: a single-row lesion was called normal.",
            "here": "Corrected: ingest with label rule `correct` (abnormal iff any "
            "lesion_type ≠ 'No finding').",
        },
        {
            "error": "Decoding: undecodable DICOMs were skipped silently (3,773 of ~8,400).",
            "here": f"Corrected: every file is decoded with the pylibjpeg plugins; "
            f"{ab.get('images', '?')} decoded, {ab.get('rejected', '?')} rejected, each "
            "rejection listed with its reason in rejected.csv.",
        },
        {
            "error": "Intensities: no rescale, VOI LUT/window or MONOCHROME1 inversion.",
            "here": "Corrected: decoding applies the Modality LUT (rescale slope/intercept), the "
            "VOI LUT or window, and MONOCHROME1 inversion before the centre crop and resize.",
        },
        {
            "error": "Model selection on the test set.",
            "here": "Corrected: every classifier (TRTR, TSTR, mixed, SpineGAN's) chooses its "
            "epoch and threshold on a validation split carved by patient from the training "
            "data; the test split gives the final numbers only.",
        },
        {
            "error": "SpineGAN's classifier input: [-1, 1] values and a centre crop.",
            "here": clinical,
        },
        {"error": "'DP' was noise-then-clip on G and D, batch 1 (ε ≈ 10^10).", "here": dp_text},
        {"error": "The clinical classifier saw real images.", "here": private_cls},
    ]


# ---------------------------------------------------------------------------- formatting


def _row(
    experiment: str, paper: str, ours: str, signal: str, details: str, epsilon: str = ""
) -> dict[str, str]:
    return {
        "experiment": experiment,
        "paper": paper,
        "ours": ours,
        "signal": signal,
        "epsilon": epsilon,
        "details": details,
    }


def _join(*parts: str) -> str:
    """The non-empty parts of a cell, separated by '; '."""
    return "; ".join(p for p in parts if p)


def _md_row(row: dict[str, str]) -> str:
    cells = [
        row["experiment"],
        row["paper"],
        row["ours"],
        row["signal"],
        row.get("epsilon", ""),
        row["details"],
    ]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def _auc_ci(arm: dict[str, Any] | None) -> str:
    if not arm or arm.get("auc") is None:
        return "n/a"
    ci = arm.get("ci")
    return _num(arm["auc"]) + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else "")


def _gan_metrics(ev: dict[str, Any]) -> str:
    m = ev.get("gan_metrics")
    if not m:
        return "no GAN metrics"
    ref = ev.get("gan_metrics_real_reference") or {}
    trts = ""
    if ev.get("trts") is not None:
        scores = ev.get("trts_scores") or []
        mean = (
            f" (mean score {_num(scores[0][0], 2)} / {_num(scores[0][1], 2)})"
            if len(scores) == 1
            else ""
        )
        judge = f" by {ev['trts_judge']}" if ev.get("trts_judge") else ""
        trts = f"TRTS {_num(ev['trts'])}{mean}{judge}; "
    return trts + (
        f"KID {_num(m.get('kid'), 2, 'e')} (real val floor at equal n: "
        f"{_num(ref.get('kid'), 2, 'e')}), FID {_num(m.get('fid'), 3, 'g')} (floor "
        f"{_num(ref.get('fid'), 3, 'g')}), precision {_num(m.get('precision'), 2)}, recall "
        f"{_num(m.get('recall'), 2)} ({m['extractor']})"
    )


def _status(result: dict[str, Any]) -> str:
    if not result:
        return "not run"
    if result.get("status") == "not run":
        return result.get("reason", "not run")
    if result.get("status") == "failed":
        return f"failed: {result.get('reason', '')}"
    return result.get("status", "?")


def _num(value: Any, digits: int = 3, style: str = "f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.{digits}{style}}"


def _signed(value: Any, digits: int = 2) -> str:
    """A number with a true minus sign, so a negative signal retained is not read as a dash."""
    return _num(value, digits).replace("-", "−")


def _fmt_setting(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return "—" if value is None else str(value)


def _eps_tag(eps: float) -> str:
    return f"{eps:g}".replace(".", "p")


_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


# ---------------------------------------------------------------------------- files and threads


def _check_previous(plan: ReproducePlan) -> None:
    """A rerun must use the same root and budget, or its arms would mix two experiments."""
    path = plan.out / PLAN_FILE
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    current = plan.to_dict()
    if Path(previous.get("root", "")).resolve() != plan.root.resolve():
        raise ReproduceError(
            f"{plan.out} holds a reproduction of {previous.get('root')}; choose another --out"
        )
    # A setting the earlier plan lacks came with a newer fedspine; it only adds arms. The number
    # of seeds only adds or leaves out replicate folders: replicate 0 is the same run either way.
    before = previous.get("budget", {})
    changed = sorted(
        k
        for k, v in current["budget"].items()
        if k in before and before[k] != v and k not in ("ingest_workers", "threads", "seeds")
    )
    if changed:
        raise ReproduceError(
            f"{plan.out} was made with budget {previous['budget'].get('name')} and other "
            f"settings ({', '.join(changed)}); rerun with the same budget or choose another --out"
        )


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(_plain(data), indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    """torch threads for every stage; `fedspine train` keeps them when OMP_NUM_THREADS is set."""
    import torch

    before_threads = torch.get_num_threads()
    before_env = os.environ.get("OMP_NUM_THREADS")
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        if before_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_env


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
