"""Source layouts `ingest` reads, turned into one list of image records.

- ``vindr``: VinDr-SpineXR, ``{train,test}_images/<image_id>.dicom`` beside
  ``annotations/{train,test}.csv`` (one row per box; ``study_id`` identifies the patient).
- ``folder``: image files (DICOM or PNG) beside ``labels.csv`` with columns ``file,label`` and
  optional ``patient_id`` and ``split`` (train/test); optional ``classes.txt`` fixes class order.

Nothing is dropped silently: files without annotations and annotations without files come back
as rejections with the reason.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedspine.data.labels import (
    LESION_TYPES,
    ImageFindings,
    class_names,
    folder_class_names,
    is_int,
    label_for,
    normalise_lesion_type,
)
from fedspine.fileio import FOLDER_CLASSES, FOLDER_LABELS

LAYOUTS = ("auto", "vindr", "folder")
SOURCE_SPLITS = ("train", "test")
VINDR_COLUMNS = ("study_id", "image_id", "lesion_type")
IMAGE_SUFFIXES = {".dicom", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ""}


class SourceLayoutError(Exception):
    """The source folder is not in a layout `ingest` can read; the message says what is wrong."""


@dataclass(frozen=True)
class SourceRecord:
    """One image the source lists: where it is and what the source says about it."""

    path: Path
    file: str
    patient_id: str
    source_split: str | None
    label: int
    findings: np.ndarray = field(compare=False)


@dataclass
class SourceListing:
    """The records of a source and what one ``patient_id`` in them stands for.

    ``privacy_unit`` is ``patient``, ``study`` (VinDr: ``study_id`` as a patient proxy) or
    ``image`` (a folder row without ``patient_id``: that image stands for itself), so DP results
    can say which unit their guarantee covers.
    """

    layout: str
    records: list[SourceRecord]
    rejected: list[tuple[str, str]]
    class_names: list[str]
    finding_names: list[str]
    privacy_unit: str


def detect_layout(root: Path) -> str:
    """``vindr`` if annotations/ and an images folder exist, ``folder`` if labels.csv does."""
    root = Path(root)
    if not root.is_dir():
        raise SourceLayoutError(f"{root}: no such folder")
    if (root / "annotations").is_dir() and any(
        (root / f"{s}_images").is_dir() for s in SOURCE_SPLITS
    ):
        return "vindr"
    if (root / FOLDER_LABELS).is_file():
        return "folder"
    raise SourceLayoutError(
        f"{root}: cannot tell the layout: expected annotations/ with train_images/ or test_images/ "
        "(VinDr-SpineXR), or a labels.csv with columns file,label (folder). Pass --layout to choose."
    )


def list_source(
    root: Path,
    layout: str = "auto",
    schema: str = "abnormality",
    rule: str = "correct",
    split: str | None = None,
    classes: Sequence[str] | None = None,
) -> SourceListing:
    """All records of ``root`` under the label schema, restricted to one source split if given."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise SourceLayoutError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if split is not None and split not in SOURCE_SPLITS:
        raise SourceLayoutError(f"unknown split {split!r}; expected one of {SOURCE_SPLITS}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "vindr":
        return _list_vindr(root, schema, rule, split)
    return _list_folder(root, split, classes)


def _list_vindr(root: Path, schema: str, rule: str, split: str | None) -> SourceListing:
    records: list[SourceRecord] = []
    rejected: list[tuple[str, str]] = []
    splits = [split] if split else [s for s in SOURCE_SPLITS if (root / f"{s}_images").is_dir()]
    if not splits:
        raise SourceLayoutError(f"{root}: neither train_images/ nor test_images/ exists")
    for s in splits:
        image_dir = root / f"{s}_images"
        ann_path = root / "annotations" / f"{s}.csv"
        if not image_dir.is_dir():
            raise SourceLayoutError(f"{image_dir}: missing (asked for split {s!r})")
        if not ann_path.is_file():
            raise SourceLayoutError(f"{ann_path}: missing; the {s} images have no annotations")
        rows_by_image: dict[str, list[str]] = defaultdict(list)
        patient_of: dict[str, str] = {}
        with open(ann_path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in VINDR_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise SourceLayoutError(f"{ann_path}: missing column(s) {missing}")
            for line_no, row in enumerate(reader, start=2):
                image_id = (row["image_id"] or "").strip()
                study = (row["study_id"] or "").strip()
                if not image_id or not study:
                    rejected.append(
                        (f"{ann_path.name}:{line_no}", "row without image_id or study_id")
                    )
                    continue
                rows_by_image[image_id].append(normalise_lesion_type(row["lesion_type"] or ""))
                patient_of.setdefault(image_id, study)
        files = {
            p.stem: p
            for p in image_dir.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        }
        for image_id in sorted(rows_by_image):
            rel = f"{s}_images/{image_id}.dicom"
            path = files.get(image_id)
            if path is None:
                rejected.append((rel, "listed in annotations but the image file is missing"))
                continue
            findings = ImageFindings(tuple(rows_by_image[image_id]))
            records.append(
                SourceRecord(
                    path=path,
                    file=str(path.relative_to(root)),
                    patient_id=patient_of[image_id],
                    source_split=s,
                    label=label_for(findings, schema, rule),
                    findings=findings.findings_vector(),
                )
            )
        for stem in sorted(set(files) - set(rows_by_image)):
            rejected.append(
                (
                    str(files[stem].relative_to(root)),
                    f"no row in annotations/{s}.csv for this image",
                )
            )
    return SourceListing(
        "vindr", records, rejected, class_names(schema), list(LESION_TYPES), privacy_unit="study"
    )


def _list_folder(root: Path, split: str | None, classes: Sequence[str] | None) -> SourceListing:
    labels_path = root / FOLDER_LABELS
    if not labels_path.is_file():
        raise SourceLayoutError(
            f"{labels_path}: missing; the folder layout needs labels.csv (file,label)"
        )
    with open(labels_path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in ("file", "label") if c not in header]
        if missing:
            raise SourceLayoutError(
                f"{labels_path}: missing column(s) {missing}; expected file,label"
            )
        rows = list(reader)
    declared = classes
    classes_txt = root / FOLDER_CLASSES
    if declared is None and classes_txt.is_file():
        declared = [c.strip() for c in classes_txt.read_text().splitlines() if c.strip()]
    raw = [(r["label"] or "").strip() for r in rows]
    try:
        names = folder_class_names([v for v in raw if v], declared)
    except ValueError as err:
        raise SourceLayoutError(f"{labels_path}: {err}") from None
    integer_labels = declared is None and all(is_int(v) for v in raw if v)
    index = {(str(int(n)) if integer_labels else n): k for k, n in enumerate(names)}

    records: list[SourceRecord] = []
    rejected: list[tuple[str, str]] = []
    listed: set[str] = set()
    unnamed_patient = False
    for line_no, row in enumerate(rows, start=2):
        rel = (row["file"] or "").strip()
        value = raw[line_no - 2]
        if not rel or not value:
            rejected.append((rel or f"labels.csv:{line_no}", "row without file or label"))
            continue
        listed.add(rel)
        row_split = (row.get("split") or "").strip() or None
        if row_split is not None and row_split not in SOURCE_SPLITS:
            rejected.append((rel, f"split {row_split!r} is not train or test"))
            continue
        if split is not None and row_split is not None and row_split != split:
            continue
        path = root / rel
        if not path.is_file():
            rejected.append((rel, "listed in labels.csv but the file is missing"))
            continue
        key = str(int(value)) if integer_labels else value
        label = index[key]
        onehot = np.zeros(len(names), dtype=np.uint8)
        onehot[label] = 1
        patient_id = (row.get("patient_id") or "").strip()
        unnamed_patient |= not patient_id
        records.append(
            SourceRecord(
                path=path,
                file=rel,
                patient_id=patient_id or rel,
                source_split=row_split,
                label=label,
                findings=onehot,
            )
        )
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES - {""} and rel not in listed:
            rejected.append((rel, "image file not listed in labels.csv"))
    unit = "image" if unnamed_patient else "patient"
    return SourceListing("folder", records, rejected, names, list(names), privacy_unit=unit)
