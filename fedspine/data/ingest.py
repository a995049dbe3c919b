"""`fedspine ingest`: decode a source once into a prepared dataset.

Every listed file is either in the prepared dataset or in its ``rejected.csv`` with the reason:
a bad file is skipped, never fatal, and never silent.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fedspine import __version__
from fedspine.data.dicom import ImageDecodeError, read_image
from fedspine.data.geometry import prepare_image
from fedspine.data.prepared import write_prepared
from fedspine.data.sources import SourceLayoutError, SourceRecord, list_source
from fedspine.data.splits import assign_splits

FITS = ("crop", "pad")


@dataclass(frozen=True)
class IngestConfig:
    """Every setting that shapes a prepared dataset; written into its manifest."""

    layout: str = "auto"
    split: str | None = None
    resolution: int = 256
    fit: str = "crop"
    labels: str = "abnormality"
    label_rule: str = "correct"
    classes: tuple[str, ...] | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    workers: int = 1

    def validate(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"--resolution {self.resolution} is too small (at least 8 pixels)")
        if self.fit not in FITS:
            raise ValueError(f"--fit {self.fit!r}: expected one of {FITS}")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")


@dataclass(frozen=True)
class IngestSummary:
    out: Path
    layout: str
    num_images: int
    num_rejected: int
    counts: dict[str, dict[str, int]]
    rejection_reasons: dict[str, int]
    patients_moved_to_test: int
    privacy_unit: str = "patient"


ProgressFn = Callable[[int, int, int], None]
"""Called as ``progress(done, total, skipped)`` while files are decoded."""


def ingest(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: IngestConfig | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> IngestSummary:
    """Decode ``source`` into the prepared dataset folder ``out`` (written atomically)."""
    config = config or IngestConfig()
    config.validate()
    source = Path(source)
    listing = list_source(
        source,
        layout=config.layout,
        schema=config.labels,
        rule=config.label_rule,
        split=config.split,
        classes=config.classes,
    )
    records = sorted(listing.records, key=lambda r: r.file)
    if not records:
        raise SourceLayoutError(f"{source}: no images listed; nothing to ingest")

    arrays, decode_rejected = _decode_all(records, config, progress)
    kept = [i for i, a in enumerate(arrays) if a is not None]
    rejected = listing.rejected + decode_rejected
    if not kept:
        raise SourceLayoutError(
            f"{source}: none of the {len(records)} listed images could be decoded "
            f"(first reason: {decode_rejected[0][1] if decode_rejected else 'unknown'})"
        )
    kept_records = [records[i] for i in kept]
    images = np.stack([arrays[i] for i in kept])
    split_result = assign_splits(
        [r.patient_id for r in kept_records],
        [r.source_split for r in kept_records],
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )
    labels = np.array([r.label for r in kept_records], dtype=np.int64)
    counts = _counts(labels, split_result.splits, listing.class_names)
    manifest = {
        "format": "fedspine-prepared/1",
        "fedspine_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(source.resolve()),
        "layout": listing.layout,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "label_schema": config.labels if listing.layout == "vindr" else "folder",
        "counts": counts,
        "num_patients": int(len(set(r.patient_id for r in kept_records))),
        "privacy_unit": listing.privacy_unit,
        "num_rejected": len(rejected),
        "patients_moved_to_test": list(split_result.patients_moved_to_test),
    }
    out_path = write_prepared(
        out,
        images=images,
        files=[r.file for r in kept_records],
        patient_ids=[r.patient_id for r in kept_records],
        splits=list(split_result.splits),
        labels=labels,
        findings=np.stack([r.findings for r in kept_records]),
        finding_names=listing.finding_names,
        class_names=listing.class_names,
        rejected=rejected,
        manifest=manifest,
        overwrite=overwrite,
    )
    reasons = Counter(_reason_kind(reason) for _, reason in rejected)
    return IngestSummary(
        out=out_path,
        layout=listing.layout,
        num_images=len(kept_records),
        num_rejected=len(rejected),
        counts=counts,
        rejection_reasons=dict(reasons.most_common()),
        patients_moved_to_test=len(split_result.patients_moved_to_test),
        privacy_unit=listing.privacy_unit,
    )


def decode_record(path: str | os.PathLike, resolution: int, fit: str) -> np.ndarray:
    """One file to a square uint8 image at ``resolution`` (raises ImageDecodeError)."""
    return prepare_image(read_image(path), resolution, fit)


def _decode_all(
    records: Sequence[SourceRecord], config: IngestConfig, progress: ProgressFn | None
) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    tasks = [(i, str(r.path), config.resolution, config.fit) for i, r in enumerate(records)]
    arrays: list[np.ndarray | None] = [None] * len(records)
    rejected: list[tuple[str, str]] = []
    done = 0

    def collect(result: tuple[int, np.ndarray | None, str | None]) -> None:
        nonlocal done
        i, array, reason = result
        arrays[i] = array
        if reason is not None:
            rejected.append((records[i].file, reason))
        done += 1
        if progress is not None:
            progress(done, len(records), len(rejected))

    if config.workers == 1 or len(tasks) < 2:
        for task in tasks:
            collect(_decode_task(task))
    else:
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        chunk = max(1, min(16, len(tasks) // (config.workers * 4)))
        with ctx.Pool(config.workers) as pool:
            for result in pool.imap_unordered(_decode_task, tasks, chunksize=chunk):
                collect(result)
    rejected.sort()
    return arrays, rejected


def _decode_task(task: tuple[int, str, int, str]) -> tuple[int, np.ndarray | None, str | None]:
    i, path, resolution, fit = task
    try:
        return i, decode_record(path, resolution, fit), None
    except ImageDecodeError as err:
        return i, None, err.reason
    except Exception as err:  # a decoder bug must cost one file, not the whole ingest
        return i, None, f"unexpected {type(err).__name__}: {err}"


def _counts(
    labels: np.ndarray, splits: np.ndarray, names: Sequence[str]
) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for split in ("train", "val", "test"):
        mask = splits == split
        per_class = {name: int(((labels == k) & mask).sum()) for k, name in enumerate(names)}
        per_class["not eligible"] = int(((labels < 0) & mask).sum())
        per_class["total"] = int(mask.sum())
        out[split] = per_class
    return out


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary line (details stay in rejected.csv)."""
    return reason.split(":")[0].split("(")[0].strip()
