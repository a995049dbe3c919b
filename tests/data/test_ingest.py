"""Sources, labels, splits and the prepared dataset, through `ingest`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedspine.cli.main import app
from fedspine.data.ingest import IngestConfig, ingest
from fedspine.data.labels import LESION_CLASSES, ImageFindings, label_for
from fedspine.data.prepared import PreparedDatasetError, load_prepared
from fedspine.data.sources import SourceLayoutError, detect_layout
from fedspine.data.splits import assign_splits
from tests.conftest import write_test_dicom

HEADER = [
    "study_id",
    "series_id",
    "image_id",
    "rad_id",
    "lesion_type",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
]


def _vindr(root: Path) -> Path:
    """A tiny VinDr-SpineXR tree: 6 train images of 4 patients, 2 test images, plus trouble."""
    rng = np.random.default_rng(0)
    train_rows = [
        ("p1", "img_a", "No finding"),
        ("p1", "img_b", "Osteophytes"),  # a single-annotation lesion: abnormal, not normal
        ("p2", "img_c", "Osteophytes"),
        ("p2", "img_c", "Disc space narrowing"),  # two distinct lesions: lesion schema -1
        ("p3", "img_d", "Surgical implant"),
        ("p3", "img_d", "Surgical implant"),
        ("p4", "img_e", "No finding"),
        ("p4", "img_f", "Sclerotic lesion"),  # unknown names join "Other lesions"
        ("p4", "img_missing", "No finding"),  # annotated, no file
    ]
    test_rows = [("p9", "img_t1", "No finding"), ("p9", "img_t2", "Vertebral collapse")]
    for split, rows in (("train", train_rows), ("test", test_rows)):
        ann = root / "annotations" / f"{split}.csv"
        ann.parent.mkdir(parents=True, exist_ok=True)
        with open(ann, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(HEADER)
            for study, image, lesion in rows:
                box = ["", "", "", ""] if lesion == "No finding" else [1, 2, 10, 12]
                w.writerow([study, "s", image, "r1", lesion, *box])
        for image in sorted({r[1] for r in rows} - {"img_missing"}):
            pixels = rng.integers(0, 4000, size=(40, 30))
            write_test_dicom(root / f"{split}_images" / f"{image}.dicom", pixels, patient_id=image)
    write_test_dicom(root / "train_images" / "img_unlisted.dicom", rng.integers(0, 10, (8, 8)))
    (root / "train_images" / "img_broken.dicom").write_bytes(b"not a dicom at all")
    with open(root / "annotations" / "train.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["p5", "s", "img_broken", "r1", "No finding", "", "", "", ""])
    return root


def test_vindr_ingest_labels_splits_and_rejections(tmp_path):
    src = _vindr(tmp_path / "src")
    assert detect_layout(src) == "vindr"
    summary = ingest(src, tmp_path / "prep", IngestConfig(resolution=16, val_fraction=0.3))
    ds = load_prepared(summary.out)

    assert len(ds) == 8
    assert ds.images.shape == (8, 16, 16) and ds.images.dtype == np.uint8
    labels = dict(zip(ds.files, ds.labels, strict=True))
    assert labels["train_images/img_a.dicom"] == 0
    assert labels["train_images/img_b.dicom"] == 1, "single-annotation lesion must be abnormal"
    assert labels["train_images/img_f.dicom"] == 1
    assert labels["test_images/img_t2.dicom"] == 1

    with open(ds.root / "rejected.csv", newline="") as fh:
        rejected = {row["file"]: row["reason"] for row in csv.DictReader(fh)}
    assert "train_images/img_missing.dicom" in rejected
    assert "train_images/img_unlisted.dicom" in rejected
    assert "train_images/img_broken.dicom" in rejected
    assert summary.num_rejected == 3

    # No patient in two splits; the source's test set is the test split.
    for patient in set(ds.patient_ids):
        assert len(set(ds.splits[ds.patient_ids == patient])) == 1
    assert set(ds.splits[ds.patient_ids == "p9"]) == {"test"}
    assert "val" in set(ds.splits)

    # The multi-label findings are kept for every image.
    row_c = ds.files.index("train_images/img_c.dicom")
    names = ds.finding_names
    assert ds.findings[row_c, names.index("Osteophytes")] == 1
    assert ds.findings[row_c, names.index("Disc space narrowing")] == 1
    assert (
        ds.findings[ds.files.index("train_images/img_f.dicom"), names.index("Other lesions")] == 1
    )

    manifest = json.loads((ds.root / "manifest.json").read_text())
    assert len(manifest["content_hash"]) == 64
    assert manifest["counts"]["test"]["total"] == 2
    assert manifest["config"]["resolution"] == 16


def test_paper_label_rule_and_lesion_schema(tmp_path):
    src = _vindr(tmp_path / "src")
    paper = load_prepared(
        ingest(src, tmp_path / "paper", IngestConfig(resolution=8, label_rule="paper")).out
    )
    assert dict(zip(paper.files, paper.labels, strict=True))["train_images/img_b.dicom"] == 0
    # img_d has two rows of one lesion: still abnormal under the paper's rule.
    assert dict(zip(paper.files, paper.labels, strict=True))["train_images/img_d.dicom"] == 1

    lesion = load_prepared(
        ingest(src, tmp_path / "lesion", IngestConfig(resolution=8, labels="lesion")).out
    )
    by_file = dict(zip(lesion.files, lesion.labels, strict=True))
    assert lesion.class_names == list(LESION_CLASSES)
    assert by_file["train_images/img_c.dicom"] == -1
    assert by_file["train_images/img_d.dicom"] == LESION_CLASSES.index("Surgical implant")
    assert by_file["train_images/img_a.dicom"] == 0
    assert len(lesion.select(labelled=True)) == len(lesion) - 1


def test_label_rules_directly():
    single = ImageFindings(("Osteophytes",))
    assert label_for(single, "abnormality") == 1
    assert label_for(single, "abnormality", "paper") == 0
    assert label_for(ImageFindings(("No finding",)), "abnormality") == 0
    with pytest.raises(ValueError):
        label_for(single, "lesion", "paper")


def test_folder_layout_classes_and_patients(tmp_path, dicom_writer):
    from PIL import Image

    src = tmp_path / "folder"
    src.mkdir()
    rows = []
    for i in range(12):
        name = f"im{i}.png"
        Image.fromarray(np.full((20, 30), i * 20, dtype=np.uint8)).save(src / name)
        rows.append((name, ["cat", "dog", "emu"][i % 3], f"pt{i // 2}"))
    dicom_writer(src / "d.dcm", np.arange(64).reshape(8, 8))
    rows.append(("d.dcm", "dog", "pt99"))
    rows.append(("gone.png", "cat", "pt100"))
    with open(src / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "patient_id"])
        w.writerows(rows)
    ds = load_prepared(ingest(src, tmp_path / "prep", IngestConfig(resolution=8, seed=3)).out)
    assert ds.class_names == ["cat", "dog", "emu"]
    assert len(ds) == 13
    assert set(ds.splits) == {"train", "val", "test"}
    for patient in set(ds.patient_ids):
        assert len(set(ds.splits[ds.patient_ids == patient])) == 1
    assert ds.findings.sum(axis=1).tolist() == [1] * 13

    (src / "classes.txt").write_text("emu\ncat\ndog\n")
    ordered = load_prepared(ingest(src, tmp_path / "prep2", IngestConfig(resolution=8)).out)
    assert ordered.class_names == ["emu", "cat", "dog"]
    assert ordered.labels[ordered.files.index("im0.png")] == 1


def test_integer_folder_labels_sort_numerically(tmp_path):
    from PIL import Image

    src = tmp_path / "ints"
    src.mkdir()
    with open(src / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"])
        for i, label in enumerate([10, 2, 2, 10, 0, 0]):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / f"{i}.png")
            w.writerow([f"{i}.png", label])
    ds = load_prepared(ingest(src, tmp_path / "prep", IngestConfig(resolution=8)).out)
    assert ds.class_names == ["0", "2", "10"]
    assert ds.labels[ds.files.index("0.png")] == 2


def test_splits_never_share_patients():
    rng = np.random.default_rng(1)
    patients = [f"p{rng.integers(0, 40)}" for _ in range(300)]
    source = [None] * 250 + ["test"] * 50
    result = assign_splits(patients, source, val_fraction=0.2, test_fraction=0.2, seed=5)
    for p in set(patients):
        assert len({s for q, s in zip(patients, result.splits, strict=True) if q == p}) == 1
    again = assign_splits(patients, source, val_fraction=0.2, test_fraction=0.2, seed=5)
    assert list(again.splits) == list(result.splits)
    straddle = assign_splits(["a", "a", "b"], ["train", "test", "train"], val_fraction=0.0)
    assert list(straddle.splits) == ["test", "test", "train"]
    assert straddle.patients_moved_to_test == ("a",)


def test_interrupted_ingest_leaves_nothing(tmp_path, monkeypatch):
    src = _vindr(tmp_path / "src")
    import fedspine.data.prepared as prepared

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepared, "_index_csv", explode)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, tmp_path / "prep", IngestConfig(resolution=8))
    assert not (tmp_path / "prep").exists()
    assert list(tmp_path.glob(".prep*")) == []


def test_parallel_ingest_matches_serial(tmp_path):
    src = _vindr(tmp_path / "src")
    a = load_prepared(ingest(src, tmp_path / "a", IngestConfig(resolution=12)).out)
    b = load_prepared(ingest(src, tmp_path / "b", IngestConfig(resolution=12, workers=2)).out)
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert a.content_hash == b.content_hash


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(SourceLayoutError, match="cannot tell the layout"):
        detect_layout(tmp_path)
    with pytest.raises(PreparedDatasetError, match="not a prepared dataset"):
        load_prepared(tmp_path / "nothing")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "cannot tell the layout" in result.output


def test_ingest_cli_reports_counts(tmp_path):
    src = _vindr(tmp_path / "src")
    result = CliRunner().invoke(
        app, ["ingest", str(src), "--out", str(tmp_path / "p"), "--resolution", "16"]
    )
    assert result.exit_code == 0, result.output
    assert "prepared 8 images" in result.output
    assert "skipped 3" in result.output
    again = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "p")])
    assert again.exit_code != 0 and "already exists" in again.output
