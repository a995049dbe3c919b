"""The synthetic-only membership attack: copies of members are caught, independent draws are not."""

from __future__ import annotations

import numpy as np
import pytest

from fedspine.audit.membership import membership_audit


def _images(n: int, seed: int, size: int = 16) -> np.ndarray:
    """Random grey uint8 images: 4x4 blocks of noise upsampled, plus a little pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(128, 40, (n, 4, 4))
    smooth = np.kron(coarse, np.ones((size // 4, size // 4)))
    return np.clip(smooth + rng.normal(0, 8, (n, size, size)), 0, 255).astype(np.uint8)


MEMBERS = _images(200, seed=1)
NONMEMBERS = _images(200, seed=2)


def test_copies_of_the_members_are_found():
    result = membership_audit(MEMBERS.copy(), MEMBERS, NONMEMBERS)
    assert result.auc == pytest.approx(1.0)
    assert result.tpr_at_1pct_fpr == pytest.approx(1.0)
    assert result.mc_auc > 0.99 and result.mc_tpr_at_1pct_fpr > 0.9
    assert (result.n_members, result.n_nonmembers, result.n_synthetic) == (200, 200, 200)


def test_independent_synthetic_images_give_chance():
    result = membership_audit(_images(300, seed=3), MEMBERS, NONMEMBERS)
    assert abs(result.auc - 0.5) < 0.08
    assert abs(result.mc_auc - 0.5) < 0.08
    assert result.tpr_at_1pct_fpr < 0.08


def test_partial_copying_shows_in_tpr_at_low_fpr():
    # A quarter of the members copied, the rest of the synthetic set independent: those members
    # sit at distance 0 (TPR 0.25 at zero FPR), the others are at chance.
    synthetic = np.concatenate([MEMBERS[:50], _images(150, seed=4)])
    result = membership_audit(synthetic, MEMBERS, NONMEMBERS)
    assert 0.25 <= result.tpr_at_1pct_fpr < 0.33
    assert result.auc == pytest.approx(0.625, abs=0.05)


def test_float_and_uint8_inputs_agree_and_summary_is_json_ready():
    import json

    syn = _images(50, seed=5)
    a = membership_audit(syn, MEMBERS[:60], NONMEMBERS[:60])
    b = membership_audit(syn / 255.0, MEMBERS[:60, None] / 255.0, NONMEMBERS[:60] / 255.0)
    assert a.auc == pytest.approx(b.auc) and a.mc_radius == pytest.approx(b.mc_radius)
    summary = json.loads(json.dumps(a.summary()))
    assert summary["nearest"]["auc"] == pytest.approx(a.auc)
    assert summary["n_members"] == 60


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="one image size"):
        membership_audit(_images(5, 6, size=8), MEMBERS, NONMEMBERS)
    with pytest.raises(ValueError, match="non-member"):
        membership_audit(MEMBERS, MEMBERS, NONMEMBERS[:0])
    with pytest.raises(ValueError, match="FeatureExtractor"):
        membership_audit(MEMBERS, MEMBERS, NONMEMBERS, features="inception")


def test_summary_claims_no_dp_bound_on_the_population_attack():
    # DP bounds a test about one individual's inclusion, not this members-vs-held-out comparison:
    # the summary must not state a TPR ceiling from ε, and must call a low AUC evidence only.
    import fedspine.audit.membership as membership

    text = membership.membership_audit(MEMBERS[:20], MEMBERS[:20], NONMEMBERS[:20]).summary()
    interpretation = text["interpretation"]
    assert "e^ε" not in interpretation and "≤" not in interpretation
    assert "evidence, not proof" in interpretation
    assert "no formal bound" in interpretation
    for doc in (membership.__doc__, membership.MembershipResult.__doc__):
        assert "e^ε" not in doc
        assert "evidence, not proof" in doc
