"""Training and evaluating the abnormality classifier (DenseNet-121 or the small CNN).

Model selection uses a validation split carved from training data by patient, never the test
split: the paper's code chose checkpoints on test images, which inflates the reported AUC.
:func:`train_classifier` refuses rows whose split is "test" and records which splits and how
many rows it saw for training and for selection, so a report can prove it.

Tasks (every output is a sigmoid trained with BCE, weighted by ``pos_weight = neg / pos``):

- ``binary``: one output, positive where the label is class 1 (two-class datasets);
- ``multiclass``: one output per class, one-hot targets, so each class gets a one-vs-rest AUC;
- ``multilabel``: one output per finding column of the prepared dataset (lesion variant).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from fedspine.data.prepared import PreparedDataset
from fedspine.fileio import file_sha256
from fedspine.models.classifier import TASKS, ClassifierConfig, build_classifier, predict_proba

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class ClassifierTrainConfig:
    """How the classifier is trained; written beside every classifier it produces.

    ``input_size`` None means the dataset's own resolution. ``model`` describes the network;
    its ``num_outputs`` and ``input_size`` are filled in from the task and ``input_size``.
    ``steps_per_epoch`` None makes an epoch one pass over the training rows; a number makes it
    that many optimizer steps of full batches drawn from reshuffled passes, so classifiers
    trained on sets of different sizes get the same optimizer steps and patience in steps.
    """

    task: str = "auto"
    epochs: int = 30
    batch: int = 32
    lr: float = 1e-3
    patience: int = 5
    augment: bool = True
    flip_p: float = 0.3
    rotate_deg: float = 5.0
    crop_scale: tuple[float, float] = (0.8, 1.0)
    class_weighting: bool = True
    seed: int = 0
    device: str = "auto"
    max_train_images: int | None = None
    input_size: int | None = None
    steps_per_epoch: int | None = None
    eval_batch: int = 128
    amp: bool = True
    model: ClassifierConfig = field(default_factory=ClassifierConfig)

    def validate(self) -> None:
        if self.task not in (*TASKS, "auto"):
            raise ValueError(f"unknown task {self.task!r}; expected auto or one of {TASKS}")
        if self.epochs < 1 or self.batch < 2:
            raise ValueError("epochs must be at least 1 and batch at least 2")
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.max_train_images is not None and self.max_train_images < 2:
            raise ValueError("max_train_images must be at least 2")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {self.steps_per_epoch}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["crop_scale"] = list(self.crop_scale)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierTrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "model" in values and isinstance(values["model"], dict):
            values["model"] = ClassifierConfig.from_dict(values["model"])
        if "crop_scale" in values:
            values["crop_scale"] = tuple(values["crop_scale"])
        return cls(**values)


def train_classifier(
    train: PreparedDataset,
    val: PreparedDataset,
    cfg: ClassifierTrainConfig,
    progress: ProgressFn | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train on ``train``, keep the epoch with the best validation AUC on ``val``.

    Ties in AUC are broken by the lower validation loss; training stops after
    ``cfg.patience`` epochs without a better epoch.
    Rows not eligible under the label schema (label -1) are skipped for the binary and
    multiclass tasks. ``progress`` receives ``{"event": "batch", ...}`` after every step and
    ``{"event": "epoch", ...}`` (the epoch's history record) after every epoch.
    Returns the model holding the best epoch's weights, in eval mode, and the history.
    """
    cfg.validate()
    for name, data in (("training", train), ("validation", val)):
        if np.any(data.splits == "test"):
            raise ValueError(
                f"{int(np.sum(data.splits == 'test'))} {name} row(s) belong to the test split; "
                "the test split is for the final evaluation only, never for training or selection"
            )
    task = resolve_task(cfg.task, train)
    if list(val.class_names) != list(train.class_names) or (
        task == "multilabel" and list(val.finding_names) != list(train.finding_names)
    ):
        raise ValueError(
            "the validation data has other class or finding names than the training data "
            f"({val.class_names} vs {train.class_names}); use a validation set of the same schema"
        )
    y_train, idx_train, output_names = targets(train, task)
    y_val, idx_val, _ = targets(val, task)
    if cfg.max_train_images is not None and len(idx_train) > cfg.max_train_images:
        keep = np.sort(
            np.random.default_rng(cfg.seed).permutation(len(idx_train))[: cfg.max_train_images]
        )
        idx_train, y_train = idx_train[keep], y_train[keep]
    _check_examples(y_train, y_val, output_names, task)

    size = cfg.input_size or train.resolution
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model_cfg = replace(cfg.model, num_outputs=len(output_names), input_size=size)
    model = build_classifier(model_cfg).to(device)

    x_train = load_images(train, idx_train, size)
    x_val = load_images(val, idx_val, size)
    t_train = torch.from_numpy(y_train)
    pos = y_train.sum(axis=0)
    pos_weight = (len(y_train) - pos) / pos
    criterion = nn.BCEWithLogitsLoss(
        pos_weight=torch.from_numpy(pos_weight).float().to(device) if cfg.class_weighting else None
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    use_amp = cfg.amp and device.type == "cuda"

    history: dict[str, Any] = {
        "task": task,
        "output_names": output_names,
        "class_names": list(train.class_names),
        "input_size": size,
        "device": str(device),
        "pos_weight": [float(w) for w in pos_weight] if cfg.class_weighting else None,
        "train_splits": sorted(set(train.splits[idx_train].tolist())),
        "val_splits": sorted(set(val.splits[idx_val].tolist())),
        "train_rows": len(idx_train),
        "val_rows": len(idx_val),
        "train_patients": len(set(train.patient_ids[idx_train].tolist())),
        "val_patients": len(set(val.patient_ids[idx_val].tolist())),
        "model_config": asdict(model_cfg),
        "epochs": [],
        "best_epoch": None,
        "best_val_auc": None,
        "stopped_early": False,
    }
    best_key = (-math.inf, -math.inf)
    best_state: dict[str, torch.Tensor] | None = None
    n = len(idx_train)
    batches = cfg.steps_per_epoch or math.ceil(n / cfg.batch)
    stream = _RowStream(n, gen) if cfg.steps_per_epoch is not None else None
    steps = 0
    history["steps_per_epoch"] = batches
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start = time.perf_counter()
        if cfg.steps_per_epoch is None:
            perm = torch.randperm(n, generator=gen)
        total_loss, seen = 0.0, 0
        for b in range(batches):
            if cfg.steps_per_epoch is None:
                rows = perm[b * cfg.batch : (b + 1) * cfg.batch]
            else:
                assert stream is not None
                rows = stream.take(min(cfg.batch, n))
            if len(rows) < 2:
                continue
            steps += 1
            x = x_train[rows].to(device, non_blocking=True).float().div_(255.0)
            if cfg.augment:
                x = augment_batch(x, cfg.flip_p, cfg.rotate_deg, cfg.crop_scale, generator=gen)
            t = t_train[rows].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = criterion(logits.float(), t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(rows)
            seen += len(rows)
            if progress is not None:
                progress(
                    {
                        "event": "batch",
                        "epoch": epoch,
                        "batch": b + 1,
                        "batches": batches,
                        "loss": total_loss / seen,
                    }
                )
        train_seconds = time.perf_counter() - start
        probs = predict_proba(model, x_val, batch=cfg.eval_batch, device=device)
        aucs = auc_per_output(y_val, probs)
        mean_auc = _mean(aucs)
        record = {
            "epoch": epoch,
            "steps": steps,
            "train_loss": total_loss / max(seen, 1),
            "val_loss": _bce(y_val, probs),
            "val_auc": mean_auc,
            "val_auc_per_output": dict(zip(output_names, aucs, strict=True)),
            "train_images_per_s": seen / train_seconds if train_seconds > 0 else None,
        }
        # Ties in AUC (common once it saturates) go to the lower validation loss.
        key = (-math.inf if mean_auc is None else mean_auc, -record["val_loss"])
        if best_state is None or key > best_key:
            best_key = key
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            history["best_epoch"] = epoch
            history["best_val_auc"] = mean_auc
        record["best"] = history["best_epoch"] == epoch
        history["epochs"].append(record)
        if progress is not None:
            progress({"event": "epoch", "epochs": cfg.epochs, **record})
        if epoch - history["best_epoch"] >= cfg.patience and epoch < cfg.epochs:
            history["stopped_early"] = True
            break
    assert best_state is not None
    history["steps"] = steps
    history["best_steps"] = history["epochs"][history["best_epoch"] - 1]["steps"]
    model.load_state_dict(best_state)
    model.eval()
    return model, history


RECIPE_KEYS = ("arch", "norm", "seed", "input_size", "init", "dp")


def classifier_recipe(cfg: ClassifierTrainConfig, dp: bool = False) -> dict[str, Any]:
    """What makes two classifiers trained on the same rows the same network.

    Recorded beside every classifier (and, for SpineGAN, in the generator's metadata) so that an
    evaluation can refuse to judge a generator with the classifier it was trained against. No
    data hash is included: the generator's metadata is released, and the recipe must not
    fingerprint private data (two recipes are compared as if trained on the same rows).
    """
    weights = cfg.model.weights_path
    return {
        "arch": cfg.model.arch,
        "norm": cfg.model.norm,
        "seed": int(cfg.seed),
        "input_size": cfg.input_size or cfg.model.input_size,
        "init": f"sha256:{file_sha256(weights)}" if weights else "scratch",
        "dp": bool(dp),
    }


def same_recipe(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True unless some setting of :data:`RECIPE_KEYS` is known in both and differs.

    A setting missing from either side counts as equal: when unsure, assume the same classifier.
    """
    return all(a.get(k) is None or b.get(k) is None or a.get(k) == b.get(k) for k in RECIPE_KEYS)


class _RowStream:
    """Row indices from back-to-back shuffled passes, so a step always holds a full batch."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        self.n, self.gen = n, gen
        self.rows = torch.randperm(n, generator=gen)
        self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        if self.pos + k > self.n:
            self.rows = torch.cat(
                [self.rows[self.pos :], torch.randperm(self.n, generator=self.gen)]
            )
            self.pos = 0
        out = self.rows[self.pos : self.pos + k]
        self.pos += k
        return out


def evaluate_classifier(
    model: nn.Module, data: PreparedDataset, cfg: ClassifierTrainConfig
) -> dict[str, Any]:
    """AUC per output (one-vs-rest for multiclass) and their mean, on all eligible rows of ``data``.

    An output whose rows are all one class has AUC None and is left out of the mean.
    """
    task = resolve_task(cfg.task, data)
    y, idx, names = targets(data, task)
    model_cfg = getattr(model, "classifier_config", None)
    size = getattr(model_cfg, "input_size", None) or cfg.input_size or data.resolution
    if model_cfg is not None and model_cfg.num_outputs != len(names):
        raise ValueError(
            f"the classifier has {model_cfg.num_outputs} output(s) but the {task} task on this "
            f"data needs {len(names)}; evaluate on data of the schema it was trained on"
        )
    device = next(model.parameters()).device
    probs = predict_proba(model, load_images(data, idx, size), batch=cfg.eval_batch, device=device)
    aucs = auc_per_output(y, probs)
    return {
        "task": task,
        "rows": len(idx),
        "splits": sorted(set(data.splits[idx].tolist())),
        "auc": dict(zip(names, aucs, strict=True)),
        "mean_auc": _mean(aucs),
        "positives": dict(zip(names, (int(v) for v in y.sum(axis=0)), strict=True)),
    }


def resolve_task(task: str, data: PreparedDataset) -> str:
    """``auto`` is binary for two classes and multiclass for more."""
    if task == "auto":
        if data.num_classes < 2:
            raise ValueError(
                f"the data has {data.num_classes} class(es); a classifier needs two or more"
            )
        return "binary" if data.num_classes == 2 else "multiclass"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected auto or one of {TASKS}")
    if task == "binary" and data.num_classes != 2:
        raise ValueError(
            f"the binary task needs two classes but the data has {data.num_classes} "
            f"({data.class_names}); use --task multiclass"
        )
    if task == "multiclass" and data.num_classes < 2:
        raise ValueError(
            f"the data has {data.num_classes} class(es); a classifier needs two or more"
        )
    if task == "multilabel" and not data.finding_names:
        raise ValueError(
            "the data has no finding columns for the multilabel task; ingest a source with lesion "
            "annotations, or use --task binary/multiclass"
        )
    return task


def targets(data: PreparedDataset, task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Float32 targets [N, K], the row indices they belong to, and the output names."""
    if task == "multilabel":
        idx = np.arange(len(data))
        return data.findings[idx].astype(np.float32), idx, list(data.finding_names)
    idx = np.flatnonzero(data.labels >= 0)
    labels = data.labels[idx]
    if task == "binary":
        return (labels == 1).astype(np.float32)[:, None], idx, [data.class_names[1]]
    onehot = np.zeros((len(idx), data.num_classes), dtype=np.float32)
    onehot[np.arange(len(idx)), labels] = 1.0
    return onehot, idx, list(data.class_names)


def load_images(
    data: PreparedDataset, idx: np.ndarray, size: int, chunk: int = 256
) -> torch.Tensor:
    """Rows ``idx`` as uint8 [N, 1, S, S], resized once (antialiased bilinear) to ``size``.

    Kept as uint8 so a few thousand 224-px images fit in a few hundred MB.
    """
    out = torch.empty((len(idx), 1, size, size), dtype=torch.uint8)
    for start in range(0, len(idx), chunk):
        rows = idx[start : start + chunk]
        x = torch.from_numpy(np.asarray(data.images[rows], dtype=np.uint8))[:, None]
        if x.shape[-1] != size or x.shape[-2] != size:
            x = torch.nn.functional.interpolate(
                x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        out[start : start + len(rows)] = x
    return out


def augment_batch(
    x: torch.Tensor,
    flip_p: float = 0.3,
    rotate_deg: float = 5.0,
    crop_scale: tuple[float, float] = (0.8, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample horizontal flip, small rotation and random resized (square) crop, in one warp.

    One affine matrix per image maps output to input coordinates: flip, scale by the crop side
    ``sqrt(area fraction)``, rotate, then shift the crop anywhere inside the image. Bilinear
    sampling with border padding keeps values inside the input range. With nothing enabled the
    batch is returned unchanged.
    """
    lo, hi = crop_scale
    if flip_p <= 0 and rotate_deg <= 0 and lo >= 1.0:
        return x
    n = x.shape[0]

    def rand() -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64)

    sign = 1.0 - 2.0 * (rand() < flip_p).double()
    angle = (rand() * 2 - 1) * math.radians(rotate_deg)
    side = torch.sqrt(lo + (hi - lo) * rand())
    tx = (rand() * 2 - 1) * (1 - side)
    ty = (rand() * 2 - 1) * (1 - side)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([side * cos * sign, -side * sin, tx], dim=1),
            torch.stack([side * sin * sign, side * cos, ty], dim=1),
        ],
        dim=1,
    ).to(device=x.device, dtype=x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def auc_per_output(y: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """ROC AUC per column; None where the column holds one class only."""
    out: list[float | None] = []
    for k in range(y.shape[1]):
        col = y[:, k]
        if col.min() == col.max():
            out.append(None)
        else:
            out.append(float(roc_auc_score(col, probs[:, k])))
    return out


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return torch.device(device)


def _check_examples(y_train: np.ndarray, y_val: np.ndarray, names: list[str], task: str) -> None:
    if len(y_train) == 0:
        raise ValueError("no training rows with a usable label")
    if len(y_val) == 0:
        raise ValueError("no validation rows with a usable label; the data needs a 'val' split")
    pos = y_train.sum(axis=0)
    for k, name in enumerate(names):
        if pos[k] == 0 or pos[k] == len(y_train):
            which = "no" if pos[k] == 0 else "only"
            raise ValueError(
                f"the training rows have {which} examples of {name!r}; every output needs both "
                "positive and negative examples"
            )
    vpos = y_val.sum(axis=0)
    one_class = [name for k, name in enumerate(names) if vpos[k] in (0, len(y_val))]
    if task != "multilabel" and one_class:
        raise ValueError(
            f"the validation rows have no examples of, or only examples of, {one_class}; an AUC "
            "needs both; carve a larger validation split"
        )
    if len(one_class) == len(names):
        raise ValueError("no output has both positive and negative validation rows; AUC undefined")


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _bce(y: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
