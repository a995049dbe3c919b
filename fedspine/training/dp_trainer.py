"""GanTrainer with a differentially private discriminator: the same G step, a DP-SGD D step.

The non-private trainer draws uniform minibatches; here the discriminator sees Poisson samples of
*patients* (:class:`~fedspine.training.dp.PatientPoissonSampler`), every D update goes through
:class:`~fedspine.training.dp.DPDiscriminatorStep`, and nothing computed on real images outside
that step reaches the generator, the logs or ADA (whose p is fixed). G, G_ema and sampling are
post-processing of the privatised discriminator updates.

The Gaussian noise and the Poisson draws of patients come from generators seeded with fresh OS
entropy at every construction, never from the run's seed: the seed is written next to every
output, and noise that anyone holding it could replay would protect nothing. A DP run is
therefore not bit-reproducible from its seed (a non-private run still is).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np
import torch

from fedspine.training.config import TrainConfig
from fedspine.training.dp import (
    DPConfig,
    DPDiscriminatorStep,
    PatientPoissonSampler,
    flatten_units,
    mechanism,
)
from fedspine.training.gan_trainer import GanTrainer, StepMetrics


def dp_train_config(config: TrainConfig, dp: DPConfig) -> TrainConfig:
    """The TrainConfig a DP run must use: no minibatch-std, ADA p fixed at ``dp.ada_p``."""
    from dataclasses import replace

    network = replace(config.network, mbstd_group=0)
    augment = config.augment
    if augment.preset != "none":
        augment = replace(augment, fixed_p=float(dp.ada_p))
    return replace(config, network=network, augment=augment)


def planned_d_steps(config: TrainConfig, dp: DPConfig, kimg: float) -> int:
    """DP discriminator steps a run of ``kimg`` takes (one G step per ``config.batch`` images)."""
    return int(math.ceil(kimg * 1000 / config.batch)) * dp.d_steps_per_g


class DPGanTrainer(GanTrainer):
    """A :class:`GanTrainer` whose D step is patient-level DP-SGD.

    ``train_step`` receives the whole training set (images and labels) rather than a minibatch:
    it Poisson-samples patients from it itself, ``dp.d_steps_per_g`` times per G step, so the
    batch size the rest of the trainer sees (EMA, counters) is the public ``config.batch``.
    """

    def __init__(
        self,
        config: TrainConfig,
        dp: DPConfig,
        label_prior: np.ndarray | Sequence[float],
        patient_ids: np.ndarray | Sequence[str],
        noise_multiplier: float,
        sample_rate: float,
        device: str | torch.device | None = None,
    ) -> None:
        if config.network.mbstd_group != 0:
            raise ValueError(
                "DP training needs a discriminator without minibatch-std (it mixes patients); "
                "build the config with dp_train_config()"
            )
        if config.augment.preset != "none" and config.augment.fixed_p != dp.ada_p:
            raise ValueError(
                "under DP the augmentation probability is fixed (adaptive ADA reads D(real)); "
                "build the config with dp_train_config()"
            )
        super().__init__(config, label_prior, device)
        # R1 lives inside every DP step, so D's Adam takes no lazy-regularisation correction.
        self.opt_D = torch.optim.Adam(
            self.D.parameters(), lr=config.d_lr, betas=config.d_betas, eps=config.adam_eps
        )
        self.dp = dp
        self.sample_rate = float(sample_rate)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(secrets.randbits(63))
        self.sampler = PatientPoissonSampler(
            np.asarray(patient_ids),
            self.sample_rate,
            np.random.default_rng(secrets.randbits(128)),
        )
        self.num_train_images = len(patient_ids)
        self.dp_step = DPDiscriminatorStep(
            self.D,
            self.opt_D,
            self.augment_pipe,
            dp,
            config.r1_gamma,
            self.label_prior,
            self._make_fakes,
            noise_multiplier=noise_multiplier,
            generator=self.latent_gen,
            noise_generator=self.noise_gen,
        )

    @property
    def noise_multiplier(self) -> float:
        return self.dp_step.noise_multiplier

    def mechanism(self):
        """The ledger entry for every DP step this trainer has taken."""
        return mechanism(self.noise_multiplier, self.sample_rate, self.dp_step.steps_taken)

    def train_step(self, real_images: torch.Tensor, real_labels: torch.Tensor) -> StepMetrics:
        """One G step and ``d_steps_per_g`` DP D steps; the arguments are the whole train set."""
        if real_images.shape[0] != self.num_train_images:
            raise ValueError(
                "DPGanTrainer.train_step takes the whole training set (one patient id per image)"
            )
        batch = self.config.batch
        g = self.g_step(batch)
        for _ in range(self.dp.d_steps_per_g):
            index, unit_index = flatten_units(self.sampler())
            idx = torch.from_numpy(index)
            self.dp_step.step(real_images[idx], real_labels[idx], unit_index)
            self.d_steps += 1
        self.update_ema(batch)
        self.cur_nimg += batch
        return StepMetrics(
            loss_g=g["loss_g"],
            loss_d=None,
            d_real=None,
            d_fake=None,
            d_real_sign=None,
            loss_pl=g.get("loss_pl"),
            pl_length=g.get("pl_length"),
            ada_p=self.ada_p,
            batch=batch,
        )

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["dp"] = {
            "step": self.dp_step.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        dp_state = state.get("dp")
        if dp_state is None:
            raise ValueError("the saved state is not from a DP run; it cannot resume one")
        if abs(float(dp_state["noise_multiplier"]) - self.noise_multiplier) > 1e-12:
            raise ValueError(
                f"the saved run used σ={dp_state['noise_multiplier']}, this one σ={self.noise_multiplier}"
            )
        self.dp_step.load_state_dict(dp_state["step"])

    def _make_fakes(self, n: int, labels: torch.Tensor) -> torch.Tensor:
        """Fakes from G alone (no private data), for the pairs inside the DP step."""
        z = torch.randn([n, self.config.network.z_dim], generator=self.latent_gen).to(self.device)
        with torch.no_grad():
            ws = self._mapping(self.G, z, labels.to(self.device), update_w_avg=False)
            return self.G.synthesis(ws, noise_mode="random").float()
