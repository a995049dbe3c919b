"""Distribution metrics between real and generated feature sets: FID, KID, precision/recall,
density/coverage.

Every function takes features as arrays ``[N, D]`` (cast to float64), never images: which
extractor made them (Inception-v3 from a user file, the project's domain CNN, raw pixels) decides
what the numbers mean, so reports must print the extractor's name beside every value.
Pairwise distances are computed in row chunks so memory stays bounded for tens of thousands of
points.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.linalg

# Elements of one distance block (float64): 2**24 is 128 MiB.
_BLOCK_ELEMENTS = 2**24


def frechet_distance(
    feat_a: np.ndarray, feat_b: np.ndarray, method: str = "eigh", eps: float = 1e-6
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID on Inception features).

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with unbiased covariances.

    Only the trace of the root is needed, and ``tr (S_a S_b)^(1/2)`` is the sum of square roots
    of the eigenvalues of the symmetric ``S_a^(1/2) S_b S_a^(1/2)``. ``method="eigh"`` (default)
    computes it so, with two symmetric eigendecompositions: real by construction, defined for
    singular covariances (fewer points than dimensions), and several times faster than a general
    matrix root at D = 2048. ``method="sqrtm"`` is the classic route of common FID tools
    (``scipy.linalg.sqrtm`` of the product; ``eps * I`` added to both covariances when the root
    is not finite, round-off imaginary parts dropped); the two agree to round-off.
    """
    a, b = _features(feat_a, "feat_a", min_rows=2), _features(feat_b, "feat_b", min_rows=2)
    _same_dim(a, b)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    if method == "eigh":
        trace_root = _trace_sqrt_product_eigh(cov_a, cov_b)
    elif method == "sqrtm":
        trace_root = _trace_sqrt_product_sqrtm(cov_a, cov_b, eps)
    else:
        raise ValueError(f"unknown method {method!r}; use 'eigh' or 'sqrtm'")
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root
    return float(max(value, 0.0))


def kernel_inception_distance(
    feat_a: np.ndarray,
    feat_b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``, mean and std over subsets.

    Each subset draws ``min(subset_size, n_a, n_b)`` points from each set without replacement.
    Unbiased means it can be slightly negative when both sets come from one distribution.
    """
    a, b = _features(feat_a, "feat_a", min_rows=2), _features(feat_b, "feat_b", min_rows=2)
    _same_dim(a, b)
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"subset_size must be at least 2, got {subset_size}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / d + 1.0) ** 3
        k_yy = (y @ y.T / d + 1.0) ** 3
        k_xy = (x @ y.T / d + 1.0) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[i] = within - 2.0 * k_xy.mean()
    return float(values.mean()), float(values.std())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each point's ball has the radius of its k-th nearest neighbour in its own set. Precision is
    the share of fake points inside at least one real ball (fidelity); recall is the share of
    real points inside at least one fake ball (diversity).
    """
    r, f = _features(real, "real", min_rows=k + 1), _features(fake, "fake", min_rows=k + 1)
    _same_dim(r, f)
    radii_real = kth_neighbour_distances(r, k)
    radii_fake = kth_neighbour_distances(f, k)
    precision = np.mean(_inside_any_ball(f, r, radii_real))
    recall = np.mean(_inside_any_ball(r, f, radii_fake))
    return float(precision), float(recall)


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020), on real k-NN balls only.

    Density is the mean number of real balls holding a fake point, divided by k: about 1 when
    both sets share a distribution, below 1 for fakes in sparse or empty real regions, above 1
    for fakes clustered on real points (exact copies give (k + 1) / k). Coverage is the share of
    real points whose own ball holds at least one fake point (1 - 2^-k for fresh draws of one
    distribution).
    """
    r, f = _features(real, "real", min_rows=k + 1), _features(fake, "fake", min_rows=1)
    _same_dim(r, f)
    radii = kth_neighbour_distances(r, k)
    balls_holding = np.zeros(len(f))
    nearest_fake = np.full(len(r), np.inf)
    for start, block in distance_blocks(f, r):
        inside = block <= radii[None, :]
        balls_holding[start : start + len(block)] = inside.sum(axis=1)
        np.minimum(nearest_fake, block.min(axis=0), out=nearest_fake)
    density = balls_holding.sum() / (k * len(f))
    coverage = np.mean(nearest_fake <= radii)
    return float(density), float(coverage)


def kth_neighbour_distances(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest other row (itself excluded)."""
    x = _features(x, "x", min_rows=k + 1)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    out = np.empty(len(x))
    for start, block in distance_blocks(x, x):
        rows = np.arange(len(block))
        block[rows, start + rows] = np.inf
        out[start : start + len(block)] = np.partition(block, k - 1, axis=1)[:, k - 1]
    return out


def distance_blocks(
    a: np.ndarray, b: np.ndarray, max_elements: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Euclidean distances from rows of ``a`` to all rows of ``b``, as ``(start, block)`` chunks.

    ``block`` is ``[rows, len(b)]`` for ``a[start:start + rows]``, at most ``max_elements``
    entries (default 2**24, 128 MiB) unless one row is larger; each block is a fresh array the
    caller may modify.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sq_b = np.einsum("ij,ij->i", b, b)
    rows = max(1, (max_elements or _BLOCK_ELEMENTS) // max(1, len(b)))
    for start in range(0, len(a), rows):
        chunk = a[start : start + rows]
        sq = np.einsum("ij,ij->i", chunk, chunk)[:, None] + sq_b[None, :] - 2.0 * chunk @ b.T
        yield start, np.sqrt(np.maximum(sq, 0.0))


def _inside_any_ball(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    inside = np.zeros(len(points), dtype=bool)
    for start, block in distance_blocks(points, centres):
        inside[start : start + len(block)] = (block <= radii[None, :]).any(axis=1)
    return inside


def _trace_sqrt_product_eigh(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr (S_a S_b)^(1/2) via the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD)."""
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root_a @ cov_b @ root_a
    lam = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(cov_a: np.ndarray, cov_b: np.ndarray, eps: float) -> float:
    root = _sqrtm_product(cov_a, cov_b)
    if root is None:
        offset = eps * np.eye(cov_a.shape[0])
        root = _sqrtm_product(cov_a + offset, cov_b + offset)
        if root is None:
            raise FloatingPointError(
                "the matrix square root of the covariance product did not converge even with "
                f"eps={eps}; check the features for NaN/inf, raise eps or use method='eigh'"
            )
    return float(np.trace(root))


def _sqrtm_product(cov_a: np.ndarray, cov_b: np.ndarray) -> np.ndarray | None:
    """Real part of sqrtm(cov_a @ cov_b), or None when it is not finite or clearly complex."""
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        return None
    if np.iscomplexobj(root):
        # A PSD product has a real root; a large imaginary part means it is singular in practice.
        scale = max(1.0, float(np.abs(root.real).max()))
        if np.abs(root.imag).max() > 1e-3 * scale:
            return None
        root = root.real
    return root


def _features(x: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature array, got shape {arr.shape}")
    if len(arr) < min_rows:
        raise ValueError(f"{name} has {len(arr)} rows; this metric needs at least {min_rows}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature sets differ in dimension ({a.shape[1]} vs {b.shape[1]}); "
            "extract both with the same extractor"
        )
