"""Patient-level splits: no patient is ever in two of train, val and test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitResult:
    splits: np.ndarray
    patients_moved_to_test: tuple[str, ...]


def assign_splits(
    patient_ids: Sequence[str],
    source_splits: Sequence[str | None],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> SplitResult:
    """Give every image a split, deciding per patient.

    The source's own test set stays the test set. Images without a source split are held out by
    patient with ``test_fraction``. Validation is carved, by patient, from what remains for
    training, with a fixed ``seed``. A patient the source puts in both its train and test sets is
    moved wholly to test so that no patient straddles splits; the result names them.
    """
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError("val_fraction and test_fraction must lie in [0, 1)")
    patients = np.asarray([str(p) for p in patient_ids], dtype=object)
    source = list(source_splits)
    if len(source) != len(patients):
        raise ValueError("patient_ids and source_splits differ in length")

    in_test = {p for p, s in zip(patients, source, strict=True) if s == "test"}
    in_train = {p for p, s in zip(patients, source, strict=True) if s == "train"}
    moved = tuple(sorted(in_test & in_train))
    unassigned = sorted(
        {p for p, s in zip(patients, source, strict=True) if s is None} - in_test - in_train
    )

    rng = np.random.default_rng(seed)
    test_patients = set(in_test)
    if unassigned and test_fraction > 0:
        order = rng.permutation(len(unassigned))
        n_test = _share(len(unassigned), test_fraction)
        test_patients |= {unassigned[i] for i in order[:n_test]}

    trainable = sorted(({str(p) for p in patients}) - test_patients)
    val_patients: set[str] = set()
    if trainable and val_fraction > 0:
        order = rng.permutation(len(trainable))
        n_val = _share(len(trainable), val_fraction)
        val_patients = {trainable[i] for i in order[:n_val]}

    splits = np.array(
        [
            "test" if p in test_patients else "val" if p in val_patients else "train"
            for p in patients
        ],
        dtype=object,
    )
    return SplitResult(splits=splits, patients_moved_to_test=moved)


def _share(n: int, fraction: float) -> int:
    """At least one patient when the fraction is positive and there are two or more patients."""
    if n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))
