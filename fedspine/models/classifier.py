"""The abnormality classifier: DenseNet-121 (as in the paper) or a small CNN for CPU demos.

Input contract, shared by training, evaluation, TSTR and SpineGAN's clinical loss: the network
takes float images in [0, 1], shape [N, 1, S, S], where S is ``ClassifierConfig.input_size``
(grey radiograph pixels divided by 255, resized with antialiased bilinear interpolation). There
is no further normalisation inside or outside the network. A caller holding generator output in
[-1, 1] must map it with ``(x + 1) / 2`` and resize it to S before calling the classifier (the
original SpineGAN code fed [-1, 1] and a centre crop, which the classifier had never seen).

The network returns logits, one per output; probabilities are ``sigmoid`` per output, also for
the multiclass task, which is trained one-vs-rest.

``norm="group"`` replaces every BatchNorm by GroupNorm and uses non-inplace activations, so the
model holds no buffers and can later be trained with per-sample gradients (Opacus, DP-SGD).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedspine import __version__
from fedspine.fileio import CLASSIFIER_WEIGHTS, write_atomic

ARCHS = ("densenet121", "small")
NORMS = ("batch", "group")
TASKS = ("binary", "multiclass", "multilabel")
CHECKPOINT_KIND = "classifier"
FORMAT_VERSION = 1
INPUT_CONTRACT = (
    "float32 [N, 1, S, S] in [0, 1]: uint8 grey pixels / 255, resized to S = input_size with "
    "antialiased bilinear interpolation; no other normalisation. Generator output in [-1, 1] "
    "maps to it by (x + 1) / 2 and the same resize. Outputs are logits; sigmoid per output."
)


class ClassifierCheckpointError(Exception):
    """A classifier file or weights file is missing, unsafe, or does not fit the model."""


@dataclass
class ClassifierConfig:
    """What the network is; stored with every classifier so it can be rebuilt exactly."""

    arch: str = "densenet121"
    num_outputs: int = 1
    input_size: int = 224
    norm: str = "batch"
    num_groups: int = 32
    dropout: float = 0.1
    weights_path: str | None = None

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown classifier arch {self.arch!r}; expected one of {ARCHS}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {NORMS}")
        if self.num_outputs < 1:
            raise ValueError(f"num_outputs must be at least 1, got {self.num_outputs}")
        smallest = 32 if self.arch == "densenet121" else 8
        if self.input_size < smallest:
            raise ValueError(
                f"input_size must be at least {smallest} pixels for {self.arch}, "
                f"got {self.input_size}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    """Build the classifier, from scratch or from the user's ``cfg.weights_path``; never downloads.

    ``weights_path`` is a state-dict file (loaded with ``torch.load(weights_only=True)``): a
    MONAI or torchvision DenseNet-121 state dict (torchvision key names are mapped onto MONAI's),
    or a fedspine classifier file. A first convolution stored for 3-channel (ImageNet) input is
    adapted to the 1-channel radiograph by summing its kernels over the input-channel dimension,
    which gives a grey image the response the RGB kernels give to that grey value in all three
    channels. The output layer is taken only where its shape matches; every other weight of the
    model must be found in the file, or loading fails.

    The returned module carries its config as ``model.classifier_config``.
    """
    cfg.validate()
    model = _densenet121(cfg) if cfg.arch == "densenet121" else SmallCNN(cfg)
    if cfg.weights_path:
        load_initial_weights(model, cfg.weights_path)
    model.classifier_config = cfg
    return model


def save_classifier(
    path: str | os.PathLike, model: nn.Module, cfg: ClassifierConfig, meta: dict[str, Any]
) -> Path:
    """Write weights, config and plain metadata atomically (temporary file, then rename).

    ``meta`` must be JSON-serialisable (class names, task, content hash…); fedspine adds its
    version and the input contract.
    """
    path = Path(path)
    try:
        json.dumps(meta)
    except TypeError as err:
        raise ValueError(f"classifier metadata must be plain JSON types: {err}") from None
    full_meta = {"input_contract": INPUT_CONTRACT, "fedspine_version": __version__, **meta}
    data = {
        "fedspine_checkpoint": CHECKPOINT_KIND,
        "format_version": FORMAT_VERSION,
        "config": asdict(cfg),
        "meta": full_meta,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    return write_atomic(path, lambda handle: torch.save(data, handle), durable=True)


def load_classifier(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ClassifierConfig, dict[str, Any]]:
    """Load a classifier written by :func:`save_classifier`, in eval mode, safely.

    Accepts the file itself or a folder holding ``classifier.pt`` (``CLASSIFIER_WEIGHTS``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CLASSIFIER_WEIGHTS
    data = _safe_load(path, map_location)
    if not isinstance(data, dict) or data.get("fedspine_checkpoint") != CHECKPOINT_KIND:
        raise ClassifierCheckpointError(f"{path}: not a fedspine classifier file")
    if data.get("format_version") != FORMAT_VERSION:
        raise ClassifierCheckpointError(
            f"{path}: classifier format {data.get('format_version')} is not the supported "
            f"format {FORMAT_VERSION}; use the fedspine version that wrote it"
        )
    cfg = ClassifierConfig.from_dict(data["config"])
    cfg.weights_path = None
    model = build_classifier(cfg)
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ClassifierCheckpointError(
            f"{path}: weights do not fit the stored config ({first})"
        ) from None
    model.to(map_location)
    model.eval()
    return model, cfg, dict(data.get("meta", {}))


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    batch: int = 64,
    device: str | torch.device | None = None,
    input_size: int | None = None,
) -> np.ndarray:
    """Probabilities [N, K] (sigmoid per output) for uint8 or [0, 1] float images.

    Images may be [N, H, W] or [N, 1, H, W]; they are resized to the model's input size
    (``input_size`` or ``model.classifier_config.input_size``) when they differ.
    """
    size = input_size or getattr(getattr(model, "classifier_config", None), "input_size", None)
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    n = len(images)
    try:
        for start in range(0, n, batch):
            x = to_model_input(images[start : start + batch], size).to(device)
            out.append(torch.sigmoid(model(x).float()).cpu())
    finally:
        model.train(was_training)
    if not out:
        k = getattr(getattr(model, "classifier_config", None), "num_outputs", 1)
        return np.zeros((0, k), dtype=np.float32)
    return torch.cat(out).numpy()


def to_model_input(images: np.ndarray | torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 or float [0, 1] images, [N, H, W] or [N, 1, H, W] -> float32 [N, 1, S, S] in [0, 1]."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(
            f"expected grey images [N, H, W] or [N, 1, H, W], got shape {tuple(x.shape)}"
        )
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        ).clamp(0.0, 1.0)
    return x


def from_generator_output(x: torch.Tensor, input_size: int) -> torch.Tensor:
    """Generator output in [-1, 1], [N, 1, H, W] -> the classifier's input, differentiably.

    For SpineGAN's clinical loss: ``(x + 1) / 2`` clamped to [0, 1], then the same antialiased
    bilinear resize the classifier's training images had.
    """
    return to_model_input(((x + 1.0) * 0.5).clamp(0.0, 1.0), input_size)


def load_initial_weights(model: nn.Module, weights_path: str | os.PathLike) -> list[str]:
    """Initialise ``model`` from a user's state-dict file (see :func:`build_classifier`).

    Returns the model keys left at their fresh initialisation (the output layer, where its shape
    differs, and buffers the file does not have).
    """
    path = Path(weights_path)
    data = _safe_load(path, "cpu")
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ClassifierCheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    source = {_monai_key(k): v for k, v in data.items()}
    target = model.state_dict()
    head = _head_keys(model)
    param_names = {name for name, _ in model.named_parameters()}
    loaded: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, value in target.items():
        src = source.get(key)
        if src is not None and src.shape != value.shape:
            src = _adapt_first_conv(src, value) if src.ndim == 4 else None
        if src is not None:
            loaded[key] = src.to(value.dtype)
        elif key not in head and key in param_names:
            missing.append(key)
    if missing:
        raise ClassifierCheckpointError(
            f"{path}: {len(missing)} weight(s) of the {model.classifier_arch} model are absent or "
            f"of another shape in the file (first: {missing[:3]}); supply weights of the same "
            "architecture"
        )
    target.update(loaded)
    model.load_state_dict(target)
    return sorted(set(target) - set(loaded))


class SmallCNN(nn.Module):
    """A compact CNN (about 150k parameters) for CPU demos and tests.

    Four stages of 3x3 convolutions (16, 32, 64, 128 channels) with norm and ReLU, 2x2 max
    pooling between them, global average pooling, dropout and a linear head.
    """

    classifier_arch = "small"

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        widths = (16, 32, 64, 128)
        convs_per_stage = (2, 2, 2, 1)
        layers: list[tuple[str, nn.Module]] = []
        c_in = 1
        for stage, (width, reps) in enumerate(zip(widths, convs_per_stage, strict=True)):
            if stage > 0:
                layers.append((f"pool{stage}", nn.MaxPool2d(2, ceil_mode=True)))
            for rep in range(reps):
                name = f"s{stage + 1}c{rep + 1}"
                layers.append((f"{name}_conv", nn.Conv2d(c_in, width, 3, padding=1, bias=False)))
                layers.append((f"{name}_norm", _norm(cfg, width)))
                layers.append((f"{name}_act", nn.ReLU(inplace=cfg.norm == "batch")))
                c_in = width
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(c_in, cfg.num_outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.features(x)).flatten(1)
        return self.out(self.dropout(h))


def _densenet121(cfg: ClassifierConfig) -> nn.Module:
    """MONAI's DenseNet-121 for one grey channel, with the paper's dropout before the head.

    The dropout module has no weights, so the state-dict keys stay MONAI's own.
    """
    from monai.networks.nets import DenseNet121  # slow import (seconds); this backbone only

    if cfg.norm == "group":
        norm: str | tuple = ("group", {"num_groups": cfg.num_groups})
        act: tuple = ("relu", {"inplace": False})
    else:
        norm, act = "batch", ("relu", {"inplace": True})
    model = DenseNet121(
        spatial_dims=2,
        in_channels=1,
        out_channels=cfg.num_outputs,
        norm=norm,
        act=act,
        pretrained=False,
    )
    head = model.class_layers
    model.class_layers = nn.Sequential(
        OrderedDict(
            [
                ("relu", head.relu),
                ("pool", head.pool),
                ("flatten", head.flatten),
                ("dropout", nn.Dropout(cfg.dropout)),
                ("out", head.out),
            ]
        )
    )
    model.classifier_arch = "densenet121"
    return model


def _norm(cfg: ClassifierConfig, channels: int) -> nn.Module:
    if cfg.norm == "batch":
        return nn.BatchNorm2d(channels)
    groups = max(1, min(cfg.num_groups, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def _head_keys(model: nn.Module) -> set[str]:
    """The output layer's keys: left fresh when the file's head has another number of outputs."""
    prefix = "class_layers.out." if model.classifier_arch == "densenet121" else "out."
    return {k for k in model.state_dict() if k.startswith(prefix)}


_TORCHVISION_DENSE = re.compile(
    r"^(.*denselayer\d+)\.((?:norm|relu|conv)[12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
)


def _monai_key(key: str) -> str:
    """torchvision DenseNet key -> MONAI key (MONAI nests each dense layer under ``layers``)."""
    key = key.removeprefix("module.")
    match = _TORCHVISION_DENSE.match(key)
    if match:
        return f"{match.group(1)}.layers.{match.group(2)}.{match.group(3)}"
    return key


def _adapt_first_conv(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    """A conv kernel stored for C input channels -> 1 channel, by summing over them."""
    if dst.shape[1] == 1 and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
        return src.sum(dim=1, keepdim=True)
    return None


def _safe_load(path: Path, map_location: str | torch.device) -> Any:
    if not path.is_file():
        raise ClassifierCheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ClassifierCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain Python "
            f"types, which could run code when unpickled ({reason}). Use a plain state dict."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ClassifierCheckpointError(f"{path}: not a readable weights file ({err})") from None
