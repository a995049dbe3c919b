"""Phantom sites for measurements: sites ingested and pooled, and a held-out test population.

The benchmarks compare generators by TSTR on a real test split. Three 300-image sites leave a
test split of about 170 images, whose patient-level intervals (about ±0.1 AUC) are wider than
most differences worth measuring. The held-out population is new patients of the same sites
(same domains, another patient seed), added to the test split alone: nothing trains on it, and
the sites' own train and validation splits are unchanged. Everything is made once under
``root`` and reused.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedspine.data.ingest import IngestConfig, ingest
from fedspine.data.phantom import write_phantom_sites
from fedspine.data.prepared import (
    PreparedDataset,
    PreparedDatasetError,
    load_prepared,
    merge_prepared,
)

HELDOUT_PATIENT_SEED = 1_000_003
"""Added to the sites' seed to draw the held-out population's patients."""
HELDOUT_SUFFIX = "-heldout"
"""Appended to a site's name in the pool: the held-out patients' ids stay apart from its own."""


@dataclass(frozen=True)
class PhantomPool:
    """Where a pool's prepared datasets are."""

    sites: list[Path]
    """Each site's own prepared dataset (its train, val and test splits)."""
    pooled: Path
    """The sites' union."""
    scored: Path
    """The union plus the held-out population, all of it in the test split (``pooled`` itself
    when there is none): train and validation rows are ``pooled``'s."""


def phantom_pool(
    root: Path,
    sites: int,
    images_per_site: int,
    size: int,
    resolution: int,
    seed: int = 0,
    heldout_per_site: int = 0,
) -> PhantomPool:
    """``sites`` phantom sites ingested at ``resolution`` and pooled, plus ``heldout_per_site``
    images per site of new patients in the test split alone; made once under ``root``."""
    if heldout_per_site < 0:
        raise ValueError(f"heldout_per_site must be 0 or more, got {heldout_per_site}")
    parts = _ingested(
        root / "dicom", root / f"prepared-{resolution}", sites, images_per_site, size,
        resolution, seed, patient_seed=None,
    )  # fmt: skip
    pooled = root / f"pooled-{resolution}"
    if _open_prepared(pooled) is None:
        merge_prepared([p for _, p in parts], pooled, [n for n, _ in parts], overwrite=True)
    site_paths = [p.root for _, p in parts]
    if not heldout_per_site:
        return PhantomPool(site_paths, pooled, pooled)
    scored = root / f"pooled-{resolution}-heldout{heldout_per_site}"
    if _open_prepared(scored) is None:
        held = _ingested(
            root / f"heldout-{heldout_per_site}-dicom",
            root / f"prepared-{resolution}-heldout{heldout_per_site}",
            sites, heldout_per_site, size, resolution, seed,
            patient_seed=seed + HELDOUT_PATIENT_SEED,
        )  # fmt: skip
        everything = parts + [(name + HELDOUT_SUFFIX, _all_test(p)) for name, p in held]
        names = [n for n, _ in everything]
        merge_prepared([p for _, p in everything], scored, names, overwrite=True)
    return PhantomPool(site_paths, pooled, scored)


def _ingested(
    raw: Path,
    prepared_root: Path,
    sites: int,
    images_per_site: int,
    size: int,
    resolution: int,
    seed: int,
    patient_seed: int | None,
) -> list[tuple[str, PreparedDataset]]:
    """(site name, prepared dataset) of every phantom site under ``raw``, made once."""
    if not raw.exists():  # written whole, then renamed: an interrupted run leaves no half set
        partial = raw.parent / f".{raw.name}-partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_phantom_sites(
            partial, sites, images_per_site, size=size, seed=seed, patient_seed=patient_seed
        )
        partial.rename(raw)
    out = []
    for site in sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith(".")):
        prepared = prepared_root / site.name
        dataset = _open_prepared(prepared)
        if dataset is None:
            ingest(site, prepared, IngestConfig(resolution=resolution, seed=seed), overwrite=True)
            dataset = load_prepared(prepared)
        out.append((site.name, dataset))
    return out


def _all_test(dataset: PreparedDataset) -> PreparedDataset:
    return dataclasses.replace(dataset, splits=np.full(len(dataset), "test", dtype=object))


def _open_prepared(path: Path) -> PreparedDataset | None:
    """The prepared dataset at ``path``, or None where there is none yet (prepared datasets
    are written whole, then renamed, so a missing part means not made)."""
    try:
        return load_prepared(path)
    except PreparedDatasetError:
        return None
