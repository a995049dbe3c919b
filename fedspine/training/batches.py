"""Training data held in memory, and the uniform random minibatches the trainer consumes.

Kept apart from the trainer so that the training step stays free of data loading: the
centralised CLI and the federated client both hand the trainer an iterator of batches. The
sampler draws indices from a numpy Generator the caller owns (the trainer's), so a resumed run
draws the same batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedspine.data.prepared import PreparedDataset


@dataclass
class TrainingData:
    """Images (uint8 [N, 1, R, R]) and labels (int64 [N]) ready for sampling."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    resized_from: int | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def label_prior(self) -> np.ndarray:
        """The empirical class frequencies: the non-private default for fake labels."""
        return empirical_prior(self.labels.numpy(), self.num_classes)


class BatchSampler:
    """Endless uniform random minibatches (indices drawn with replacement), images in [-1, 1]."""

    def __init__(
        self,
        data: TrainingData,
        batch_size: int,
        rng: np.random.Generator,
        device: str | torch.device = "cpu",
    ) -> None:
        if len(data) == 0:
            raise ValueError("no training images: the train split holds no labelled image")
        self.data = data
        self.batch_size = int(batch_size)
        self.rng = rng
        self.device = torch.device(device)
        self._images = data.images.to(self.device)
        self._labels = data.labels.to(self.device)

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.rng.integers(0, len(self.data), size=self.batch_size)).to(
            self.device
        )
        images = self._images[idx].to(torch.float32) / 127.5 - 1.0
        return images, self._labels[idx]


def training_data(dataset: PreparedDataset, resolution: int | None = None) -> TrainingData:
    """The labelled rows of ``dataset`` as tensors, resized once to ``resolution`` if it differs."""
    labels = np.asarray(dataset.labels, dtype=np.int64)
    keep = labels >= 0
    images = torch.from_numpy(
        np.ascontiguousarray(np.asarray(dataset.images)[keep], dtype=np.uint8)
    )
    images = images[:, None]
    source_res = int(images.shape[-1]) if images.shape[0] else int(dataset.resolution)
    resized_from = None
    if resolution is not None and images.shape[0] and source_res != resolution:
        images = resize_uint8(images, resolution)
        resized_from = source_res
    return TrainingData(
        images=images,
        labels=torch.from_numpy(labels[keep]),
        class_names=list(dataset.class_names),
        resized_from=resized_from,
    )


def resize_uint8(images: torch.Tensor, resolution: int, chunk: int = 256) -> torch.Tensor:
    """Resize uint8 [N, 1, r, r] images: area averaging down, bilinear up."""
    out = []
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float32)
        if resolution < x.shape[-1]:
            y = F.interpolate(x, size=(resolution, resolution), mode="area")
        else:
            y = F.interpolate(
                x, size=(resolution, resolution), mode="bilinear", align_corners=False
            )
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, 1, resolution, resolution))


def empirical_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class frequencies of ``labels`` (float64, sums to one)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes].astype(
        np.float64
    )
    if counts.sum() == 0:
        raise ValueError("no labelled images to estimate the label prior from")
    return counts / counts.sum()
