"""The DP ablation arms: clipping only, noise only, and the paper's own "DP" scheme.

Schonfeld & Veeravagu found that "differential privacy impositions severely impede GAN training"
and blamed the noise (reference/paper.md). To test that claim honestly, `fedspine reproduce`
trains beside real patient-level DP-SGD (``--dp``), on the same data and budget:

- ``clip-only``: DP-SGD's discriminator step with σ = 0 -- each sampled patient's gradient row
  is clipped to C, rows are summed and divided by the expected number of patients, no noise.
  Without noise nothing is hidden: ε = ∞.
- ``noise-only``: the same per-patient rows summed *without* clipping, plus the noise N(0, σ²C²)
  of a DP-SGD run (σ given, or calibrated exactly as ``--dp --epsilon E`` would). With no clip
  the sensitivity is unbounded, so the noise buys nothing: ε = ∞.
- ``paper``: the authors' scheme -- N(0, 0.02²) added to every gradient element of both G and D,
  *then* the whole-model gradient norm clipped to 1.5, batch 1, everything else the plain
  StyleGAN2-ADA (adaptive ADA, minibatch-std). It is not DP-SGD; :func:`paper_scheme_epsilon`
  gives the ε standard accounting assigns it (σ = 0.02 / 1.5, q = 1 / images, one step per D
  optimizer step), about 10^10 at the paper's settings.

None of these runs is private. Each writes ``RUN/privacy.json`` with ``private: false`` and the
reason, never touches a privacy ledger (the ledger records DP mechanisms only; these are not),
and writes ``RUN/ablation.json`` with the scheme and its numbers for the reproduction's table
(:mod:`fedspine.training.ablation_run` does that bookkeeping). This module holds the schemes as
D-step strategies of the one trainer: clip-only and noise-only (:class:`AblationDStep`) reuse
DP-SGD's machinery unchanged (patient Poisson sampling, per-unit gradients via torch.func,
Opacus' optimizer) so that the one thing that differs from a DP arm is the imposition under
study; the paper scheme (:class:`PaperDStep`) is the plain D step with its optimizer hook.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedspine.fileio import RUN_ABLATION
from fedspine.privacy.accounting import (
    PLAN_ACCOUNTANT,
    REPORT_ACCOUNTANT,
    Mechanism,
    PrivacyAccountingError,
    default_delta,
    epsilon,
)
from fedspine.training.config import TrainConfig
from fedspine.training.dp import DPConfig, DPDiscriminatorStep, FakeSource
from fedspine.training.dp_trainer import DPSGDStep
from fedspine.training.gan_trainer import GanTrainer
from fedspine.training.parts import DStep

SCHEMES: tuple[str, ...] = ("dpsgd", "clip-only", "noise-only", "paper")
ABLATION_SCHEMES: tuple[str, ...] = ("clip-only", "noise-only", "paper")
PAPER_NOISE_STD = 0.02
PAPER_CLIP_NORM = 1.5
PAPER_BATCH = 1
# The paper's own run (reference/paper.md): 3,773 training images, 8000 kimg at batch 1, and
# StyleGAN2-ADA's lazy R1 as an extra D optimizer step every 16 D steps.
PAPER_IMAGES = 3773
PAPER_KIMG = 8000.0
PAPER_R1_INTERVAL = 16
ABLATION_FORMAT = "fedspine-dp-ablation/1"
ACCOUNTANT_ORDER: tuple[str, ...] = (REPORT_ACCOUNTANT, PLAN_ACCOUNTANT)
# DPConfig and DPDiscriminatorStep insist on σ > 0 (rightly, for DP runs); the clip-only step
# is built with this stand-in and then sets σ = 0 on its own optimizer.
_SIGMA_STAND_IN = 1.0

NOT_PRIVATE_REASONS = {
    "clip-only": (
        "DP ablation 'clip-only': per-patient clipping without noise; nothing hides a patient, "
        "so ε = ∞ (not differentially private)"
    ),
    "noise-only": (
        "DP ablation 'noise-only': DP-SGD's noise without per-patient clipping; one patient's "
        "gradient is unbounded, so the noise bounds nothing and ε = ∞ (not differentially "
        "private)"
    ),
    "paper": (
        "DP ablation 'paper': the paper's scheme (N(0, 0.02²) on every gradient element of G and "
        "D, then whole-model clipping to 1.5, batch 1) is not DP-SGD; under standard accounting "
        "its ε is astronomically large (see ablation.json)"
    ),
}


class AblationError(ValueError):
    """An ablation run cannot be set up as asked; the message says why and what to do."""


@dataclass
class AblationOptions:
    """Settings of one ablation run (``scheme`` is one of :data:`ABLATION_SCHEMES`).

    ``max_grad_norm`` is C: the per-patient clip of clip-only, and the scale of noise-only's
    noise (std σC, as in DP-SGD). Noise-only takes exactly one of ``noise_multiplier`` (σ) and
    ``noise_for_epsilon`` (the σ that DP-SGD would calibrate for that ε on this data and run
    length, with an empty ledger, at ``delta``). The paper scheme takes none of these: its noise
    std, clip and batch are the paper's (0.02, 1.5, 1).
    """

    scheme: str
    noise_multiplier: float | None = None
    noise_for_epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    expected_patients_per_step: int = 64
    d_steps_per_g: int = 1
    ada_p: float = 0.0

    def __post_init__(self) -> None:
        if self.scheme not in ABLATION_SCHEMES:
            raise AblationError(
                f"unknown ablation scheme {self.scheme!r}; choose one of "
                f"{', '.join(ABLATION_SCHEMES)} (real DP-SGD is `--dp`)"
            )
        noise_given = {
            "noise_multiplier": self.noise_multiplier,
            "noise_for_epsilon": self.noise_for_epsilon,
        }
        if self.scheme == "noise-only":
            if (self.noise_multiplier is None) == (self.noise_for_epsilon is None):
                raise AblationError(
                    "noise-only needs exactly one of a noise multiplier σ and an ε whose DP-SGD "
                    "σ to use (--noise-multiplier or --noise-for-epsilon)"
                )
            for name, value in noise_given.items():
                if value is not None and not (math.isfinite(value) and value > 0):
                    raise AblationError(f"noise-only: {name} must be > 0, got {value}")
        else:
            given = [name for name, value in noise_given.items() if value is not None]
            if given or self.delta is not None:
                raise AblationError(
                    f"{self.scheme} takes no noise settings (got {', '.join(given) or 'delta'})"
                    + (": it adds no noise" if self.scheme == "clip-only" else "")
                )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise AblationError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if int(self.expected_patients_per_step) < 1 or int(self.d_steps_per_g) < 1:
            raise AblationError("expected_patients_per_step and d_steps_per_g must be >= 1")
        if not 0.0 <= self.ada_p <= 1.0:
            raise AblationError(f"ada_p must lie in [0, 1], got {self.ada_p}")

    def dp_config(self, num_patients: int) -> DPConfig:
        """The DP step settings the clip-only / noise-only step runs with (σ set separately)."""
        return DPConfig(
            noise_multiplier=self.noise_multiplier or _SIGMA_STAND_IN,
            delta=self.delta,
            max_grad_norm=float(self.max_grad_norm),
            expected_patients_per_step=min(int(self.expected_patients_per_step), num_patients),
            d_steps_per_g=int(self.d_steps_per_g),
            ada_p=float(self.ada_p),
            accountant=PLAN_ACCOUNTANT,
        )


@dataclass(frozen=True)
class PaperAccounting:
    """The ε that standard DP-SGD accounting gives the paper's scheme, and how it was computed.

    ``unit`` is "image": the paper samples one image at a time, so q = 1 / images; a patient with
    several images would fare worse. ``fallback`` says why an accountant earlier in
    :data:`ACCOUNTANT_ORDER` was not used.
    """

    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    images: int
    unit: str = "image"
    fallback: str | None = None

    def text(self) -> str:
        """One line for reports: ε, δ, accountant and the mechanism it was computed for."""
        how = f"{self.accountant.upper()} accountant" + (
            f"; {self.fallback}" if self.fallback else ""
        )
        return (
            f"ε = {self.epsilon:.3g} at δ = {self.delta:.2g} ({how}) for σ = 0.02 / 1.5 = "
            f"{self.noise_multiplier:.4f}, q = 1/{self.images} per image (not per patient), "
            f"{self.steps:,} D steps"
        )


def paper_scheme_epsilon(
    num_images: int,
    d_steps: int,
    *,
    delta: float | None = None,
    noise_std: float = PAPER_NOISE_STD,
    clip_norm: float = PAPER_CLIP_NORM,
    accountants: Sequence[str] = ACCOUNTANT_ORDER,
) -> PaperAccounting:
    """ε of the paper's scheme under standard accounting, as if it were DP-SGD at σ = std / C.

    Generous to the scheme: it treats the whole-model clip of a batch of one as per-example
    clipping and ignores that the noise added before clipping is itself clipped (and that
    adaptive ADA reads real data outside any accounting). Every D optimizer step that reads real
    images counts (the loss step and each lazy R1 step). The first accountant of
    ``accountants`` that can handle such a small σ is used: PRV's grid runs out of memory here,
    so it falls back to RDP, an upper bound on ε like PRV's.
    """
    if int(num_images) < 1:
        raise AblationError(f"num_images must be >= 1, got {num_images}")
    delta = float(delta) if delta is not None else default_delta(int(num_images))
    sigma = float(noise_std) / float(clip_norm)
    mech = Mechanism(sigma, 1.0 / int(num_images), int(d_steps), label="paper-dp-scheme")
    reasons = []
    for name in accountants:
        try:
            eps = epsilon([mech], delta, name)
        except (PrivacyAccountingError, ValueError, ArithmeticError) as err:
            reasons.append(f"{name.upper()} not usable at σ = {sigma:.4f}: {_short_reason(err)}")
            continue
        if not math.isfinite(eps):
            reasons.append(f"{name.upper()} gave ε = {eps}")
            continue
        return PaperAccounting(
            epsilon=float(eps),
            delta=delta,
            accountant=name,
            noise_multiplier=sigma,
            sample_rate=mech.sample_rate,
            steps=mech.steps,
            images=int(num_images),
            fallback="; ".join(reasons) or None,
        )
    raise AblationError(
        f"no accountant could bound the paper scheme's ε ({'; '.join(reasons)}); its ε is "
        "unbounded for practical purposes"
    )


@lru_cache(maxsize=1)
def paper_settings_epsilon() -> PaperAccounting:
    """:func:`paper_scheme_epsilon` at the paper's own run: 3,773 images, 8000 kimg at batch 1
    with a lazy R1 step every 16 D steps (8,500,000 D optimizer steps)."""
    main_steps = int(PAPER_KIMG * 1000 / PAPER_BATCH)
    return paper_scheme_epsilon(PAPER_IMAGES, main_steps + main_steps // PAPER_R1_INTERVAL)


def noise_then_clip(
    params: Iterable[Tensor],
    noise_std: float,
    max_norm: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The paper's gradient hook: add N(0, std²) to every gradient element, *then* clip the
    whole model's gradient norm to ``max_norm``. Returns the norm before clipping.

    Parameters without a gradient are left alone (the optimizer skips them too).
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros([])
    with torch.no_grad():
        for p in with_grad:
            noise = torch.randn(
                p.grad.shape, generator=generator, device=p.grad.device, dtype=p.grad.dtype
            )
            p.grad.add_(noise, alpha=float(noise_std))
    return torch.nn.utils.clip_grad_norm_(with_grad, float(max_norm))


class AblationDiscriminatorStep(DPDiscriminatorStep):
    """DP-SGD's discriminator step with one imposition removed (``scheme``):

    - ``clip-only``: Opacus clips each patient's row to C and sums; σ = 0, so no noise.
    - ``noise-only``: rows are summed unclipped, then N(0, σ²C²) is added as in DP-SGD.

    Everything else (pairing, R1 inside the unit, chunking, the division by the expected number
    of patients, step counting) is :class:`DPDiscriminatorStep`'s own. Not private.
    """

    def __init__(
        self,
        D: nn.Module,
        optimizer: torch.optim.Optimizer,
        augment_pipe: nn.Module | None,
        config: DPConfig,
        r1_gamma: float,
        label_prior: Tensor,
        make_fakes: FakeSource,
        *,
        scheme: str,
        noise_multiplier: float = 0.0,
        generator: torch.Generator | None = None,
        noise_generator: torch.Generator | None = None,
    ) -> None:
        if scheme == "clip-only":
            if noise_multiplier:
                raise AblationError(
                    f"clip-only adds no noise; got noise_multiplier {noise_multiplier}"
                )
        elif scheme == "noise-only":
            if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
                raise AblationError(f"noise-only needs σ > 0, got {noise_multiplier}")
        else:
            raise AblationError(
                f"AblationDiscriminatorStep: scheme must be clip-only or noise-only, not {scheme!r}"
            )
        super().__init__(
            D,
            optimizer,
            augment_pipe,
            config,
            r1_gamma,
            label_prior,
            make_fakes,
            noise_multiplier=noise_multiplier or _SIGMA_STAND_IN,
            generator=generator,
            noise_generator=noise_generator,
        )
        self.scheme = scheme
        self.noise_multiplier = float(noise_multiplier)
        if scheme == "clip-only":
            self.dp_optimizer.noise_multiplier = 0.0
        else:
            self.dp_optimizer = _unclipped_optimizer_class()(
                optimizer,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=config.max_grad_norm,
                expected_batch_size=config.expected_patients_per_step,
                loss_reduction="mean",
                generator=noise_generator,
            )

    @property
    def non_private(self) -> bool:
        """Always True: an ablation step is not differentially private."""
        return True

    @property
    def noise_std(self) -> float:
        """Std of the noise added to the summed rows (σC; 0 for clip-only)."""
        return self.noise_multiplier * self.config.max_grad_norm


class AblationDStep(DPSGDStep):
    """:class:`DPSGDStep` with an :class:`AblationDiscriminatorStep`: the same patient
    sampling, G step and counters, but clip-only or noise-only D updates. Not private."""

    def __init__(
        self,
        scheme: str,
        dp: DPConfig,
        patient_ids: np.ndarray | Sequence[str],
        noise_multiplier: float,
        sample_rate: float,
    ) -> None:
        super().__init__(dp, patient_ids, noise_multiplier, sample_rate)
        self.scheme = scheme

    step_class = AblationDiscriminatorStep

    def step_options(self) -> dict[str, Any]:
        return {"scheme": self.scheme}

    def mechanism(self) -> Mechanism:
        raise AblationError(
            f"a {self.scheme} run is not a DP mechanism and has no ledger entry (ε = ∞)"
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["ablation"] = {"scheme": self.scheme, "noise_std": self.dp_step.noise_std}
        return state

    def check_state(self, state: dict) -> None:
        check_scheme(state, self.scheme)
        super().check_state(state)


class PaperDStep(DStep):
    """The plain D step at batch 1 with the paper's hook on every optimizer step of G and D
    (:func:`noise_then_clip`, std 0.02, whole-model norm 1.5). Not private."""

    scheme = "paper"

    def __init__(self, noise_std: float = PAPER_NOISE_STD, clip_norm: float = PAPER_CLIP_NORM):
        self.noise_std = float(noise_std)
        self.clip_norm = float(clip_norm)
        self.opt_steps = {"G": 0, "D": 0}

    def check(self, config: TrainConfig) -> None:
        if config.batch != PAPER_BATCH:
            raise AblationError(
                f"the paper scheme trains at batch {PAPER_BATCH}, the config has batch "
                f"{config.batch}; build it with paper_train_config()"
            )

    def attach(self, trainer: GanTrainer) -> None:
        seed = int(np.random.SeedSequence([int(trainer.config.seed), 0x9A9E7]).generate_state(1)[0])
        self.noise_gen = torch.Generator(device=trainer.device).manual_seed(seed)

    @property
    def d_releases(self) -> int:
        """D optimizer steps taken: each read real images and counts in the accounting."""
        return self.opt_steps["D"]

    def optimise(
        self, trainer: GanTrainer, opt: torch.optim.Optimizer, scaler, loss: Tensor
    ) -> None:
        opt.zero_grad(set_to_none=True)
        fp16 = scaler is not None and scaler.is_enabled()
        if fp16:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        params = [p for group in opt.param_groups for p in group["params"]]
        noise_then_clip(params, self.noise_std, self.clip_norm, self.noise_gen)
        if fp16:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        self.opt_steps["D" if opt is trainer.opt_D else "G"] += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "ablation": {
                "scheme": self.scheme,
                "noise_std": self.noise_std,
                "clip_norm": self.clip_norm,
                "opt_steps": dict(self.opt_steps),
                "noise_rng": self.noise_gen.get_state(),
            }
        }

    def check_state(self, state: dict) -> None:
        check_scheme(state, self.scheme)

    def load_state_dict(self, state: dict) -> None:
        saved = state["ablation"]
        self.opt_steps = {k: int(v) for k, v in saved["opt_steps"].items()}
        self.noise_gen.set_state(saved["noise_rng"].cpu())


def paper_train_config(config: TrainConfig) -> TrainConfig:
    """The config of a paper-scheme run: the preset's, at batch 1 (minibatch-std group 1)."""
    network = replace(config.network, mbstd_group=min(config.network.mbstd_group, PAPER_BATCH))
    return replace(config, batch=PAPER_BATCH, network=network)


def read_ablation_summary(run: str | os.PathLike) -> dict[str, Any] | None:
    """RUN/ablation.json, or None when the run is not an ablation run."""
    path = Path(run) / RUN_ABLATION
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != ABLATION_FORMAT:
        raise AblationError(f"{path}: unknown format {data.get('format')!r}")
    return data


def saved_scheme(state: dict | None) -> str | None:
    """The DP scheme a saved trainer state was trained with (None: no DP of any kind)."""
    if state is None:
        return None
    ablation = state.get("ablation")
    if ablation:
        return str(ablation["scheme"])
    return "dpsgd" if "dp" in state else None


# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _unclipped_optimizer_class() -> type:
    """Opacus' DPOptimizer with clipping taken out: rows are summed as they are, then the noise,
    the division by the expected batch size and the step are DP-SGD's own."""
    from opacus.optimizers.optimizer import (  # lazy: Opacus loads with the first DP step
        DPOptimizer,
        _check_processed_flag,
        _mark_as_processed,
    )

    class UnclippedDPOptimizer(DPOptimizer):
        def clip_and_accumulate(self) -> None:
            for p in self.params:
                _check_processed_flag(p.grad_sample)
                grad = self._get_flat_grad_sample(p).to(p.dtype).sum(0)
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
                _mark_as_processed(p.grad_sample)

    return UnclippedDPOptimizer


def check_scheme(state: dict, scheme: str) -> None:
    found = saved_scheme(state)
    if found != scheme:
        raise AblationError(
            f"the saved run was trained with DP scheme {found or 'none'}, not {scheme}; resume "
            "it with the same --dp / --dp-scheme"
        )


def _short_reason(err: Exception) -> str:
    text = str(err)
    need = re.search(r"need about ([0-9.]+) GiB", text)
    if need:
        return f"its grid would need {float(need.group(1)):.3g} GiB of memory"
    return text.split("; ")[0][:200]
