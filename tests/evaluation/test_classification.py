"""AUC, patient-level bootstrap intervals, thresholds, one-vs-rest AUCs and ROC plots."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from fedspine.evaluation.classification import (
    _tie_bins,
    _weighted_auc,
    auc,
    bootstrap_auc_ci,
    choose_threshold,
    one_vs_rest_aucs,
    plot_rocs,
    roc_curve_points,
    sensitivity_specificity,
)


def test_auc_fixed_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    # positives 0.4, 0.8; negatives 0.4, 0.1: pairs (0.4 vs 0.4) tie = 1/2, others won: 3.5 / 4
    assert auc([1, 0, 1, 0], [0.4, 0.4, 0.8, 0.1]) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_sklearn_on_random_inputs_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    scores = rng.integers(0, 7, n) / 7.0 if seed % 2 else rng.normal(size=n)
    assert auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="positive and one negative"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only 0"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="equal length"):
        auc([0, 1, 0], [0.1, 0.2])


def test_weighted_auc_equals_auc_of_duplicated_images():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 10, 60).astype(float)
    w = rng.integers(0, 4, 60)
    w[np.flatnonzero(y == 1)[0]] = w[np.flatnonzero(y == 0)[0]] = 1
    order, bins = _tie_bins(s)
    weighted = _weighted_auc(y[order], bins, w[order].astype(float))
    assert weighted == pytest.approx(roc_auc_score(np.repeat(y, w), np.repeat(s, w)), abs=1e-12)


def _patient_data(n_patients=40, per_patient=5, seed=0):
    rng = np.random.default_rng(seed)
    y_patient = np.arange(n_patients) % 2
    s_patient = rng.normal(size=n_patients) + 1.0 * y_patient
    groups = np.repeat(np.arange(n_patients), per_patient)
    return y_patient[groups], s_patient[groups], groups


def test_bootstrap_equals_naive_patient_resampling():
    y, s, groups = _patient_data(n_patients=12, per_patient=3)
    point, lo, hi = bootstrap_auc_ci(y, s, groups, n_boot=200, seed=7)
    rng = np.random.default_rng(7)
    members = [np.flatnonzero(groups == g) for g in range(12)]
    naive = []
    for _ in range(200):
        idx = np.concatenate([members[g] for g in rng.integers(0, 12, 12)])
        if len(np.unique(y[idx])) == 2:
            naive.append(roc_auc_score(y[idx], s[idx]))
    assert point == pytest.approx(roc_auc_score(y, s))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(naive, [2.5, 97.5])), abs=1e-12)


def test_bootstrap_ci_contains_point_and_is_deterministic():
    y, s, groups = _patient_data()
    first = bootstrap_auc_ci(y, s, groups, n_boot=500, seed=1)
    assert first[1] <= first[0] <= first[2]
    assert bootstrap_auc_ci(y, s, groups, n_boot=500, seed=1) == first
    assert bootstrap_auc_ci(y, s, groups, n_boot=500, seed=2) != first


def test_patient_level_interval_is_wider_than_image_level_for_copied_images():
    # Every patient's 10 images are identical copies: there are 40 units of evidence, not 400.
    y, s, groups = _patient_data(n_patients=40, per_patient=10, seed=4)
    _, lo_p, hi_p = bootstrap_auc_ci(y, s, groups, n_boot=1000, seed=0)
    _, lo_i, hi_i = bootstrap_auc_ci(y, s, np.arange(len(y)), n_boot=1000, seed=0)
    assert hi_p - lo_p > 2.0 * (hi_i - lo_i)


def test_bootstrap_rejects_bad_input():
    y, s, groups = _patient_data(n_patients=4, per_patient=2)
    with pytest.raises(ValueError, match="one group per image"):
        bootstrap_auc_ci(y, s, groups[:-1])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_auc_ci(y, s, groups, alpha=1.5)
    with pytest.raises(ValueError, match="single class"):
        # Two single-class patients; with this seed all three resamples draw patient "b" twice.
        bootstrap_auc_ci([0, 1], [0.1, 0.9], ["a", "b"], n_boot=3, seed=4)


def test_roc_curve_points_match_sklearn():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 20, 200) / 20.0
    fpr, tpr, thr = roc_curve_points(y, s)
    ref_fpr, ref_tpr, ref_thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thr[1:], ref_thr[1:])
    assert thr[0] == np.inf


def test_youden_threshold_and_rates():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9])
    t = choose_threshold(y, s)
    # s >= 0.5: sensitivity 4/4, specificity 3/4; s >= 0.7: 3/4 and 4/4. Both give J = 0.75;
    # ties go to the higher threshold.
    assert t == 0.7
    assert sensitivity_specificity(y, s, t) == (0.75, 1.0)
    assert sensitivity_specificity(y, s, 0.5) == (1.0, 0.75)
    assert choose_threshold(y, s, rule="sensitivity", target=1.0) == 0.5
    assert choose_threshold(y, s, rule="specificity", target=1.0) == 0.7


def test_threshold_rules_and_rates_reject_bad_input():
    y, s = [0, 1, 0, 1], [0.1, 0.9, 0.3, 0.4]
    with pytest.raises(ValueError, match="unknown rule"):
        choose_threshold(y, s, rule="f1")
    with pytest.raises(ValueError, match="target"):
        choose_threshold(y, s, rule="sensitivity")
    sens, spec = sensitivity_specificity([0, 0], [0.2, 0.7], 0.5)
    assert np.isnan(sens) and spec == 0.5


def test_one_vs_rest_aucs_labels_and_multilabel():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    labels[:3] = [0, 1, 2]
    probs = rng.random((120, 4))
    out = one_vs_rest_aucs(labels, probs, class_names=["a", "b", "c", "d"])
    for c, name in enumerate("abc"):
        assert out["per_class"][name] == pytest.approx(roc_auc_score(labels == c, probs[:, c]))
    assert out["skipped"] == {"d": "no positive example in y"}
    assert out["mean"] == pytest.approx(np.mean([out["per_class"][n] for n in "abc"]))

    multi = (rng.random((50, 2)) > 0.5).astype(int)
    multi[:, 1] = 1
    multi[:2, 0] = [0, 1]
    out = one_vs_rest_aucs(multi, rng.random((50, 2)))
    assert set(out["per_class"]) == {"0"} and out["skipped"] == {"1": "no negative example in y"}


def test_one_vs_rest_aucs_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        one_vs_rest_aucs([0, 1], np.array([0.2, 0.3]))
    with pytest.raises(ValueError, match="lie in"):
        one_vs_rest_aucs([0, 3], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class names"):
        one_vs_rest_aucs([0, 1], np.zeros((2, 2)), class_names=["x"])


def test_plot_rocs_writes_png(tmp_path):
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.2, 0.8, 0.4, 0.6, 0.3, 0.1])
    fpr, tpr, _ = roc_curve_points(y, s)
    path = plot_rocs(
        {"real": (fpr, tpr, auc(y, s), (0.5, 0.9)), "synthetic": (fpr, tpr, 0.7, None)},
        tmp_path / "plots" / "roc.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one"):
        plot_rocs({}, tmp_path / "empty.png")
