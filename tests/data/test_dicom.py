"""DICOM and image decoding: the grayscale pipeline, rejections, and pydicom's own test files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from fedspine.data.dicom import (
    DicomDecodeError,
    ImageDecodeError,
    _mask_to_bits_stored,
    decode_dicom,
    dicom_metadata,
    read_image,
)
from tests.conftest import write_test_dicom

# pydicom's bundled test files, globbed on disk: get_testdata_files() may also try to download
# the larger online set, and nothing here may touch the network.
PYDICOM_FILES = Path(DATA_ROOT) / "test_files"
# measured with pydicom 3.0.2 and the pylibjpeg plugins: 53 of 176 files decode
MIN_DECODED = 50


def _corpus() -> list[Path]:
    return sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file())


def _good(tmp_path: Path, name: str = "good.dcm", **attributes) -> Path:
    pixels = (np.arange(64 * 48).reshape(64, 48) * 7) % 4096
    return write_test_dicom(tmp_path / name, pixels, **attributes)


def _write(tmp_path: Path, pixels, name: str = "x.dcm", **attributes) -> Path:
    return write_test_dicom(tmp_path / name, np.asarray(pixels), **attributes)


def _lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", descriptor)  # LUTDescriptor
    item.add_new(0x00283006, "US", data)  # LUTData
    return item


# --- pydicom's test corpus ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_pydicom_test_file_decodes_or_is_rejected_with_a_reason():
    files = _corpus()
    assert len(files) > 100, f"pydicom test files not found under {PYDICOM_FILES}"
    decoded: dict[str, np.ndarray] = {}
    rejected: dict[str, str] = {}
    for path in files:
        name = path.relative_to(PYDICOM_FILES).as_posix()
        try:
            img = decode_dicom(path)
        except DicomDecodeError as err:
            assert err.path == path
            assert err.reason and str(err) == f"{path}: {err.reason}"
            rejected[name] = err.reason
            continue
        assert img.dtype == np.float32 and img.ndim == 2, name
        assert np.all(np.isfinite(img)) and img.min() >= 0.0 and img.max() <= 1.0, name
        decoded[name] = img
    assert len(decoded) >= MIN_DECODED, sorted(rejected.items())
    for name in (
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        "JPEG2000.dcm",  # JPEG 2000
        "693_J2KI.dcm",  # JPEG 2000, signed 14-bit, rescaled
        "MR_small_RLE.dcm",  # pydicom's RLE decoder
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "JPEGLSNearLossless_16.dcm",  # JPEG-LS near lossless
        "JPGExtended.dcm",  # JPEG extended 12-bit
        "image_dfl.dcm",  # deflated explicit VR
        "MR_small_bigendian.dcm",
        "dicomdirtests/77654033/CR1/6154",  # MONOCHROME1 CR with rescale and window
    ):
        assert name in decoded, rejected.get(name)
    expected_reasons = {
        "SC_rgb_rle.dcm": "colour image (PhotometricInterpretation RGB)",
        "examples_palette.dcm": "PALETTE COLOR",
        "examples_ybr_color.dcm": "colour image",
        "rtdose.dcm": "multi-frame image (NumberOfFrames=15)",
        "MR_truncated.dcm": "truncated pixel data: expected 8192 bytes, found 8130",
        "rtplan.dcm": "no pixel data",
        "README.txt": "not a DICOM file",
        "badVR.dcm": "NumberOfFrames='1A'",
        "JPEG-lossy.dcm": "could not decode JPEG Extended",
    }
    for name, fragment in expected_reasons.items():
        assert fragment in rejected.get(name, ""), (name, rejected.get(name))


def test_lossless_encodings_of_one_image_decode_identically():
    reference = decode_dicom(PYDICOM_FILES / "MR_small.dcm")
    for name in (
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ):
        np.testing.assert_array_equal(decode_dicom(PYDICOM_FILES / name), reference, err_msg=name)


def test_own_image_through_rle_and_jpeg2000_lossless(tmp_path):
    from pydicom.uid import JPEG2000Lossless, RLELossless

    good = _good(tmp_path, BitsStored=12, HighBit=11)
    expected = decode_dicom(good)
    for uid in (RLELossless, JPEG2000Lossless):
        ds = pydicom.dcmread(good)
        ds.compress(uid)
        path = tmp_path / f"{uid.keyword}.dcm"
        ds.save_as(path)
        np.testing.assert_array_equal(decode_dicom(path), expected, err_msg=uid.name)


# --- damaged and foreign files --------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutations_of_a_good_file_are_rejected_naming_the_file(tmp_path):
    good = _good(tmp_path)
    img = decode_dicom(good)
    assert img.shape == (64, 48) and img.min() == 0.0 and img.max() == 1.0
    raw = good.read_bytes()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    pixel_start = raw.rfind(b"\xe0\x7f\x10\x00OW")
    assert 0 < meta_end < pixel_start

    cases: dict[str, tuple[bytes, str]] = {
        "half.dcm": (raw[: len(raw) // 2], "truncated pixel data"),
        "header_cut.dcm": (raw[: meta_end + 20], "truncated file: it ends inside element"),
        "meta_cut.dcm": (raw[:200], "truncated file: it ends inside the file meta header"),
        # the group length of the file meta, then the dataset's first element header
        "meta_corrupt.dcm": (raw[:140] + b"\xff" * 8 + raw[148:], "corrupt DICOM header"),
        "header_corrupt.dcm": (
            raw[:meta_end] + b"\xff" * 16 + raw[meta_end + 16 :],
            "corrupt DICOM header",
        ),
        "text.dcm": (b"patient,label\nA,normal\n" * 20, "not a DICOM file"),
        "empty.dcm": (b"", "not a DICOM file"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    for name, value in (("bits12.dcm", 12), ("bits7.dcm", 7)):
        _good(tmp_path, name, BitsAllocated=value, BitsStored=min(value, 12))
        cases[name] = (b"", f"BitsAllocated={value} is not valid")
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(tmp_path / "no_pixels.dcm")
    cases["no_pixels.dcm"] = (b"", "no pixel data (PixelData missing)")

    for name, (_, fragment) in cases.items():
        path = tmp_path / name
        with pytest.raises(DicomDecodeError) as info:
            decode_dicom(path)
        assert info.value.path == path
        assert str(info.value).startswith(f"{path}: ")
        assert fragment in info.value.reason, (name, info.value.reason)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_overwriting_any_header_bytes_never_escapes_as_another_error(tmp_path):
    good = _good(tmp_path)
    raw = good.read_bytes()
    pixel_start = raw.rfind(b"\xe0\x7f\x10\x00OW")
    rejected = 0
    for offset in range(128, pixel_start + 8, 8):
        for fill in (b"\x00", b"\xff"):
            path = tmp_path / "mutant.dcm"
            path.write_bytes(raw[:offset] + fill * 16 + raw[offset + 16 :])
            try:
                assert decode_dicom(path).shape == (64, 48)
            except DicomDecodeError as err:
                assert err.path == path and err.reason
                rejected += 1
    assert rejected > 20  # most structural damage is caught, not decoded as something else


def test_missing_file_and_directory_are_decode_errors(tmp_path):
    for path in (tmp_path / "absent.dcm", tmp_path):
        with pytest.raises(DicomDecodeError, match="cannot"):
            decode_dicom(path)


def test_file_without_preamble_and_meta_is_read(tmp_path):
    good = _good(tmp_path)
    ds = pydicom.dcmread(good)
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(decode_dicom(bare), decode_dicom(good))
    assert dicom_metadata(bare)["PatientID"] == "TEST-0001"


def test_decode_error_carries_path_and_reason_and_pickles(tmp_path):
    err = DicomDecodeError(tmp_path / "a.dcm", "no pixel data (PixelData missing)")
    assert isinstance(err, ImageDecodeError)
    assert str(err) == f"{tmp_path / 'a.dcm'}: no pixel data (PixelData missing)"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is DicomDecodeError and again.path == err.path and again.reason == err.reason


# --- the grayscale pipeline, exactly --------------------------------------------------------


def _decode(tmp_path: Path, pixels, **attributes) -> np.ndarray:
    return decode_dicom(_write(tmp_path, pixels, **attributes))


def test_linear_window_on_known_values(tmp_path):
    values = [[0, 449, 450, 500], [549, 550, 1000, 4095]]
    out = _decode(tmp_path, values, WindowCenter=500, WindowWidth=101)
    np.testing.assert_allclose(out, [[0, 0, 0.005, 0.505], [0.995, 1, 1, 1]], atol=1e-6)


def test_only_the_first_window_is_used(tmp_path):
    values = [[400, 500, 600]]
    out = _decode(tmp_path, values, WindowCenter=[500, 0], WindowWidth=[101, 10])
    np.testing.assert_allclose(out, [[0, 0.505, 1]], atol=1e-6)


def test_exact_and_sigmoid_windows(tmp_path):
    values = [[400, 500, 550]]
    exact = _decode(
        tmp_path, values, WindowCenter=500, WindowWidth=100, VOILUTFunction="LINEAR_EXACT"
    )
    np.testing.assert_allclose(exact, [[0, 0.5, 1]], atol=1e-6)
    sigmoid = _decode(tmp_path, values, WindowCenter=500, WindowWidth=100, VOILUTFunction="SIGMOID")
    expected = 1 / (1 + np.exp(-4 * (np.array(values) - 500) / 100))
    np.testing.assert_allclose(sigmoid, expected, atol=1e-6)


def test_rescale_is_applied_before_the_window(tmp_path):
    # modality values -100, 0, 100, 200, 300; a window on stored values would give
    # 0.0025, 0.2525, 0.5025, 0.7525, 1
    stored = [[0, 50, 100, 150, 200]]
    out = _decode(
        tmp_path, stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=100, WindowWidth=201
    )
    np.testing.assert_allclose(out, [[0, 0.0025, 0.5025, 1, 1]], atol=1e-6)


def test_without_window_the_modality_range_fills_zero_to_one(tmp_path):
    plain = _decode(tmp_path, [[10, 20], [30, 50]])
    np.testing.assert_allclose(plain, [[0, 0.25], [0.5, 1]], atol=1e-7)
    flipped = _decode(tmp_path, [[10, 20], [30, 50]], RescaleSlope=-1, RescaleIntercept=0)
    np.testing.assert_allclose(flipped, [[1, 0.75], [0.5, 0]], atol=1e-7)
    assert np.all(_decode(tmp_path, [[7, 7], [7, 7]]) == 0.0)


def test_unusable_window_width_falls_back_to_the_data_range(tmp_path):
    out = _decode(tmp_path, [[10, 20, 30]], WindowCenter=20, WindowWidth=0)
    np.testing.assert_allclose(out, [[0, 0.5, 1]], atol=1e-7)


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    values = np.random.default_rng(1).integers(0, 4096, size=(16, 12))
    window = {"WindowCenter": 2000, "WindowWidth": 3000}
    m2 = decode_dicom(_write(tmp_path, values, "m2.dcm", **window))
    m1 = decode_dicom(_write(tmp_path, values, "m1.dcm", photometric="MONOCHROME1", **window))
    assert 0.0 < m2.mean() < 1.0
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    no_window_m1 = decode_dicom(_write(tmp_path, [[0, 100]], "m1b.dcm", photometric="MONOCHROME1"))
    np.testing.assert_array_equal(no_window_m1, [[1.0, 0.0]])


def test_bits_above_bits_stored_are_ignored(tmp_path):
    clean = np.random.default_rng(2).integers(0, 4096, size=(8, 8))
    garbage = clean | (np.random.default_rng(3).integers(0, 16, size=(8, 8)) << 12)
    assert np.any(garbage != clean)
    stored12 = {"BitsStored": 12, "HighBit": 11}
    expected = decode_dicom(_write(tmp_path, clean, "clean.dcm", **stored12))
    noisy = decode_dicom(_write(tmp_path, garbage, "noisy.dcm", **stored12))
    np.testing.assert_array_equal(noisy, expected)


def test_signed_12_bit_values_are_sign_extended(tmp_path):
    raw = np.array([[0x0800, 0x0FFF, 0x0000, 0x07FF]]) | 0xF000  # -2048, -1, 0, 2047 + garbage
    out = _decode(tmp_path, raw, BitsStored=12, HighBit=11, PixelRepresentation=1)
    np.testing.assert_allclose(out, (np.array([[-2048, -1, 0, 2047]]) + 2048) / 4095, atol=1e-6)


def test_mask_helper_masks_only_what_a_decoder_left_unmasked():
    unmasked = np.array([0xF001, 0x0FFF], dtype=np.uint16)
    np.testing.assert_array_equal(_mask_to_bits_stored(unmasked, 12, signed=False), [1, 4095])
    signed = np.array([0x0FFF, 0x7800], dtype=np.uint16).view(np.int16)
    np.testing.assert_array_equal(_mask_to_bits_stored(signed, 12, signed=True), [-1, -2048])
    fine = np.array([-5, 100], dtype=np.int16)
    assert _mask_to_bits_stored(fine, 12, signed=True) is fine


def test_voi_lut_sequence_is_applied_in_preference_to_the_window(tmp_path):
    stored = [[5, 10, 11], [12, 13, 40]]
    lut = Sequence([_lut_item([4, 10, 8], [0, 85, 170, 255])])
    out = _decode(tmp_path, stored, VOILUTSequence=lut, WindowCenter=0, WindowWidth=2)
    np.testing.assert_allclose(out, [[0, 0, 1 / 3], [2 / 3, 1, 1]], atol=1e-6)


def test_voi_lut_after_rescale(tmp_path):
    # stored 0..3, modality 10..13 index the LUT; stored values alone would all clip to entry 0
    lut = Sequence([_lut_item([4, 10, 16], [0, 1000, 30000, 65535])])
    out = _decode(tmp_path, [[0, 1, 2, 3]], VOILUTSequence=lut, RescaleIntercept=10, RescaleSlope=1)
    np.testing.assert_allclose(out, [[0, 1000 / 65535, 30000 / 65535, 1]], atol=1e-6)


def test_modality_lut_sequence_replaces_rescale(tmp_path):
    lut = Sequence([_lut_item([3, 100, 16], [1000, 3000, 2000])])
    stored = [[90, 100], [101, 102], [500, 100]]
    out = _decode(tmp_path, stored, ModalityLUTSequence=lut)
    np.testing.assert_allclose(out, [[0, 0], [1, 0.5], [0.5, 0]], atol=1e-7)


def test_rejections_of_colour_frames_and_bad_headers(tmp_path):
    checks = {
        "rgb.dcm": ({"PhotometricInterpretation": "RGB"}, "PhotometricInterpretation RGB"),
        "spp.dcm": ({"SamplesPerPixel": 3}, "SamplesPerPixel=3"),
        "frames.dcm": ({"NumberOfFrames": 3}, "multi-frame image (NumberOfFrames=3)"),
        "bits.dcm": ({"BitsStored": 17}, "BitsStored=17 is not valid"),
    }
    paths = {name: _good(tmp_path, name, **attributes) for name, (attributes, _) in checks.items()}
    ds = pydicom.dcmread(_good(tmp_path))
    ds.add_new(0x00281053, "LO", "abc")  # RescaleSlope, stored as text a DS cannot hold
    ds.save_as(tmp_path / "slope.dcm")
    paths["slope.dcm"] = tmp_path / "slope.dcm"
    checks["slope.dcm"] = ({}, "RescaleSlope='abc' is not a number")
    for name, (_, fragment) in checks.items():
        path = paths[name]
        with pytest.raises(
            DicomDecodeError, match=fragment.replace("(", r"\(").replace(")", r"\)")
        ):
            decode_dicom(path)


def test_unsupported_transfer_syntax_is_named(tmp_path):
    path = _good(tmp_path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(path)
    with pytest.raises(
        DicomDecodeError,
        match=r"unsupported transfer syntax 1\.2\.840\.10008\.1\.2\.4\.100 \(MPEG2",
    ):
        decode_dicom(path)


def test_metadata_without_pixels(tmp_path):
    meta = dicom_metadata(_good(tmp_path, Modality="CR"))
    assert meta["PatientID"] == "TEST-0001" and meta["Modality"] == "CR"
    assert (meta["Rows"], meta["Columns"]) == (64, 48)
    assert meta["PhotometricInterpretation"] == "MONOCHROME2"
    assert meta["StudyInstanceUID"].startswith("1.")
    (tmp_path / "t.dcm").write_text("hello")
    with pytest.raises(DicomDecodeError, match="not a DICOM file"):
        dicom_metadata(tmp_path / "t.dcm")


# --- read_image: DICOM and Pillow formats ---------------------------------------------------


def test_read_image_png_8_and_16_bit_and_colour(tmp_path):
    grey = np.array([[0, 51, 255]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g8.png")
    np.testing.assert_allclose(read_image(tmp_path / "g8.png"), [[0, 0.2, 1]], atol=1e-7)
    deep = np.array([[0, 1, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 1 / 65535, 1]], atol=1e-8)
    rgb = np.zeros((1, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "c.tif")
    np.testing.assert_allclose(read_image(tmp_path / "c.tif"), [[76 / 255, 1]], atol=1e-7)
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(tmp_path / "j.jpg")
    np.testing.assert_allclose(read_image(tmp_path / "j.jpg"), 128 / 255, atol=2 / 255)


def test_read_image_chooses_the_decoder_by_content(tmp_path):
    good = _good(tmp_path)
    expected = decode_dicom(good)
    for name in ("no_extension", "scan.png"):
        (tmp_path / name).write_bytes(good.read_bytes())
        np.testing.assert_array_equal(read_image(tmp_path / name), expected)
    Image.fromarray(np.full((2, 2), 255, dtype=np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "image.dat").write_bytes((tmp_path / "p.png").read_bytes())
    np.testing.assert_array_equal(read_image(tmp_path / "image.dat"), np.ones((2, 2)))


def test_read_image_failures_name_the_file(tmp_path):
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    (tmp_path / "words.jpg").write_text("not an image")
    for name in ("cut.png", "words.jpg"):
        with pytest.raises(ImageDecodeError) as info:
            read_image(tmp_path / name)
        assert type(info.value) is ImageDecodeError
        assert info.value.path == tmp_path / name and info.value.reason
    (tmp_path / "words.dicom").write_text("not an image")
    with pytest.raises(DicomDecodeError, match="not a DICOM file"):
        read_image(tmp_path / "words.dicom")
