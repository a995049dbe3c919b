"""Offline feature extractors for FID-type metrics and memorisation audits, each with a name.

Nothing here downloads anything. A metric computed on these features means something only beside
the extractor that made them, so every extractor carries a ``name`` that says exactly what it is
(which file, which training data) and reports print it next to each number:

- :class:`InceptionTorchScript`: Inception-v3 from a TorchScript file the user supplies (the
  usual FID network). Numbers are comparable with published FIDs only with this extractor.
- :class:`DomainExtractor`: a small CNN the project trains on the real training split of a
  prepared dataset. Comparable only between runs that used the same trained extractor.
- :class:`PixelExtractor`: area-downsampled raw pixels, a trivial baseline.

All take images as float in [0, 1], shape ``[N, 1, H, W]`` (numpy or torch).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fedspine.data.prepared import PreparedDataset

DOMAIN_FORMAT = "fedspine-domain-cnn"
DOMAIN_VERSION = 1


class FeatureExtractorError(Exception):
    """A feature extractor file is missing, unreadable or does not behave as expected."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images float [0, 1] ``[N, 1, H, W]`` to features ``np.ndarray [N, D]``."""

    name: str

    def describe(self) -> str: ...

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray: ...


def extract(
    extractor: FeatureExtractor, images: np.ndarray | torch.Tensor, batch: int = 64
) -> np.ndarray:
    """Features of all ``images`` in batches, as float64 ``[N, D]``.

    Accepts float [0, 1] ``[N, 1, H, W]`` or ``[N, H, W]``, or uint8 (divided by 255).
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    x = as_float_images(images)
    if len(x) == 0:
        raise ValueError("no images to extract features from")
    parts = [
        np.asarray(extractor(x[i : i + batch]), dtype=np.float64) for i in range(0, len(x), batch)
    ]
    out = np.concatenate(parts, axis=0)
    if out.ndim != 2 or len(out) != len(x):
        raise FeatureExtractorError(
            f"extractor {extractor.name!r} returned shape {out.shape} for {len(x)} images; "
            "expected [N, D]"
        )
    return out


def as_float_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images as a float32 CPU tensor ``[N, 1, H, W]`` in [0, 1] (uint8 input is divided by 255)."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    x = x.detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected grey images [N, 1, H, W] or [N, H, W], got {tuple(x.shape)}")
    if x.numel() and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"image values span [{x.min():.3g}, {x.max():.3g}]; expected floats in [0, 1]"
        )
    return x


class PixelExtractor:
    """Raw pixels, area-downsampled to ``size x size`` (D = size^2): a baseline, not a metric
    anyone should quote alone."""

    def __init__(self, size: int = 16) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        self.name = f"pixels {size}x{size} (area-downsampled raw pixels, D={size * size})"

    def describe(self) -> str:
        return (
            f"{self.name}. A trivial baseline: distances between blurred images, blind to "
            "anatomy; use it to sanity-check the other extractors."
        )

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = as_float_images(images)
        pooled = F.adaptive_avg_pool2d(x, self.size)
        return pooled.flatten(1).double().numpy()


class InceptionTorchScript:
    """Inception-v3 loaded from a TorchScript file the user supplies; never downloaded.

    Expected file: the TorchScript Inception-v3 used by common FID tools (for example
    ``inception-2015-12-05.pt`` / ``pt_inception-2015-12-05-*.pt``), callable as
    ``model(x, return_features=True)`` with ``x`` a uint8 tensor ``[N, 3, 299, 299]`` of values
    0-255, returning the 2048-d pool features ``[N, 2048]``. Grey images are replicated to three
    channels and resized (bilinear) to 299 px before quantising to uint8.

    Security: ``torch.jit.load`` runs the TorchScript code inside the file. Only load a file the
    user chose and trusts (check its sha256, which is part of :attr:`name`).
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", size: int = 299) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureExtractorError(
                f"{self.path}: Inception-v3 TorchScript file not found; pass the path of a local "
                "copy (fedspine never downloads weights)"
            )
        self.sha256 = _sha256(self.path)
        self.device = torch.device(device)
        self.size = size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(self.path), map_location=self.device)
        except Exception as exc:
            raise FeatureExtractorError(
                f"{self.path}: not a loadable TorchScript file ({type(exc).__name__}: {exc}); "
                "expected a TorchScript Inception-v3 such as inception-2015-12-05.pt"
            ) from exc
        self.model.eval()
        self.name = f"inception-v3 (user file {self.path.name}, sha256 {self.sha256[:12]})"
        self._checked = False

    def describe(self) -> str:
        return (
            f"{self.name}: TorchScript Inception-v3 pool features (2048-d) from the user's file "
            f"(sha256 {self.sha256}); grey images replicated to 3 channels, resized to "
            f"{self.size} px, uint8 0-255. FIDs are comparable with other tools using this file."
        )

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = as_float_images(images)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).repeat(1, 3, 1, 1)
        try:
            with torch.no_grad():
                out = self.model(x.to(self.device), return_features=True)
        except Exception as exc:
            raise FeatureExtractorError(
                f"{self.path}: calling model(x, return_features=True) with uint8 "
                f"[N, 3, {self.size}, {self.size}] failed ({type(exc).__name__}: {exc}); "
                "the file is not the expected TorchScript Inception-v3"
            ) from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(x):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise FeatureExtractorError(
                f"{self.path}: returned {shape} for {len(x)} images; expected features [N, 2048]"
            )
        if not self._checked and out.shape[1] != 2048:
            warnings.warn(
                f"{self.path}: features have {out.shape[1]} dimensions, not Inception-v3's 2048",
                stacklevel=2,
            )
        self._checked = True
        return out.detach().cpu().double().numpy()


class DomainExtractor:
    """A small CNN trained by the project on a prepared dataset's real TRAINING split.

    Trained as a classifier of the dataset's labels (class-balanced cross-entropy, small shifts
    and intensity jitter); the features are the penultimate layer (global average pool),
    L2-normalised. Distances in this space reflect what separates the classes, which is what a
    downstream classifier needs; they are not comparable with Inception-based FIDs.
    """

    def __init__(self, model: _DomainCNN, train_hash: str, meta: dict) -> None:
        self.model = model.eval()
        self.train_hash = train_hash
        self.meta = dict(meta)
        self.dim = model.dim
        self.input_size = model.input_size
        self.name = (
            f"fedspine-domain-cnn v{DOMAIN_VERSION} (trained on {train_hash[:12] or 'unhashed'} "
            f"train split, D={self.dim})"
        )

    @classmethod
    def fit(
        cls,
        dataset: PreparedDataset,
        epochs: int = 10,
        seed: int = 0,
        batch_size: int = 64,
        lr: float = 2e-3,
        width: int = 16,
        input_size: int = 64,
        device: str = "cpu",
    ) -> DomainExtractor:
        """Train on ``dataset``'s labelled train split only (never val or test)."""
        train = dataset.select("train", labelled=True)
        where = getattr(dataset, "root", "dataset")
        if len(train) < 2:
            raise ValueError(f"{where}: {len(train)} labelled train images; need at least 2")
        labels = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
        num_classes = max(len(train.class_names), int(labels.max()) + 1)
        if len(torch.unique(labels)) < 2:
            raise ValueError(
                f"{where}: the train split holds a single class; a domain extractor trained as a "
                "classifier needs at least two"
            )
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        dev = torch.device(device)
        images = F.interpolate(
            torch.from_numpy(train.images_float()), size=(input_size, input_size), mode="area"
        )
        counts = torch.bincount(labels, minlength=num_classes).float()
        class_weight = torch.where(counts > 0, counts.sum() / (num_classes * counts), 0.0)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _DomainCNN(num_classes, width=width, input_size=input_size).to(dev)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            gen = torch.Generator().manual_seed(seed)
            model.train()
            for _ in range(epochs):
                order = torch.randperm(len(images), generator=gen)
                for i in range(0, len(order), batch_size):
                    idx = order[i : i + batch_size]
                    x = _augment(images[idx], gen).to(dev)
                    logits = model.head(model.pooled(x))
                    loss = F.cross_entropy(logits, labels[idx].to(dev), weight=class_weight.to(dev))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            model.eval()
            with torch.no_grad():
                preds = torch.cat(
                    [
                        model.head(model.pooled(images[i : i + 256].to(dev))).argmax(1).cpu()
                        for i in range(0, len(images), 256)
                    ]
                )
        meta = {
            "epochs": epochs,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
            "width": width,
            "input_size": input_size,
            "num_classes": num_classes,
            "class_names": list(train.class_names),
            "train_images": len(train),
            "train_accuracy": float((preds == labels).float().mean()),
        }
        return cls(model.cpu().eval(), dataset.content_hash, meta)

    def describe(self) -> str:
        m = self.meta
        return (
            f"{self.name}: a {m.get('width')}-wide 4-stage CNN trained for {m.get('epochs')} "
            f"epochs (seed {m.get('seed')}) to classify {m.get('class_names')} on "
            f"{m.get('train_images')} real training images at {self.input_size} px (train "
            f"accuracy {m.get('train_accuracy', float('nan')):.3f}); features are the "
            "L2-normalised penultimate layer. Values are comparable only between runs using "
            "this extractor."
        )

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = as_float_images(images)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        with torch.no_grad():
            return self.model.features(x).double().numpy()

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights and metadata (tensors and plain types only), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": DOMAIN_FORMAT,
            "version": DOMAIN_VERSION,
            "train_hash": self.train_hash,
            "meta": self.meta,
            "state_dict": self.model.state_dict(),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DomainExtractor:
        """Load with ``torch.load(weights_only=True)``: a crafted file cannot run code."""
        path = Path(path)
        if not path.is_file():
            raise FeatureExtractorError(f"{path}: domain extractor file not found")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FeatureExtractorError(
                f"{path}: not a readable weights-only file ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != DOMAIN_FORMAT:
            raise FeatureExtractorError(f"{path}: not a fedspine domain extractor file")
        if data.get("version") != DOMAIN_VERSION:
            raise FeatureExtractorError(
                f"{path}: domain extractor version {data.get('version')}, this fedspine reads "
                f"version {DOMAIN_VERSION}; retrain it"
            )
        meta = data["meta"]
        model = _DomainCNN(meta["num_classes"], width=meta["width"], input_size=meta["input_size"])
        model.load_state_dict(data["state_dict"])
        return cls(model, data["train_hash"], meta)


class _DomainCNN(nn.Module):
    """Four stride-2 stages (width, 2w, 4w, 8w channels), global average pool, linear head."""

    def __init__(self, num_classes: int, width: int = 16, input_size: int = 64) -> None:
        super().__init__()
        self.input_size = input_size
        self.dim = 8 * width
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in (width, 2 * width, 4 * width, 8 * width):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                nn.GroupNorm(min(8, c_out), c_out),
                nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.GroupNorm(min(8, c_out), c_out),
                nn.SiLU(),
            ]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(self.dim, num_classes)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2.0 - 1.0).mean(dim=(2, 3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pooled(x), dim=1)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small integer shifts (up to 1/16 of the side) and a global gain/offset jitter."""
    n, _, h, w = x.shape
    max_shift = max(1, h // 16)
    shifts = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen)
    x = torch.roll(x, shifts=(int(shifts[0]), int(shifts[1])), dims=(2, 3))
    gain = 1.0 + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    offset = 0.05 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    return (x * gain + offset).clamp(0.0, 1.0)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
