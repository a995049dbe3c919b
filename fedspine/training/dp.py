"""The differentially private discriminator step: patient-level DP-SGD on D only.

Why this shape (DESIGN.md decisions 3 and 4, reference/dp.md):

- Only D reads real radiographs, so only D's update is privatised; G, G_ema and everything
  sampled from them are post-processing.
- The privacy unit is the patient. :class:`PatientPoissonSampler` includes each patient
  independently with probability q and hands back all of that patient's training images.
- Each sampled patient contributes ONE gradient row: the gradient of one per-unit loss that sums,
  over the patient's real images, the real logistic term, R1 (taken through the augmentation)
  and a paired fake term (one fake per real image, fake label drawn from the public prior).
  Pairing makes the fakes part of the unit, so removing a patient removes exactly one row.
- Rows come from ``torch.func.vmap(grad(unit_loss))`` over units, in chunks of ``chunk_size``
  units (memory-bounded), and go to Opacus' ``DPOptimizer`` as ``p.grad_sample``: it clips each
  row to C, sums, adds N(0, σ²C²) and divides by the expected number of patients per step.
  Chunks are accumulated with Opacus' own skip-step mechanism, so one noise draw and one
  optimizer step happen per DP step whatever the chunking.
- ``DPConfig.trainable_d = "top:K"`` trains only D's K lowest-resolution stages, ``"head"``
  only its projection head (the label mapping and the epilogue's output layer): the rows cover
  those parameters alone (the rest enter the loss as constants), Opacus sees only them
  (``_trainable``), so noise lands only there and the frozen ones never move.
  ``DPConfig.augment_views = K`` makes each unit's loss the mean over K augmented views of its
  images: still one row per unit, clipped as before, so it costs no privacy.
- An empty Poisson draw still takes a noise-only step; :attr:`DPDiscriminatorStep.steps_taken`
  counts every optimizer step and is what the ledger must record (:func:`mechanism`).
- Nothing computed on real data leaves the step except the privatised update: the metrics it
  returns are derived from the noisy gradient only. ``debug_leaks=True`` adds D(real) means,
  losses and batch sizes for debugging and marks the run non-private.

How a trainer uses it::

    sigma, q, delta = plan_noise(dp, num_patients, planned_d_steps, prior=ledger_mechanisms)
    sampler = PatientPoissonSampler(train_patient_ids, q, np_rng)
    step = DPDiscriminatorStep(D, opt_D, augment_pipe, dp, r1_gamma, public_prior,
                               make_fakes, noise_multiplier=sigma)
    for each G step:
        for _ in range(dp.d_steps_per_g):
            index, unit_index = flatten_units(sampler())
            step.step(images[index], labels[index], unit_index)
    ledger.record(dataset_hash, mechanism(sigma, q, step.steps_taken), run_id, dp.max_grad_norm)

(:class:`fedspine.training.dp_trainer.DPSGDStep` is that trainer part.) The module is long on
purpose: the sampler, the per-unit loss, the chunked rows and the Opacus hand-off are one
mechanism whose privacy argument reads top to bottom; split, each piece would lose the reason
it is shaped the way it is.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedspine.dp_options import (
    MAX_AUGMENT_VIEWS,
    TRAINABLE_ALL,
    top_stages,
    trainable_d_problem,
)
from fedspine.privacy.accounting import (
    ACCOUNTANTS,
    REPORT_ACCOUNTANT,
    Mechanism,
    calibrate_noise,
    default_delta,
)

MECHANISM_LABEL = "gan-discriminator"
FakeSource = Callable[[int, Tensor], Tensor]


@dataclass
class DPConfig:
    """DP settings of the discriminator step.

    Give exactly one of ``target_epsilon`` (σ is then calibrated for the planned number of D
    steps, see :func:`plan_noise`) and ``noise_multiplier``. ``delta`` defaults to
    min(1e-5, 1 / (10 · patients)). q = ``expected_patients_per_step`` / patients.
    ``r1_every_step`` puts R1 in every per-unit loss; otherwise R1 joins the per-unit loss every
    ``r1_interval`` DP steps, scaled by the interval (still inside the clipped row, so it costs
    no extra privacy). ``ada_p`` is the fixed augmentation probability: adaptive ADA reads
    D(real) and is refused under DP.

    ``trainable_d`` says which of D's parameters the DP step trains (and privatises): "all";
    "head" for D's projection head only (the label mapping and the epilogue's output layer); or
    "top:K" for the K lowest-resolution stages of D, counting the 4x4 epilogue together with
    the label mapping as the first stage and each discriminator block above it as one more
    (:func:`trainable_d_names`); the rest of D stays frozen, outside the gradient rows and the
    noise. ``augment_views`` = K > 1 evaluates every real image and its paired fake under K
    independently drawn augmentations inside the per-unit loss, whose value is the mean over the
    views: still one clipped row per unit, so no privacy cost. It needs augmentation (ada_p > 0)
    and multiplies the work per unit by K (a chunk then holds ``chunk_size // K`` units).
    """

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    expected_patients_per_step: int = 64
    d_steps_per_g: int = 1
    chunk_size: int = 16
    r1_every_step: bool = True
    r1_interval: int = 16
    ada_p: float = 0.0
    accountant: str = REPORT_ACCOUNTANT
    trainable_d: str = TRAINABLE_ALL
    augment_views: int = 1

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "DPConfig: give exactly one of target_epsilon (σ is calibrated from it) and "
                f"noise_multiplier; got target_epsilon={self.target_epsilon}, "
                f"noise_multiplier={self.noise_multiplier}"
            )
        if self.target_epsilon is not None and not _positive(self.target_epsilon):
            raise ValueError(f"DPConfig: target_epsilon must be > 0, got {self.target_epsilon}")
        if self.noise_multiplier is not None and not _positive(self.noise_multiplier):
            raise ValueError(
                f"DPConfig: noise_multiplier must be > 0 (σ = 0 is not private), "
                f"got {self.noise_multiplier}"
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"DPConfig: delta must be in (0, 1), got {self.delta}")
        if not _positive(self.max_grad_norm):
            raise ValueError(f"DPConfig: max_grad_norm must be > 0, got {self.max_grad_norm}")
        for name in ("expected_patients_per_step", "d_steps_per_g", "chunk_size", "r1_interval"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DPConfig: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ada_p <= 1.0:
            raise ValueError(f"DPConfig: ada_p must lie in [0, 1], got {self.ada_p}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(
                f"DPConfig: accountant must be 'prv', 'rdp' or 'pld', got {self.accountant!r}"
            )
        problem = trainable_d_problem(self.trainable_d)
        if problem:
            raise ValueError(f"DPConfig: {problem}")
        views = self.augment_views
        if not _whole(views) or not 1 <= views <= MAX_AUGMENT_VIEWS:
            raise ValueError(
                f"DPConfig: augment_views must be a whole number from 1 to {MAX_AUGMENT_VIEWS} "
                f"(each view is one more pass of D per image), got {views!r}"
            )
        if views > 1 and not self.ada_p > 0:
            raise ValueError(
                f"DPConfig: augment_views={views} needs augmentation, and no augmentation is "
                f"active (ada_p is {self.ada_p}); set ada_p > 0, or augment_views=1"
            )


def plan_noise(
    dp: DPConfig,
    num_patients: int,
    planned_d_steps: int,
    prior: Sequence[Mechanism] = (),
) -> tuple[float, float, float]:
    """(σ, q, δ) for a run of ``planned_d_steps`` DP steps on ``num_patients`` patients.

    With ``dp.noise_multiplier`` set, σ is that; otherwise the smallest σ for which ``prior``
    (the site's ledger so far) composed with the planned steps stays within ``target_epsilon``.
    """
    if int(num_patients) < 1:
        raise ValueError(f"plan_noise: num_patients must be >= 1, got {num_patients}")
    q = min(1.0, dp.expected_patients_per_step / int(num_patients))
    delta = dp.delta if dp.delta is not None else default_delta(int(num_patients))
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier), q, delta
    if int(planned_d_steps) < 1:
        raise ValueError(f"plan_noise: planned_d_steps must be >= 1, got {planned_d_steps}")
    sigma = calibrate_noise(
        dp.target_epsilon,
        delta,
        q,
        int(planned_d_steps),
        accountant=dp.accountant,
        prior=prior,
        label=MECHANISM_LABEL,
    )
    return float(sigma), q, delta


def mechanism(noise_multiplier: float, sample_rate: float, steps: int) -> Mechanism:
    """The ledger entry of ``steps`` DP discriminator steps (use ``steps_taken``)."""
    return Mechanism(noise_multiplier, sample_rate, int(steps), label=MECHANISM_LABEL)


def trainable_d_names(D: nn.Module, spec: str) -> list[str]:
    """Names of D's parameters that ``trainable_d = spec`` trains, in D's order.

    "all" is every parameter. "head" is D's projection head: the label mapping (``mapping.*``,
    the class embedding and its FC layers) and the epilogue's output layer (``epilogue.out.*``,
    which maps the fc's features to the cmap the label is projected onto); these are all the
    parameters after the epilogue's fc, the projection itself has none. The epilogue's conv and
    fc stay frozen with everything below them. "top:K" is the K lowest-resolution stages: the
    4x4 epilogue (conv, fc, out) with the label mapping of the projection (stage 1), and the
    last K - 1 of ``D.blocks`` (blocks run from the highest resolution down, so these end at
    8x8 -> 4x4). ``from_rgb`` and the higher-resolution blocks stay frozen. K runs from 1 to
    ``len(D.blocks)``: a larger K would leave only ``from_rgb`` frozen, use "all" for that.
    """
    names = [name for name, _ in D.named_parameters()]
    k = top_stages(spec)
    if spec == TRAINABLE_ALL:
        return names
    blocks = getattr(D, "blocks", None)
    epilogue = getattr(D, "epilogue", None)
    if (
        not isinstance(blocks, nn.ModuleList)
        or epilogue is None
        or not isinstance(getattr(epilogue, "out", None), nn.Module)
    ):
        raise ValueError(
            f"DPConfig.trainable_d {spec}: needs a fedspine Discriminator (blocks, epilogue with "
            f"its out layer); got {type(D).__name__}"
        )
    if k is None:  # "head"
        return [name for name in names if name.startswith(("epilogue.out.", "mapping."))]
    if k > len(blocks):
        raise ValueError(
            f"DPConfig.trainable_d {spec}: this discriminator has {len(blocks)} blocks, so K runs "
            f"from 1 (the 4x4 epilogue and the label mapping) to {len(blocks)} (all but the "
            "highest-resolution block and from_rgb); use 'all' to train every parameter"
        )
    prefixes = ("epilogue.", "mapping.") + tuple(
        f"blocks.{i}." for i in range(len(blocks) - (k - 1), len(blocks))
    )
    return [name for name in names if name.startswith(prefixes)]


def trainable_fraction(D: nn.Module, spec: str) -> float:
    """Share of D's parameter count (elements) that ``trainable_d = spec`` trains."""
    return _share(D, set(trainable_d_names(D, spec)))


def _share(D: nn.Module, chosen: set[str]) -> float:
    named = list(D.named_parameters())
    total = sum(p.numel() for _, p in named)
    return sum(p.numel() for n, p in named if n in chosen) / max(total, 1)


class PatientPoissonSampler:
    """Poisson sampling of patients: each call includes each patient with probability q.

    ``patient_ids`` has one entry per training image. A call returns one index array per
    sampled patient, holding all of that patient's images (or a random subset of at most
    ``max_images_per_patient`` of them, drawn without looking at pixels). The list may be empty.
    """

    def __init__(
        self,
        patient_ids: np.ndarray | Sequence[Any],
        sample_rate: float,
        rng: np.random.Generator,
        max_images_per_patient: int | None = None,
    ) -> None:
        ids = np.asarray(patient_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(
                "PatientPoissonSampler: patient_ids must be a non-empty 1-D array with one entry "
                f"per training image, got shape {ids.shape}"
            )
        if not 0 < float(sample_rate) <= 1:
            raise ValueError(
                f"PatientPoissonSampler: sample_rate must be in (0, 1], got {sample_rate}"
            )
        if max_images_per_patient is not None and int(max_images_per_patient) < 1:
            raise ValueError(
                "PatientPoissonSampler: max_images_per_patient must be >= 1 or None, "
                f"got {max_images_per_patient}"
            )
        _, inverse = np.unique(ids, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        self.units: list[np.ndarray] = [a.astype(np.int64) for a in np.split(order, bounds)]
        self.sample_rate = float(sample_rate)
        self.rng = rng
        self.max_images_per_patient = max_images_per_patient

    @classmethod
    def for_expected(
        cls,
        patient_ids: np.ndarray | Sequence[Any],
        expected_patients_per_step: int,
        rng: np.random.Generator,
        max_images_per_patient: int | None = None,
    ) -> PatientPoissonSampler:
        """A sampler with q = expected_patients_per_step / number of patients (at most 1)."""
        num = len(np.unique(np.asarray(patient_ids)))
        q = min(1.0, int(expected_patients_per_step) / max(num, 1))
        return cls(patient_ids, q, rng, max_images_per_patient)

    @property
    def num_patients(self) -> int:
        return len(self.units)

    def __call__(self) -> list[np.ndarray]:
        chosen = np.flatnonzero(self.rng.random(self.num_patients) < self.sample_rate)
        out = []
        for patient in chosen:
            images = self.units[patient]
            cap = self.max_images_per_patient
            if cap is not None and images.size > cap:
                images = np.sort(self.rng.choice(images, size=int(cap), replace=False))
            out.append(images)
        return out


def flatten_units(units: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(image indices, unit index of each image) for a sampler's draw, to gather a batch."""
    if not units:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    indices = np.concatenate([np.asarray(u, dtype=np.int64) for u in units])
    unit_index = np.repeat(np.arange(len(units)), [len(u) for u in units])
    return indices, unit_index


@dataclass
class UnitBatch:
    """One DP step's inputs, flat over images; ``unit_index`` says which unit each belongs to.

    Fakes are paired with reals one to one (same position), with labels from the public prior.
    Augmentation parameters are drawn here, outside vmap; empty dicts mean no augmentation.
    With ``views`` = K > 1 each augmentation tensor is [N, K, ...]: K independent draws per
    image (otherwise [N, ...]).
    """

    real: Tensor
    real_c: Tensor
    fake: Tensor
    fake_c: Tensor
    unit_index: Tensor
    num_units: int
    aug_real: dict[str, Tensor]
    aug_fake: dict[str, Tensor]
    fake_labels: Tensor
    views: int = 1


class DPDiscriminatorStep:
    """One DP-SGD update of D per call to :meth:`step`; see the module docstring for why.

    ``optimizer`` is D's plain optimizer (e.g. the trainer's Adam); it is wrapped, not copied,
    so its state stays where the trainer saves it. With R1 in every step, build it without the
    lazy-regularisation scaling of lr and betas. ``make_fakes(n, labels)`` must return n fake
    images for the given class indices from G alone (no private data), in D's input range.
    ``generator`` drives fake labels and augmentation draws; ``noise_generator`` drives the
    Gaussian noise (default: torch's global RNG; Opacus' secure mode needs torchcsprng, which
    fedspine does not ship).
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
        noise_multiplier: float | None = None,
        generator: torch.Generator | None = None,
        noise_generator: torch.Generator | None = None,
        debug_leaks: bool = False,
    ) -> None:
        if getattr(D, "mixes_samples", False):
            raise ValueError(
                "DPDiscriminatorStep: this discriminator mixes samples (minibatch-std is on), "
                "so one patient's gradient row would depend on other patients and the DP "
                "guarantee would silently fail; build D with mbstd_group=0 for DP training"
            )
        buffers = [name for name, _ in D.named_buffers()]
        if buffers:
            raise ValueError(
                f"DPDiscriminatorStep: the discriminator has buffers {buffers[:5]}; a buffer "
                "updated in the forward pass (e.g. BatchNorm statistics) escapes clipping and "
                "noise. Use a discriminator with parameters only"
            )
        self._check_pipe(augment_pipe, config)
        if r1_gamma < 0 or not math.isfinite(r1_gamma):
            raise ValueError(f"DPDiscriminatorStep: r1_gamma must be >= 0, got {r1_gamma}")
        prior = torch.as_tensor(label_prior, dtype=torch.float64).flatten()
        if (prior < 0).any() or float(prior.sum()) <= 0:
            raise ValueError(
                f"DPDiscriminatorStep: label_prior must be non-negative weights, got {prior}"
            )
        sigma = noise_multiplier if noise_multiplier is not None else config.noise_multiplier
        if sigma is None:
            raise ValueError(
                "DPDiscriminatorStep: no noise multiplier; DPConfig gives only target_epsilon, "
                "so call plan_noise(config, num_patients, planned_d_steps) first and pass its σ "
                "as noise_multiplier="
            )
        if not _positive(sigma):
            raise ValueError(f"DPDiscriminatorStep: noise_multiplier must be > 0, got {sigma}")
        self.D = D
        self.config = config
        self.noise_multiplier = float(sigma)
        self.r1_gamma = float(r1_gamma)
        self.label_prior = prior / prior.sum()
        self.make_fakes = make_fakes
        self.augment_pipe = augment_pipe if _augments(augment_pipe, config) else None
        if config.augment_views > 1 and self.augment_pipe is None:
            raise ValueError(
                f"DPDiscriminatorStep: augment_views={config.augment_views} averages augmented "
                "views of each image, but no augmentation is active (ada_p is "
                f"{config.ada_p}{', no augment pipe' if augment_pipe is None else ''}); set "
                "ada_p > 0 with an augment pipe, or augment_views=1"
            )
        chosen = set(trainable_d_names(D, config.trainable_d))  # refuses a K the net lacks
        # The share of D's parameters (elements) this step trains and privatises.
        self.trainable_fraction = _share(D, chosen)
        self.generator = generator if generator is not None else torch.Generator()
        self.debug_leaks = bool(debug_leaks)
        self.steps_taken = 0
        self.non_finite_rows = 0
        self.reservation: Any = None
        self._warmed: set[tuple[torch.device, torch.dtype]] = set()
        self._selected = chosen
        with _trainable(D, chosen):
            self.dp_optimizer = make_dp_optimizer(
                optimizer,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=config.max_grad_norm,
                expected_batch_size=config.expected_patients_per_step,
                generator=noise_generator,
            )
            named = {id(p): name for name, p in D.named_parameters()}
            mine = {id(p) for n, p in D.named_parameters() if n in chosen}
            theirs = [id(p) for p in self.dp_optimizer.params]
        if mine != set(theirs):
            which = (
                "parameters"
                if config.trainable_d == TRAINABLE_ALL
                else f"parameters selected by trainable_d={config.trainable_d!r}"
            )
            raise ValueError(
                f"DPDiscriminatorStep: the optimizer must hold exactly the discriminator's {which} "
                f"({len(mine)} tensors), it holds {len(theirs)} trainable ones"
            )
        # Rows follow the order of Opacus' params (they are handed over by position).
        self._names = [named[i] for i in theirs]
        self._frozen = [p for n, p in D.named_parameters() if n not in chosen]

    @property
    def non_private(self) -> bool:
        """True when debug metrics computed on real data were returned (not a DP run)."""
        return self.debug_leaks

    @property
    def device(self) -> torch.device:
        return next(self.D.parameters()).device

    def step(
        self,
        images: Tensor,
        labels: Tensor,
        unit_index: Tensor | np.ndarray,
    ) -> dict[str, Any]:
        """One DP update from the sampled units' images (uint8, or float in [-1, 1]).

        ``labels`` are class indices [N]; ``unit_index`` [N] says which sampled unit (0..U-1)
        each image belongs to (see :func:`flatten_units`). N = 0 takes a noise-only step.
        Returns metrics derived from the privatised gradient only (plus real-data debug metrics
        when ``debug_leaks``).
        """
        return self.step_batch(self.prepare(images, labels, unit_index))

    def step_batch(self, batch: UnitBatch) -> dict[str, Any]:
        """The DP update of :meth:`step` on a batch from :meth:`prepare` (audits, tests)."""
        if self.reservation is not None:
            self.reservation.take(1)  # written ahead in the ledger before the step runs
        for p in self._frozen:  # the wrapped optimizer steps only parameters with a gradient
            p.grad = None
        with _trainable(self.D, self._selected):
            stats: list[Tensor] = []
            chunks = self._chunk_grads(batch, stats)
            self.non_finite_rows += privatised_step(self.dp_optimizer, chunks)
            # Opacus lists only parameters that require grad: read them while D is trainable.
            grads = [p.grad for p in self.dp_optimizer.params if p.grad is not None]
        self.steps_taken += 1
        noisy_norm = torch.sqrt(sum(g.detach().float().square().sum() for g in grads))
        metrics: dict[str, Any] = {
            "dp_steps": self.steps_taken,
            "dp_noisy_grad_norm": noisy_norm,
            "dp_noise_std": self.noise_multiplier
            * self.config.max_grad_norm
            / self.config.expected_patients_per_step,
        }
        if self.debug_leaks:
            metrics.update(_debug_metrics(stats, batch))
        return metrics

    def prepare(
        self,
        images: Tensor,
        labels: Tensor,
        unit_index: Tensor | np.ndarray,
    ) -> UnitBatch:
        """Draw the paired fakes, their prior labels and the augmentation parameters."""
        device = self.device
        real = _to_float_images(images).to(device)
        labels = torch.as_tensor(labels, dtype=torch.int64).to(device).flatten()
        unit_index = torch.as_tensor(np.asarray(unit_index), dtype=torch.int64).flatten()
        n = real.shape[0]
        if labels.shape[0] != n or unit_index.shape[0] != n:
            raise ValueError(
                f"DPDiscriminatorStep.step: {n} images but {labels.shape[0]} labels and "
                f"{unit_index.shape[0]} unit indices; give one of each per image"
            )
        num_units = int(unit_index.max()) + 1 if n else 0
        if n and (int(unit_index.min()) < 0 or torch.bincount(unit_index).min() == 0):
            raise ValueError(
                "DPDiscriminatorStep.step: unit_index must number the sampled units 0..U-1 "
                "with at least one image each (use flatten_units on the sampler's draw)"
            )
        c_dim = self.label_prior.numel()
        # Fake labels come from the public prior only: never from `labels`.
        fake_labels = (
            torch.multinomial(
                self.label_prior.float(), n, replacement=True, generator=self.generator
            )
            if n
            else torch.zeros(0, dtype=torch.int64)
        )
        with torch.no_grad():
            fake = (
                self.make_fakes(n, fake_labels.to(device)).detach().float().to(device)
                if n
                else real.new_zeros(real.shape)
            )
        if fake.shape != real.shape:
            raise ValueError(
                f"DPDiscriminatorStep: make_fakes returned {tuple(fake.shape)}, expected "
                f"{tuple(real.shape)} (one fake per real image)"
            )
        aug_real: dict[str, Tensor] = {}
        aug_fake: dict[str, Tensor] = {}
        views = self.config.augment_views
        if self.augment_pipe is not None and n:
            self._check_p()
            aug_real = self._draw_views(real.shape, device, views)
            aug_fake = self._draw_views(real.shape, device, views)
        return UnitBatch(
            real=real,
            real_c=F.one_hot(labels, c_dim).float(),
            fake=fake,
            fake_c=F.one_hot(fake_labels.to(device), c_dim).float(),
            unit_index=unit_index.to(device),
            num_units=num_units,
            aug_real=aug_real,
            aug_fake=aug_fake,
            fake_labels=fake_labels,
            views=views,
        )

    def _draw_views(self, shape: torch.Size, device: torch.device, views: int) -> dict:
        """Augmentation parameters of every image: [N, ...] for one view, [N, K, ...] for K."""
        pipe = self.augment_pipe
        if views == 1:
            return pipe.sample_params(shape, device, self.generator)
        draws = [pipe.sample_params(shape, device, self.generator) for _ in range(views)]
        return {k: torch.stack([d[k] for d in draws], dim=1) for k in draws[0]}

    def per_unit_grads(self, batch: UnitBatch) -> dict[str, Tensor]:
        """Unclipped per-unit gradients {parameter name: [U, *shape]} in unit order (audits)."""
        chunks = list(self._chunk_grads(batch, [], keep_order=True))
        if not chunks:
            named = dict(self.D.named_parameters())
            return {name: named[name].new_zeros((0, *named[name].shape)) for name in self._names}
        order = torch.cat([c[1] for c in chunks])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = {}
        for k, name in enumerate(self._names):
            out[name] = torch.cat([c[0][k] for c in chunks])[inverse]
        return out

    def r1_weight(self) -> float:
        """Weight of ||∇x D||² in this step's per-unit loss (γ/2, ×interval on lazy steps)."""
        if self.r1_gamma == 0:
            return 0.0
        if self.config.r1_every_step:
            return self.r1_gamma / 2
        interval = self.config.r1_interval
        return self.r1_gamma / 2 * interval if self.steps_taken % interval == 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Step count and the fake-label / augmentation RNG, for exact resume."""
        return {"steps_taken": self.steps_taken, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_taken = int(state["steps_taken"])
        self.generator.set_state(state["generator"])

    # ----------------------------------------------------------------------------------------

    def _chunk_grads(
        self, batch: UnitBatch, stats: list[Tensor], keep_order: bool = False
    ) -> Iterable[Any]:
        """Per-unit gradient rows, ``chunk_size`` units at a time, grouped by unit size so
        each chunk pads to its own largest unit."""
        if batch.num_units == 0:
            return
        sizes = torch.bincount(batch.unit_index, minlength=batch.num_units).cpu()
        by_size = torch.argsort(sizes, stable=True)
        members = torch.argsort(batch.unit_index.cpu(), stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        self._warm_constants(batch.real)
        named = dict(self.D.named_parameters())
        # Gradients are taken over the trained parameters only; frozen ones enter as constants.
        params = {name: named[name].detach() for name in self._names}
        frozen = {name: p.detach() for name, p in named.items() if name not in params}
        r1_weight = self.r1_weight()
        grad_fn = torch.func.vmap(
            torch.func.grad(self._unit_loss, has_aux=True),
            in_dims=(None, None, 0, 0, 0, 0, 0, 0, 0, None, None),
        )
        # K views are K passes of D per image: fewer units per chunk keep memory bounded.
        step = max(1, self.config.chunk_size // batch.views)
        for begin in range(0, batch.num_units, step):
            units = by_size[begin : begin + step]
            width = int(sizes[units].max())
            slots = torch.arange(width)
            mask = slots[None, :] < sizes[units][:, None]
            pos = members[(starts[units][:, None] + slots[None, :]).clamp(max=members.numel() - 1)]
            pos = torch.where(mask, pos, torch.zeros_like(pos)).to(batch.real.device)
            mask = mask.to(batch.real.device, batch.real.dtype)
            grads, aux = grad_fn(
                params,
                frozen,
                batch.real[pos],
                batch.real_c[pos],
                {k: v[pos] for k, v in batch.aug_real.items()},
                batch.fake[pos],
                batch.fake_c[pos],
                {k: v[pos] for k, v in batch.aug_fake.items()},
                mask,
                r1_weight,
                batch.views,
            )
            if self.debug_leaks:
                stats.append(aux.detach())
            rows = [grads[name] for name in self._names]
            yield (rows, units) if keep_order else rows

    def _warm_constants(self, real: Tensor) -> None:
        """Run D once outside torch.func so its cached constants (the FIR filter of
        fedspine.models.layers) are built as plain tensors; built first inside grad/vmap they
        would be wrapped tensors that escape their transform and fail the next call."""
        key = (real.device, real.dtype)
        if key in self._warmed:
            return
        c_dim = self.label_prior.numel()
        with torch.no_grad():
            self.D(real.new_zeros((1, *real.shape[1:])), real.new_zeros((1, c_dim)))
        self._warmed.add(key)

    def _unit_loss(
        self,
        params: dict[str, Tensor],
        frozen: dict[str, Tensor],
        real: Tensor,
        real_c: Tensor,
        aug_real: dict[str, Tensor],
        fake: Tensor,
        fake_c: Tensor,
        aug_fake: dict[str, Tensor],
        mask: Tensor,
        r1_weight: float,
        views: int = 1,
    ) -> tuple[Tensor, Tensor]:
        """One unit's loss: Σ over its images of softplus(-D(aug(x))) + w·||∇x D(aug(x))||²
        + softplus(D(aug(fake))); padded slots are masked out. Returns (loss, debug stats).

        With ``views`` = K > 1 every image (real and fake) is taken K times, each copy under its
        own augmentation draw, and the loss is the mean over the K views (R1 of each view is
        taken with respect to that view's own copy). ``frozen`` parameters are constants."""
        if views > 1:
            real, real_c, fake, fake_c, mask = (
                _repeat_views(t, views) for t in (real, real_c, fake, fake_c, mask)
            )
            aug_real = {k: v.flatten(0, 1) for k, v in aug_real.items()}
            aug_fake = {k: v.flatten(0, 1) for k, v in aug_fake.items()}
        weights = {**frozen, **params}

        def logits(x: Tensor, c: Tensor, aug: dict[str, Tensor]) -> Tensor:
            if self.augment_pipe is not None:
                x = self.augment_pipe.apply(x, aug)
            return torch.func.functional_call(self.D, weights, (x, c))[:, 0]

        def real_sum(x: Tensor) -> tuple[Tensor, Tensor]:
            out = logits(x, real_c, aug_real)
            return out.sum(), out

        if r1_weight > 0:
            grad_x, real_logits = torch.func.grad(real_sum, has_aux=True)(real)
            r1 = grad_x.square().flatten(1).sum(1)
        else:
            real_logits = real_sum(real)[1]
            r1 = torch.zeros_like(real_logits)
        fake_logits = logits(fake, fake_c, aug_fake)
        per_image = F.softplus(-real_logits) + F.softplus(fake_logits) + r1_weight * r1
        loss = (per_image * mask).sum()
        stats = torch.stack(
            [
                loss,
                (real_logits * mask).sum(),
                (fake_logits * mask).sum(),
                (r1 * mask).sum(),
                mask.sum(),
            ]
        ).detach()
        if views > 1:
            return loss / views, stats / views
        return loss, stats

    def _check_pipe(self, pipe: nn.Module | None, config: DPConfig) -> None:
        if pipe is None:
            if config.ada_p > 0:
                raise ValueError(
                    f"DPDiscriminatorStep: DPConfig.ada_p is {config.ada_p} but no augment pipe "
                    "was given; pass the trainer's pipe or set ada_p=0"
                )
            return
        fixed = getattr(getattr(pipe, "cfg", None), "fixed_p", None)
        if fixed is None:
            raise ValueError(
                "DPDiscriminatorStep: the augment pipe is adaptive (AugmentConfig.fixed_p is "
                "None); adaptive ADA steers p from D(real), an uncounted release. Set "
                "AugmentConfig.fixed_p to DPConfig.ada_p for DP training"
            )
        if not math.isclose(float(fixed), config.ada_p, abs_tol=1e-6) or not math.isclose(
            float(pipe.p), config.ada_p, abs_tol=1e-6
        ):
            raise ValueError(
                f"DPDiscriminatorStep: the augment pipe's p is {float(pipe.p)} (fixed_p "
                f"{fixed}) but DPConfig.ada_p is {config.ada_p}; make them equal"
            )

    def _check_p(self) -> None:
        if not math.isclose(float(self.augment_pipe.p), self.config.ada_p, abs_tol=1e-6):
            raise RuntimeError(
                f"DPDiscriminatorStep: the augment pipe's p moved to {float(self.augment_pipe.p)}"
                f" (DPConfig.ada_p is {self.config.ada_p}); something adapts p from data, "
                "which DP training forbids"
            )


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
) -> Any:
    """Opacus' DPOptimizer around ``optimizer``: clip rows to C, add N(0, σ²C²), then divide
    by the expected batch size (``loss_reduction="mean"``; Opacus' "sum" would not divide)."""
    from opacus.optimizers import DPOptimizer  # lazy: opacus loads slowly; only DP runs need it

    return DPOptimizer(
        optimizer,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        expected_batch_size=int(expected_batch_size),
        loss_reduction="mean",
        generator=generator,
    )


def privatised_step(dp_optimizer: Any, chunks: Iterable[Sequence[Tensor]]) -> int:
    """One DP optimizer step from per-unit gradient rows given in chunks; returns how many
    rows were not finite (and were zeroed).

    Each chunk is a sequence of tensors aligned with ``dp_optimizer.params``, each
    [units in chunk, *param shape]. All chunks are clipped and summed with Opacus' skip-step
    accumulation, then noise is added once and the wrapped optimizer steps once. No chunk at
    all (an empty Poisson draw) still adds noise and steps. Afterwards ``p.grad`` holds the
    privatised gradient (read it for audits or metrics); per-unit rows are released.

    A unit whose row holds a NaN or an infinity anywhere would give a NaN clip factor and
    poison the whole sum, exactly when that unit was sampled: a server that crafts D to
    overflow on one patient would learn membership for certain. Such a row is zeroed before
    clipping (a zero row adds nothing, so the sum's sensitivity is still C); the count is for
    the site's own eyes only.
    """
    params = dp_optimizer.params
    non_finite = 0
    # A step that failed half-way must not leave a queued skip or a partial sum behind.
    dp_optimizer._step_skip_queue.clear()
    for p in params:
        p.grad = None
        p.grad_sample = None
        p.summed_grad = None
    pending: Sequence[Tensor] | None = None
    for chunk in chunks:
        if pending is not None:
            non_finite += _set_rows(params, pending)
            dp_optimizer.signal_skip_step(do_skip=True)
            dp_optimizer.step()
        pending = chunk
    if pending is None:
        pending = [p.new_zeros((0, *p.shape)) for p in params]
    non_finite += _set_rows(params, pending)
    dp_optimizer.step()
    for p in params:
        p.grad_sample = None
        p.summed_grad = None
    return non_finite


def isolation_violations(
    per_unit_grad_fn: Callable[[Tensor], Tensor | dict[str, Tensor] | Sequence[Tensor]],
    images: Tensor,
    unit_index: Tensor | np.ndarray,
    perturb: int,
    *,
    rtol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Units other than the owner of image ``perturb`` whose gradient row changes when that
    image is replaced by noise: must be [] for a per-unit gradient engine fit for DP.

    ``per_unit_grad_fn(images)`` returns the per-unit rows [U, ...] (a tensor, a dict or a
    sequence of tensors with a leading unit dimension) and must be deterministic in its
    other inputs. A row counts as changed when it moves by more than ``rtol`` times the
    largest row norm: isolated rows are bit-identical on deterministic kernels, while the
    leak of a minibatch-std layer at initialisation can be as small as 1e-4 of a row.
    """
    unit_index = torch.as_tensor(np.asarray(unit_index), dtype=torch.int64)
    before = _flat_rows(per_unit_grad_fn(images))
    changed = images.clone()
    noise = torch.rand(changed[perturb].shape, generator=generator) * 2 - 1
    changed[perturb] = noise.to(changed.dtype if changed.is_floating_point() else torch.float32)
    after = _flat_rows(per_unit_grad_fn(changed))
    scale = before.norm(dim=1).max().clamp_min(1e-12)
    moved = (after - before).norm(dim=1) > rtol * scale
    owner = int(unit_index[perturb])
    return [int(u) for u in torch.nonzero(moved).flatten() if int(u) != owner]


# --------------------------------------------------------------------------------------------


def _set_rows(params: Sequence[Tensor], rows: Sequence[Tensor]) -> int:
    """Hand one chunk's rows to Opacus, zeroing every unit whose row is not finite anywhere;
    returns how many were."""
    if len(rows) != len(params):
        raise ValueError(
            f"privatised_step: a chunk has {len(rows)} tensors for {len(params)} parameters"
        )
    for p, row in zip(params, rows, strict=True):
        if tuple(row.shape[1:]) != tuple(p.shape):
            raise ValueError(
                f"privatised_step: per-unit rows of shape {tuple(row.shape)} do not match a "
                f"parameter of shape {tuple(p.shape)}"
            )
    units = rows[0].shape[0] if rows else 0
    finite = torch.ones(units, dtype=torch.bool, device=rows[0].device if rows else None)
    for row in rows:
        finite &= torch.isfinite(row.detach()).flatten(1).all(dim=1)
    bad = int(units - int(finite.sum()))
    for p, row in zip(params, rows, strict=True):
        row = row.detach()
        if bad:
            keep = finite.view(-1, *([1] * (row.dim() - 1)))
            row = torch.where(keep, row, torch.zeros_like(row))
        p.grad_sample = row
    return bad


def _flat_rows(rows: Tensor | dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
    if isinstance(rows, Tensor):
        return rows.detach().flatten(1).double()
    values = list(rows.values()) if isinstance(rows, dict) else list(rows)
    return torch.cat([v.detach().flatten(1).double() for v in values], dim=1)


def _to_float_images(images: Tensor | np.ndarray) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1]; floats are taken as already in D's range."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    if not x.is_floating_point():
        raise ValueError(f"DPDiscriminatorStep: images must be uint8 or float, got {x.dtype}")
    return x.float()


def _augments(pipe: nn.Module | None, config: DPConfig) -> bool:
    return pipe is not None and config.ada_p > 0 and bool(getattr(pipe, "enabled_ops", ()))


def _debug_metrics(stats: list[Tensor], batch: UnitBatch) -> dict[str, Any]:
    """Real-data summaries: NOT private. Only returned with debug_leaks=True."""
    n = batch.real.shape[0]
    if not stats or n == 0:
        return {"debug_units": batch.num_units, "debug_images": n}
    total = torch.cat(stats).sum(0)
    return {
        "loss_d": total[0] / n,
        "d_real": total[1] / n,
        "d_fake": total[2] / n,
        "r1_penalty": total[3] / n,
        "debug_units": batch.num_units,
        "debug_images": n,
    }


def _repeat_views(x: Tensor, views: int) -> Tensor:
    """[W, ...] -> [W·K, ...], each row repeated K times in a row (image-major, like the
    [W, K, ...] augmentation draws flattened)."""
    return x.unsqueeze(1).expand(x.shape[0], views, *x.shape[1:]).flatten(0, 1)


class _trainable:
    """Inside, exactly the selected parameters require grad (Opacus only sees those) and the
    rest do not; every flag is restored on exit."""

    def __init__(self, module: nn.Module, selected: set[str] | None = None) -> None:
        self.module = module
        self.selected = selected

    def __enter__(self) -> None:
        self.saved = [p.requires_grad for p in self.module.parameters()]
        for name, p in self.module.named_parameters():
            p.requires_grad_(self.selected is None or name in self.selected)

    def __exit__(self, *exc: object) -> None:
        for p, flag in zip(self.module.parameters(), self.saved, strict=True):
            p.requires_grad_(flag)


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
