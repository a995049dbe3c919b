"""Decode radiographs (DICOM, PNG, JPEG, TIFF) to grey float images in [0, 1].

A DICOM is shown the way a radiologist's viewer shows it, following the grayscale pipeline of
PS3.3 C.11 and PS3.4 N.2: stored values (BitsStored respected), then the Modality LUT (rescale
slope/intercept or a Modality LUT Sequence), then the VOI LUT (a VOI LUT Sequence, else the first
window centre/width, else the image's own range), then MONOCHROME1 inversion so that 0 is always
black. Anything this module cannot turn into one grey frame raises `DicomDecodeError` (or, for
PNG/JPEG/TIFF, `ImageDecodeError`) naming the file and what is wrong with it; no other exception
type escapes `decode_dicom`, `read_image` or `dicom_metadata`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
VALID_BITS_ALLOCATED = (1, 8, 16, 32)

_PILLOW_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")
_PIXEL_DATA_TAG = 0x7FE00010
# PixelData element headers: explicit VR (little and big endian), implicit VR encapsulated
_PIXEL_DATA_MARKERS = (
    b"\xe0\x7f\x10\x00OB",
    b"\xe0\x7f\x10\x00OW",
    b"\x7f\xe0\x00\x10OB",
    b"\x7f\xe0\x00\x10OW",
    b"\xe0\x7f\x10\x00\xff\xff\xff\xff",
)
_NOT_DICOM = "not a DICOM file (no DICM preamble and no valid header)"
_METADATA_FIELDS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
)


class ImageDecodeError(Exception):
    """An image file could not be turned into a grey float image; `reason` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DicomDecodeError(ImageDecodeError):
    """A DICOM file could not be decoded to one grey frame; `reason` says why."""


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read any supported image file as a float32 2-D array in [0, 1] (0 = black).

    The file's content decides first (a DICM marker at byte 128 means DICOM, a PNG/JPEG/TIFF
    signature means Pillow), then its extension; anything else is tried as DICOM, since
    archives often store DICOMs without an extension.
    """
    path = Path(path)
    pillow_suffix = path.suffix.lower() in PILLOW_SUFFIXES
    head = _read_head(path, ImageDecodeError if pillow_suffix else DicomDecodeError)
    if head[128:132] == b"DICM":
        return decode_dicom(path)
    if pillow_suffix or head.startswith(_PILLOW_MAGIC):
        return _read_with_pillow(path)
    return decode_dicom(path)


def decode_dicom(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one single-frame greyscale DICOM to float32 [0, 1], as a viewer would display it.

    Steps (PS3.3 C.11, PS3.4 N.2): stored values, masked to BitsStored where a decoder left the
    unused high bits set; Modality LUT Sequence, else RescaleSlope/RescaleIntercept; the first
    item of the VOI LUT Sequence, else the first WindowCenter/WindowWidth (with VOILUTFunction
    LINEAR, LINEAR_EXACT or SIGMOID); else the actual min..max of the modality values. The last
    choice is what a viewer does for an image without a window, and it uses the whole grey scale:
    the range possible under BitsStored would squeeze a 12-bit radiograph stored as 16 bits into
    the darkest sixteenth. A constant image without a window becomes 0 (before inversion).
    Finally MONOCHROME1 is inverted (1 - x) so 0 is black for every image. PresentationLUTShape
    is not applied: in DX/CR objects it restates the photometric interpretation.

    Raises DicomDecodeError (and nothing else) for anything that is not one grey frame.
    """
    path = Path(path)
    try:
        return _decode(path)
    except DicomDecodeError:
        raise
    except MemoryError:
        raise DicomDecodeError(path, "not enough memory to decode this image") from None
    except Exception as err:  # a codec or pydicom failure costs this file only
        raise DicomDecodeError(path, f"could not decode: {_short(err)}") from err


def dicom_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A few plain header fields (ids, modality, geometry) without reading the pixels.

    Values are str or int, or None where the header lacks them.
    """
    path = Path(path)
    try:
        ds = _read_dataset(path, stop_before_pixels=True)
        out: dict[str, Any] = {}
        for keyword in _METADATA_FIELDS:
            value = ds.get(keyword)
            if value is None or value == "":
                out[keyword] = None
            elif keyword in ("Rows", "Columns"):
                out[keyword] = int(value)
            else:
                out[keyword] = str(value)
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        out["TransferSyntaxUID"] = str(ts) if ts else None
        return out
    except DicomDecodeError:
        raise
    except Exception as err:
        raise DicomDecodeError(path, f"unreadable DICOM header: {_short(err)}") from err


# --- reading -------------------------------------------------------------------------------


def _read_head(path: Path, error: type[ImageDecodeError]) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)
    except OSError as err:
        raise error(path, f"cannot open file ({err.strerror or err})") from None


def _read_dataset(path: Path, stop_before_pixels: bool = False) -> Any:
    """dcmread, with a forced read only for preamble-less files that still look like images."""
    _read_head(path, DicomDecodeError)  # a missing or unreadable file says so, not "not DICOM"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        ds = _forced_read(path, stop_before_pixels)
    except OSError as err:
        raise DicomDecodeError(path, f"cannot read file ({err.strerror or err})") from None
    except Exception as err:  # EOFError, struct.error, ValueError on a broken header
        raise DicomDecodeError(path, f"corrupt or truncated DICOM header: {_short(err)}") from err
    _ensure_transfer_syntax(ds, path)
    return ds


def _forced_read(path: Path, stop_before_pixels: bool) -> Any:
    """Files without the 128-byte preamble are valid in old archives; anything else is not DICOM."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
        looks_like_image = all(k in ds for k in ("Rows", "Columns", "BitsAllocated"))
        if not stop_before_pixels:
            looks_like_image = looks_like_image and "PixelData" in ds
    except Exception:
        looks_like_image = False
    if not looks_like_image:
        raise DicomDecodeError(path, _NOT_DICOM)
    return ds


def _ensure_transfer_syntax(ds: Any, path: Path) -> None:
    """A file without file meta has its encoding only in how pydicom parsed it; record it."""
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise DicomDecodeError(path, "transfer syntax unknown (file meta has no TransferSyntaxUID)")
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


# --- the grayscale pipeline ----------------------------------------------------------------


def decode_stored_values(path: str | os.PathLike[str]) -> np.ndarray:
    """The stored pixel values of one single-frame greyscale DICOM, as fedspine decodes them
    before any transform (masked to BitsStored, sign-extended): what the cross-check against an
    independent toolkit compares. Raises DicomDecodeError like :func:`decode_dicom`."""
    path = Path(path)
    try:
        return _stored(path)[1]
    except DicomDecodeError:
        raise
    except Exception as err:
        raise DicomDecodeError(path, f"could not decode: {_short(err)}") from err


def _decode(path: Path) -> np.ndarray:
    ds, stored, photometric = _stored(path)
    values = _apply_modality(stored, ds, path)
    if not np.all(np.isfinite(values)):
        raise DicomDecodeError(path, "modality transform gave non-finite values")
    shown = _apply_voi(values, ds, path)
    shown = np.clip(shown, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        shown = 1.0 - shown
    return shown.astype(np.float32)


def _stored(path: Path) -> tuple[Any, np.ndarray, str]:
    """(dataset, stored values, photometric interpretation) of one grey frame."""
    ds = _read_dataset(path)
    try:
        bits_stored, signed, photometric = _check_image(ds, path)
    except DicomDecodeError:
        raise
    except Exception as err:  # pydicom converts raw values lazily, so damage surfaces here
        raise DicomDecodeError(path, f"corrupt DICOM header: {_short(err)}") from err
    try:
        stored = ds.pixel_array
    except MemoryError:
        raise
    except Exception as err:
        name = ds.file_meta.TransferSyntaxUID.name
        raise DicomDecodeError(path, f"could not decode {name} pixel data: {_short(err)}") from err
    rows, columns = int(ds.Rows), int(ds.Columns)
    if stored.shape != (rows, columns):
        raise DicomDecodeError(
            path, f"decoded pixels have shape {stored.shape}, header says {rows}x{columns}"
        )
    return ds, _mask_to_bits_stored(stored, bits_stored, signed), photometric


def _check_image(ds: Any, path: Path) -> tuple[int, bool, str]:
    """Reject what is not one grey frame before spending time on decoding it."""
    if "PixelData" not in ds:
        for keyword in ("FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                return _fail(path, f"floating-point pixel data ({keyword}) is not supported")
        if _pixel_data_unreached(ds, path):
            _fail(path, "corrupt DICOM header: parsing stopped before the pixel data in the file")
        truncated = _truncation(ds, path)
        if truncated:
            _fail(path, f"truncated file: {truncated}; copy it again from its source")
        return _fail(path, "no pixel data (PixelData missing)")
    for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            _fail(path, f"required attribute {keyword} is missing")
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        _fail(path, f"colour image (PhotometricInterpretation {photometric}) is not supported")
    samples = _int_attr(ds, "SamplesPerPixel", path, default=1)
    if samples != 1:
        _fail(path, f"colour image (SamplesPerPixel={samples}) is not supported")
    ds.SamplesPerPixel = 1
    frames = _int_attr(ds, "NumberOfFrames", path, default=1)
    if frames > 1:
        _fail(path, f"multi-frame image (NumberOfFrames={frames}) is not supported")
    if frames < 1:
        _fail(path, f"NumberOfFrames={frames} is not valid")
    rows, columns = _int_attr(ds, "Rows", path), _int_attr(ds, "Columns", path)
    if rows < 1 or columns < 1:
        _fail(path, f"image size {rows}x{columns} is empty")
    allocated = _int_attr(ds, "BitsAllocated", path)
    if allocated not in VALID_BITS_ALLOCATED:
        _fail(path, f"BitsAllocated={allocated} is not valid (expected 1, 8, 16 or 32)")
    stored = _int_attr(ds, "BitsStored", path, default=allocated)
    if not 1 <= stored <= allocated:
        _fail(path, f"BitsStored={stored} is not valid with BitsAllocated={allocated}")
    ds.BitsStored = stored
    representation = _int_attr(ds, "PixelRepresentation", path, default=0)
    if representation not in (0, 1):
        _fail(path, f"PixelRepresentation={representation} is not valid (expected 0 or 1)")
    ds.PixelRepresentation = representation
    _check_transfer_syntax(ds, path, rows * columns * frames, allocated)
    return stored, representation == 1, photometric


def _truncation(ds: Any, path: Path) -> str | None:
    """Where a file ends early, say where; pydicom silently shortens the last value it reads."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            has_preamble = fh.read(132)[128:132] == b"DICM"
    except OSError:
        return None
    group_length = ds.file_meta.get("FileMetaInformationGroupLength")
    if has_preamble and isinstance(group_length, int) and 144 + group_length > size:
        return "it ends inside the file meta header"
    elements = list(ds.elements())
    if not elements:
        return "no data set after the file meta header" if has_preamble else None
    last = elements[-1]
    if (
        isinstance(last, RawDataElement)
        and last.length != 0xFFFFFFFF
        and isinstance(last.value, bytes)
        and len(last.value) < last.length
    ):
        return f"it ends inside element {last.tag} ({len(last.value)} of {last.length} bytes)"
    return None


def _pixel_data_unreached(ds: Any, path: Path) -> bool:
    """True where the bytes of a PixelData element exist but the parsed header lacks it.

    pydicom reads a damaged length as "undefined" and swallows the rest of the file, which
    would otherwise be reported as a file without pixels.
    """
    try:
        raw = path.read_bytes()
    except OSError:
        return False
    if not any(marker in raw for marker in _PIXEL_DATA_MARKERS):
        return False
    # an icon or other nested image is not a damaged header
    return not any(elem.tag == _PIXEL_DATA_TAG for elem in ds.iterall())


def _check_transfer_syntax(ds: Any, path: Path, n_pixels: int, bits_allocated: int) -> None:
    uid = ds.file_meta.TransferSyntaxUID
    if not uid.is_valid:
        _fail(path, f"corrupt DICOM header: TransferSyntaxUID {str(uid)!r} is not a valid UID")
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        label = f"{uid} ({uid.name})" if uid.name != str(uid) else str(uid)
        _fail(path, f"unsupported transfer syntax {label}; decompress it first (e.g. gdcmconv)")
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no decoder plugin available"
        _fail(path, f"transfer syntax {uid.name} needs a decoder that is not installed: {missing}")
    if not uid.is_encapsulated:
        expected = (n_pixels * bits_allocated + 7) // 8
        found = len(ds.PixelData)
        if found < expected:
            _fail(path, f"truncated pixel data: expected {expected} bytes, found {found}")


def _mask_to_bits_stored(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Drop the bits above BitsStored (overlays, garbage) and sign-extend signed data.

    pydicom does this for native data; it is repeated only where values are out of range, so a
    codec whose output already fits (whatever its declared precision) is left alone.
    """
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iu" or bits_stored >= arr.dtype.itemsize * 8:
        return arr
    if signed:
        lo, hi = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        lo, hi = 0, (1 << bits_stored) - 1
    if arr.size == 0 or (arr.min() >= lo and arr.max() <= hi):
        return arr
    mask = (1 << bits_stored) - 1
    values = arr.astype(np.int64) & mask
    if signed:
        values = np.where(values > hi, values - (1 << bits_stored), values)
    return values


def _apply_modality(stored: np.ndarray, ds: Any, path: Path) -> np.ndarray:
    """Stored values to modality values (PS3.3 C.11.1): LUT Sequence first, else rescale."""
    sequence = ds.get("ModalityLUTSequence")
    if sequence:
        return _apply_lut(stored, sequence[0], ds, path, "Modality LUT Sequence")[0]
    slope = _float_attr(ds, "RescaleSlope", path, default=1.0)
    intercept = _float_attr(ds, "RescaleIntercept", path, default=0.0)
    return stored.astype(np.float64) * slope + intercept


def _apply_voi(values: np.ndarray, ds: Any, path: Path) -> np.ndarray:
    """Modality values to [0, 1] (PS3.3 C.11.2): VOI LUT, else window, else the data range."""
    sequence = ds.get("VOILUTSequence")
    if sequence:
        out, bits, table_max = _apply_lut(values, sequence[0], ds, path, "VOI LUT Sequence")
        top = max(float((1 << bits) - 1), 1.0)
        if table_max > top:  # the descriptor understates the entries' bit depth
            top = float((1 << int(table_max).bit_length()) - 1)
        return out / top
    window = _first_window(ds)
    if window is not None:
        center, width, function = window
        return _window(values, center, width, function)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float64)
    return (values - lo) / (hi - lo)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The VOI window functions of PS3.3 C.11.2.1.2-3, with output range 0..1."""
    x = x.astype(np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700.0, 700.0)))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    lower = center - 0.5 - (width - 1.0) / 2.0
    upper = center - 0.5 + (width - 1.0) / 2.0
    if width == 1.0:  # a threshold: below the centre black, above it white
        return np.where(x <= lower, 0.0, 1.0)
    y = (x - (center - 0.5)) / (width - 1.0) + 0.5
    return np.where(x <= lower, 0.0, np.where(x > upper, 1.0, y))


def _first_window(ds: Any) -> tuple[float, float, str] | None:
    """The first WindowCenter/WindowWidth pair, or None where absent or unusable.

    A width the function cannot use (below 1 for LINEAR, not positive otherwise) is treated as
    no window rather than an error: the pixels are still good and the data range shows them.
    """
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if width < (1.0 if function == "LINEAR" else np.finfo(float).tiny):
        return None
    return center, width, function


def _apply_lut(
    values: np.ndarray, item: Any, ds: Any, path: Path, what: str
) -> tuple[np.ndarray, int, float]:
    """Look values up in a LUT item (PS3.3 C.11.1.1.1): outputs, bits per entry, largest entry.

    Inputs below the first mapped value take the first entry, inputs past the end the last.
    """
    try:
        n_entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    except Exception:
        _fail(path, f"{what} has no valid LUTDescriptor (3 numbers expected)")
    n_entries = n_entries or 65536
    if "LUTData" not in item:
        _fail(path, f"{what} has no LUTData")
    table = _lut_entries(item["LUTData"].value, n_entries, _is_little_endian(ds))
    if table.size < n_entries:
        _fail(path, f"{what} has {table.size} entries, its descriptor says {n_entries}")
    table = table[:n_entries].astype(np.float64)
    index = np.rint(values).astype(np.int64) - first_mapped
    return table[np.clip(index, 0, n_entries - 1)], bits, float(table.max())


def _lut_entries(data: Any, n_entries: int, little_endian: bool) -> np.ndarray:
    if isinstance(data, bytes | bytearray):
        if len(data) == n_entries:  # 8-bit entries packed one per byte
            return np.frombuffer(data, dtype=np.uint8)
        usable = len(data) - len(data) % 2
        return np.frombuffer(data[:usable], dtype="<u2" if little_endian else ">u2")
    if isinstance(data, int):
        return np.asarray([data])
    return np.asarray(list(data), dtype=np.int64)


def _is_little_endian(ds: Any) -> bool:
    return ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian


# --- Pillow formats ------------------------------------------------------------------------


def _read_with_pillow(path: Path) -> np.ndarray:
    """PNG/JPEG/TIFF to grey [0, 1]: 8-bit by 255, 16-bit by 65535, colour to luma ('L')."""
    try:
        with Image.open(path) as img:
            frames = int(getattr(img, "n_frames", 1))
            if frames > 1:
                raise ImageDecodeError(path, f"multi-page image ({frames} frames) is not supported")
            img.load()
            return _pillow_to_float(img, path)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a readable PNG, JPEG or TIFF image") from None
    except MemoryError:
        raise ImageDecodeError(path, "not enough memory to decode this image") from None
    except Exception as err:  # truncated streams, decompression bombs, codec errors
        raise ImageDecodeError(path, f"could not decode image: {_short(err)}") from err


def _pillow_to_float(img: Any, path: Path) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16"):
        return (np.asarray(img).astype(np.float64) / 65535.0).astype(np.float32)
    if mode == "I":  # 16-bit PNGs open as 'I' in some Pillow versions
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageDecodeError(path, "32-bit integer image outside 0..65535 is not supported")
        return (arr.astype(np.float64) / 65535.0).astype(np.float32)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.all(np.isfinite(arr)) or (arr.size and (arr.min() < 0 or arr.max() > 1)):
            raise ImageDecodeError(path, "floating-point image with values outside [0, 1]")
        return arr.copy()
    if mode != "L":
        img = img.convert("L")
    return (np.asarray(img).astype(np.float32) / 255.0).astype(np.float32)


# --- small helpers -------------------------------------------------------------------------


def _fail(path: Path, reason: str) -> NoReturn:
    raise DicomDecodeError(path, reason)


def _int_attr(ds: Any, keyword: str, path: Path, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            _fail(path, f"required attribute {keyword} is missing")
        return default
    try:
        number = float(str(value).strip())
        if not number.is_integer():
            raise ValueError
        return int(number)
    except ValueError:
        return _fail(path, f"{keyword}={str(value)!r} is not a valid integer")


def _float_attr(ds: Any, keyword: str, path: Path, default: float) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    number = _first_number(value)
    if number is None:
        _fail(path, f"{keyword}={str(value)!r} is not a number")
    return number


def _first_number(value: Any) -> float | None:
    """A DS/IS value as float (the first of several), or None where absent or not finite."""
    if value is None or value == "":
        return None
    if not isinstance(value, str | bytes) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value if not isinstance(value, bytes) else value.decode())
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _short(err: BaseException, limit: int = 200) -> str:
    """One line of an exception's message, so reasons read well in a rejection list."""
    text = re.sub(r"\s+", " ", str(err)).strip() or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
