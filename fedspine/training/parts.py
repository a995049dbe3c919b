"""The parts a :class:`~fedspine.training.gan_trainer.GanTrainer` is composed of.

A variant of the trainer is not a subclass: it is the one trainer given a D-step strategy
(:class:`DStep`; this module's is the plain non-private one) and a list of G loss terms
(:class:`GLoss`). The DP-SGD step lives in :mod:`fedspine.training.dp_trainer`, the ablation
schemes in :mod:`fedspine.training.dp_ablation`, SpineGAN's clinical term in
:mod:`fedspine.training.clinical`; :mod:`fedspine.training.factory` builds them from a spec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedspine.training import losses
from fedspine.training.config import TrainConfig

if TYPE_CHECKING:
    from fedspine.training.gan_trainer import GanTrainer


class DStep:
    """The plain (non-private) D step, and the interface every D-step strategy fills.

    A strategy decides what ``train_step`` is given (:meth:`batch_size`), how D is updated
    (:meth:`step`) and how every optimizer step of G and D is taken (:meth:`optimise`: the
    paper's ablation hooks its noise-then-clip in there). It carries its own pieces of the
    trainer's state: :meth:`state_dict` returns top-level entries merged into it,
    :meth:`check_state` refuses a saved state of another variant before anything is restored,
    :meth:`load_state_dict` restores its pieces after the trainer's own.
    """

    lazy_r1 = True
    """R1 as an extra step every ``r1_interval`` D steps (D's Adam takes the lazy correction);
    False where R1 lives inside every D step (DP-SGD)."""

    def check(self, config: TrainConfig) -> None:
        """Refuse a config this strategy cannot train, before anything is built."""

    def attach(self, trainer: GanTrainer) -> None:
        """Build what the strategy needs from the trainer's networks and optimizers."""

    def batch_size(self, trainer: GanTrainer, real_images: torch.Tensor) -> int:
        """Images this iteration counts (for G, EMA and the counters)."""
        return int(real_images.shape[0])

    def step(
        self, trainer: GanTrainer, real_images: torch.Tensor, real_labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """D update on a real minibatch and as many fakes; lazy R1 when due.

        Fake labels come from the label prior; every image D sees goes through the augmentation.
        ADA's controller reads sign(D(real)) from this step only.
        """
        t, cfg = trainer, trainer.config
        real = real_images.to(t.device, torch.float32)
        labels = real_labels.to(t.device, torch.int64)
        batch = int(real.shape[0])
        t.G.requires_grad_(False)
        t.D.requires_grad_(True)
        out: dict[str, torch.Tensor] = {}
        z, c_fake = t.sample_latents(batch)
        real_c = t._onehot(labels)
        with torch.no_grad(), t._autocast():
            fake = t.G.synthesis(
                t._mapping(t.G, z, c_fake, update_w_avg=False), noise_mode="random"
            )
        with t._autocast():
            fake_logits = t.D(t._augment(fake.float()), t._onehot(c_fake))
            real_logits = t.D(t._augment(real), real_c)
        loss = losses.d_logistic(real_logits.float(), fake_logits.float()).mean()
        t._optimise(t.opt_D, t.scaler_D, loss)
        real_logits = real_logits.detach().float()
        if t.ada is not None:
            t.ada.accumulate(real_logits)
        out["loss_d"] = loss.detach()
        out["d_real"] = real_logits.mean()
        out["d_fake"] = fake_logits.detach().float().mean()
        out["d_real_sign"] = real_logits.sign().mean()

        if cfg.r1_gamma > 0 and cfg.r1_interval > 0 and t.d_steps % cfg.r1_interval == 0:
            penalty, _ = losses.r1_penalty(t.D, real, real_c, augment=t._augment)
            loss_r1 = penalty.mean() * (cfg.r1_gamma / 2)
            t._optimise(t.opt_D, None, loss_r1 * cfg.r1_interval)
            out["loss_r1"] = loss_r1.detach()
            out["r1_penalty"] = penalty.detach().mean()
        t.D.requires_grad_(False)
        t.d_steps += 1
        return out

    def optimise(
        self, trainer: GanTrainer, opt: torch.optim.Optimizer, scaler, loss: torch.Tensor
    ) -> None:
        """One optimizer step of G or D on ``loss`` (through the fp16 scaler when it is on).

        The trainer replaces NaN/inf gradients just before ``opt`` steps (a step pre-hook).
        Under fp16 the scaler unscales first, and a step whose gradients overflowed is counted
        here and then skipped by the scaler (which lowers its scale), as GradScaler does.
        """
        opt.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            trainer.sanitise_gradients(opt)  # counts an overflow the scaler will skip
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def check_state(self, state: dict) -> None:
        """The plain step resumes any state (a DP run's included, as before)."""

    def load_state_dict(self, state: dict) -> None:
        pass


class GLoss:
    """A term added to the adversarial loss of every G step (SpineGAN's clinical loss).

    :meth:`g_loss` gets the step's fakes and their classes inside the step's autocast and
    returns the loss to add and detached values to log with the step's metrics. The state
    hooks work as :class:`DStep`'s; :meth:`check_state` runs first of all.
    """

    def attach(self, trainer: GanTrainer) -> None:
        """Check the term fits the trainer's networks and move it to its device."""

    def g_loss(
        self, fake: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def check_state(self, state: dict) -> None:
        pass

    def load_state_dict(self, state: dict) -> None:
        pass
