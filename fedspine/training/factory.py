"""Every trainer variant as data, and the one factory that builds it for both modes.

A variant is a :class:`TrainerSpec`: how D is updated (one of the D-step specs below) and the
G loss terms beside the adversarial one (SpineGAN's clinical loss, or none). The centralised
run, its DP and ablation bookkeeping, the federated site and the canary audit all build their
trainer through :func:`build_trainer`, so a variant is composed in one place and nowhere else.

Adding a D-step scheme: write its :class:`~fedspine.training.gan_trainer.DStep` subclass
(its constructor takes its spec), add the spec dataclass here and one line to ``_D_STEPS``,
and test it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedspine.training.clinical import ClinicalLoss, ClinicalTerm
from fedspine.training.config import TrainConfig
from fedspine.training.dp import DPConfig
from fedspine.training.dp_ablation import (
    PAPER_CLIP_NORM,
    PAPER_NOISE_STD,
    AblationDStep,
    PaperDStep,
)
from fedspine.training.dp_trainer import DPSGDStep
from fedspine.training.gan_trainer import GanTrainer
from fedspine.training.parts import DStep, GLoss


@dataclass(frozen=True)
class NonPrivate:
    """The plain StyleGAN2-ADA D step: uniform minibatches, lazy R1, adaptive ADA."""


@dataclass(frozen=True)
class DPSGD:
    """Patient-level DP-SGD on D at the planned σ and q; ``patient_ids`` holds the privacy
    unit of every training image, in the order of the images ``train_step`` receives."""

    dp: DPConfig
    noise_multiplier: float
    sample_rate: float
    patient_ids: Sequence[str] | np.ndarray = field(compare=False, repr=False)


@dataclass(frozen=True)
class Ablation:
    """DP-SGD with one imposition removed (``scheme`` clip-only or noise-only); not private."""

    scheme: str
    dp: DPConfig
    noise_multiplier: float
    sample_rate: float
    patient_ids: Sequence[str] | np.ndarray = field(compare=False, repr=False)


@dataclass(frozen=True)
class PaperScheme:
    """The paper's "DP": noise then whole-model clip on every G and D step, batch 1."""

    noise_std: float = PAPER_NOISE_STD
    clip_norm: float = PAPER_CLIP_NORM


DStepSpec = NonPrivate | DPSGD | Ablation | PaperScheme

_D_STEPS: dict[type, Callable[[Any], DStep]] = {
    NonPrivate: lambda s: DStep(),
    DPSGD: lambda s: DPSGDStep(s.dp, s.patient_ids, s.noise_multiplier, s.sample_rate),
    Ablation: lambda s: AblationDStep(
        s.scheme, s.dp, s.patient_ids, s.noise_multiplier, s.sample_rate
    ),
    PaperScheme: lambda s: PaperDStep(s.noise_std, s.clip_norm),
}


@dataclass(frozen=True)
class TrainerSpec:
    """One trainer variant: its D step and, for SpineGAN, the frozen clinical loss."""

    d_step: DStepSpec = field(default_factory=NonPrivate)
    clinical: ClinicalLoss | None = None

    @property
    def model(self) -> str:
        return "cgan" if self.clinical is None else "spinegan"


def build_trainer(
    spec: TrainerSpec,
    config: TrainConfig,
    label_prior: np.ndarray | Sequence[float],
    device: str | torch.device | None = None,
    state: dict | None = None,
) -> GanTrainer:
    """The trainer ``spec`` describes, fresh, or resumed from ``state`` (checked by its parts:
    a state of another variant, classifier or σ is refused)."""
    try:
        make_part = _D_STEPS[type(spec.d_step)]
    except KeyError:
        raise TypeError(f"no D step is registered for {spec.d_step!r}") from None
    g_losses: list[GLoss] = [ClinicalTerm(spec.clinical)] if spec.clinical is not None else []
    trainer = GanTrainer(
        config, label_prior, device, d_step=make_part(spec.d_step), g_losses=g_losses
    )
    if state is not None:
        trainer.load_state_dict(state)
    return trainer


def rebuild_trainer(
    spec: TrainerSpec, state: dict, device: str | torch.device | None = None
) -> GanTrainer:
    """A trainer rebuilt from a saved state, with the state's own config and label prior."""
    config = TrainConfig.from_dict(state["config"])
    return build_trainer(spec, config, state["label_prior"].numpy(), device, state)
