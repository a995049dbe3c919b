"""Squaring, area resizing and quantisation of decoded images."""

from __future__ import annotations

import numpy as np
import pytest

from fedspine.data.geometry import fit_square, prepare_image, resize_area, to_uint8


def _marked(height: int, width: int) -> np.ndarray:
    img = np.full((height, width), 0.25, dtype=np.float32)
    img[height // 2, width // 2] = 1.0
    return img


def test_crop_keeps_the_centred_square():
    img = _marked(100, 60)
    img[19, 0] = 0.5  # just above the kept rows
    img[20, 0] = 0.75  # first kept row
    out = fit_square(img, "crop")
    assert out.shape == (60, 60)
    assert out[30, 30] == 1.0  # the centre marker stays at the centre
    assert out[0, 0] == 0.75
    assert 0.5 not in out
    wide = fit_square(_marked(60, 100), "crop")
    assert wide.shape == (60, 60) and wide[30, 30] == 1.0


def test_pad_centres_the_content_on_black():
    img = _marked(100, 60)
    out = fit_square(img, "pad")
    assert out.shape == (100, 100)
    assert out.dtype == img.dtype
    assert out[50, 50] == 1.0
    np.testing.assert_array_equal(out[:, 20:80], img)
    assert np.all(out[:, :20] == 0.0) and np.all(out[:, 80:] == 0.0)
    odd = fit_square(np.ones((5, 2), dtype=np.float32), "pad")
    np.testing.assert_array_equal(odd[0], [0, 1, 1, 0, 0])  # the odd pixel goes after


def test_fit_square_rejects_unknown_modes_and_bad_shapes():
    with pytest.raises(ValueError, match="stretch"):
        fit_square(np.zeros((4, 3)), "stretch")
    with pytest.raises(ValueError, match="2-D"):
        fit_square(np.zeros((4, 3, 3)))
    square = np.eye(4)
    np.testing.assert_array_equal(fit_square(square, "crop"), square)
    np.testing.assert_array_equal(fit_square(square, "pad"), square)


def test_area_resize_of_a_constant_stays_constant():
    for shape, size in (((250, 160), 64), ((37, 53), 16), ((7, 9), 32)):
        out = resize_area(np.full(shape, 0.7, dtype=np.float32), size)
        assert out.shape == (size, size) and out.dtype == np.float32
        np.testing.assert_allclose(out, 0.7, atol=1e-6)


def test_area_resize_averages_exactly():
    blocks = np.kron(np.indices((4, 4)).sum(0) % 2, np.ones((2, 2))).astype(np.float32)
    np.testing.assert_array_equal(resize_area(blocks, 4), np.indices((4, 4)).sum(0) % 2)
    pixels = (np.indices((8, 8)).sum(0) % 2).astype(np.float32)
    np.testing.assert_allclose(resize_area(pixels, 4), 0.5, atol=1e-7)
    # non-integer factor: 3 -> 2 splits the middle pixel between both outputs
    np.testing.assert_allclose(resize_area(np.array([[0.0, 1.0, 0.0]] * 3), 2), 1 / 3, atol=1e-7)


def test_area_resize_matches_a_dense_coverage_matrix():
    def coverage(n: int, m: int) -> np.ndarray:
        w = np.zeros((m, n))
        for i in range(m):
            lo, hi = i * n / m, (i + 1) * n / m
            for j in range(n):
                w[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
        return w * (m / n)

    img = np.random.default_rng(0).random((37, 53))
    expected = coverage(37, 16) @ img @ coverage(53, 16).T
    np.testing.assert_allclose(resize_area(img, 16), expected, atol=1e-6)


def test_upsampling_interpolates_between_pixel_centres():
    out = resize_area(np.array([[0.0, 1.0], [0.0, 1.0]]), 4)
    np.testing.assert_allclose(out[0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(out[:, 1], 0.25)


def test_to_uint8_rounds_and_clips():
    img = np.array([[-0.5, 0.0, 0.5 / 255, 0.6 / 255], [0.5, 254.4 / 255, 1.0, 2.0]])
    out = to_uint8(img)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 0, 0, 1], [128, 254, 255, 255]])
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.array([[np.nan]]))


def test_prepare_image_composes_square_resize_and_quantise():
    img = _marked(100, 60)
    out = prepare_image(img, 30, "crop")
    assert out.shape == (30, 30) and out.dtype == np.uint8
    expected = to_uint8(resize_area(fit_square(img, "crop"), 30))
    np.testing.assert_array_equal(out, expected)
    padded = prepare_image(img, 50, "pad")
    assert padded[25, 0] == 0 and padded[25, 25] > 0
