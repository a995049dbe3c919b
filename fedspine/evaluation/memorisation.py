"""Memorisation audit: are synthetic images closer to training images than unseen real ones are?

For each synthetic image we take the distance to its closest training image (DCR, distance to
closest record). A generator that copies training images puts synthetic images at near-zero
distance from them. What counts as "near" is calibrated on held-out real images: a real image the
generator never saw is, by construction, not a copy, so its distance to the closest training
image tells how close two distinct images of this distribution naturally come. The audit reports
the share of synthetic images whose DCR falls below the 1st / 5th percentile of the held-out
images' DCRs: about 1 % / 5 % for a generator that does not memorise (held-out and synthetic
draws then behave alike), far more for one that does.

Distances are Euclidean in the space of a named feature extractor, or of raw pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedspine.evaluation.generative import distance_blocks

if TYPE_CHECKING:
    import torch

    from fedspine.evaluation.features import FeatureExtractor

PIXELS_NAME = "raw pixels (flattened, full resolution)"


@dataclass
class MemorisationResult:
    """Per-image distances and their calibrated summary; ``summary()`` is JSON-ready."""

    extractor: str
    syn_to_train: np.ndarray
    syn_to_train_index: np.ndarray
    syn_to_heldout: np.ndarray
    heldout_to_train: np.ndarray
    threshold_p1: float
    threshold_p5: float
    share_closer_to_train: float

    @property
    def share_below_p1(self) -> float:
        """Share of synthetic images closer to train than 99 % of held-out real images are."""
        return float(np.mean(self.syn_to_train <= self.threshold_p1))

    @property
    def share_below_p5(self) -> float:
        """Share of synthetic images closer to train than 95 % of held-out real images are."""
        return float(np.mean(self.syn_to_train <= self.threshold_p5))

    def flagged(self, percentile: Literal[1, 5] = 1) -> np.ndarray:
        """Indices of synthetic images below the chosen calibrated threshold, closest first."""
        if percentile not in (1, 5):
            raise ValueError(f"percentile must be 1 or 5, got {percentile}")
        threshold = self.threshold_p1 if percentile == 1 else self.threshold_p5
        idx = np.flatnonzero(self.syn_to_train <= threshold)
        return idx[np.argsort(self.syn_to_train[idx], kind="stable")]

    def summary(self) -> dict:
        ratio = self.syn_to_train / np.maximum(self.syn_to_heldout, np.finfo(float).tiny)
        return {
            "extractor": self.extractor,
            "n_synthetic": int(len(self.syn_to_train)),
            "n_heldout": int(len(self.heldout_to_train)),
            "median_syn_to_train": float(np.median(self.syn_to_train)),
            "median_syn_to_heldout": float(np.median(self.syn_to_heldout)),
            "median_heldout_to_train": float(np.median(self.heldout_to_train)),
            "min_syn_to_train": float(np.min(self.syn_to_train)),
            "median_ratio_train_over_heldout": float(np.median(ratio)),
            "threshold_p1": self.threshold_p1,
            "threshold_p5": self.threshold_p5,
            "share_below_p1": self.share_below_p1,
            "share_below_p5": self.share_below_p5,
            "share_closer_to_train": self.share_closer_to_train,
            "calibration": (
                "thresholds are the 1st/5th percentiles of held-out real images' distances to "
                "their closest training image; a non-memorising generator gives shares near "
                "0.01/0.05 and share_closer_to_train near 0.5"
            ),
        }


def memorisation_audit(
    synthetic: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    heldout: np.ndarray | torch.Tensor,
    extractor: FeatureExtractor | Literal["pixels"] = "pixels",
    seed: int = 0,
    batch: int = 64,
) -> MemorisationResult:
    """Distances of synthetic images to the closest training and held-out real images.

    Images are float [0, 1] ``[N, 1, H, W]`` (or uint8). ``heldout`` are real images the
    generator never saw (the validation or test split). ``share_closer_to_train`` compares each
    synthetic image's distance to training vs held-out images with the training set subsampled
    to the held-out set's size (a larger set is closer by size alone); it is about 0.5 without
    memorisation.
    """
    name, f_syn, f_train, f_held = _embed(extractor, batch, synthetic, train, heldout)
    if len(f_held) < 2:
        raise ValueError(f"{len(f_held)} held-out images; the calibration needs at least 2")
    d_st, i_st = nearest_distances(f_syn, f_train)
    d_sh, _ = nearest_distances(f_syn, f_held)
    d_ht, _ = nearest_distances(f_held, f_train)

    rng = np.random.default_rng(seed)
    if len(f_train) > len(f_held):
        subset = rng.choice(len(f_train), len(f_held), replace=False)
        d_st_same_size, _ = nearest_distances(f_syn, f_train[subset])
    else:
        d_st_same_size = d_st
    closer = np.mean(d_st_same_size < d_sh) + 0.5 * np.mean(d_st_same_size == d_sh)
    return MemorisationResult(
        extractor=name,
        syn_to_train=d_st,
        syn_to_train_index=i_st,
        syn_to_heldout=d_sh,
        heldout_to_train=d_ht,
        threshold_p1=float(np.percentile(d_ht, 1)),
        threshold_p5=float(np.percentile(d_ht, 5)),
        share_closer_to_train=float(closer),
    )


def nearest_distances(
    query: np.ndarray, reference: np.ndarray, metric: Literal["l2", "cosine"] = "l2"
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the distance to and index of its nearest reference row (chunked).

    ``cosine`` returns ``1 - cos`` (rows are L2-normalised first; a zero row is an error).
    """
    q = _rows(query, "query")
    r = _rows(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query has {q.shape[1]} dimensions, reference {r.shape[1]}")
    if metric == "cosine":
        q, r = _unit_rows(q, "query"), _unit_rows(r, "reference")
    elif metric != "l2":
        raise ValueError(f"unknown metric {metric!r}; use 'l2' or 'cosine'")
    dist = np.empty(len(q))
    index = np.empty(len(q), dtype=np.int64)
    for start, block in distance_blocks(q, r):
        j = block.argmin(axis=1)
        index[start : start + len(block)] = j
        # Recompute the winner directly: the expanded form in the block loses exact zeros.
        diff = q[start : start + len(block)] - r[j]
        dist[start : start + len(block)] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    if metric == "cosine":
        dist = dist**2 / 2.0
    return dist, index


def closest_pairs_png(
    path: str | os.PathLike,
    synthetic: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    idx: np.ndarray,
    k: int = 8,
    dist: np.ndarray | None = None,
) -> Path:
    """Save the ``k`` closest synthetic / training pairs side by side, for a person to judge.

    ``idx[i]`` is the nearest training image of synthetic image ``i`` (``syn_to_train_index``);
    pairs are ranked by ``dist`` (``syn_to_train``) when given, else by pixel distance. Top row:
    synthetic; bottom row: its nearest training image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: only when plotting
    from matplotlib.figure import Figure  # heavy: only when plotting

    syn, tr = _grey(synthetic), _grey(train)
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) != len(syn):
        raise ValueError(f"{len(idx)} nearest indices for {len(syn)} synthetic images")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(tr)):
        raise ValueError(f"nearest indices must lie in [0, {len(tr) - 1}]")
    if k < 1 or len(syn) == 0:
        raise ValueError("need k >= 1 and at least one synthetic image")
    if dist is None:
        dist = np.sqrt(((syn - tr[idx]) ** 2).reshape(len(syn), -1).sum(axis=1))
    dist = np.asarray(dist, dtype=np.float64)
    chosen = np.argsort(dist, kind="stable")[:k]

    fig = Figure(figsize=(1.6 * len(chosen), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for col, i in enumerate(chosen):
        top = fig.add_subplot(2, len(chosen), col + 1)
        top.imshow(syn[i], cmap="gray", vmin=0.0, vmax=1.0)
        top.set_title(f"syn {i}\nd={dist[i]:.3g}", fontsize=7)
        bottom = fig.add_subplot(2, len(chosen), len(chosen) + col + 1)
        bottom.imshow(tr[idx[i]], cmap="gray", vmin=0.0, vmax=1.0)
        bottom.set_title(f"train {idx[i]}", fontsize=7)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("closest synthetic (top) / training (bottom) pairs", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _embed(extractor, batch: int, *image_sets) -> tuple:
    if isinstance(extractor, str):
        if extractor != "pixels":
            raise ValueError(f"extractor must be a FeatureExtractor or 'pixels', got {extractor!r}")
        grey = [_grey(x) for x in image_sets]
        shapes = {x.shape[1:] for x in grey}
        if len(shapes) > 1:
            raise ValueError(f"raw-pixel distances need one image size, got {sorted(shapes)}")
        return (PIXELS_NAME, *(x.reshape(len(x), -1) for x in grey))
    from fedspine.evaluation.features import extract  # torch: package stays numpy-only

    return (extractor.name, *(extract(extractor, x, batch=batch) for x in image_sets))


def _grey(images) -> np.ndarray:
    """Images as float64 numpy [N, H, W] in [0, 1]."""
    from fedspine.evaluation.features import as_float_images  # torch, as above

    return as_float_images(images)[:, 0].double().numpy()


def _rows(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or len(arr) == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has a zero row; cosine distance is undefined for it")
    return x / norms
