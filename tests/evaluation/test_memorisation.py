"""Nearest distances and the memorisation audit: copies are flagged, fresh draws are not."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from fedspine.evaluation import generative
from fedspine.evaluation.features import PixelExtractor
from fedspine.evaluation.memorisation import (
    closest_pairs_png,
    memorisation_audit,
    nearest_distances,
)


def _images(n: int, seed: int, size: int = 16) -> np.ndarray:
    """Smooth random grey images in [0, 1]: 4x4 noise upsampled, plus a little pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.5, 0.15, (n, 4, 4))
    smooth = np.kron(coarse, np.ones((size // 4, size // 4)))
    return np.clip(smooth + rng.normal(0, 0.03, (n, size, size)), 0, 1)[:, None].astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_distances_equal_brute_force_with_tiny_chunks(monkeypatch, metric):
    rng = np.random.default_rng(0)
    query, reference = rng.normal(size=(37, 5)), rng.normal(size=(23, 5))
    monkeypatch.setattr(generative, "_BLOCK_ELEMENTS", 50)
    dist, index = nearest_distances(query, reference, metric=metric)
    full = cdist(query, reference, metric="euclidean" if metric == "l2" else "cosine")
    np.testing.assert_array_equal(index, full.argmin(axis=1))
    np.testing.assert_allclose(dist, full.min(axis=1), atol=1e-12)


def test_nearest_distances_are_exactly_zero_for_copies_and_check_input():
    reference = np.random.default_rng(1).normal(size=(20, 64)) * 1e3
    dist, index = nearest_distances(reference[[4, 7, 7]], reference)
    assert dist.tolist() == [0.0, 0.0, 0.0] and index.tolist() == [4, 7, 7]
    with pytest.raises(ValueError, match="dimensions"):
        nearest_distances(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="unknown metric"):
        nearest_distances(reference, reference, metric="l1")
    with pytest.raises(ValueError, match="zero row"):
        nearest_distances(np.zeros((1, 64)), reference, metric="cosine")
    with pytest.raises(ValueError, match="non-empty"):
        nearest_distances(np.zeros((0, 64)), reference)


def test_copies_of_training_images_are_flagged():
    train, heldout = _images(300, seed=1), _images(200, seed=2)
    synthetic = train[:100].copy()
    result = memorisation_audit(synthetic, train, heldout)
    assert result.syn_to_train.max() == 0.0
    np.testing.assert_array_equal(result.syn_to_train_index, np.arange(100))
    assert result.threshold_p1 > 0
    summary = result.summary()
    assert summary["share_below_p1"] == 1.0 and summary["share_below_p5"] == 1.0
    assert summary["median_ratio_train_over_heldout"] == 0.0
    # Train is subsampled to the held-out size here, so only some originals remain: still > 0.5.
    assert summary["share_closer_to_train"] > 0.7
    assert summary["extractor"] == "raw pixels (flattened, full resolution)"
    json.dumps(summary)


def test_fresh_draws_of_the_same_distribution_are_not_flagged():
    train, heldout = _images(300, seed=1), _images(200, seed=2)
    synthetic = _images(200, seed=3)
    summary = memorisation_audit(synthetic, train, heldout).summary()
    assert summary["share_below_p1"] < 0.05
    assert summary["share_below_p5"] < 0.15
    assert summary["share_closer_to_train"] == pytest.approx(0.5, abs=0.12)
    assert summary["median_syn_to_train"] == pytest.approx(
        summary["median_heldout_to_train"], rel=0.1
    )


def test_a_few_copies_among_fresh_draws_are_found_with_an_extractor():
    train, heldout = _images(300, seed=1), _images(200, seed=2)
    synthetic = np.concatenate([_images(180, seed=3), train[50:70]])
    result = memorisation_audit(synthetic, train, heldout, extractor=PixelExtractor(8))
    assert result.extractor.startswith("pixels 8x8")
    flagged = result.flagged(1)
    assert set(range(180, 200)) <= set(flagged.tolist())
    assert len(flagged) <= 20 + 10
    assert np.all(np.diff(result.syn_to_train[flagged]) >= 0)
    with pytest.raises(ValueError, match="percentile"):
        result.flagged(10)


def test_audit_rejects_bad_input():
    train = _images(10, seed=1)
    with pytest.raises(ValueError, match="held-out"):
        memorisation_audit(train, train, train[:1])
    with pytest.raises(ValueError, match="'pixels'"):
        memorisation_audit(train, train, train, extractor="inception")
    with pytest.raises(ValueError, match="one image size"):
        memorisation_audit(_images(4, seed=2, size=8), train, train)


def test_closest_pairs_png(tmp_path):
    train, heldout = _images(40, seed=1), _images(20, seed=2)
    synthetic = np.concatenate([_images(10, seed=3), train[:3]])
    result = memorisation_audit(synthetic, train, heldout)
    path = closest_pairs_png(
        tmp_path / "audit" / "pairs.png",
        synthetic,
        train,
        result.syn_to_train_index,
        k=4,
        dist=result.syn_to_train,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert closest_pairs_png(
        tmp_path / "p2.png", synthetic, train, result.syn_to_train_index
    ).is_file()
    with pytest.raises(ValueError, match="nearest indices for"):
        closest_pairs_png(tmp_path / "x.png", synthetic, train, result.syn_to_train_index[:-1])
    with pytest.raises(ValueError, match="must lie in"):
        closest_pairs_png(tmp_path / "x.png", synthetic, train, np.full(len(synthetic), 99))
