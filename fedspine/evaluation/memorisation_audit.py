"""The evaluation's memorisation audit in pixel space, and the figures that show real images.

Both figures (the closest synthetic/training pairs and the per-class samples grid) show private
training images: they are for the data owner, never released with the synthetic data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedspine.data.prepared import PreparedDataset
from fedspine.evaluation.config import PAIRS_SHOWN, SAMPLES_PER_CLASS, EvaluateConfig
from fedspine.evaluation.features import PixelExtractor
from fedspine.evaluation.memorisation import closest_pairs_png, memorisation_audit
from fedspine.training.generate import image_grid


def audit_memorisation(
    syn_rows: PreparedDataset,
    syn_images: np.ndarray,
    real_train: PreparedDataset,
    heldout: PreparedDataset,
    cfg: EvaluateConfig,
    pairs_png: Path,
) -> dict[str, Any]:
    """Pixel-space audit (area-downsampled to at most 64 px) and the closest pairs figure."""

    side = min(64, real_train.resolution)
    pixels = PixelExtractor(side)
    small = [downsampled(x, side) for x in (syn_images, real_train.images, heldout.images)]
    result = memorisation_audit(*small, extractor=pixels, seed=cfg.seed)
    summary = result.summary()
    exact = int(np.sum(result.syn_to_train <= 1e-9))
    order = np.argsort(result.syn_to_train, kind="stable")[:PAIRS_SHOWN]
    nearest = result.syn_to_train_index[order]
    closest_pairs_png(
        pairs_png,
        syn_images[order],
        np.asarray(real_train.images[nearest], dtype=np.uint8),
        np.arange(len(order)),
        k=len(order),
        dist=result.syn_to_train[order],
    )
    suspected = summary["share_below_p1"] > 0.05 or exact > 0
    summary.update(
        {
            "extractor_description": pixels.describe(),
            "exact_copies": exact,
            "verdict": (
                "memorisation suspected: look at the closest pairs"
                if suspected
                else "no sign of memorisation"
            ),
            "flagged": bool(suspected),
            "rule": (
                "suspected when any synthetic image equals a training image in this space or "
                "more than 5 % fall below the held-out 1st percentile (about 1 % expected)"
            ),
            "closest_pairs": [
                {
                    "synthetic_file": syn_rows.files[int(i)],
                    "train_file": real_train.files[int(j)],
                    "distance": float(result.syn_to_train[i]),
                }
                for i, j in zip(order, nearest, strict=True)
            ],
        }
    )
    return summary


def downsampled(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 [N, R, R] -> float32 [N, 1, side, side] in [0, 1], area-averaged in chunks."""

    out = np.empty((len(images), 1, side, side), dtype=np.float32)
    for start in range(0, len(images), 256):
        x = torch.from_numpy(np.asarray(images[start : start + 256], dtype=np.float32) / 255.0)
        out[start : start + len(x)] = F.adaptive_avg_pool2d(x[:, None], side).numpy()
    return out


def samples_png(
    path: Path,
    syn_rows: PreparedDataset,
    syn_images: np.ndarray,
    real_train: PreparedDataset,
    seed: int,
) -> None:
    """One row of synthetic then one of real training images per class, at most 128 px."""

    rng = np.random.default_rng(seed)
    side = min(128, real_train.resolution)
    rows, names = [], []
    for k, name in enumerate(real_train.class_names):
        for tag, labels, images in (
            ("synthetic", syn_rows.labels, syn_images),
            ("real", real_train.labels, real_train.images),
        ):
            idx = np.flatnonzero(labels == k)
            if len(idx) > SAMPLES_PER_CLASS:
                idx = np.sort(rng.choice(idx, SAMPLES_PER_CLASS, replace=False))
            picked = np.asarray(images[idx], dtype=np.uint8)
            if side != picked.shape[-1] and len(picked):
                picked = (downsampled(picked, side)[:, 0] * 255).round().astype(np.uint8)
            rows.append(picked.reshape(len(idx), side, side))
            names.append(f"{tag}: {name}")
    image_grid(rows, names, min_cell=64).save(path, format="PNG")
