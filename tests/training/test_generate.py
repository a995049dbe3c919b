import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedspine.cli.main import app
from fedspine.models import Generator
from fedspine.training import generate as generate_module
from fedspine.training.generate import load_generator, save_generator, synthesize
from tests.training import tiny_config

runner = CliRunner()
CLASSES = ["normal", "abnormal, with comma"]


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    net = tiny_config(num_classes=2).network
    G = Generator(net).eval()
    with torch.no_grad():
        G.mapping.w_avg.normal_()
    run = tmp_path / "run"
    save_generator(
        run / "generator.pt", G, tiny_config().to_dict()["network"], CLASSES, {"kimg": 1.0}
    )
    return run


def _rows(folder):
    with open(folder / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_generate_png_writes_the_folder_layout(run_dir, tmp_path):
    out = tmp_path / "syn"
    args = [
        "--per-class",
        "5",
        "--batch",
        "3",
        "--seed",
        "4",
        "--truncation",
        "0.7",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, ["generate", str(run_dir), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert list(rows[0]) == ["file", "label", "patient_id"]
    assert [r["label"] for r in rows].count(CLASSES[0]) == 5
    assert [r["label"] for r in rows].count(CLASSES[1]) == 5
    assert len({r["patient_id"] for r in rows}) == 10
    assert all(r["patient_id"].startswith("syn-") for r in rows)
    for r in rows:
        img = Image.open(out / r["file"])
        assert img.mode == "L" and img.size == (16, 16)
    info = json.loads((out / "generation.json").read_text())
    assert info["truncation"] == 0.7 and info["seed"] == 4 and info["total"] == 10
    assert info["counts"] == {CLASSES[0]: 5, CLASSES[1]: 5} and info["synthetic"] is True
    assert (out / "classes.txt").read_text().splitlines() == CLASSES


def test_generation_is_reproducible_and_class_conditional(run_dir, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        generate_module.generate_dataset(run_dir, out, per_class=2, seed=seed, batch=4)
    pix = {}
    for name, out in (("a", a), ("b", b), ("c", c)):
        pix[name] = np.stack([np.asarray(Image.open(out / r["file"])) for r in _rows(out)])
    assert np.array_equal(pix["a"], pix["b"])
    assert not np.array_equal(pix["a"], pix["c"])
    # Same latents, other class: another image.
    G, _ = load_generator(run_dir / "generator.pt")
    z = torch.randn(2, G.z_dim)
    assert not np.array_equal(
        synthesize(G, z, torch.tensor([0, 0])), synthesize(G, z, torch.tensor([1, 1]))
    )


def test_generate_dicom_is_marked_synthetic(run_dir, tmp_path):
    import pydicom

    out = tmp_path / "dcm"
    result = runner.invoke(app, ["generate", str(run_dir), "--out", str(out), "--per-class", "2",
                                 "--format", "dicom", "--seed", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    png = tmp_path / "png"
    generate_module.generate_dataset(run_dir, png, per_class=2, seed=4)
    uids = set()
    for row, png_row in zip(_rows(out), _rows(png), strict=True):
        ds = pydicom.dcmread(out / row["file"])
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert "SYNTHETIC IMAGE" in ds.ImageComments and "not a real patient" in ds.ImageComments
        assert ds.BurnedInAnnotation == "NO"
        assert ds.ConversionType == "SYN"
        assert ds.PatientID == row["patient_id"] and ds.PatientID.startswith("syn-")
        assert str(ds.PatientName).startswith("SYNTHETIC")
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        uids.add(ds.SOPInstanceUID)
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint8 and pixels.shape == (16, 16)
        assert np.array_equal(pixels, np.asarray(Image.open(png / png_row["file"])))
    assert len(uids) == 4


def test_generated_folder_is_readable_by_the_folder_layout(run_dir, tmp_path):
    from fedspine.data.sources import list_source

    out = tmp_path / "syn"
    generate_module.generate_dataset(run_dir, out, per_class=3, seed=0)
    listing = list_source(out, layout="folder")
    assert listing.class_names == CLASSES
    assert len(listing.records) == 6 and not listing.rejected
    assert {r.patient_id for r in listing.records} == {r["patient_id"] for r in _rows(out)}


def test_interrupted_generate_leaves_no_output(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "syn"
    original = generate_module._write_png
    calls = {"n": 0}

    def interrupted(path, pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(path, pixels)

    monkeypatch.setattr(generate_module, "_write_png", interrupted)
    result = runner.invoke(app, ["generate", str(run_dir), "--out", str(out), "--per-class", "4"])
    assert result.exit_code == 130
    assert "nothing was written" in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_generate_errors(run_dir, tmp_path):
    missing = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code != 0 and "no such run folder" in missing.output
    (tmp_path / "exists").mkdir()
    exists = runner.invoke(app, ["generate", str(run_dir), "--out", str(tmp_path / "exists")])
    assert exists.exit_code != 0 and "already exists" in exists.output
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    res = runner.invoke(app, ["generate", str(unfinished), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "no generator.pt" in res.output
    bad = runner.invoke(
        app, ["generate", str(run_dir), "--out", str(tmp_path / "o"), "--format", "jpeg"]
    )
    assert bad.exit_code != 0 and "--format jpeg" in bad.output
