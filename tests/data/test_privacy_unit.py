"""The DP privacy unit: what one ``patient_id`` stands for, from ingest to merge."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedspine.data.ingest import IngestConfig, ingest
from fedspine.data.prepared import (
    PRIVACY_UNITS,
    UNIT_DESCRIPTIONS,
    PreparedDataset,
    PreparedDatasetError,
    combine_privacy_units,
    load_prepared,
    merge_prepared,
    write_prepared,
)
from fedspine.data.sources import list_source
from tests.data.test_ingest import _vindr


def _folder(root: Path, patient_ids: list[str] | None) -> Path:
    """Six PNGs with labels.csv; ``patient_ids`` None leaves out the column."""
    from PIL import Image

    root.mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"] + ([] if patient_ids is None else ["patient_id"]))
        for i in range(6):
            Image.fromarray(np.full((10, 12), i * 30, dtype=np.uint8)).save(root / f"im{i}.png")
            w.writerow(
                [f"im{i}.png", "ab"[i % 2]] + ([] if patient_ids is None else [patient_ids[i]])
            )
    return root


def _manifest(ds: PreparedDataset) -> dict:
    return json.loads((ds.root / "manifest.json").read_text())


def _ingested(tmp_path: Path, name: str, patient_ids: list[str] | None) -> PreparedDataset:
    src = _folder(tmp_path / f"src_{name}", patient_ids)
    return load_prepared(ingest(src, tmp_path / name, IngestConfig(resolution=8)).out)


def _drop_unit(ds: PreparedDataset) -> PreparedDataset:
    """Rewrite the manifest as an older fedspine would have: without ``privacy_unit``."""
    manifest = _manifest(ds)
    del manifest["privacy_unit"]
    (ds.root / "manifest.json").write_text(json.dumps(manifest))
    return load_prepared(ds.root)


PATIENTS = ["p0", "p0", "p1", "p1", "p2", "p2"]


def test_constants():
    assert PRIVACY_UNITS == ("patient", "study", "image")
    assert set(UNIT_DESCRIPTIONS) == set(PRIVACY_UNITS)
    assert UNIT_DESCRIPTIONS["study"] == "study (patient proxy)"


def test_folder_with_patient_ids_is_patient(tmp_path):
    ds = _ingested(tmp_path, "prep", PATIENTS)
    assert _manifest(ds)["privacy_unit"] == "patient"
    assert ds.privacy_unit == "patient"
    assert ds.select("train").privacy_unit == "patient"


def test_folder_without_patient_column_is_image(tmp_path):
    src = _folder(tmp_path / "src", None)
    assert list_source(src).privacy_unit == "image"
    summary = ingest(src, tmp_path / "prep", IngestConfig(resolution=8))
    ds = load_prepared(summary.out)
    assert summary.privacy_unit == "image"
    assert _manifest(ds)["privacy_unit"] == "image"
    assert ds.privacy_unit == "image"


def test_folder_with_one_empty_patient_id_is_image(tmp_path):
    ds = _ingested(tmp_path, "prep", [*PATIENTS[:5], "  "])
    assert _manifest(ds)["privacy_unit"] == "image"
    assert ds.privacy_unit == "image"
    assert ds.patient_ids[ds.files.index("im5.png")] == "im5.png"


def test_rejected_row_without_patient_id_does_not_count(tmp_path):
    src = _folder(tmp_path / "src", PATIENTS)
    with open(src / "labels.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["gone.png", "a", ""])
    assert list_source(src).privacy_unit == "patient"


def test_vindr_is_study(tmp_path):
    src = _vindr(tmp_path / "src")
    ds = load_prepared(ingest(src, tmp_path / "prep", IngestConfig(resolution=8)).out)
    assert _manifest(ds)["privacy_unit"] == "study"
    assert ds.privacy_unit == "study"


def test_old_manifest_is_inferred(tmp_path):
    assert _drop_unit(_ingested(tmp_path, "named", PATIENTS)).privacy_unit == "patient"
    assert _drop_unit(_ingested(tmp_path, "unnamed", None)).privacy_unit == "image"
    partly = _drop_unit(_ingested(tmp_path, "partly", [*PATIENTS[:5], ""]))
    assert partly.privacy_unit == "image"
    src = _vindr(tmp_path / "vindr")
    vindr = load_prepared(ingest(src, tmp_path / "v", IngestConfig(resolution=8)).out)
    assert _drop_unit(vindr).privacy_unit == "study"


def test_unknown_unit_in_manifest_is_an_error(tmp_path):
    ds = _ingested(tmp_path, "prep", PATIENTS)
    ds.manifest["privacy_unit"] = "household"
    with pytest.raises(PreparedDatasetError, match="household"):
        _ = ds.privacy_unit


def _part(tmp_path: Path, name: str, unit: str) -> PreparedDataset:
    files = [f"{name}_{i}.png" for i in range(4)]
    return load_prepared(
        write_prepared(
            tmp_path / name,
            images=np.zeros((4, 8, 8), np.uint8),
            files=files,
            patient_ids=["a", "a", "b", "c"],
            splits=["train", "train", "val", "test"],
            labels=[0, 1, 0, 1],
            findings=np.eye(2, dtype=np.uint8)[[0, 1, 0, 1]],
            finding_names=["x", "y"],
            class_names=["x", "y"],
            rejected=[],
            manifest={"layout": "folder", "privacy_unit": unit},
        )
    )


@pytest.mark.parametrize(
    ("units", "expected"),
    [
        (("patient", "patient"), "patient"),
        (("patient", "study"), "study"),
        (("study", "patient", "study"), "study"),
        (("patient", "image"), "image"),
        (("study", "image", "patient"), "image"),
    ],
)
def test_merge_takes_the_weakest_unit(tmp_path, units, expected):
    parts = [_part(tmp_path, f"s{i}", unit) for i, unit in enumerate(units)]
    names = [f"s{i}" for i in range(len(parts))]
    merged = load_prepared(merge_prepared(parts, tmp_path / "merged", names))
    assert _manifest(merged)["privacy_unit"] == expected
    assert merged.privacy_unit == expected
    assert combine_privacy_units(units) == expected


def test_merge_of_ingested_parts_and_old_merged_manifest(tmp_path):
    named = _ingested(tmp_path, "named", PATIENTS)
    unnamed = _ingested(tmp_path, "unnamed", None)
    merged = load_prepared(merge_prepared([named, unnamed], tmp_path / "m", ["n", "u"]))
    assert merged.privacy_unit == "image"
    # Merging prefixes file and patient alike, so the fallback stays visible without the key.
    assert _drop_unit(merged).privacy_unit == "image"
    with pytest.raises(ValueError, match="unknown privacy unit"):
        combine_privacy_units(["patient", "household"])
