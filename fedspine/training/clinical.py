"""SpineGAN: the generator's clinical loss through a frozen classifier, and the trainers using it.

SpineGAN (Schonfeld & Veeravagu; reference/paper.md, "What they did", item 3) adds to every
generator step ``λ · BCE(C(map(G(z, c))), target(c))`` where C is a frozen abnormality classifier
(λ = 0.1 in the paper). Gradients flow through C into G; C's weights never change: it stays in
eval mode (BatchNorm statistics frozen, no dropout), none of its parameters requires a gradient,
and no optimizer holds it.

``map`` is how generator output in [-1, 1] reaches C:

- ``default``: what C was trained on (the input contract of fedspine.models.classifier):
  ``(x + 1) / 2`` clamped to [0, 1], then an antialiased bilinear resize to C's input size.
- ``paper``: the original code's mapping, kept for a faithful reproduction (paper.md, error 5:
  "SpineGAN's classifier received generator output in [-1, 1] and a 16-pixel centre crop, while
  it was trained on [0, 1] resized images"). The raw [-1, 1] values, unshifted and unclamped,
  cropped by 16 pixels on each side at the paper's 256 px (256 -> 224, DenseNet's input size);
  at other resolutions by one sixteenth of the side (``R // 16`` pixels) so the kept centre
  stays 7/8 of the image; then resized to C's input size only where the crop differs from it.
  The original also copied the grey channel into three for an RGB DenseNet; fedspine's
  classifier takes the one grey channel, so there is nothing to copy.

Targets follow the classifier's outputs: a binary classifier (one output, named after the
positive class) gets ``c == positive class``; a multiclass one the one-hot of ``c``; a
multilabel (lesion findings) one the finding vector the class implies ("No finding" -> zeros, a
lesion class -> one-hot of that finding).

The trainer takes the loss as a G loss term (:class:`ClinicalTerm`), whatever its D step: a
SpineGAN, DP or not, is one :class:`~fedspine.training.factory.TrainerSpec` with ``clinical``
set.

Privacy (DESIGN.md decision 5): C saw real images, so under DP the generator is private only if
C is; :func:`clinical_privacy` decides what a DP run may claim, and
:class:`~fedspine.training.dp_run.RunPrivacy` writes it into the run's privacy.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedspine.fileio import CLASSIFIER_WEIGHTS, file_sha256
from fedspine.models.classifier import ClassifierConfig, from_generator_output, load_classifier
from fedspine.training.checkpoint import state_sha256
from fedspine.training.gan_trainer import GanTrainer
from fedspine.training.parts import GLoss

MAPPINGS = ("default", "paper")
DEFAULT_WEIGHT = 0.1
NO_FINDING = "No finding"
PAPER_RESOLUTION = 256
PAPER_CROP = 16
DECLARED_PUBLIC = "declared public by the user"
NOT_PRIVATE_REASON = "SpineGAN's clinical classifier was trained on private data without DP"


class ClinicalLossError(ValueError):
    """The classifier cannot serve as SpineGAN's clinical loss for this GAN, or a run conflicts."""


class ClinicalPrivacyError(ClinicalLossError):
    """A DP SpineGAN run whose classifier is neither DP-trained nor declared public."""


class ClinicalLoss:
    """λ · BCE(C(map(fake)), target(c)) with C frozen; see the module docstring.

    ``class_names`` are the GAN's conditioning classes, in label order; ``meta`` is the
    classifier's metadata (task, class_names, output_names) as :func:`load_classifier` returns
    it. ``sha256`` identifies the classifier (its file's hash); without it a hash of the weights
    is used.
    """

    def __init__(
        self,
        classifier: nn.Module,
        classifier_config: ClassifierConfig,
        meta: dict[str, Any],
        class_names: list[str] | tuple[str, ...],
        weight: float = DEFAULT_WEIGHT,
        mapping: str = "default",
        sha256: str | None = None,
        path: str | None = None,
    ) -> None:
        if mapping not in MAPPINGS:
            raise ClinicalLossError(
                f"unknown clinical input mapping {mapping!r}; choose {MAPPINGS}"
            )
        if not (weight >= 0 and np.isfinite(weight)):
            raise ClinicalLossError(f"the clinical weight λ must be finite and >= 0, got {weight}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.input_size = int(classifier_config.input_size)
        self.num_outputs = int(classifier_config.num_outputs)
        self.meta = dict(meta)
        self.class_names = [str(n) for n in class_names]
        self.weight = float(weight)
        self.mapping = mapping
        self.path = path
        self.sha256 = sha256 or weights_sha256(classifier)
        self.task, self.output_names, table = clinical_targets(
            self.class_names, self.meta, self.num_outputs, where=path or "the classifier"
        )
        self.targets = torch.from_numpy(table)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        class_names: list[str] | tuple[str, ...],
        weight: float = DEFAULT_WEIGHT,
        mapping: str = "default",
        device: str | torch.device = "cpu",
    ) -> ClinicalLoss:
        """Load C from a classifier file (or a folder holding classifier.pt), frozen."""
        file = classifier_file(path)
        model, cfg, meta = load_classifier(file, map_location=device)
        return cls(
            model,
            cfg,
            meta,
            class_names,
            weight=weight,
            mapping=mapping,
            sha256=file_sha256(file),
            path=str(file.resolve()),
        )

    def __call__(self, fake: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ · BCE, BCE) for generator output ``fake`` [N, 1, R, R] of classes ``c`` [N].

        The BCE is the mean over the batch and the classifier's outputs.
        """
        if self.classifier.training:
            self.classifier.eval()  # a stray .train() would let BatchNorm statistics move
        logits = self.classifier(self.map_input(fake))
        target = self.targets.to(logits.device)[c.to(logits.device)]
        bce = F.binary_cross_entropy_with_logits(logits.float(), target)
        return bce * self.weight, bce

    def map_input(self, fake: torch.Tensor) -> torch.Tensor:
        """Generator output -> the classifier's input, by this loss's mapping (differentiable)."""
        return map_generator_output(fake, self.mapping, self.input_size)

    def to(self, device: str | torch.device) -> ClinicalLoss:
        self.classifier.to(device)
        self.targets = self.targets.to(device)
        return self

    def identity(self) -> dict[str, Any]:
        """What a snapshot records about C (its weights stay in its own file) and the loss."""
        return {
            "classifier_sha256": self.sha256,
            "classifier_path": self.path,
            "weight": self.weight,
            "mapping": self.mapping,
            "task": self.task,
            "output_names": list(self.output_names),
            "class_names": list(self.class_names),
        }


class ClinicalTerm(GLoss):
    """SpineGAN's G loss term: the clinical loss joins the adversarial one in the same backward
    pass of every G step (tests/training/test_spinegan.py checks that with λ = 0 the generator
    is bit-identical to the cGAN's, DP or not).

    It logs ``loss_clinical`` (λ · BCE, as added to L_G) and ``clinical_bce``, writes C's
    identity into the trainer's state (``state["clinical"]``; C's weights stay in their own
    file) and refuses to resume a state trained with another classifier, λ or mapping, or none.
    """

    def __init__(self, clinical: ClinicalLoss) -> None:
        self.clinical = clinical

    def attach(self, trainer: GanTrainer) -> None:
        net = trainer.config.network
        if net.img_channels != 1:
            raise ClinicalLossError(
                f"the clinical classifier takes grey images; this generator makes "
                f"{net.img_channels} channels"
            )
        if len(self.clinical.class_names) != net.c_dim:
            raise ClinicalLossError(
                f"the clinical loss knows {len(self.clinical.class_names)} classes "
                f"({self.clinical.class_names}), the generator is conditioned on {net.c_dim}"
            )
        self.clinical.to(trainer.device)

    def g_loss(
        self, fake: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_clinical, bce = self.clinical(fake, labels)
        return loss_clinical, {
            "loss_clinical": loss_clinical.detach(),
            "clinical_bce": bce.detach(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"clinical": self.clinical.identity()}

    def check_state(self, state: dict) -> None:
        check_same_clinical(state.get("clinical"), self.clinical)


@dataclass
class ClinicalPrivacy:
    """What a DP SpineGAN run may say about its classifier in privacy.json."""

    basis: str  # "dp", "public" or "not_private"
    component: str
    not_private_reason: str | None = None


def clinical_privacy(
    meta: dict[str, Any], classifier_public: bool, not_private: bool, where: str = "the classifier"
) -> ClinicalPrivacy:
    """Decide what a ``--dp`` SpineGAN run may claim, or refuse it.

    C saw real images, so the generator is private only if C was DP-trained (its metadata has a
    ``dp`` or ``privacy`` record with an ε) or the user declares it was trained on public data.
    ``not_private`` lets the run go on, marked not private.
    """
    if classifier_public and not_private:
        raise ClinicalPrivacyError("choose one of --classifier-public and --not-private")
    if not_private:
        return ClinicalPrivacy(
            "not_private",
            "trained on private data without DP (the run is marked not private)",
            NOT_PRIVATE_REASON,
        )
    if classifier_public:
        return ClinicalPrivacy("public", DECLARED_PUBLIC)
    record = classifier_dp_record(meta)
    if record is not None:
        eps, delta = record.get("epsilon"), record.get("delta")
        return ClinicalPrivacy(
            "dp",
            f"DP-trained (ε = {eps}, δ = {delta} on its own), its mechanisms found in this "
            "site's privacy ledger and composed into ε above",
        )
    raise ClinicalPrivacyError(
        f"--model spinegan --dp: {where} was not trained with differential privacy (its "
        "metadata has no dp record) and it saw real images, so the generator would not be "
        "private; pass --classifier-public if it was trained on public data only, or "
        "--not-private to train anyway and mark the run not private"
    )


def classifier_dp_record(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The classifier's DP record (a ``dp`` or ``privacy`` entry with an ε), if it has one."""
    for key in ("dp", "privacy"):
        record = meta.get(key)
        if isinstance(record, dict) and isinstance(record.get("epsilon"), int | float):
            return record
    return None


def classifier_patients_on_record(ledger, meta: dict[str, Any], where: str) -> list[str]:
    """The patient keys of a DP classifier's mechanisms in ``ledger``; refused where the ledger
    holds none of its run."""
    record = classifier_dp_record(meta) or {}
    run_id = record.get("run_id")
    records = ledger.records(run_id=str(run_id)) if run_id else []
    if not records:
        raise ClinicalPrivacyError(
            f"--model spinegan --dp: {where} says it was DP-trained, but the privacy ledger "
            f"{ledger.path} holds no mechanism of its run ({run_id or 'no run id'}), so its ε "
            "would not be composed with this run's. Train the classifier with `fedspine "
            "classifier train --dp` in this site's privacy home (--privacy-home), or pass "
            "--classifier-public if it saw public data only"
        )
    return sorted({key for r in records for key in ledger.cohort(r)})


def clinical_targets(
    class_names: list[str],
    meta: dict[str, Any],
    num_outputs: int,
    where: str = "the classifier",
) -> tuple[str, list[str], np.ndarray]:
    """(task, output names, float32 table [num classes, num outputs]): row k is class k's target.

    Raises ClinicalLossError where the classifier's classes do not fit the GAN's.
    """
    task = meta.get("task")
    clf_classes = meta.get("class_names")
    outputs = meta.get("output_names")
    if task not in ("binary", "multiclass", "multilabel"):
        raise ClinicalLossError(
            f"{where}: its metadata names no task (binary, multiclass or multilabel); use a "
            "classifier written by `fedspine classifier train`"
        )
    if task != "multilabel" and clf_classes is None:
        raise ClinicalLossError(f"{where}: its metadata has no class_names")
    if task == "binary" and outputs is None:
        outputs = [clf_classes[1]] if len(clf_classes) == 2 else None
    if task == "multiclass" and outputs is None:
        outputs = list(clf_classes)
    if outputs is None:
        raise ClinicalLossError(f"{where}: its metadata has no output_names")
    outputs = [str(n) for n in outputs]
    if len(outputs) != num_outputs:
        raise ClinicalLossError(
            f"{where}: its metadata names {len(outputs)} outputs but the network has {num_outputs}"
        )
    if task in ("binary", "multiclass") and list(clf_classes) != list(class_names):
        raise ClinicalLossError(
            f"{where} was trained on classes {list(clf_classes)} but the GAN is conditioned on "
            f"{list(class_names)}; use a classifier trained on data of the same label schema"
        )
    k = len(class_names)
    table = np.zeros((k, len(outputs)), dtype=np.float32)
    if task == "binary":
        if outputs[0] not in class_names:
            raise ClinicalLossError(
                f"{where}: its positive output {outputs[0]!r} is not one of the GAN's classes "
                f"{list(class_names)}"
            )
        table[class_names.index(outputs[0]), 0] = 1.0
    elif task == "multiclass":
        if outputs != list(class_names):
            raise ClinicalLossError(
                f"{where}: its outputs {outputs} are not the GAN's classes {list(class_names)}"
            )
        table[:] = np.eye(k, dtype=np.float32)
    else:
        for row, name in enumerate(class_names):
            if name in outputs:
                table[row, outputs.index(name)] = 1.0
            elif name.strip().lower() != NO_FINDING.lower():
                raise ClinicalLossError(
                    f"{where}: the GAN's class {name!r} is neither 'No finding' nor one of the "
                    f"classifier's findings {outputs}; use a classifier of the same label schema"
                )
    return str(task), outputs, table


def map_generator_output(x: torch.Tensor, mapping: str, input_size: int) -> torch.Tensor:
    """Generator output [N, 1, R, R] in [-1, 1] -> classifier input [N, 1, S, S] (see module doc).

    ``default``: [0, 1], resized to S. ``paper``: raw values, centre crop of ``R // 16`` pixels
    per side (16 at 256 px), resized to S only where the crop is not already S.
    """
    if mapping == "default":
        return from_generator_output(x, input_size)
    if mapping != "paper":
        raise ClinicalLossError(f"unknown clinical input mapping {mapping!r}; choose {MAPPINGS}")
    crop = paper_crop(int(x.shape[-1]))
    if crop:
        x = x[..., crop:-crop, crop:-crop]
    if tuple(x.shape[-2:]) != (input_size, input_size):
        x = F.interpolate(
            x.float(),
            size=(input_size, input_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    return x


def paper_crop(resolution: int) -> int:
    """Pixels the paper's mapping crops off each side: 16 at 256 px, ``R // 16`` in general."""
    return resolution * PAPER_CROP // PAPER_RESOLUTION


def check_same_clinical(saved: dict[str, Any] | None, clinical: ClinicalLoss) -> None:
    """A SpineGAN run resumes only with the classifier, λ and mapping it was started with."""
    if saved is None:
        raise ClinicalLossError(
            "the saved state is not from a SpineGAN run; resume it with --model cgan"
        )
    if saved["classifier_sha256"] != clinical.sha256:
        raise ClinicalLossError(
            f"the run was trained with the classifier {saved.get('classifier_path')} (sha256 "
            f"{saved['classifier_sha256'][:12]}…), not {clinical.path or 'this one'} (sha256 "
            f"{clinical.sha256[:12]}…); resume with the same --classifier"
        )
    for key, mine in (("weight", clinical.weight), ("mapping", clinical.mapping)):
        if saved[key] != mine:
            raise ClinicalLossError(
                f"the run was trained with clinical {key} {saved[key]!r}, not {mine!r}; "
                "resume with the same setting"
            )


def classifier_file(path: str | os.PathLike) -> Path:
    """A classifier file, or the classifier.pt inside a classifier folder."""
    path = Path(path)
    return path / CLASSIFIER_WEIGHTS if path.is_dir() else path


def weights_sha256(model: nn.Module) -> str:
    """A hash of a module's state dict (names, shapes, dtypes and values), for in-memory C."""
    return state_sha256(model.state_dict())
