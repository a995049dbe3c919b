"""Label schemas for spine radiographs: abnormality, lesion type, and the multi-label findings.

VinDr-SpineXR annotates one row per box; a normal image has a single "No finding" row. The
schemas turn an image's set of rows into a conditioning class:

- ``abnormality`` (class 0 "normal", 1 "abnormal"): abnormal iff any row names a lesion.
- ``abnormality`` with ``rule="paper"``: the rule of Schonfeld & Veeravagu's code, which labelled
  an image with exactly one annotation row as normal even when that row is a lesion. Only for a
  faithful reproduction; it mislabels single-lesion images.
- ``lesion``: the paper's 8 classes ("No finding" plus 7 lesion types), for images whose rows
  name exactly one distinct type; other images get -1 (not eligible) and stay in the index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NO_FINDING = "No finding"
LESION_TYPES: tuple[str, ...] = (
    "Disc space narrowing",
    "Foraminal stenosis",
    "Osteophytes",
    "Spondylolysthesis",
    "Surgical implant",
    "Vertebral collapse",
    "Other lesions",
)
LESION_CLASSES: tuple[str, ...] = (NO_FINDING, *LESION_TYPES)
ABNORMALITY_CLASSES: tuple[str, ...] = ("normal", "abnormal")
SCHEMAS = ("abnormality", "lesion")
RULES = ("correct", "paper")
NOT_ELIGIBLE = -1


@dataclass(frozen=True)
class ImageFindings:
    """Everything the annotation file says about one image."""

    lesion_rows: tuple[str, ...]

    @property
    def distinct_lesions(self) -> frozenset[str]:
        return frozenset(t for t in self.lesion_rows if t != NO_FINDING)

    def findings_vector(self) -> np.ndarray:
        """One 0/1 entry per lesion type in :data:`LESION_TYPES` order."""
        present = self.distinct_lesions
        return np.array([int(t in present) for t in LESION_TYPES], dtype=np.uint8)


def normalise_lesion_type(name: str) -> str:
    """Map an annotation's lesion name onto the fixed vocabulary.

    VinDr-SpineXR's public release groups its rarer findings under "Other lesions"; any name we
    do not know joins them, so no annotated abnormality is ever read as normal.
    """
    cleaned = " ".join(name.strip().split())
    for known in LESION_CLASSES:
        if cleaned.lower() == known.lower():
            return known
    if cleaned.lower() in {"spondylolisthesis"}:
        return "Spondylolysthesis"
    return "Other lesions"


def class_names(schema: str) -> list[str]:
    if schema == "abnormality":
        return list(ABNORMALITY_CLASSES)
    if schema == "lesion":
        return list(LESION_CLASSES)
    raise ValueError(f"unknown label schema {schema!r}; expected one of {SCHEMAS}")


def label_for(findings: ImageFindings, schema: str, rule: str = "correct") -> int:
    """The conditioning class of one image under ``schema`` (``NOT_ELIGIBLE`` if none)."""
    if rule not in RULES:
        raise ValueError(f"unknown label rule {rule!r}; expected one of {RULES}")
    if schema == "abnormality":
        if rule == "paper" and len(findings.lesion_rows) == 1:
            return 0
        return int(bool(findings.distinct_lesions))
    if schema == "lesion":
        if rule == "paper":
            raise ValueError("--label-rule paper only applies to the abnormality schema")
        distinct = findings.distinct_lesions
        if not distinct:
            return LESION_CLASSES.index(NO_FINDING)
        if len(distinct) == 1:
            return LESION_CLASSES.index(next(iter(distinct)))
        return NOT_ELIGIBLE
    raise ValueError(f"unknown label schema {schema!r}; expected one of {SCHEMAS}")


def folder_class_names(
    raw_labels: Sequence[str], declared: Sequence[str] | None = None
) -> list[str]:
    """Class order for a folder dataset.

    An explicit order (``classes.txt`` or ``--classes``) wins; otherwise integer labels sort
    numerically and names sort alphabetically, so the same labels always give the same indices.
    """
    present = list(dict.fromkeys(str(v).strip() for v in raw_labels))
    if declared:
        declared = [str(c).strip() for c in declared]
        unknown = sorted(set(present) - set(declared))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the declared classes {declared}")
        return declared
    if all(is_int(v) for v in present):
        return [str(v) for v in sorted({int(v) for v in present})]
    return sorted(present)


def is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True
