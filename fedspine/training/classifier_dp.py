"""Patient-level DP-SGD for the abnormality classifier, with its ε in the data's ledger.

Why (DESIGN.md decisions 4 and 5, reference/dp.md): SpineGAN's clinical loss passes generator
output through a classifier C trained on real radiographs, so a DP SpineGAN is private only if C
is. This module trains C the way the discriminator is trained under DP:

- The privacy unit is the patient: :class:`~fedspine.training.dp.PatientPoissonSampler` includes
  each training patient with probability q = patients_per_step / patients and hands back all of
  that patient's images. One per-patient gradient row is the gradient of the patient's summed
  loss, from ``torch.func.vmap(grad(...))``; Opacus' ``DPOptimizer`` clips each row to C, adds
  N(0, σ²C²) once per step and divides by the expected number of patients
  (:func:`~fedspine.training.dp.privatised_step`). An empty draw still takes a noise-only step;
  every step counts.
- The network may hold no buffers (BatchNorm statistics would escape clipping and noise, and
  BatchNorm mixes patients in a batch): build it with ``norm="group"``.
- The loss is unweighted BCE: the non-private loop's ``pos_weight = neg / pos`` is computed from
  the private labels and would steer training outside the mechanism. Any threshold or AUC is
  only reported; the model kept is the one after the last of a fixed number of steps, since
  choosing a step on the private validation split is an uncounted release.
- Patient sampling and the Gaussian noise draw from fresh OS entropy, never from ``seed``: a seed
  written beside the outputs would let anyone replay the batches and subtract the noise. The
  seed drives only augmentation and dropout, which are independent of the data.

A run goes through the privacy engine (:mod:`fedspine.privacy.engine`):
:func:`plan_classifier_dp` plans σ against the worst training patient's history in the site's
privacy home and refuses a run over the cap before anything is written; the steps are reserved
in the ledger before the first one runs (:meth:`ClassifierDPPlan.reserve`), and
:func:`train_classifier_dp_steps` takes them; :func:`record_classifier_dp` settles the
reservation and returns the ``meta["dp"]`` record (with the run id a DP SpineGAN looks up in the
ledger). A later ``fedspine train --dp`` on the same patients composes with it, whatever folder
they were prepared into.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedspine.data.prepared import PreparedDataset
from fedspine.privacy.accounting import REPORT_ACCOUNTANT, Mechanism
from fedspine.privacy.engine import (
    PrivacyCapExceeded,
    PrivacyEngine,
    PrivacyPlan,
    Reservation,
    new_run_id,
    worst_epsilon,
)
from fedspine.training.classifier_trainer import (
    ClassifierTrainConfig,
    augment_batch,
    load_images,
    resolve_task,
    targets,
)
from fedspine.training.dp import (
    PatientPoissonSampler,
    flatten_units,
    make_dp_optimizer,
    privatised_step,
)
from fedspine.training.dp_run import dp_unit_of

__all__ = [
    "ClassifierDPConfig",
    "ClassifierDPPlan",
    "PrivacyCapExceeded",
    "plan_classifier_dp",
    "record_classifier_dp",
    "train_classifier_dp_steps",
]

MECHANISM_LABEL = "clinical-classifier"
WHAT = "classifier DP-SGD"
CHUNK_UNITS = 16
"""Patients per vmap call: bounds the memory of per-patient gradient rows."""
CLASS_WEIGHTING = (
    "none: unweighted BCE (class weights from the private labels would steer training outside "
    "the DP mechanism)"
)
MODEL_SELECTION = (
    "none: the model after the last of a fixed number of steps is kept (choosing a step on the "
    "private validation split would be an uncounted release)"
)
RANDOMNESS = (
    "patient sampling and DP noise from fresh OS entropy (not the recorded seed); the seed drives "
    "initialisation, augmentation and dropout only"
)

_DEFAULTS = ClassifierTrainConfig()


@dataclass(frozen=True)
class ClassifierDPConfig:
    """DP-SGD settings of a classifier run; σ is already planned (see :func:`plan_classifier_dp`).

    q = ``patients_per_step`` / number of training patients (at most 1); ``clip`` is the L2 bound
    C on one patient's gradient; ``lr`` is Adam's learning rate (Adam only post-processes the
    privatised gradient).
    """

    noise_multiplier: float
    clip: float = 1.0
    patients_per_step: int = 32
    lr: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "clip", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (
                isinstance(value, int | float) and math.isfinite(value) and value > 0
            ):
                raise ValueError(
                    f"ClassifierDPConfig: {name} must be > 0 and finite, got {value!r}"
                )
        if isinstance(self.patients_per_step, bool) or int(self.patients_per_step) < 1:
            raise ValueError(
                f"ClassifierDPConfig: patients_per_step must be >= 1, got {self.patients_per_step}"
            )


@dataclass(frozen=True)
class ClassifierDPPlan:
    """σ, q, steps and δ of one DP classifier run, checked by the privacy engine."""

    engine: PrivacyEngine
    privacy: PrivacyPlan
    patients_per_step: int
    target_epsilon: float | None
    max_epsilon: float | None

    @property
    def noise_multiplier(self) -> float:
        return self.privacy.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.privacy.sample_rate

    @property
    def steps(self) -> int:
        return self.privacy.steps

    @property
    def delta(self) -> float:
        return self.privacy.delta

    @property
    def clip(self) -> float:
        return self.privacy.clip_norm

    @property
    def patients(self) -> int:
        return self.privacy.patients

    @property
    def spent_before(self) -> float:
        return self.privacy.spent_before

    @property
    def projected_epsilon(self) -> float:
        return self.privacy.projected

    @property
    def run_id(self) -> str:
        return self.engine.run_id

    @property
    def privacy_home(self) -> Path:
        return self.engine.home.path

    def config(self, lr: float) -> ClassifierDPConfig:
        """The :class:`ClassifierDPConfig` that trains this plan."""
        return ClassifierDPConfig(self.noise_multiplier, self.clip, self.patients_per_step, lr)

    def mechanism(self, steps: int) -> Mechanism:
        """The ledger entry of ``steps`` steps of this plan."""
        return self.privacy.mechanism(steps)

    def reserve(self, notes: dict[str, Any] | None = None) -> Reservation:
        """Write every planned step into the ledger before the first one runs."""
        return self.engine.reserve(self.privacy, extra={"what": WHAT, **(notes or {})})


def train_classifier_dp_steps(
    model: nn.Module,
    data: PreparedDataset,
    task: str,
    dp: ClassifierDPConfig,
    steps: int,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    augment: bool = True,
    progress: Callable[[int], None] | None = None,
    reservation: Reservation | None = None,
) -> dict[str, Any]:
    """Runs `steps` DP-SGD steps on data's train split, updating `model` in place.
    Returns {"steps", "sample_rate", "noise_multiplier", "clip", "patients", "mean_loss"}.

    Rows of ``data`` outside the 'train' split are never read. ``steps`` counts every optimizer
    step, noise-only ones included: record ``mechanism(σ, sample_rate, steps)`` in the ledger.
    Each call starts a fresh Adam state (federated rounds average weights, not optimizer state).
    ``progress(k)`` is called after step k. ``mean_loss`` is the mean per-image BCE of the
    sampled patients before each update: computed on private data WITHOUT noise, for the data
    owner's own console only; never send it to a server or write it into a shared output.
    ``reservation.take(1)`` runs before each step (the steps must be in the ledger first).
    The model is left in eval mode.
    """
    if isinstance(steps, bool) or int(steps) < 1:
        raise ValueError(f"train_classifier_dp_steps: steps must be >= 1, got {steps}")
    check_dp_model(model)
    device = torch.device(device)
    train = data.select("train", labelled=False)
    if len(train) == 0:
        raise ValueError(f"{data.root}: no rows in the 'train' split to train on")
    task = resolve_task(task, train)
    y, idx, names = targets(train, task)
    if len(idx) == 0:
        raise ValueError(f"{data.root}: no training rows with a usable label for the {task} task")
    model_cfg = getattr(model, "classifier_config", None)
    if model_cfg is not None and int(model_cfg.num_outputs) != len(names):
        raise ValueError(
            f"the classifier has {model_cfg.num_outputs} output(s) but the {task} task on "
            f"{data.root} needs {len(names)}; build it for this data's schema"
        )
    size = int(getattr(model_cfg, "input_size", None) or train.resolution)
    images = load_images(train, idx, size)
    labels = torch.from_numpy(y)
    units = train.privacy_ids[idx]
    sampler = PatientPoissonSampler(
        units,
        sample_rate(dp.patients_per_step, _count_patients(units)),
        np.random.default_rng(secrets.randbits(128)),
    )

    model.to(device).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the classifier has no trainable parameters")
    optimizer = torch.optim.Adam([p for _, p in named], lr=dp.lr)
    noise = torch.Generator(device=device)
    noise.manual_seed(secrets.randbits(63))
    dp_optimizer = make_dp_optimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.clip,
        expected_batch_size=max(1, round(sampler.sample_rate * sampler.num_patients)),
        generator=noise,
    )
    if len(dp_optimizer.params) != len(named):
        raise ValueError("the DP optimizer does not hold exactly the trainable parameters")
    engine = _PerPatientGradients(model, [n for n, _ in named])
    aug_gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # dropout masks inside vmap
    total_loss, total_images = 0.0, 0
    try:
        for step in range(1, int(steps) + 1):
            index, unit_index = flatten_units(sampler())
            x = images[torch.from_numpy(index)].to(device).float().div_(255.0)
            if augment and len(index):
                x = augment_batch(
                    x, _DEFAULTS.flip_p, _DEFAULTS.rotate_deg, _DEFAULTS.crop_scale, aug_gen
                )
            t = labels[torch.from_numpy(index)].to(device)
            losses: list[Tensor] = []
            if reservation is not None:
                reservation.take(1)
            privatised_step(
                dp_optimizer,
                (rows for rows, _ in engine.chunks(x, t, torch.from_numpy(unit_index), losses)),
            )
            total_loss += float(sum(float(v) for v in losses))
            total_images += len(index)
            if progress is not None:
                progress(step)
    finally:
        model.eval()
    return {
        "steps": int(steps),
        "sample_rate": sampler.sample_rate,
        "noise_multiplier": float(dp.noise_multiplier),
        "clip": float(dp.clip),
        "patients": sampler.num_patients,
        "mean_loss": total_loss / total_images if total_images else float("nan"),
    }


def per_patient_gradients(
    model: nn.Module, images: Tensor, target: Tensor, unit_index: Tensor | np.ndarray
) -> dict[str, Tensor]:
    """Unclipped per-patient gradient rows {parameter name: [patients, *shape]}, in patient order.

    ``images`` float [N, 1, S, S] in [0, 1], ``target`` [N, K], ``unit_index`` [N] the patient
    (0 .. patients - 1) of each image. The rows the DP step clips; for audits and tests.
    """
    check_dp_model(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = _PerPatientGradients(model, names)
    unit_index = torch.as_tensor(np.asarray(unit_index), dtype=torch.int64)
    chunks = list(engine.chunks(images, target, unit_index, []))
    num_units = int(unit_index.max()) + 1 if unit_index.numel() else 0
    params = dict(model.named_parameters())
    out = {}
    for k, name in enumerate(names):
        rows = params[name].new_zeros((num_units, *params[name].shape))
        for chunk_rows, units in chunks:
            rows[units.to(rows.device)] = chunk_rows[k]
        out[name] = rows
    return out


def check_dp_model(model: nn.Module) -> None:
    """Refuse a network with BatchNorm or any buffer: its statistics escape clipping and noise."""
    batchnorm = [
        name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if batchnorm:
        raise ValueError(
            f"the classifier has BatchNorm layers ({batchnorm[0]}, {len(batchnorm)} in all): "
            "BatchNorm mixes the patients of a batch and its running statistics escape clipping "
            "and noise, so DP training refuses it; build it with norm='group' (--norm group)"
        )
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ValueError(
            f"the classifier has buffers {buffers[:3]}: they would be updated from private data "
            "outside the DP mechanism; use a network with parameters only (norm='group')"
        )


def sample_rate(patients_per_step: int, patients: int) -> float:
    """q = patients_per_step / patients, at most 1."""
    if int(patients) < 1:
        raise ValueError(f"no training patients (got {patients})")
    return min(1.0, int(patients_per_step) / int(patients))


def epochs_to_steps(epochs: float, q: float) -> int:
    """DP steps of ``epochs`` expected passes over the patients: ceil(epochs / q)."""
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    return max(1, math.ceil(epochs / q - 1e-9))


def plan_classifier_dp(
    data: PreparedDataset,
    task: str,
    *,
    epochs: float,
    patients_per_step: int = 32,
    clip: float = 1.0,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float | None = None,
    privacy_home: str | Path | None = None,
    privacy_unit: str | None = None,
    max_epsilon: float | None = None,
) -> ClassifierDPPlan:
    """σ, q, steps and δ of a run on ``data``'s train split, against its patients' ledger.

    Give exactly one of ``target_epsilon`` (ε of the worst training patient after this run,
    everything on record included; σ is calibrated with the planning accountant) and
    ``noise_multiplier``. Records nothing (the privacy home and its key are made if absent).
    Raises PrivacyCapExceeded when the worst patient would pass ``max_epsilon``, and
    PrivacyError (a ValueError) for an unreachable target, a δ above the site's or data without
    patient identifiers (unless ``privacy_unit="image"``).
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon and noise_multiplier")
    train = data.select("train", labelled=False)
    _, idx, _ = targets(train, resolve_task(task, train))
    if len(idx) == 0:
        raise ValueError(f"{data.root}: no training rows with a usable label")
    engine = PrivacyEngine(
        train.privacy_ids[idx],
        unit=dp_unit_of(data, privacy_unit),
        home=privacy_home,
        run_id=new_run_id("classifier"),
        delta=delta,
    )
    q = sample_rate(patients_per_step, engine.num_patients)
    steps = epochs_to_steps(epochs, q)
    try:
        privacy = engine.plan(
            steps=steps,
            sample_rate=q,
            clip_norm=clip,
            label=MECHANISM_LABEL,
            target_epsilon=target_epsilon,
            noise_multiplier=noise_multiplier,
            cap=max_epsilon,
        )
    except PrivacyCapExceeded as err:
        raise PrivacyCapExceeded(
            f"{err} Lower --epochs or --epsilon, raise --noise-multiplier, or raise "
            "--max-epsilon if the data owner allows it."
        ) from None
    return ClassifierDPPlan(engine, privacy, int(patients_per_step), target_epsilon, max_epsilon)


def record_classifier_dp(
    plan: ClassifierDPPlan, reservation: Reservation, notes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Settle ``reservation`` to the steps that ran; return ``meta["dp"]``.

    A run cut short settles to what it ran. ε is reported with PRV (RDP where PRV would need
    too much memory): the run's own, and its worst patient's with everything on record.
    """
    reservation.settle()
    steps = reservation.taken
    own, accountant = worst_epsilon([[plan.mechanism(steps)]], plan.delta, REPORT_ACCOUNTANT)
    total, total_accountant, _ = plan.engine.reported()
    return {
        "epsilon": own,
        "delta": plan.delta,
        "accountant": accountant,
        "noise_multiplier": plan.noise_multiplier,
        "clip": plan.clip,
        "sample_rate": plan.sample_rate,
        "steps": int(steps),
        "patients": plan.patients,
        "patients_per_step": plan.patients_per_step,
        "unit": plan.engine.unit,
        "mechanism": "dp-sgd-poisson",
        "what": WHAT,
        "label": MECHANISM_LABEL,
        "target_epsilon": plan.target_epsilon,
        "max_epsilon": plan.max_epsilon,
        "run_id": plan.run_id,
        "data_epsilon_after": total,
        "data_epsilon_accountant": total_accountant,
        "class_weighting": CLASS_WEIGHTING,
        "model_selection": MODEL_SELECTION,
        "randomness": RANDOMNESS,
        **({"notes": dict(notes)} if notes else {}),
    }


# --------------------------------------------------------------------------------------------


class _PerPatientGradients:
    """Per-patient gradient rows of the summed BCE, by vmap(grad) over padded patient chunks."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model = model
        self.names = names
        self.grad_fn = torch.func.vmap(
            torch.func.grad(self._unit_loss, has_aux=True),
            in_dims=(None, None, 0, 0, 0),
            randomness="different",
        )

    def chunks(
        self, x: Tensor, t: Tensor, unit_index: Tensor, losses: list[Tensor]
    ) -> Iterator[tuple[list[Tensor], Tensor]]:
        """(rows aligned with ``names``, the patients they belong to), ``CHUNK_UNITS`` at a time.

        Patients are grouped by image count so each chunk pads only to its own largest patient;
        padded slots are masked out of the loss. Each chunk's summed loss goes to ``losses``.
        """
        if unit_index.numel() == 0:
            return
        unit_index = unit_index.cpu()
        num_units = int(unit_index.max()) + 1
        sizes = torch.bincount(unit_index, minlength=num_units)
        by_size = torch.argsort(sizes, stable=True)
        members = torch.argsort(unit_index, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        trainable = set(self.names)
        params = {n: p.detach() for n, p in self.model.named_parameters() if n in trainable}
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in trainable}
        for begin in range(0, num_units, CHUNK_UNITS):
            units = by_size[begin : begin + CHUNK_UNITS]
            units = units[sizes[units] > 0]
            if units.numel() == 0:
                continue
            width = int(sizes[units].max())
            slots = torch.arange(width)
            mask = slots[None, :] < sizes[units][:, None]
            pos = members[(starts[units][:, None] + slots[None, :]).clamp(max=members.numel() - 1)]
            pos = torch.where(mask, pos, torch.zeros_like(pos)).to(x.device)
            mask = mask.to(x.device, x.dtype)
            grads, loss = self.grad_fn(params, frozen, x[pos], t[pos], mask)
            losses.append(loss.detach().sum())
            yield [grads[n] for n in self.names], units

    def _unit_loss(
        self,
        params: dict[str, Tensor],
        frozen: dict[str, Tensor],
        x: Tensor,
        t: Tensor,
        mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One patient's loss: Σ over its images of the BCE averaged over the outputs."""
        logits = torch.func.functional_call(self.model, (params, frozen), (x,))
        per_image = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
        loss = (per_image.mean(dim=1) * mask).sum()
        return loss, loss.detach()


def _count_patients(patient_ids: np.ndarray) -> int:
    return len(np.unique(np.asarray(patient_ids).astype(str)))
