"""The one-shot DP mean-embedding release of a site (issue 15, item 4; DP-MERF / DP-MEPF).

A site releases, once, per class, the sum over its patients of each patient's mean feature
embedding, and the per-class patient counts, with Gaussian noise added once through the privacy
engine. A generator is then fitted to the released means with no further privacy cost
(:mod:`fedspine.training.mean_embedding_fit`). Sums, not means, are released so that a server
pools sites by adding their files (:func:`combine_releases`).

**The released vector and its sensitivity.** With K classes, a public feature map φ of
dimension D whose rows have norm ≤ 1 (:mod:`.mean_embedding_features`), a clip norm C and a
count scale κ (default κ = C), patient p with n_p labelled training images, n_{p,k} of them in
class k, contributes the vector u_p ∈ R^{K·(D+1)} whose class-k slot is

    w_{p,k} · [ clip_C(mean of φ over p's class-k images),  κ ],    w_{p,k} = n_{p,k} / n_p.

The patient's features are averaged *before* the norm bound (a patient with many images weighs
as much as one with one). Then ‖u_p‖² = Σ_k w_{p,k}² (‖m_{p,k}‖² + κ²) ≤ (C² + κ²)·Σ_k w_{p,k}²
≤ C² + κ², so adding or removing one patient moves the sum S = Σ_p u_p by at most
**Δ = √(C² + κ²)** in L2 (√2 at the defaults). The site releases S + N(0, σ²Δ² I): one Gaussian
mechanism, recorded as ``Mechanism(σ, q=1, steps=1, label="mean-embedding")``, σ calibrated by
the engine so the worst patient (everything on record composed) ends at the target ε at the
site's δ. Released: the noisy class sums S_k (K×D) and noisy counts S_k,count/κ (K), which the
fit divides as S_k / max(count_k, 1).

**Order of events.** Features and the unnoised sum are computed first (nothing leaves); then σ
is planned, the step is reserved in the ledger (durably), the noise is drawn, the record
settled and the file written. A crash after the reservation leaves the record counted in full
(it can only over-count); a crash before it spent and released nothing.

**What the file holds** (one ``.npz``, written whole or not at all): ``sums``, ``counts`` and
``metadata`` (JSON: the site name, class names, the feature map's public description, C, κ, Δ,
σ, ε, δ, accountant, unit, the number of patients (treated as public, as in Opacus; the release
gate checks δ against it) and the ledger's mechanism rows). Nothing else computed on private data.

**Federation.** Without secure aggregation each site adds the full noise its own ε requires and
its ledger records what it released; the server sums the files (:func:`combine_releases`), and
the pooled generator is (max over sites ε, δ)-DP when no patient is at two sites. A 1/K share of
the noise variance per site would be sound only behind secure aggregation, which this does not
build (the server sees each site's release).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedspine import __version__
from fedspine.fileio import json_text, write_atomic
from fedspine.privacy.engine import PrivacyEngine, PrivacyError, new_run_id
from fedspine.training.mean_embedding_features import (
    DEFAULT_BANDWIDTHS,
    DEFAULT_DIM,
    DEFAULT_FEATURE_RESOLUTION,
    DEFAULT_SEED,
    RFF,
    NetworkFeatures,
    build_feature_map,
    to_unit_range,
)

MECHANISM_LABEL = "mean-embedding"
FORMAT = "fedspine-mean-embedding/1"
ARRAYS = ("sums", "counts", "metadata")
METADATA_KEYS = frozenset(
    {
        "format",
        "fedspine_version",
        "written",
        "site",
        "class_names",
        "feature_map",
        "clip_norm",
        "count_scale",
        "sensitivity",
        "noise_multiplier",
        "noise_std",
        "epsilon",
        "delta",
        "accountant",
        "unit",
        "patients",
        "run_id",
        "mechanisms",
    }
)


class EmbeddingReleaseError(ValueError):
    """A release that cannot be made or read; the message says why and what to do."""


@dataclass
class EmbeddingRelease:
    """A site's released (noisy) class sums and counts, and what makes them meaningful."""

    sums: np.ndarray
    counts: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def site(self) -> str:
        return str(self.metadata["site"])

    def means(self) -> np.ndarray:
        """Per-class mean embeddings, sum / max(count, 1) (post-processing of the release)."""
        return self.sums / np.maximum(self.counts, 1.0)[:, None]


def sensitivity(clip_norm: float, count_scale: float) -> float:
    """Δ = √(C² + κ²): the most one patient moves the released vector (module docstring)."""
    return math.sqrt(float(clip_norm) ** 2 + float(count_scale) ** 2)


def patient_contributions(
    features: np.ndarray,
    labels: np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    num_classes: int,
    clip_norm: float = 1.0,
    count_scale: float | None = None,
) -> tuple[list[str], np.ndarray]:
    """(patients, u [P, K·(D+1)]): each patient's row of the released vector, unnoised.

    Layout: the K class sums (K·D values, class-major), then the K scaled counts.
    """
    feats = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    ids = np.asarray(patient_ids).astype(str)
    if not (len(feats) == len(labels) == len(ids)):
        raise EmbeddingReleaseError("features, labels and patient ids differ in length")
    if np.any(labels < 0) or np.any(labels >= num_classes):
        raise EmbeddingReleaseError("labels must be class indices in [0, K)")
    clip = float(clip_norm)
    kappa = clip if count_scale is None else float(count_scale)
    if not (clip > 0 and kappa > 0 and math.isfinite(clip) and math.isfinite(kappa)):
        raise EmbeddingReleaseError(
            f"clip {clip_norm} and count scale {count_scale}: both must be positive and finite"
        )
    dim = feats.shape[1]
    patients, inverse = np.unique(ids, return_inverse=True)
    rows = np.zeros((len(patients), num_classes * dim + num_classes))
    for p in range(len(patients)):
        mine = inverse == p
        total = int(mine.sum())
        for k in np.unique(labels[mine]):
            idx = mine & (labels == k)
            mean = feats[idx].mean(axis=0)  # the patient's images averaged first
            if not np.all(np.isfinite(mean)):
                mean = np.zeros(dim)  # a non-finite embedding counts as zero (same bound)
            norm = float(np.linalg.norm(mean))
            if norm > clip:
                mean = mean * (clip / norm)
            weight = idx.sum() / total
            rows[p, k * dim : (k + 1) * dim] = weight * mean
            rows[p, num_classes * dim + k] = weight * kappa
    return [str(p) for p in patients], rows


def embedding_sums(
    features: np.ndarray,
    labels: np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    num_classes: int,
    clip_norm: float = 1.0,
    count_scale: float | None = None,
) -> np.ndarray:
    """The unnoised released vector S = Σ_p u_p (length K·(D+1))."""
    _, rows = patient_contributions(
        features, labels, patient_ids, num_classes, clip_norm, count_scale
    )
    return rows.sum(axis=0)


def split_vector(
    vector: np.ndarray, num_classes: int, count_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """(sums [K, D], counts [K]) of a released vector; counts unscaled by κ."""
    vector = np.asarray(vector, dtype=np.float64)
    dim = (len(vector) - num_classes) // num_classes
    sums = vector[: num_classes * dim].reshape(num_classes, dim)
    scaled = vector[num_classes * dim :]
    return sums, scaled / count_scale


@torch.no_grad()
def image_features(feature_map, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """φ of uint8 images [N, R, R], as float64 [N, D]."""
    out = []
    for start in range(0, len(images), batch):
        x = to_unit_range(np.ascontiguousarray(images[start : start + batch]))
        out.append(feature_map(x).double().numpy())
    if not out:
        return np.zeros((0, feature_map.dim))
    return np.concatenate(out)


def release_embedding(
    prepared: str | os.PathLike,
    out: str | os.PathLike,
    *,
    epsilon: float,
    clip_norm: float = 1.0,
    count_scale: float | None = None,
    features: str = RFF,
    dim: int = DEFAULT_DIM,
    seed: int = DEFAULT_SEED,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    feature_resolution: int = DEFAULT_FEATURE_RESOLUTION,
    privacy_home: str | os.PathLike | None = None,
    privacy_unit: str | None = None,
    delta: float | None = None,
    max_epsilon: float | None = None,
    site: str | None = None,
    public: NetworkFeatures | None = None,
) -> EmbeddingRelease:
    """Compute, noise once (through the privacy engine) and write a site's release to ``out``.

    ``features`` may name ``public``: the network given as ``public`` (a federation's site
    receives it from the server and checks it before)."""
    from fedspine.data.prepared import PreparedDatasetError, load_prepared  # lazy: reads data
    from fedspine.training.dp_run import dp_unit_of  # lazy: the DP run's unit rules

    out = Path(out)
    if out.exists():
        raise EmbeddingReleaseError(f"{out} already exists; choose another --out")
    if out.suffix != ".npz":
        raise EmbeddingReleaseError(f"{out}: a release is an .npz file; name it *.npz")
    try:
        dataset = load_prepared(prepared)
    except PreparedDatasetError as err:
        raise EmbeddingReleaseError(str(err)) from None
    train = dataset.select("train", labelled=True)
    if len(train) == 0:
        raise EmbeddingReleaseError(f"{prepared}: the train split holds no labelled image")
    unit = dp_unit_of(dataset, privacy_unit)
    kappa = float(clip_norm) if count_scale is None else float(count_scale)
    delta_sens = sensitivity(clip_norm, kappa)
    feature_map = build_feature_map(
        features,
        dim=dim,
        seed=seed,
        bandwidths=bandwidths,
        resolution=feature_resolution,
        dataset_content_hash=dataset.content_hash,
        public=public,
        patient_ids=dataset.patient_ids.tolist(),
    )
    engine = PrivacyEngine(
        train.privacy_ids,
        unit=unit,
        home=privacy_home,
        run_id=new_run_id("embedding"),
        delta=delta,
    )
    num_classes = dataset.num_classes
    feats = image_features(feature_map, np.asarray(train.images))
    exact = embedding_sums(feats, train.labels, train.privacy_ids, num_classes, clip_norm, kappa)
    plan = engine.plan(
        steps=1,
        sample_rate=1.0,
        clip_norm=delta_sens,
        label=MECHANISM_LABEL,
        target_epsilon=epsilon,
        cap=max_epsilon,
    )
    description = feature_map.describe()
    reservation = engine.reserve(
        plan, extra={"feature_map": _short(description), "clip": float(clip_norm)}
    )
    reservation.take(1)  # durably on record before any noise is drawn
    noisy = exact + draw_noise(exact.shape, plan.noise_multiplier * delta_sens)
    del exact
    reservation.settle()
    spent, accountant, rows = engine.reported()
    sums, counts = split_vector(noisy, num_classes, kappa)
    metadata = {
        "format": FORMAT,
        "fedspine_version": __version__,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "site": site or Path(prepared).resolve().name,
        "class_names": list(dataset.class_names),
        "feature_map": description,
        "clip_norm": float(clip_norm),
        "count_scale": kappa,
        "sensitivity": delta_sens,
        "noise_multiplier": plan.noise_multiplier,
        "noise_std": plan.noise_multiplier * delta_sens,
        "epsilon": float(spent),
        "delta": engine.delta,
        "accountant": accountant,
        "unit": unit,
        "patients": engine.num_patients,
        "run_id": engine.run_id,
        "mechanisms": rows,
    }
    release = EmbeddingRelease(sums=sums, counts=counts, metadata=metadata, path=out)
    write_release(out, release)
    return release


def draw_noise(shape: tuple[int, ...], std: float) -> np.ndarray:
    """Gaussian noise of standard deviation ``std`` from a generator seeded by OS entropy."""
    return np.random.default_rng().normal(0.0, std, size=shape)


def write_release(path: str | os.PathLike, release: EmbeddingRelease) -> Path:
    """The .npz of a release (sums, counts, metadata as JSON text), whole or not at all."""
    unknown = set(release.metadata) - METADATA_KEYS
    if unknown:
        raise EmbeddingReleaseError(f"metadata fields not allowed in a release: {sorted(unknown)}")
    arrays = {
        "sums": np.asarray(release.sums, dtype=np.float64),
        "counts": np.asarray(release.counts, dtype=np.float64),
        "metadata": np.array(json_text(release.metadata, strict=True)),
    }
    return write_atomic(path, lambda handle: np.savez(handle, **arrays), durable=True)


def read_release(path: str | os.PathLike) -> EmbeddingRelease:
    """A release file, checked to be fedspine's format and consistent."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingReleaseError(f"{path}: no such release file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if set(data.files) != set(ARRAYS):
                raise EmbeddingReleaseError(f"{path}: holds {sorted(data.files)}, not {ARRAYS}")
            sums, counts = np.asarray(data["sums"]), np.asarray(data["counts"])
            metadata = json.loads(str(data["metadata"]))
    except (OSError, ValueError) as err:
        if isinstance(err, EmbeddingReleaseError):
            raise
        raise EmbeddingReleaseError(f"{path}: not a release file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise EmbeddingReleaseError(f"{path}: unknown format {metadata.get('format')!r}")
    k = len(metadata.get("class_names", []))
    if sums.ndim != 2 or sums.shape[0] != k or counts.shape != (k,):
        raise EmbeddingReleaseError(f"{path}: arrays do not match its {k} classes")
    return EmbeddingRelease(sums=sums, counts=counts, metadata=metadata, path=path)


@dataclass
class PooledEmbedding:
    """Several sites' releases summed: what a server fits a generator to."""

    sums: np.ndarray
    counts: np.ndarray
    class_names: list[str]
    feature_map: dict[str, Any]
    releases: list[EmbeddingRelease]

    def means(self) -> np.ndarray:
        return self.sums / np.maximum(self.counts, 1.0)[:, None]


def combine_releases(releases: Sequence[EmbeddingRelease]) -> PooledEmbedding:
    """Sum sites' releases (same classes, same feature map, one release per site)."""
    if not releases:
        raise EmbeddingReleaseError("no release given")
    first = releases[0]
    seen: set[str] = set()
    for r in releases:
        where = r.path or r.site
        if r.class_names != first.class_names:
            raise EmbeddingReleaseError(
                f"{where}: classes {r.class_names} differ from {first.class_names}"
            )
        if r.metadata["feature_map"] != first.metadata["feature_map"]:
            raise EmbeddingReleaseError(
                f"{where}: another feature map than {first.path or first.site}'s; every site "
                "must release with the same public map (same --features, --dim, --seed)"
            )
        if r.site in seen:
            raise EmbeddingReleaseError(
                f"{where}: a second release of site {r.site}; its releases compose on the same "
                "patients, so pool one release per site"
            )
        seen.add(r.site)
    return PooledEmbedding(
        sums=np.sum([r.sums for r in releases], axis=0),
        counts=np.sum([r.counts for r in releases], axis=0),
        class_names=first.class_names,
        feature_map=dict(first.metadata["feature_map"]),
        releases=list(releases),
    )


def _short(description: dict[str, Any]) -> str:
    kinds = [p.get("kind", "?") for p in description.get("parts", [])]
    return f"{'+'.join(kinds)}, dim {description.get('dim')}"


__all__ = [
    "MECHANISM_LABEL",
    "EmbeddingRelease",
    "EmbeddingReleaseError",
    "PooledEmbedding",
    "PrivacyError",
    "combine_releases",
    "embedding_sums",
    "patient_contributions",
    "read_release",
    "release_embedding",
    "sensitivity",
]
