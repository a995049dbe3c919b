"""FID, KID, precision/recall and density/coverage on constructed features with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from fedspine.evaluation import generative
from fedspine.evaluation.generative import (
    _trace_sqrt_product_eigh,
    density_coverage,
    distance_blocks,
    frechet_distance,
    kernel_inception_distance,
    kth_neighbour_distances,
    precision_recall,
)


def _with_moments(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n points whose sample mean and unbiased sample covariance are exactly mean and cov."""
    x = np.random.default_rng(seed).normal(size=(n, len(mean)))
    x -= x.mean(axis=0)
    whiten = np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False)))
    return x @ whiten.T @ np.linalg.cholesky(cov).T + mean


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_fid_matches_closed_form_for_diagonal_gaussians(method):
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    a = _with_moments(200, mu1, np.diag(s1), seed=1)
    b = _with_moments(150, mu2, np.diag(s2), seed=2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(a, b, method=method) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    cov = np.cov(a, rowvar=False)
    assert _trace_sqrt_product_eigh(cov, cov) == pytest.approx(np.trace(cov), rel=1e-9)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(a, a[::-1], method=method) < 1e-6 * np.trace(cov)


def test_fid_grows_with_the_square_of_a_mean_shift():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 8))
    b = rng.normal(size=(400, 8))
    direction = rng.normal(size=8)
    base = frechet_distance(a, b)
    values = [frechet_distance(a, b + t * direction) for t in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert np.all(np.diff(values) > 0)
    shift_of_b = b.mean(axis=0) - a.mean(axis=0)
    for t, value in zip((0.5, 1.0, 2.0, 4.0), values[1:], strict=True):
        expected = base + 2 * t * shift_of_b @ direction + t**2 * direction @ direction
        assert value == pytest.approx(expected, rel=1e-9)


def test_fid_methods_agree_on_general_and_singular_covariances():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(80, 20)) @ rng.normal(size=(20, 20))
    b = rng.normal(size=(90, 20)) @ rng.normal(size=(20, 20)) + 0.3
    assert frechet_distance(a, b, method="eigh") == pytest.approx(
        frechet_distance(a, b, method="sqrtm"), rel=1e-8
    )
    # Fewer points than dimensions: both covariances are singular.
    a, b = rng.normal(size=(10, 30)), rng.normal(size=(12, 30)) + 0.5
    eig, sq = frechet_distance(a, b, method="eigh"), frechet_distance(a, b, method="sqrtm")
    assert np.isfinite(eig) and eig > 0
    assert sq == pytest.approx(eig, rel=1e-3)


def test_fid_rejects_bad_input():
    a = np.zeros((5, 3))
    with pytest.raises(ValueError, match="dimension"):
        frechet_distance(a, np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        frechet_distance(np.zeros(5), a)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), a)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 3), np.nan), a)
    with pytest.raises(ValueError, match="unknown method"):
        frechet_distance(a, a, method="svd")


def _mmd2_unbiased_loops(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)

    def k(u, v):
        return (u @ v / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_brute_force_unbiased_mmd_when_subsets_are_whole_sets():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.4
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=100)
    assert mean == pytest.approx(_mmd2_unbiased_loops(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(600, 16))
    same = rng.normal(size=(600, 16))
    shifted = rng.normal(size=(600, 16)) + 0.5
    kid_same, std_same = kernel_inception_distance(real, same, subsets=20, subset_size=300)
    kid_shift, _ = kernel_inception_distance(real, shifted, subsets=20, subset_size=300)
    assert kid_shift > 0
    assert abs(kid_same) < 0.05 * kid_shift
    assert abs(kid_same) < 3 * std_same + 1e-3
    assert kernel_inception_distance(real, same, subsets=5, subset_size=100, seed=1) == (
        kernel_inception_distance(real, same, subsets=5, subset_size=100, seed=1)
    )


def test_kid_rejects_bad_input():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="subsets"):
        kernel_inception_distance(x, x, subsets=0)
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(x, x, subset_size=1)


def _prdc_brute_force(real, fake, k):
    rr, ff, rf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
    r_real = np.sort(rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(ff, axis=1)[:, k]
    inside = rf <= r_real[:, None]  # [real, fake]: fake j in real ball i
    precision = inside.any(axis=0).mean()
    recall = (rf <= r_fake[None, :]).any(axis=1).mean()
    return precision, recall, inside.sum() / (k * len(fake)), inside.any(axis=1).mean()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_equal_brute_force_with_tiny_chunks(monkeypatch, k):
    rng = np.random.default_rng(k)
    real, fake = rng.normal(size=(70, 4)), rng.normal(size=(50, 4)) * 1.3 + 0.2
    expected = _prdc_brute_force(real, fake, k)
    monkeypatch.setattr(generative, "_BLOCK_ELEMENTS", 97)  # many uneven blocks
    assert precision_recall(real, fake, k) + density_coverage(real, fake, k) == pytest.approx(
        expected, abs=1e-12
    )


def test_prdc_of_a_set_with_itself():
    real = np.random.default_rng(6).uniform(size=(500, 3))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    density, coverage = density_coverage(real, real.copy(), k=3)
    # each point lies in its own ball and its 3 neighbours': (k + 1) / k
    assert coverage == 1.0
    assert density == pytest.approx(4 / 3)


def test_prdc_for_fresh_draws_of_one_distribution():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2))
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)
    assert precision > 0.9 and recall > 0.9
    assert density == pytest.approx(1.0, abs=0.1)
    assert coverage == pytest.approx(1 - 0.5**3, abs=0.04)  # Naeem et al.: 1 - 2^-k


def test_prdc_for_far_away_fakes_is_zero():
    rng = np.random.default_rng(8)
    real = rng.uniform(size=(300, 2))
    fake = rng.uniform(size=(300, 2)) + 10.0
    assert precision_recall(real, fake) == (0.0, 0.0)
    assert density_coverage(real, fake) == (0.0, 0.0)


def test_prdc_for_fakes_covering_half_the_real_support():
    rng = np.random.default_rng(9)
    real = rng.uniform(size=(2000, 2))
    fake = rng.uniform(size=(2000, 2)) * [0.5, 1.0]  # the left half only
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)
    assert precision > 0.97
    assert recall == pytest.approx(0.5, abs=0.05)
    assert coverage == pytest.approx(0.5, abs=0.05)
    # Real balls adapt to real density, so a fake in the real support sits in about k of them
    # however crowded the fakes are: density stays near 1.
    assert density == pytest.approx(1.0, abs=0.1)


def test_kth_neighbour_distances_and_blocks():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(kth_neighbour_distances(x, 1), [1, 1, 2, 4])
    np.testing.assert_allclose(kth_neighbour_distances(x, 2), [3, 2, 3, 6])
    blocks = list(distance_blocks(x, x[:2], max_elements=3))
    assert [start for start, _ in blocks] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.vstack([b for _, b in blocks]), cdist(x, x[:2]))
    with pytest.raises(ValueError, match="at least 4"):
        kth_neighbour_distances(x[:3], 3)
    with pytest.raises(ValueError, match="k must be"):
        kth_neighbour_distances(x, 0)
