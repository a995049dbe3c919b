"""The sizes of a reproduction: one typed row per budget (smoke, quick, full) and its checks.

A budget is written into ``reproduce_plan.json`` and ``reproduce.json``, so every number in the
table can be traced to the sizes that made it; a rerun into the same folder must use the same
budget (``fedspine.experiments.reproduce.check_previous``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedspine.dp_options import TRAINABLE_HEAD, trainable_d_problem


class ReproduceError(Exception):
    """The reproduction cannot start or a stage failed; the message says where and why."""


@dataclass(frozen=True)
class ReproduceBudget:
    """Every size of a reproduction; one row of :data:`BUDGETS`, written into the report.

    ``lesion_kimg`` / ``spinegan_kimg`` None leave that arm out; an empty ``dp_epsilons`` leaves
    the DP arms out. ``dp_ablation`` adds the clip-only and noise-only arms (``dp_kimg`` long, the
    noise of the ``ablation_noise_epsilon`` arm); ``paper_dp_kimg`` None leaves out the paper's
    own scheme (batch 1, so a kimg costs a thousand steps). ``gan_batch`` None keeps the preset's
    batch; ``classifier_input_size`` None uses the prepared resolution. ``max_metric_images``
    caps each image set of FID and friends. ``seeds`` replicates every arm with training seeds
    ``seed``, ``seed + 1``, ...: the test-set intervals do not show how much a result moves from
    one training run to the next.

    ``embedding_steps`` and ``dp_public_trainable_d`` size the arms planned only with a public
    checkpoint (``--public-run``): the DP mean-embedding route's generator fit (Adam steps, no
    ε) and which of D's parameters the DP-SGD run from the public checkpoint trains and
    privatises (``DPRequest.trainable_d``).
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
    # The arms of a public checkpoint (issue 15): the mean-embedding fit's Adam steps and the
    # part of D that DP-SGD from the checkpoint trains and privatises.
    embedding_steps: int = 600
    dp_public_trainable_d: str = TRAINABLE_HEAD
    ingest_workers: int = 2
    # One torch thread: on a shared 2-core machine two threads made a 32 px GAN step 3.4x
    # slower in wall time and CPU time (OpenMP threads wait on each other); 0 = all cores.
    threads: int = 1
    seed: int = 0
    seeds: int = 1
    device: str = "auto"

    @property
    def training_seeds(self) -> tuple[int, ...]:
        """The training seed of each replicate, replicate 0 first."""
        return tuple(self.seed + r for r in range(self.seeds))

    @property
    def left_out(self) -> str:
        """The reason of an arm this budget leaves out."""
        return f"not run: left out of the {self.name} budget"

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
        kimgs = (self.kimg, self.dp_kimg, self.lesion_kimg, self.spinegan_kimg, self.paper_dp_kimg)
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
                f"{fmt_setting(self.dp_epsilons)}; add it or change ablation_noise_epsilon"
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
            "embedding_steps": self.embedding_steps,
        }
        for name, value in positive.items():
            if value < 1:
                raise ReproduceError(f"budget {self.name}: {name} must be at least 1")
        problem = trainable_d_problem(self.dp_public_trainable_d)
        if problem:
            raise ReproduceError(f"budget {self.name}: dp_public_{problem}")
        if self.threads < 0:
            raise ReproduceError(f"budget {self.name}: threads must be 0 (all cores) or more")

    def to_json(self) -> dict[str, Any]:
        """The budget as ``reproduce.json`` and the plan file hold it (ε as a list)."""
        values = dataclasses.asdict(self)
        values["dp_epsilons"] = list(self.dp_epsilons)
        return values

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ReproduceBudget:
        """The budget :meth:`to_json` wrote."""
        return cls(**{**values, "dp_epsilons": tuple(values.get("dp_epsilons", ()))})


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
            embedding_steps=300,
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
            embedding_steps=600,
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
            embedding_steps=2000,
            ingest_workers=8,
            threads=0,
            seeds=3,
        ),
    )
}


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


def fmt_setting(value: Any) -> str:
    """A budget setting as the plan and the report print it: lists joined, None as a dash."""
    if isinstance(value, list | tuple):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return "—" if value is None else str(value)
