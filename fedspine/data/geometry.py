"""Square, resize and quantise decoded radiographs for the prepared dataset.

The GAN and the classifiers take square images of one resolution. `fit_square` makes the image
square without distorting anatomy, `resize_area` shrinks it by exact area averaging (the paper's
nearest-neighbour resize aliases fine trabecular texture and skips most of the pixels of a
2500x1600 radiograph), and `to_uint8` stores it in the prepared cache.
"""

from __future__ import annotations

import numpy as np

FIT_MODES = ("crop", "pad")


def prepare_image(img: np.ndarray, resolution: int, fit: str = "crop") -> np.ndarray:
    """A decoded float image in [0, 1] to a uint8 ``resolution`` x ``resolution`` image."""
    return to_uint8(resize_area(fit_square(img, fit), resolution))


def fit_square(img: np.ndarray, mode: str = "crop") -> np.ndarray:
    """Make a 2-D image square without changing its aspect ratio.

    ``crop`` keeps the centred square of side min(H, W) (the paper's choice: the spine sits in
    the middle of the film). ``pad`` keeps everything and pads the short side symmetrically
    (the extra pixel, for an odd difference, goes after) with 0.0, which is black for every
    image once decoding has applied MONOCHROME1 inversion, i.e. the film's unexposed border.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode {mode!r} is not one of {', '.join(FIT_MODES)}")
    img = _check_2d(img)
    height, width = img.shape
    if height == width:
        return img
    if mode == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return img[top : top + side, left : left + side]
    side = max(height, width)
    out = np.zeros((side, side), dtype=img.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = img
    return out


def resize_area(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D float image to ``size`` x ``size`` (float32), antialiased.

    Each axis is handled on its own. Shrinking averages every source pixel by the fraction of
    it that falls in the target pixel (exact area averaging, from differences of the
    cumulative sum, which is piecewise linear for piecewise constant pixels). Enlarging uses
    linear interpolation between pixel centres, clamped at the edges.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    img = _check_2d(img)
    if img.dtype != np.float32:
        img = img.astype(np.float64)
    out = _resize_axis(img, int(size), axis=0)
    out = _resize_axis(out, int(size), axis=1)
    return out.astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round x * 255 to the nearest integer (halves to even)."""
    img = np.asarray(img)
    if not np.all(np.isfinite(img)):
        raise ValueError("image has NaN or infinite values; cannot convert to uint8")
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_2d(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 2 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {img.shape}")
    return img


def _resize_axis(img: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = img.shape[axis]
    if n == size:
        return img
    moved = np.moveaxis(img, axis, 0)
    out = _shrink(moved, size) if size < n else _enlarge(moved, size)
    return np.moveaxis(out, 0, axis)


def _shrink(a: np.ndarray, size: int) -> np.ndarray:
    """Area average along axis 0: target pixel i covers source [i*n/size, (i+1)*n/size).

    The integral up to an edge e is the sum of the whole pixels before floor(e) plus the covered
    fraction of pixel floor(e); a target's area is the difference of its two edges' integrals,
    i.e. the whole pixels between them (one `reduceat`) corrected by the two fractions.
    """
    n = a.shape[0]
    edges = np.arange(size + 1, dtype=np.float64) * (n / size)
    edges[-1] = n
    whole = np.floor(edges).astype(np.int64)
    frac = (edges - whole)[:, None]
    partial = frac * a[np.minimum(whole, n - 1)]  # zero at the last edge, where frac is 0
    sums = np.add.reduceat(a, whole[:-1], axis=0, dtype=np.float64)
    return (sums + partial[1:] - partial[:-1]) * (size / n)


def _enlarge(a: np.ndarray, size: int) -> np.ndarray:
    """Linear interpolation along axis 0 between source pixel centres (half-pixel aligned)."""
    n = a.shape[0]
    centres = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
    centres = np.clip(centres, 0.0, n - 1)
    lo = np.minimum(np.floor(centres).astype(np.int64), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    frac = (centres - lo)[:, None]
    return a[lo] * (1.0 - frac) + a[hi] * frac
