"""The DP-SGD D step of the GAN trainer: the same G step, a patient-level private D update.

The non-private trainer draws uniform minibatches; under :class:`DPSGDStep` the discriminator
sees Poisson samples of *patients* (:class:`~fedspine.training.dp.PatientPoissonSampler`), every
D update goes through :class:`~fedspine.training.dp.DPDiscriminatorStep`, and nothing computed on
real images outside that step reaches the generator, the logs or ADA (whose p is fixed). G,
G_ema and sampling are post-processing of the privatised discriminator updates.

The Gaussian noise and the Poisson draws of patients come from generators seeded with fresh OS
entropy at every construction, never from the run's seed: the seed is written next to every
output, and noise that anyone holding it could replay would protect nothing. A DP run is
therefore not bit-reproducible from its seed (a non-private run still is).
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedspine.training.config import TrainConfig
from fedspine.training.dp import (
    TRAINABLE_ALL,
    DPConfig,
    DPDiscriminatorStep,
    PatientPoissonSampler,
    flatten_units,
    mechanism,
)
from fedspine.training.gan_trainer import GanTrainer
from fedspine.training.parts import DStep


def dp_train_config(config: TrainConfig, dp: DPConfig) -> TrainConfig:
    """The TrainConfig a DP run must use: no minibatch-std, ADA p fixed at ``dp.ada_p``, and
    with part of D frozen, G trains its mapping only.

    Why the last: measured on phantom sites (README), a fully trainable G fine-tuned against a
    D whose body is frozen walks into that body's blind spots within 2 kimg, without noise as
    with it, and draws the same blob for every z (its loss falls to 0.01). Trained through its
    mapping alone, G can move each class within the public checkpoint's images only."""
    network = replace(config.network, mbstd_group=0)
    augment = config.augment
    if augment.preset != "none":
        augment = replace(augment, fixed_p=float(dp.ada_p))
    g_trainable = config.g_trainable if dp.trainable_d == TRAINABLE_ALL else "mapping"
    return replace(config, network=network, augment=augment, g_trainable=g_trainable)


def planned_d_steps(config: TrainConfig, dp: DPConfig, kimg: float) -> int:
    """DP discriminator steps a run of ``kimg`` takes (one G step per ``config.batch`` images)."""
    return int(math.ceil(kimg * 1000 / config.batch)) * dp.d_steps_per_g


def check_resume(dp_state: dict, dp: DPConfig) -> None:
    """Refuse to go on from a saved DP state (``DPSGDStep.state_dict()["dp"]``) that trained
    another part of D (``trainable_d``) or averaged another number of augmented views
    (``augment_views``) than ``dp`` asks: the run's records (config.toml, privacy.json) would
    describe a run that never happened. A state saved before these were recorded trained all of
    D with one view."""
    saved_d = dp_state.get("trainable_d", TRAINABLE_ALL)
    if saved_d != dp.trainable_d:
        raise ValueError(
            f"the saved run trained trainable_d={saved_d!r} of D, this one asks for "
            f"{dp.trainable_d!r}; resume with the same value (--dp-trainable-d {saved_d}) or "
            "start a new run"
        )
    saved_views = int(dp_state.get("augment_views", 1))
    if saved_views != dp.augment_views:
        raise ValueError(
            f"the saved run averaged augment_views={saved_views} augmented view(s) per image, "
            f"this one asks for {dp.augment_views}; resume with the same value "
            f"(--dp-augment-views {saved_views}) or start a new run"
        )


class DPSGDStep(DStep):
    """Patient-level DP-SGD on D, ``dp.d_steps_per_g`` private updates per G step.

    ``train_step`` receives the whole training set (images and labels, one id of
    ``patient_ids`` per image) rather than a minibatch: this step Poisson-samples patients from
    it itself, so the batch size the rest of the trainer sees (G, EMA, counters) is the public
    ``config.batch``. Every D optimizer step is one accountant step (``dp_step.steps_taken``).
    """

    lazy_r1 = False  # R1 lives inside every DP step: D's Adam takes no lazy correction.

    def __init__(
        self,
        dp: DPConfig,
        patient_ids: np.ndarray | Sequence[str],
        noise_multiplier: float,
        sample_rate: float,
    ) -> None:
        self.dp = dp
        self.patient_ids = np.asarray(patient_ids)
        self.sample_rate = float(sample_rate)
        self.num_train_images = len(patient_ids)
        self._sigma = float(noise_multiplier)

    def check(self, config: TrainConfig) -> None:
        if config.network.mbstd_group != 0:
            raise ValueError(
                "DP training needs a discriminator without minibatch-std (it mixes patients); "
                "build the config with dp_train_config()"
            )
        if config.augment.preset != "none" and config.augment.fixed_p != self.dp.ada_p:
            raise ValueError(
                "under DP the augmentation probability is fixed (adaptive ADA reads D(real)); "
                "build the config with dp_train_config()"
            )

    def attach(self, trainer: GanTrainer) -> None:
        self.noise_gen = torch.Generator(device=trainer.device).manual_seed(secrets.randbits(63))
        self.sampler = PatientPoissonSampler(
            self.patient_ids, self.sample_rate, np.random.default_rng(secrets.randbits(128))
        )
        self.dp_step = self.make_step(trainer)

    step_class: type[DPDiscriminatorStep] = DPDiscriminatorStep
    """The update of D this part drives (an ablation names its own, with :meth:`step_options`)."""

    def step_options(self) -> dict[str, Any]:
        """Keyword arguments ``step_class`` takes beyond the DP step's own."""
        return {}

    def make_step(self, trainer: GanTrainer) -> DPDiscriminatorStep:
        """The update of D, on the trainer's networks, optimizer, pipe and generators."""
        return self.step_class(
            trainer.D,
            trainer.opt_D,
            trainer.augment_pipe,
            self.dp,
            trainer.config.r1_gamma,
            trainer.label_prior,
            functools.partial(fakes_from_g, trainer),
            noise_multiplier=self._sigma,
            generator=trainer.latent_gen,
            noise_generator=self.noise_gen,
            **self.step_options(),
        )

    @property
    def noise_multiplier(self) -> float:
        return self.dp_step.noise_multiplier

    def mechanism(self):
        """The ledger entry for every DP step this trainer has taken."""
        return mechanism(self.noise_multiplier, self.sample_rate, self.dp_step.steps_taken)

    def batch_size(self, trainer: GanTrainer, real_images: torch.Tensor) -> int:
        if real_images.shape[0] != self.num_train_images:
            raise ValueError(
                "a DP trainer's train_step takes the whole training set (one patient id per image)"
            )
        return trainer.config.batch

    def step(
        self, trainer: GanTrainer, real_images: torch.Tensor, real_labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``d_steps_per_g`` private D updates on Poisson-sampled patients; nothing is logged."""
        for _ in range(self.dp.d_steps_per_g):
            index, unit_index = flatten_units(self.sampler())
            idx = torch.from_numpy(index)
            self.dp_step.step(real_images[idx], real_labels[idx], unit_index)
            trainer.d_steps += 1
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "dp": {
                "step": self.dp_step.state_dict(),
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
                "trainable_d": self.dp.trainable_d,
                "augment_views": int(self.dp.augment_views),
            }
        }

    def check_state(self, state: dict) -> None:
        """Before anything is loaded: a DP state, of the same ``trainable_d`` and
        ``augment_views`` (:func:`check_resume`) and the same σ."""
        dp_state = state.get("dp")
        if dp_state is None:
            raise ValueError("the saved state is not from a DP run; it cannot resume one")
        check_resume(dp_state, self.dp)
        if abs(float(dp_state["noise_multiplier"]) - self.noise_multiplier) > 1e-12:
            raise ValueError(
                f"the saved run used σ={dp_state['noise_multiplier']}, "
                f"this one σ={self.noise_multiplier}"
            )

    def load_state_dict(self, state: dict) -> None:
        """After :meth:`check_state` accepted ``state`` (the trainer calls it first)."""
        self.dp_step.load_state_dict(state["dp"]["step"])


def fakes_from_g(trainer: GanTrainer, n: int, labels: torch.Tensor) -> torch.Tensor:
    """Fakes from G alone (no private data), for the pairs inside the DP step."""
    z = torch.randn([n, trainer.config.network.z_dim], generator=trainer.latent_gen)
    z = z.to(trainer.device)
    with torch.no_grad():
        ws = trainer._mapping(trainer.G, z, labels.to(trainer.device), update_w_avg=False)
        return trainer.G.synthesis(ws, noise_mode="random").float()
