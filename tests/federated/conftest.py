"""Small prepared site datasets for federation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedspine.data.prepared import write_prepared


def make_site_dataset(
    root: Path, n: int, seed: int, resolution: int = 16, brightness: float = 0.0
) -> Path:
    """Two classes that differ visibly (a bright bar for class 1), per-site intensity shift."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    images = rng.normal(80 + brightness, 20, size=(n, resolution, resolution))
    images[labels == 1, resolution // 2 - 1 : resolution // 2 + 1, :] += 120
    images = np.clip(images, 0, 255).astype(np.uint8)
    patients = [f"s{seed}-p{i // 2}" for i in range(n)]  # each seed's patients its own
    splits = ["test" if i >= n - 4 else "val" if i >= n - 8 else "train" for i in range(n)]
    return write_prepared(
        root,
        images=images,
        files=[f"img{i}.png" for i in range(n)],
        patient_ids=patients,
        splits=splits,
        labels=labels,
        findings=np.eye(2, dtype=np.uint8)[labels],
        finding_names=["normal", "abnormal"],
        class_names=["normal", "abnormal"],
        rejected=[],
        manifest={"source": "test"},
    )


@pytest.fixture
def site_datasets(tmp_path):
    return [
        make_site_dataset(tmp_path / f"site_{k}", n=40 + 8 * k, seed=k, brightness=15.0 * k)
        for k in range(3)
    ]
