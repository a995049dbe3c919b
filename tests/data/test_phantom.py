"""The phantom generator: real, decodable DICOM in the VinDr layout, distinct sites, sane labels."""

from __future__ import annotations

import csv
import dataclasses
import filecmp
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedspine.data.labels import LESION_TYPES, NO_FINDING
from fedspine.data.phantom import (
    ANNOTATION_COLUMNS,
    SITE_MANIFEST,
    PhantomCase,
    phantom_arrays,
    phantom_site_domains,
    render_phantom,
    sample_case,
    write_phantom_site,
    write_phantom_sites,
)
from fedspine.data.phantom_anatomy import Lesion, sample_anatomy

SIZE = 96
SITES = 3
IMAGES = 10


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    seen: list[int] = []
    write_phantom_sites(
        root, sites=SITES, images_per_site=IMAGES, size=SIZE, seed=3, progress=seen.append
    )
    assert seen == list(range(1, SITES * IMAGES + 1))
    return root


def read_rows(site: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for split in ("train", "test"):
        with open(site / "annotations" / f"{split}.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            assert tuple(reader.fieldnames) == ANNOTATION_COLUMNS
            rows[split] = list(reader)
    return rows


def test_layout_matches_annotations(sites_root: Path) -> None:
    assert sorted(p.name for p in sites_root.iterdir()) == [
        f"site_{i}" for i in range(1, SITES + 1)
    ]
    for site in sites_root.iterdir():
        rows = read_rows(site)
        total = 0
        for split, split_rows in rows.items():
            files = {p.stem for p in (site / f"{split}_images").glob("*.dicom")}
            assert files == {r["image_id"] for r in split_rows}
            total += len(files)
            for r in split_rows:
                assert r["lesion_type"] in (NO_FINDING, *LESION_TYPES)
                blank = [r[c] == "" for c in ("xmin", "ymin", "xmax", "ymax")]
                assert all(blank) if r["lesion_type"] == NO_FINDING else not any(blank)
            by_image = defaultdict(list)
            for r in split_rows:
                by_image[r["image_id"]].append(r["lesion_type"])
            for types in by_image.values():
                assert NO_FINDING not in types or types == [NO_FINDING]
        assert total == IMAGES
        assert rows["test"], "every site should hold out some patients"


def test_dicom_decodes_with_site_conventions(sites_root: Path) -> None:
    import pydicom
    from pydicom.uid import UID

    domains = {d.name: d for d in phantom_site_domains(SITES, seed=3)}
    for site in sites_root.iterdir():
        domain = domains[site.name]
        for path in sorted(site.glob("*_images/*.dicom")):
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == domain.transfer_syntax
            pixels = ds.pixel_array
            assert pixels.shape == (ds.Rows, ds.Columns) == domain.shape(SIZE)
            assert pixels.dtype == np.uint16 and int(pixels.max()) < 2**ds.BitsStored
            assert pixels.std() > 0
            assert ds.PhotometricInterpretation == domain.photometric
            assert ds.BitsAllocated == 16 and ds.BitsStored == domain.bits_stored
            assert ds.Modality == domain.modality and ds.BodyPartExamined == "LSPINE"
            assert ds.ViewPosition in ("LL", "AP")
            assert "SYNTHETIC" in ds.ImageComments
            assert ds.PatientID.startswith("PHANTOM-")
            assert float(ds.RescaleSlope) == domain.rescale_slope
            for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
                assert UID(uid).is_valid
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
            assert ds.PixelSpacing[0] == pytest.approx(domain.pixel_spacing_mm(SIZE), rel=1e-4)
            rescaled = pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            low, high = np.percentile(rescaled, [1, 99])
            centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
            assert centre - width / 2 <= low and high <= centre + width / 2


def test_boxes_inside_image_and_patients_in_one_split(sites_root: Path) -> None:
    import pydicom

    for site in sites_root.iterdir():
        rows = read_rows(site)
        split_of_study: dict[str, set[str]] = defaultdict(set)
        patient_of_study: dict[str, set[str]] = defaultdict(set)
        for split, split_rows in rows.items():
            for r in split_rows:
                split_of_study[r["study_id"]].add(split)
                ds = pydicom.dcmread(
                    site / f"{split}_images" / f"{r['image_id']}.dicom", stop_before_pixels=True
                )
                patient_of_study[r["study_id"]].add(f"{ds.PatientID}|{ds.StudyInstanceUID}")
                if r["lesion_type"] != NO_FINDING:
                    x0, y0, x1, y1 = (float(r[c]) for c in ("xmin", "ymin", "xmax", "ymax"))
                    assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
        assert all(len(s) == 1 for s in split_of_study.values())
        assert all(len(p) == 1 for p in patient_of_study.values())
        images_per_study = defaultdict(set)
        for split_rows in rows.values():
            for r in split_rows:
                images_per_study[r["study_id"]].add(r["image_id"])
        assert all(1 <= len(v) <= 3 for v in images_per_study.values())


def test_sites_are_distinct_domains() -> None:
    domains = phantom_site_domains(6, seed=0)
    assert domains == phantom_site_domains(6, seed=0)
    assert len({d.transfer_syntax for d in domains[:3]}) == 3
    assert {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1"} <= {
        d.transfer_syntax for d in domains
    }
    assert {d.photometric for d in domains[:2]} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({(d.rescale_slope, d.rescale_intercept) for d in domains}) >= 2
    assert len({d.bits_stored for d in domains}) == 3
    assert len({d.shape(512) for d in domains}) == len(domains)
    for d in domains:
        rows, cols = d.shape(512)
        assert 512 <= cols <= 768 and 1.3 <= rows / cols <= 1.6
        assert 0.3 <= d.abnormal_prevalence <= 0.6
        assert sum(d.lesion_weights) == pytest.approx(1.0)
    assert len({d.imaging for d in domains}) == len(domains)


def test_monochrome1_stores_inverted_values(tmp_path: Path) -> None:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    base = phantom_site_domains(1, seed=0)[0]
    mono2 = dataclasses.replace(
        base, photometric="MONOCHROME2", transfer_syntax="1.2.840.10008.1.2.1"
    )
    mono1 = dataclasses.replace(
        mono2, photometric="MONOCHROME1", rescale_slope=0.5, rescale_intercept=-1024.0
    )
    write_phantom_site(tmp_path / "m2", mono2, images=3, size=64, seed=5)
    write_phantom_site(tmp_path / "m1", mono1, images=3, size=64, seed=5)
    top = 2**base.bits_stored - 1
    for path2 in sorted((tmp_path / "m2").glob("*_images/*.dicom")):
        ds2 = pydicom.dcmread(path2)
        ds1 = pydicom.dcmread(tmp_path / "m1" / path2.parent.name / path2.name)
        p1, p2 = ds1.pixel_array.astype(int), ds2.pixel_array.astype(int)
        assert np.abs(p1 + p2 - top).max() <= 1
        # bone (bright on MONOCHROME2) is stored dark on MONOCHROME1
        bright = p2 >= np.percentile(p2, 95)
        assert p1[bright].mean() < p1.mean()
        # through rescale, window and inversion both display the same picture
        shown = []
        for ds in (ds1, ds2):
            voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(float)
            voi = (voi - voi.min()) / (voi.max() - voi.min())
            shown.append(1.0 - voi if ds.PhotometricInterpretation == "MONOCHROME1" else voi)
        assert np.abs(shown[0] - shown[1]).mean() < 0.01


def test_same_seed_same_bytes_and_new_seed_new_images(tmp_path: Path) -> None:
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        write_phantom_sites(tmp_path / name, sites=1, images_per_site=4, size=64, seed=seed)
    a, b, c = (tmp_path / n / "site_1" for n in "abc")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    assert {p.name for p in a.glob("*_images/*")} != {p.name for p in c.glob("*_images/*")}


def test_interrupted_run_leaves_no_half_site(tmp_path: Path) -> None:
    def interrupt(done: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_phantom_sites(
            tmp_path, sites=1, images_per_site=6, size=64, seed=0, progress=interrupt
        )
    assert list(tmp_path.iterdir()) == []
    write_phantom_sites(tmp_path, sites=1, images_per_site=2, size=64, seed=0)
    with pytest.raises(FileExistsError, match="site_1"):
        write_phantom_sites(tmp_path, sites=1, images_per_site=2, size=64, seed=0)


def test_patient_prevalence_follows_site_setting() -> None:
    for domain in phantom_site_domains(2, seed=4):
        rng = np.random.default_rng(0)
        cases = [sample_case(rng, domain) for _ in range(500)]
        rate = np.mean([c.abnormal for c in cases])
        assert abs(rate - domain.abnormal_prevalence) < 0.07
        lateral = np.mean([c.views[0] == "LAT" for c in cases])
        assert abs(lateral - domain.lateral_fraction) < 0.07


@pytest.mark.parametrize("lesion_type", LESION_TYPES)
def test_each_lesion_is_drawn_inside_its_box(lesion_type: str) -> None:
    domain = phantom_site_domains(1, seed=0)[0]
    anatomy = sample_anatomy(np.random.default_rng(1), 0.0)
    anatomy = dataclasses.replace(anatomy, spurs=(), tilt_deg=0.0, shift=(0.0, 0.0))
    level = 2 if lesion_type == "Surgical implant" else 4
    lesion = Lesion(lesion_type, level, severity=0.9, side=1, corner=1, variant="sclerotic", span=1)
    normal, no_boxes = render_phantom(
        np.random.default_rng(2), domain, PhantomCase(anatomy, (), ("LAT",)), "LAT", 128
    )
    image, boxes = render_phantom(
        np.random.default_rng(2), domain, PhantomCase(anatomy, (lesion,), ("LAT",)), "LAT", 128
    )
    assert no_boxes == [] and [b.lesion_type for b in boxes] == [lesion_type]
    box = boxes[0]
    rows, cols = image.shape
    assert 0 <= box.xmin < box.xmax <= cols and 0 <= box.ymin < box.ymax <= rows
    inside = np.zeros(image.shape, bool)
    inside[
        int(box.ymin) : int(np.ceil(box.ymax)) + 1, int(box.xmin) : int(np.ceil(box.xmax)) + 1
    ] = True
    diff = np.abs(image - normal)
    assert diff[inside].mean() > 0.01
    if lesion_type in ("Osteophytes", "Other lesions", "Surgical implant"):
        assert diff[inside].mean() > 4 * diff[~inside].mean()


def test_lateral_only_findings_are_not_boxed_on_ap() -> None:
    domain = phantom_site_domains(1, seed=0)[0]
    anatomy = sample_anatomy(np.random.default_rng(1))
    case = PhantomCase(anatomy, (Lesion("Spondylolysthesis", 4, 0.8),), ("LAT", "AP"))
    _, lat_boxes = render_phantom(np.random.default_rng(0), domain, case, "LAT", 64)
    _, ap_boxes = render_phantom(np.random.default_rng(0), domain, case, "AP", 64)
    assert [b.lesion_type for b in lat_boxes] == ["Spondylolysthesis"] and ap_boxes == []


@pytest.mark.slow
def test_abnormality_is_learnable_but_not_trivial() -> None:
    """A translation-invariant linear probe on 64-px phantoms lands in the target AUC band."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fedspine.data.phantom import random_conv_features

    data = phantom_arrays(600, resolution=64, seed=1, sites=3)
    patients = np.unique(data.patient_ids)
    test_patients = np.random.default_rng(0).choice(
        patients, size=len(patients) * 3 // 10, replace=False
    )
    test = np.isin(data.patient_ids, test_patients)
    features = random_conv_features(data.images, seed=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
    model.fit(features[~test], data.abnormal[~test])
    auc = roc_auc_score(data.abnormal[test], model.predict_proba(features[test])[:, 1])
    print(f"random-conv probe AUC {auc:.3f}")
    assert 0.6 <= auc <= 0.9, f"phantom abnormality AUC {auc:.3f} left the band"


def test_another_patient_seed_gives_new_patients_of_the_same_sites(tmp_path: Path) -> None:
    """A held-out test population (the benchmarks' --heldout-per-site): same domains, no shared
    study or image (PatientID numbers restart per set, so a pool keeps the sets apart by its
    part names)."""
    (a,) = write_phantom_sites(tmp_path / "a", sites=1, images_per_site=6, size=64, seed=3)
    (b,) = write_phantom_sites(
        tmp_path / "b", sites=1, images_per_site=6, size=64, seed=3, patient_seed=1003
    )
    manifests = [json.loads((p / SITE_MANIFEST).read_text()) for p in (a, b)]
    assert manifests[0]["domain"] == manifests[1]["domain"]
    ids = [{pydicom.dcmread(f).StudyInstanceUID for f in p.glob("*_images/*")} for p in (a, b)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert not {f.name for f in a.glob("*_images/*")} & {f.name for f in b.glob("*_images/*")}
