"""The prepared dataset: one folder that every later step (training, evaluation, privacy) reads.

Layout of a prepared folder::

    images.npy      uint8 [N, R, R], one square grey image per row
    index.csv       row,file,patient_id,split,label,<one 0/1 column per finding>
    rejected.csv    file,reason (files that could not be used, with why)
    manifest.json   source, settings, class names, counts, privacy unit, content hash, version

``label`` is the conditioning class index under the chosen label schema, or -1 where the image
is not eligible under it (for example several distinct lesion types under ``lesion``). The
multi-label finding columns are kept for every image whatever the schema.

``privacy_unit`` in the manifest says what one ``patient_id`` stands for, so that a DP guarantee
computed per ``patient_id`` is not read as stronger than it is: ``patient`` (the source named
every image's patient), ``study`` (VinDr ``study_id``, a patient proxy: one person with two
studies counts twice) or ``image`` (some images had no patient id and are each their own unit).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedspine.fileio import (
    PREPARED_IMAGES,
    PREPARED_INDEX,
    PREPARED_MANIFEST,
    PREPARED_REJECTED,
    json_text,
    publish_folder,
)

IMAGES_FILE = PREPARED_IMAGES
INDEX_FILE = PREPARED_INDEX
REJECTED_FILE = PREPARED_REJECTED
MANIFEST_FILE = PREPARED_MANIFEST
SPLITS = ("train", "val", "test")
PRIVACY_UNITS = ("patient", "study", "image")


def unit_plural(unit: str) -> str:
    """'patients', 'studies' or 'images': a privacy unit's plural, for messages."""
    return "studies" if unit == "study" else f"{unit}s"


UNIT_DESCRIPTIONS = {
    "patient": "patient",
    "study": "study (patient proxy)",
    "image": "image (each image treated as one person)",
}


class PreparedDatasetError(Exception):
    """A prepared dataset folder is missing, incomplete or inconsistent."""


@dataclass
class PreparedDataset:
    """An in-memory view of a prepared dataset folder (images are memory-mapped)."""

    root: Path
    images: np.ndarray
    files: list[str]
    patient_ids: np.ndarray
    splits: np.ndarray
    labels: np.ndarray
    findings: np.ndarray
    finding_names: list[str]
    class_names: list[str]
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def content_hash(self) -> str:
        return str(self.manifest.get("content_hash", ""))

    @property
    def privacy_unit(self) -> str:
        """What one ``patient_id`` stands for: one of :data:`PRIVACY_UNITS`.

        Manifests written before the key existed get it inferred from the rows, erring weak:
        ``image`` if any row's patient id is its file name (ingest's fallback for a missing id).
        """
        unit = self.manifest.get("privacy_unit")
        if unit is not None:
            if unit not in PRIVACY_UNITS:
                raise PreparedDatasetError(
                    f"{self.root}: manifest privacy_unit {unit!r} is not one of {PRIVACY_UNITS}"
                )
            return str(unit)
        files = np.asarray(self.files, dtype=str)
        if files.size and bool(np.any(np.asarray(self.patient_ids).astype(str) == files)):
            return "image"
        if self.manifest.get("layout") == "vindr":
            return "study"
        return "patient"

    @property
    def privacy_ids(self) -> np.ndarray:
        """Each row's privacy-unit identifier: its patient id without the prefixes
        :func:`merge_prepared` added.

        DP samples, clips and keys the ledger by this, never by the prefixed id: a person merged
        in twice (two ingests of one source) must stay one unit with one spend. Two people who
        share an id across merged sources become one unit, which can only over-count.
        """
        ids = np.asarray(self.patient_ids).astype(str)
        prefixes = set(self.manifest.get("merge_prefixes") or self.manifest.get("parts") or ())
        if not prefixes:
            return ids
        out = []
        for pid in ids.tolist():
            head, sep, rest = pid.partition("/")
            while sep and head in prefixes:
                pid = rest
                head, sep, rest = pid.partition("/")
            out.append(pid)
        return np.asarray(out)

    def select(
        self, split: str | Sequence[str] | None = None, labelled: bool = True
    ) -> PreparedDataset:
        """Rows of the given split(s); with ``labelled`` only rows eligible under the schema."""
        mask = np.ones(len(self), dtype=bool)
        if split is not None:
            wanted = (split,) if isinstance(split, str) else tuple(split)
            unknown = set(wanted) - set(SPLITS)
            if unknown:
                raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {SPLITS}")
            mask &= np.isin(self.splits, wanted)
        if labelled:
            mask &= self.labels >= 0
        return self.rows(np.flatnonzero(mask))

    def rows(self, idx: np.ndarray) -> PreparedDataset:
        """The rows at indices ``idx``, in that order, with this dataset's schema and manifest."""
        return PreparedDataset(
            root=self.root,
            images=self.images[idx],
            files=[self.files[i] for i in idx],
            patient_ids=self.patient_ids[idx],
            splits=self.splits[idx],
            labels=self.labels[idx],
            findings=self.findings[idx],
            finding_names=list(self.finding_names),
            class_names=list(self.class_names),
            manifest=self.manifest,
        )

    def images_float(self) -> np.ndarray:
        """Images as float32 in [0, 1], shape [N, 1, R, R]."""
        return (np.asarray(self.images, dtype=np.float32) / 255.0)[:, None]

    def class_counts(self) -> dict[str, int]:
        return {name: int((self.labels == k).sum()) for k, name in enumerate(self.class_names)}


def load_prepared(root: str | os.PathLike) -> PreparedDataset:
    """Open a prepared dataset folder written by :func:`write_prepared`."""
    root = Path(root)
    if not root.is_dir():
        raise PreparedDatasetError(
            f"{root}: not a prepared dataset folder (run `fedspine ingest SOURCE --out {root}`)"
        )
    for name in (IMAGES_FILE, INDEX_FILE, MANIFEST_FILE):
        if not (root / name).is_file():
            raise PreparedDatasetError(
                f"{root}: missing {name}; the folder is not a complete prepared dataset"
            )
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    images = np.load(root / IMAGES_FILE, mmap_mode="r")
    with open(root / INDEX_FILE, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames or []
    finding_names = list(manifest.get("finding_names", []))
    missing = [
        c for c in ("file", "patient_id", "split", "label", *finding_names) if c not in header
    ]
    if missing:
        raise PreparedDatasetError(f"{root / INDEX_FILE}: missing column(s) {missing}")
    if len(rows) != images.shape[0]:
        raise PreparedDatasetError(
            f"{root}: index.csv has {len(rows)} rows but images.npy has {images.shape[0]} images"
        )
    findings = np.array(
        [[int(r[name]) for name in finding_names] for r in rows], dtype=np.uint8
    ).reshape(len(rows), len(finding_names))
    return PreparedDataset(
        root=root,
        images=images,
        files=[r["file"] for r in rows],
        patient_ids=np.array([r["patient_id"] for r in rows], dtype=object),
        splits=np.array([r["split"] for r in rows], dtype=object),
        labels=np.array([int(r["label"]) for r in rows], dtype=np.int64),
        findings=findings,
        finding_names=finding_names,
        class_names=list(manifest["class_names"]),
        manifest=manifest,
    )


def content_hash(images: np.ndarray, index_csv: bytes) -> str:
    """SHA-256 over the pixels and the index: the dataset's identity for privacy accounting."""
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(index_csv)
    return h.hexdigest()


def write_prepared(
    out: str | os.PathLike,
    images: np.ndarray,
    files: Sequence[str],
    patient_ids: Sequence[str],
    splits: Sequence[str],
    labels: Sequence[int],
    findings: np.ndarray,
    finding_names: Sequence[str],
    class_names: Sequence[str],
    rejected: Iterable[tuple[str, str]],
    manifest: dict,
    overwrite: bool = False,
) -> Path:
    """Write a prepared dataset atomically: into a sibling temporary folder, then rename.

    An interrupted write leaves no half dataset at ``out``. Returns the final path.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise PreparedDatasetError(
            f"{out} already exists; choose another --out or pass --overwrite"
        )
    n = len(files)
    if not (
        images.shape[0] == len(patient_ids) == len(splits) == len(labels) == findings.shape[0] == n
    ):
        raise ValueError("images, files, patient ids, splits, labels and findings differ in length")
    bad_splits = set(splits) - set(SPLITS)
    if bad_splits:
        raise ValueError(f"unknown split(s) {sorted(bad_splits)}")
    # index.csv ends rows with "\n" and the csv writer quotes only that, so a carriage return
    # inside a field would split its row when read back: refuse it here, naming the value.
    for kind, values in (("file name", files), ("patient id", patient_ids)):
        bad = next((str(v) for v in values if "\r" in str(v)), None)
        if bad is not None:
            raise PreparedDatasetError(
                f"{kind} {bad!r} holds a carriage return; fedspine cannot index it. Rename the "
                "file or fix the identifier at the source, then ingest again"
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        np.save(tmp / IMAGES_FILE, np.ascontiguousarray(images, dtype=np.uint8))
        index_bytes = _index_csv(files, patient_ids, splits, labels, findings, finding_names)
        (tmp / INDEX_FILE).write_bytes(index_bytes)
        with open(tmp / REJECTED_FILE, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "reason"])
            w.writerows(rejected)
        full_manifest = dict(manifest)
        full_manifest.update(
            {
                "class_names": list(class_names),
                "finding_names": list(finding_names),
                "num_images": n,
                "resolution": int(images.shape[-1]) if n else None,
                "content_hash": content_hash(images, index_bytes),
            }
        )
        (tmp / MANIFEST_FILE).write_text(json_text(full_manifest, sort_keys=True))
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _index_csv(files, patient_ids, splits, labels, findings, finding_names) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "file", "patient_id", "split", "label", *finding_names])
    for i, (f, p, s, lab) in enumerate(zip(files, patient_ids, splits, labels, strict=True)):
        w.writerow([i, f, p, s, int(lab), *(int(v) for v in findings[i])])
    return buf.getvalue().encode()


def combine_privacy_units(units: Iterable[str]) -> str:
    """The unit of pooled data is the weakest of its parts': ``image`` < ``study`` < ``patient``."""
    units = set(units)
    unknown = units - set(PRIVACY_UNITS)
    if unknown:
        raise ValueError(f"unknown privacy unit(s) {sorted(unknown)}; expected {PRIVACY_UNITS}")
    return next((u for u in reversed(PRIVACY_UNITS) if u in units), "patient")


def merge_prepared(
    parts: Sequence[PreparedDataset],
    out: str | os.PathLike,
    names: Sequence[str],
    overwrite: bool = False,
) -> Path:
    """Pool prepared datasets of equal resolution and classes into one (patients prefixed by name).

    For a site that holds several sources, or a demo that compares federated training with a
    centralised run on the union of the sites' data. Splits are kept as they were.
    """
    if not parts or len(parts) != len(names):
        raise ValueError("merge_prepared needs one name per dataset, and at least one dataset")
    first = parts[0]
    for name, part in zip(names, parts, strict=True):
        if part.class_names != first.class_names or part.finding_names != first.finding_names:
            raise PreparedDatasetError(f"{name}: classes or findings differ from {names[0]}")
        if part.resolution != first.resolution:
            raise PreparedDatasetError(
                f"{name}: resolution {part.resolution} differs from {first.resolution}"
            )
    return write_prepared(
        out,
        images=np.concatenate([np.asarray(p.images) for p in parts]),
        files=[f"{n}/{f}" for n, p in zip(names, parts, strict=True) for f in p.files],
        patient_ids=[
            f"{n}/{pid}" for n, p in zip(names, parts, strict=True) for pid in p.patient_ids
        ],
        splits=[s for p in parts for s in p.splits],
        labels=np.concatenate([p.labels for p in parts]),
        findings=np.concatenate([p.findings for p in parts]),
        finding_names=first.finding_names,
        class_names=first.class_names,
        rejected=[],
        manifest={
            "format": "fedspine-prepared/1",
            "layout": "merged",
            "parts": {n: p.content_hash for n, p in zip(names, parts, strict=True)},
            # Every prefix on the patient ids, nested merges included: privacy_ids strips them.
            "merge_prefixes": sorted(
                {*names, *(x for p in parts for x in p.manifest.get("merge_prefixes") or ())}
            ),
            "privacy_unit": combine_privacy_units(p.privacy_unit for p in parts),
        },
        overwrite=overwrite,
    )
