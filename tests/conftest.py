"""Fixtures shared across the test tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_test_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    patient_id: str = "TEST-0001",
    **attributes,
) -> Path:
    """A small valid uncompressed DICOM (uint16, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def dicom_writer():
    return write_test_dicom


@pytest.fixture(autouse=True)
def privacy_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test spends from a privacy home of its own: never the user's real ledger."""
    home = tmp_path_factory.mktemp("privacy-home")
    monkeypatch.setenv("FEDSPINE_PRIVACY_HOME", str(home))
    return home


def spend(home: Path, patient_ids, mechanism, run_id: str = "earlier") -> None:
    """Put a settled mechanism on these patients into the privacy home's ledger."""
    from fedspine.privacy.home import PrivacyHome

    site = PrivacyHome(home)
    ledger = site.ledger()
    record = ledger.reserve(site.keys_of(patient_ids), mechanism, run_id, 1.0, unit="patient")
    ledger.settle(record, mechanism.steps)


def home_records(home: Path, run_id: str | None = None) -> list[dict]:
    """The ledger records of a privacy home ([] where it has no ledger yet)."""
    from fedspine.privacy.ledger import PrivacyLedger

    path = Path(home) / "ledger.json"
    return PrivacyLedger.open(path, create=False).records(run_id=run_id) if path.exists() else []


@pytest.fixture
def tiny_cpu_preset(monkeypatch):
    """`--preset cpu` builds tiny networks, and torch keeps one thread, so a run takes seconds."""
    import torch

    from fedspine.training import config as config_module
    from tests.training import tiny_config

    monkeypatch.setitem(
        config_module.PRESETS,
        "cpu",
        lambda res, nc: tiny_config(resolution=res or 16, num_classes=nc),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    yield
    monkeypatch.undo()
    torch.set_num_threads(threads)
