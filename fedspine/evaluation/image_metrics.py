"""Distribution metrics of an evaluation: KID, FID, precision/recall, density/coverage.

The image sets are chosen so that no row can flatter: the reference is the labelled real
training rows (with the domain CNN, only the half of the patients that did not fit it), and the
synthetic row and the real-val floor row use the same number of images of each class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedspine.data.prepared import PreparedDataset
from fedspine.evaluation.config import PRECISION_K, EvaluateConfig, EvaluateError, ProgressFn
from fedspine.evaluation.features import (
    DomainExtractor,
    FeatureExtractorError,
    InceptionTorchScript,
    PixelExtractor,
    extract,
)
from fedspine.evaluation.generative import (
    density_coverage,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from fedspine.fileio import EVAL_DOMAIN_EXTRACTOR

if TYPE_CHECKING:
    import torch

    from fedspine.evaluation.features import FeatureExtractor


def metric_samples(
    real_train: PreparedDataset,
    real_val: PreparedDataset,
    syn_rows: PreparedDataset,
    syn_images: np.ndarray,
    cfg: EvaluateConfig,
) -> dict[str, Any]:
    """The image sets of the distribution metrics, chosen so that no row can flatter.

    - reference: labelled real training images (the rows the GAN trained on; unlabelled rows
      such as multi-lesion images are excluded). With the domain CNN, half of the training
      patients fit the extractor and only the other half is the reference, so no reference
      image is in-sample for the extractor.
    - floor (real val) and synthetic: the same number of images of each class, the real
      validation split's class mix, because FID is biased upward at small n and a class-balanced
      synthetic set against an unbalanced reference would be penalised (or flattered) by mix.
    """
    rng = np.random.default_rng(cfg.seed)
    labelled = real_train.select(None, labelled=True)
    fit: PreparedDataset | None = None
    reference = labelled
    if not (cfg.extractor == "inception" or (cfg.extractor == "auto" and cfg.inception)):
        fit_mask = _half_of_patients(labelled, rng)
        fit = labelled.rows(np.flatnonzero(fit_mask))
        reference = labelled.rows(np.flatnonzero(~fit_mask))
    val = real_val.select(None, labelled=True)
    per_class = {}
    for k, name in enumerate(real_train.class_names):
        per_class[name] = min(int((val.labels == k).sum()), int((syn_rows.labels == k).sum()))
    total = sum(per_class.values())
    if cfg.max_metric_images is not None and total > cfg.max_metric_images:
        scale = cfg.max_metric_images / total
        per_class = {name: int(n * scale) for name, n in per_class.items()}
    floor_idx, syn_idx = [], []
    for k, name in enumerate(real_train.class_names):
        n = per_class[name]
        if n:
            floor_idx.append(rng.choice(np.flatnonzero(val.labels == k), n, replace=False))
            syn_idx.append(rng.choice(np.flatnonzero(syn_rows.labels == k), n, replace=False))
    floor_idx_arr = np.sort(np.concatenate(floor_idx)) if floor_idx else np.zeros(0, int)
    syn_idx_arr = np.sort(np.concatenate(syn_idx)) if syn_idx else np.zeros(0, int)
    ref_images = _cap(np.asarray(reference.images), cfg.max_metric_images, rng)
    return {
        "fit": fit,
        "reference": ref_images,
        "floor": np.asarray(val.images[floor_idx_arr], dtype=np.uint8),
        "synthetic": np.asarray(syn_images[syn_idx_arr], dtype=np.uint8),
        "class_counts": per_class,
        "reference_patients": len(set(reference.patient_ids.tolist())),
        "fit_patients": None if fit is None else len(set(fit.patient_ids.tolist())),
        "excluded_unlabelled": int(np.sum(real_train.labels < 0)),
    }


def _half_of_patients(data: PreparedDataset, rng: np.random.Generator) -> np.ndarray:
    """Row mask of a random half of the patients, drawn within each patient's first class so
    both halves hold every class the data has."""
    patients, first = np.unique(data.patient_ids, return_index=True)
    chosen: list[str] = []
    for k in np.unique(data.labels[first]):
        group = patients[data.labels[first] == k]
        chosen += rng.permutation(group)[: len(group) // 2 + len(group) % 2].tolist()
    return np.isin(data.patient_ids, chosen)


def build_extractors(
    samples: dict[str, Any], cfg: EvaluateConfig, device: torch.device, work: Path
) -> list[FeatureExtractor]:
    """The primary extractor (user Inception or the domain CNN), then raw pixels as a baseline."""

    resolution = samples["reference"].shape[-1]
    try:
        if samples["fit"] is None:
            primary: FeatureExtractor = InceptionTorchScript(cfg.inception, device=str(device))
        else:
            primary = DomainExtractor.fit(
                samples["fit"],
                epochs=cfg.domain_epochs,
                seed=cfg.seed,
                input_size=cfg.domain_input_size or min(64, resolution),
                device=str(device),
            )
            primary.save(work / EVAL_DOMAIN_EXTRACTOR)
    except (FeatureExtractorError, ValueError) as err:
        raise EvaluateError(f"feature extractor: {err}") from None
    return [primary, PixelExtractor(min(cfg.pixel_size, resolution))]


def generative_metrics(
    extractors: Sequence[FeatureExtractor],
    samples: dict[str, Any],
    cfg: EvaluateConfig,
    notify: ProgressFn,
) -> dict[str, Any]:
    n_each = len(samples["synthetic"])
    results = []
    for ext in extractors:
        notify({"stage": "metrics", "event": "extractor", "description": ext.name})
        f_ref = _features(ext, samples["reference"])
        for compared, images in (
            ("synthetic vs real reference", samples["synthetic"]),
            ("real val vs real reference (floor)", samples["floor"]),
        ):
            row = {"compared": compared, "extractor": ext.name, "n_real": len(f_ref)}
            if n_each < 2:
                row["reason"] = "fewer than 2 images of matching classes in val and synthetic"
            else:
                row.update(_distribution(f_ref, _features(ext, images), ext, cfg))
            results.append(row)
    fit = samples["fit_patients"]
    return {
        "n_real": len(samples["reference"]),
        "n_synthetic": n_each,
        "n_reference": n_each,
        "n_each": n_each,
        "class_counts": samples["class_counts"],
        "k": PRECISION_K,
        "reference": (
            f"{len(samples['reference'])} labelled real training images of "
            f"{samples['reference_patients']} patients"
            + (
                f"; the other {fit} training patients fitted the domain extractor, so no "
                "reference image is in-sample for it"
                if fit is not None
                else ""
            )
            + (
                f"; {samples['excluded_unlabelled']} unlabelled training rows excluded (the GAN "
                "never trained on them)"
                if samples["excluded_unlabelled"]
                else ""
            )
        ),
        "equal_n": (
            f"synthetic and floor rows use {n_each} images each with the same class counts "
            f"({counts_text(samples['class_counts'])}), the real validation split's mix"
        ),
        "extractors": [ext.describe() for ext in extractors],
        "results": results,
    }


def _distribution(
    f_real: np.ndarray, f_other: np.ndarray, ext: FeatureExtractor, cfg: EvaluateConfig
) -> dict[str, Any]:
    kid, kid_std = kernel_inception_distance(
        f_real, f_other, subsets=cfg.kid_subsets, subset_size=1000, seed=cfg.seed
    )
    if min(len(f_real), len(f_other)) > PRECISION_K:
        precision, recall = precision_recall(f_real, f_other, k=PRECISION_K)
        density, coverage = density_coverage(f_real, f_other, k=PRECISION_K)
    else:  # k-nearest-neighbour balls need more than k points on each side
        precision = recall = density = coverage = None
    return {
        "extractor": ext.name,
        "fid": frechet_distance(f_real, f_other),
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "density": density,
        "coverage": coverage,
        "n_real": len(f_real),
        "n_other": len(f_other),
    }


def _features(ext: FeatureExtractor, images: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Features of uint8 images in chunks, so full-size float copies never exist at once."""

    parts = [
        extract(ext, np.asarray(images[i : i + chunk], dtype=np.uint8), batch=64)
        for i in range(0, len(images), chunk)
    ]
    return np.concatenate(parts, axis=0)


def _cap(images: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or len(images) <= n:
        return images
    return images[np.sort(rng.choice(len(images), n, replace=False))]


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}: {n}" for name, n in counts.items())
