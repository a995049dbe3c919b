"""GanTrainer: one conditional StyleGAN2-ADA training state and the step that advances it.

The same object serves ``fedspine train`` and the federated client: it holds G, D, G_ema, their
optimizers, the ADA pipeline and its controller, the counters and every random generator the
step draws from, and ``state_dict()`` captures all of it so a run resumes exactly. Data loading,
devices of the data, logging and snapshots stay with the caller; :meth:`GanTrainer.train_step`
only computes.

One iteration is a G step (plus lazy path-length regularisation every ``pl_interval`` G steps)
and a D update, then the G_ema update and ADA's p update. Every variant (cGAN, SpineGAN, DP-SGD,
the DP ablation schemes) is this one class composed from parts, in the spirit of StyleGAN2-ADA's
phases: a :class:`~fedspine.training.parts.DStep` strategy (how D is updated and how every
optimizer step is taken; the default is the plain non-private one, with lazy R1 every
``r1_interval`` D steps) and a list of :class:`~fedspine.training.parts.GLoss` terms added to the
adversarial loss of every G step. Each part carries its own pieces of ``state_dict()`` and its
own refusals on load. :mod:`fedspine.training.factory` builds the parts from a
:class:`~fedspine.training.factory.TrainerSpec`. Fake labels always come from ``label_prior``,
never from the real batch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedspine.models import Discriminator, Generator, NetworkConfig
from fedspine.models.augment import AdaptiveP, AugmentPipe
from fedspine.models.precision import reduced_precision
from fedspine.training import losses
from fedspine.training.config import TrainConfig
from fedspine.training.modconv_choice import choose_modconv_path
from fedspine.training.parts import DStep, GLoss
from fedspine.training.precision import resolve_precision

TickCallback = Callable[["GanTrainer", dict], bool | None]


@dataclass
class StepMetrics:
    """Detached scalar tensors of one iteration (no device sync until read).

    D's losses and logits are None under DP: they are computed on private images outside the
    DP step, so they are not reported at all.
    """

    loss_g: torch.Tensor
    loss_d: torch.Tensor | None
    d_real: torch.Tensor | None
    d_fake: torch.Tensor | None
    d_real_sign: torch.Tensor | None
    loss_r1: torch.Tensor | None = None
    r1_penalty: torch.Tensor | None = None
    loss_pl: torch.Tensor | None = None
    pl_length: torch.Tensor | None = None
    ada_p: float = 0.0
    ada_rt: float | None = None
    batch: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """What the G loss terms log (SpineGAN: ``loss_clinical``, ``clinical_bce``), by name."""

    def __getattr__(self, name: str) -> torch.Tensor:
        extra = self.__dict__.get("extra") or {}
        if name in extra:
            return extra[name]
        raise AttributeError(f"StepMetrics has no {name!r}")

    def values(self) -> Iterator[tuple[str, Any]]:
        """(name, value) of every metric: the fields in order, then the terms' extras."""
        for f in fields(self):
            if f.name != "extra":
                yield f.name, getattr(self, f.name)
        yield from self.extra.items()

    def as_floats(self) -> dict[str, float | None]:
        return {k: float(v) if v is not None else None for k, v in self.values()}


class GanTrainer:
    """Conditional StyleGAN2-ADA: networks, optimizers, ADA, counters, RNGs and the step.

    ``d_step`` is the D-step strategy (default: the plain non-private :class:`DStep`);
    ``g_losses`` are the terms added to the adversarial loss of every G step. Build variants
    with :func:`fedspine.training.factory.build_trainer`. A name the trainer itself lacks is
    read from its parts, D step first (``trainer.dp_step``, ``trainer.sampler``,
    ``trainer.clinical``...), so callers need not know which part holds it.
    """

    def __init__(
        self,
        config: TrainConfig,
        label_prior: np.ndarray | Sequence[float],
        device: str | torch.device | None = None,
        *,
        d_step: DStep | None = None,
        g_losses: Sequence[GLoss] = (),
    ) -> None:
        self.d_strategy = d_step if d_step is not None else DStep()
        self.g_losses = list(g_losses)
        self._parts = (self.d_strategy, *self.g_losses)
        self.d_strategy.check(config)
        self.config = config
        net: NetworkConfig = config.network
        self.device = resolve_device(device if device is not None else config.device)
        prior = np.asarray(label_prior, dtype=np.float64)
        if prior.shape != (net.c_dim,) or (prior < 0).any() or prior.sum() <= 0:
            raise ValueError(
                f"label_prior must be {net.c_dim} non-negative weights, got {prior.tolist()}"
            )
        self.label_prior = torch.from_numpy(prior / prior.sum())

        seeds = np.random.SeedSequence(config.seed).generate_state(3)
        # The global torch RNG drives network initialisation and G's per-layer noise; seeding it
        # here makes a run reproducible from its seed, and state_dict() saves it for resume.
        torch.manual_seed(int(seeds[0]))
        self.latent_gen = torch.Generator().manual_seed(int(seeds[1]))
        self.np_rng = np.random.default_rng(int(seeds[2]))

        self.G = Generator(net).to(self.device).train()
        self.D = Discriminator(net).to(self.device).train()
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)

        g_lr, g_betas = lazy_adam(
            config.g_lr, config.g_betas, config.pl_interval if config.pl_weight > 0 else None
        )
        lazy_r1 = config.r1_gamma > 0 and self.d_strategy.lazy_r1
        d_lr, d_betas = lazy_adam(
            config.d_lr, config.d_betas, config.r1_interval if lazy_r1 else None
        )
        self._g_trained = trained_g_parameters(self.G, config.g_trainable)
        self.opt_G = torch.optim.Adam(self._g_trained, lr=g_lr, betas=g_betas, eps=config.adam_eps)
        self.opt_D = torch.optim.Adam(
            self.D.parameters(), lr=d_lr, betas=d_betas, eps=config.adam_eps
        )
        # Every optimizer step of G and D, whoever takes it (the D-step strategy, an ablation's
        # hook, Opacus' DPOptimizer around opt_D), first replaces NaN/inf in the gradients.
        self._nonfinite_steps = torch.zeros([], dtype=torch.int64, device=self.device)
        for opt in (self.opt_G, self.opt_D):
            opt.register_step_pre_hook(self._before_optimizer_step)

        self.augment_pipe: AugmentPipe | None = None
        self.ada: AdaptiveP | None = None
        if config.augment.preset != "none":
            self.augment_pipe = AugmentPipe(config.augment).to(self.device)
            if config.augment.fixed_p is None:
                self.ada = AdaptiveP(self.augment_pipe, config.augment, config.batch)

        self.precision = resolve_precision(config.mixed_precision, self.device)
        fp16 = self.amp_dtype == torch.float16
        self.scaler_G = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_D = torch.amp.GradScaler(self.device.type, enabled=fp16)

        self.modconv_choice = choose_modconv_path(
            net.fused_modconv, self.G, self.device, config.batch, autocast=self._autocast
        )
        net.fused_modconv = self.modconv_choice.fused
        self.G.use_fused_modconv(net.fused_modconv)
        self.G_ema.use_fused_modconv(net.fused_modconv)

        self.pl_mean = torch.zeros([], device=self.device)
        self.cur_nimg = 0
        self.cur_tick = 0
        self.tick_start_nimg = 0
        self.g_steps = 0
        self.d_steps = 0
        for part in self._parts:
            part.attach(self)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the trainer lacks; __dict__ is read directly so that copies
        # and half-built trainers do not recurse.
        for part in self.__dict__.get("_parts", ()):
            try:
                return getattr(part, name)
            except AttributeError:
                continue
        raise AttributeError(f"{type(self).__name__} and its parts have no attribute {name!r}")

    # ----------------------------------------------------------------------------------------
    # The step.

    def train_step(self, real_images: torch.Tensor, real_labels: torch.Tensor) -> StepMetrics:
        """One iteration on real data: a minibatch (images [N, C, R, R] in [-1, 1], labels [N]
        int), or what the D step asks for (DP-SGD: the whole training set, which it samples)."""
        batch = self.d_strategy.batch_size(self, real_images)
        g = self.g_step(batch)
        d = self.d_strategy.step(self, real_images, real_labels)
        self.update_ema(batch)
        self.cur_nimg += batch
        ada_rt = self.ada.maybe_update() if self.ada is not None else None
        return StepMetrics(
            loss_g=g["loss_g"],
            loss_d=d.get("loss_d"),
            d_real=d.get("d_real"),
            d_fake=d.get("d_fake"),
            d_real_sign=d.get("d_real_sign"),
            loss_r1=d.get("loss_r1"),
            r1_penalty=d.get("r1_penalty"),
            loss_pl=g.get("loss_pl"),
            pl_length=g.get("pl_length"),
            ada_p=self.ada_p,
            ada_rt=None if ada_rt is None else float(ada_rt),
            batch=batch,
            extra={k: v for k, v in g.items() if k not in _G_STEP_KEYS},
        )

    def g_step(self, batch: int) -> dict[str, torch.Tensor]:
        """Generator update on ``batch`` fakes: the adversarial loss plus every G loss term in
        one backward pass; path-length regularisation when it is due."""
        cfg = self.config
        for p in self._g_trained:
            p.requires_grad_(True)
        self.D.requires_grad_(False)
        out: dict[str, torch.Tensor] = {}
        z, c = self.sample_latents(batch)
        with self._autocast():
            ws = self._mapping(self.G, z, c, update_w_avg=True)
            fake = self.G.synthesis(ws, noise_mode="random")
            logits = self.D(self._augment(fake), self._onehot(c))
            terms = [term.g_loss(fake, c) for term in self.g_losses]
        # Under autocast D's logits may be half precision; the loss is taken in float32.
        loss = losses.g_logistic_ns(logits.float()).mean()
        total = loss
        for extra, _ in terms:
            total = total + extra
        self._optimise(self.opt_G, self.scaler_G, total)
        out["loss_g"] = loss.detach()
        for _, logged in terms:
            out.update(logged)

        if cfg.pl_weight > 0 and cfg.pl_interval > 0 and self.g_steps % cfg.pl_interval == 0:
            pl_batch = max(batch // cfg.pl_batch_shrink, 1)
            z, c = self.sample_latents(pl_batch)
            ws = self._mapping(self.G, z, c, update_w_avg=False)
            fake = self.G.synthesis(ws, noise_mode="random")
            lengths = losses.path_length(fake, ws, generator=self.latent_gen)
            penalty, new_mean = losses.path_length_penalty(lengths, self.pl_mean, cfg.pl_decay)
            self.pl_mean.copy_(new_mean)
            loss_pl = penalty.mean() * cfg.pl_weight
            self._optimise(self.opt_G, None, loss_pl * cfg.pl_interval)
            out["loss_pl"] = loss_pl.detach()
            out["pl_length"] = lengths.detach().mean()
        self.G.requires_grad_(False)
        self.g_steps += 1
        return out

    @torch.no_grad()
    def update_ema(self, batch: int) -> float:
        """G_ema <- lerp(G, G_ema, beta) for parameters; buffers (w_avg, noise) are copied."""
        beta = ema_beta(batch, self.cur_nimg, self.config.ema_kimg, self.config.ema_rampup)
        ema_params = dict(self.G_ema.named_parameters())
        for name, p in self.G.named_parameters():
            ema_params[name].copy_(p.detach().lerp(ema_params[name], beta))
        ema_buffers = dict(self.G_ema.named_buffers())
        for name, b in self.G.named_buffers():
            ema_buffers[name].copy_(b)
        return beta

    def sample_latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z ~ N(0, I) and labels ~ label_prior, drawn from the trainer's own generator."""
        z = torch.randn([n, self.config.network.z_dim], generator=self.latent_gen)
        c = torch.multinomial(self.label_prior, n, replacement=True, generator=self.latent_gen)
        return z.to(self.device), c.to(self.device)

    # ----------------------------------------------------------------------------------------
    # The loop.

    def run(
        self,
        kimg: float,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        on_tick: TickCallback | None = None,
        tick_kimg: float | None = None,
        on_step: Callable[[GanTrainer, StepMetrics], None] | None = None,
    ) -> dict:
        """Train for ``kimg`` thousand real images; returns the metrics of the last tick.

        A tick ends every ``tick_kimg`` (default: the config's) and at the end; ``on_tick`` gets
        the tick's averaged metrics and may return True to stop early.
        """
        tick_nimg = max(int(round((tick_kimg or self.config.tick_kimg) * 1000)), 1)
        target = self.cur_nimg + int(round(kimg * 1000))
        acc = _TickAccumulator()
        tick_start_time = time.perf_counter()
        last: dict = {}
        while self.cur_nimg < target:
            images, labels = next(batches)
            metrics = self.train_step(images, labels)
            acc.add(metrics)
            if on_step is not None:
                on_step(self, metrics)
            if self.cur_nimg >= self.tick_start_nimg + tick_nimg or self.cur_nimg >= target:
                seconds = time.perf_counter() - tick_start_time
                last = self._tick_record(acc, seconds)
                self.cur_tick += 1
                self.tick_start_nimg = self.cur_nimg
                acc = _TickAccumulator()
                stop = on_tick(self, last) if on_tick is not None else None
                tick_start_time = time.perf_counter()
                if stop:
                    break
        return last

    # ----------------------------------------------------------------------------------------
    # State.

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the forward passes (None: float32)."""
        return self.precision.dtype

    @property
    def ada_p(self) -> float:
        return float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: tensors and plain Python types only."""
        rng = {
            "torch_cpu": torch.get_rng_state(),
            "latent": self.latent_gen.get_state(),
            "numpy": self.np_rng.bit_generator.state,
        }
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "config": self.config.to_dict(),
            "label_prior": self.label_prior.clone(),
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "scaler_G": self.scaler_G.state_dict(),
            "scaler_D": self.scaler_D.state_dict(),
            "augment_pipe": self.augment_pipe.state_dict()
            if self.augment_pipe is not None
            else None,
            "ada": self.ada.state_dict() if self.ada is not None else None,
            "pl_mean": self.pl_mean.detach().cpu().clone(),
            "counters": self.counters(),
            "rng": rng,
        }
        for part in self._parts:
            state.update(part.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the network settings must match this trainer's, and
        each part refuses a state of another variant (another classifier, another DP scheme)."""
        for part in (*self.g_losses, self.d_strategy):
            part.check_state(state)
        # The modulated-convolution path is how G computes, not what G is: a run resumed or a
        # federated round received on another device keeps this trainer's own choice.
        # So are the reduced-precision blocks (NetworkConfig.identity drops both).
        saved_net = NetworkConfig.identity(state["config"]["network"])
        mine = NetworkConfig.identity(self.config.to_dict()["network"])
        if saved_net != mine:
            diff = sorted(k for k in set(saved_net) | set(mine) if saved_net.get(k) != mine.get(k))
            raise ValueError(f"the saved state has different network settings: {diff}")
        self.label_prior = state["label_prior"].to(torch.float64).cpu().clone()
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        if state.get("scaler_G"):
            self.scaler_G.load_state_dict(state["scaler_G"])
        if state.get("scaler_D"):
            self.scaler_D.load_state_dict(state["scaler_D"])
        if self.augment_pipe is not None and state.get("augment_pipe") is not None:
            self.augment_pipe.load_state_dict(state["augment_pipe"])
        if self.ada is not None and state.get("ada") is not None:
            self.ada.load_state_dict(state["ada"])
        self.pl_mean.copy_(state["pl_mean"].to(self.device))
        counters = state["counters"]
        self.cur_nimg = int(counters["cur_nimg"])
        self.cur_tick = int(counters["cur_tick"])
        self.tick_start_nimg = int(counters["tick_start_nimg"])
        self.g_steps = int(counters["g_steps"])
        self.d_steps = int(counters["d_steps"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch_cpu"].cpu())
        self.latent_gen.set_state(rng["latent"].cpu())
        self.np_rng.bit_generator.state = rng["numpy"]
        if self.device.type == "cuda" and "torch_cuda" in rng:
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["torch_cuda"]])
        self.d_strategy.load_state_dict(state)
        for term in self.g_losses:
            term.load_state_dict(state)

    @classmethod
    def from_state_dict(cls, state: dict, device: str | torch.device | None = None) -> GanTrainer:
        """A cGAN trainer rebuilt from a saved state (its own config and prior), on ``device``;
        other variants: :func:`fedspine.training.factory.rebuild_trainer`."""
        config = TrainConfig.from_dict(state["config"])
        trainer = cls(config, state["label_prior"].numpy(), device=device)
        trainer.load_state_dict(state)
        return trainer

    def counters(self) -> dict[str, int]:
        return {
            "cur_nimg": self.cur_nimg,
            "cur_tick": self.cur_tick,
            "tick_start_nimg": self.tick_start_nimg,
            "g_steps": self.g_steps,
            "d_steps": self.d_steps,
        }

    # ----------------------------------------------------------------------------------------
    # Helpers.

    def _mapping(
        self, G: Generator, z: torch.Tensor, c: torch.Tensor, update_w_avg: bool
    ) -> torch.Tensor:
        """Mapping with style mixing: with probability ``style_mixing`` the layers from a random
        cutoff on take the styles of a second latent (same class)."""
        c1 = self._onehot(c)
        ws = G.mapping(z, c1, update_w_avg=update_w_avg)
        num_ws = ws.shape[1]
        prob = self.config.style_mixing
        if prob <= 0 or num_ws < 2:
            return ws
        cutoff = int(torch.randint(1, num_ws, [], generator=self.latent_gen))
        mix = float(torch.rand([], generator=self.latent_gen)) < prob
        if not mix:
            return ws
        z2 = torch.randn(z.shape, generator=self.latent_gen).to(z.device)
        ws2 = G.mapping(z2, c1, update_w_avg=False)
        return torch.cat([ws[:, :cutoff], ws2[:, cutoff:]], dim=1)

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        if self.augment_pipe is None:
            return images
        return self.augment_pipe(images)

    def _onehot(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels, self.config.network.c_dim).to(torch.float32)

    def _autocast(self):
        """The forward passes' precision: with a reduced dtype, only the networks' blocks at
        the highest resolutions compute in it (:mod:`fedspine.models.precision`); the mapping,
        styles, (de)modulation, D's epilogue and logits stay float32. No global autocast."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return reduced_precision(self.amp_dtype)

    def sanitise_gradients(self, opt: torch.optim.Optimizer) -> torch.Tensor:
        """Replace NaN by 0 and ±inf by ±1e5 in the gradients ``opt`` is about to apply
        (NVIDIA's loop does the same) and count the step when any was not finite; returns that
        flag as a 0-dim tensor (no device sync). Finite gradients are left bit for bit."""
        bad = sanitise_gradients_(p for group in opt.param_groups for p in group["params"])
        self._nonfinite_steps += bad
        return bad

    def _before_optimizer_step(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        self.sanitise_gradients(opt)

    def _optimise(self, opt: torch.optim.Optimizer, scaler, loss: torch.Tensor) -> None:
        self.d_strategy.optimise(self, opt, scaler, loss)

    def _tick_record(self, acc: _TickAccumulator, seconds: float) -> dict:
        nimg = acc.nimg
        record = {
            "tick": self.cur_tick,
            "kimg": self.cur_nimg / 1000,
            "cur_nimg": self.cur_nimg,
            "g_steps": self.g_steps,
            "d_steps": self.d_steps,
            "tick_seconds": seconds,
            "sec_per_kimg": seconds / (nimg / 1000) if nimg else None,
            "img_per_sec": nimg / seconds if seconds > 0 else None,
            "ada_p": self.ada_p,
            "pl_mean": float(self.pl_mean),
            # Optimizer steps of this tick whose gradients held a NaN or an inf (replaced
            # before the step; under fp16 the loss scaler also skipped them).
            "nonfinite_grads": int(self._nonfinite_steps),
        }
        self._nonfinite_steps.zero_()
        record.update(acc.means())
        return record


_G_STEP_KEYS = ("loss_g", "loss_pl", "pl_length")


NONFINITE_CLAMP = 1e5


def trained_g_parameters(G: Generator, which: str) -> list[torch.nn.Parameter]:
    """G's parameters its optimizer trains (``TrainConfig.g_trainable``); the others get no
    gradient and keep their starting weights. ``which`` is checked by TrainConfig."""
    return list((G.mapping if which == "mapping" else G).parameters())


def sanitise_gradients_(params) -> torch.Tensor:
    """In place: NaN -> 0, +inf -> 1e5, -inf -> -1e5 in the ``.grad`` of ``params``; returns
    a 0-dim bool tensor, True when any gradient held a non-finite value.

    On a GPU this never waits for the device (the check and the replacement are queued, as in
    NVIDIA's loop). On a CPU, where isfinite/max reductions cost about ten times a sum, the
    gradients' sums screen first (a NaN or inf anywhere makes its sum non-finite): when all
    are finite nothing else runs; otherwise the exact check and the replacement do.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros([], dtype=torch.bool)
    if grads[0].device.type == "cpu" and bool(
        torch.stack([g.sum() for g in grads]).isfinite().all()
    ):
        return torch.zeros([], dtype=torch.bool)
    bad = torch.stack([torch.isfinite(g).all() for g in grads]).logical_not().any()
    for g in grads:
        torch.nan_to_num(g, nan=0.0, posinf=NONFINITE_CLAMP, neginf=-NONFINITE_CLAMP, out=g)
    return bad


def ema_beta(batch: int, cur_nimg: int, ema_kimg: float, ema_rampup: float | None) -> float:
    """G_ema decay per step: 0.5 ** (batch / ema_nimg), ema_nimg = min(ema_kimg * 1000,
    cur_nimg * ema_rampup) while ramping up, so early G_ema follows G closely."""
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


def lazy_adam(
    lr: float, betas: tuple[float, float], interval: int | None
) -> tuple[float, tuple[float, float]]:
    """Adam settings for a network whose regulariser runs every ``interval`` steps as an extra
    step: lr * k/(k+1), betas ** (k/(k+1)), so the optimizer's time scale stays as without it."""
    if not interval or interval <= 0:
        return float(lr), (float(betas[0]), float(betas[1]))
    ratio = interval / (interval + 1)
    return float(lr * ratio), (float(betas[0] ** ratio), float(betas[1] ** ratio))


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda was asked for, but torch sees no CUDA device; use --device cpu"
        )
    return dev


def configure_cpu(threads: int | None = None, flush_denormal: bool = True) -> int:
    """CPU settings for training: flush denormals (they make tiny-weight convs crawl) and use
    the cores this process may run on (or OMP_NUM_THREADS when set). Call once per process,
    outside the training step; returns the thread count."""
    torch.set_flush_denormal(flush_denormal)
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            threads = torch.get_num_threads()
        else:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


@dataclass
class _TickAccumulator:
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    nimg: int = 0

    def add(self, m: StepMetrics) -> None:
        self.nimg += m.batch
        for name, value in m.values():
            if name == "batch" or value is None:
                continue
            if isinstance(value, torch.Tensor):
                self.tensors.setdefault(name, []).append(value)
            else:
                self.sums[name] = self.sums.get(name, 0.0) + float(value)
                self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if k != "ada_p"}
        for key, values in self.tensors.items():
            out[key] = float(torch.stack([v.float() for v in values]).mean())
        return out
