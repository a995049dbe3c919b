"""Classifier metrics for TSTR / TRTR: AUC with patient-level confidence intervals, thresholds.

Why patient-level: several radiographs of one patient are not independent evidence. A bootstrap
that resamples images treats them as such and gives intervals that are too narrow; resampling
patients (and taking all of each drawn patient's images) does not.

Conventions: ``y`` is 0/1 (1 = positive, e.g. abnormal), ``scores`` are higher-is-more-positive,
and an image is called positive when ``score >= threshold``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RocCurve = tuple[np.ndarray, np.ndarray, float, "tuple[float, float] | None"]


def auc(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic, ties counted one half.

    Equals the probability that a random positive scores above a random negative.
    """
    y, s = _binary_inputs(y_true, scores)
    order, bins = _tie_bins(s)
    return _weighted_auc(y[order], bins, np.ones(len(y)))


def bootstrap_auc_ci(
    y_true: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    groups: Sequence | np.ndarray,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """AUC with a percentile bootstrap CI that resamples groups (patients), not images.

    Each resample draws as many patients as there are, with replacement, and takes all images of
    every drawn patient (a patient drawn twice counts twice). Resamples holding a single class
    are skipped. Returns ``(auc, lo, hi)`` with the AUC on the full data.
    """
    y, s = _binary_inputs(y_true, scores)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups has shape {g.shape}, expected one group per image {y.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    _, group_of = np.unique(g, return_inverse=True)
    n_groups = int(group_of.max()) + 1
    order, bins = _tie_bins(s)
    y_sorted, group_sorted = y[order], group_of[order]
    point = _weighted_auc(y_sorted, bins, np.ones(len(y)))

    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        drawn = rng.integers(0, n_groups, size=n_groups)
        # A resample with duplicates is the original data weighted by draw counts: no re-sorting.
        weights = np.bincount(drawn, minlength=n_groups)[group_sorted].astype(np.float64)
        value = _weighted_auc(y_sorted, bins, weights)
        if not np.isnan(value):
            aucs.append(value)
    if not aucs:
        raise ValueError(
            "every bootstrap resample held a single class; too few patients of one class "
            "for a patient-level interval"
        )
    lo, hi = np.percentile(aucs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


def choose_threshold(
    y_val: Sequence[int] | np.ndarray,
    s_val: Sequence[float] | np.ndarray,
    rule: str = "youden",
    target: float | None = None,
) -> float:
    """Pick an operating threshold on the VALIDATION split (never on test).

    Rules: ``"youden"`` maximises sensitivity + specificity - 1 (ties go to the higher
    threshold); ``"sensitivity"`` / ``"specificity"`` take the threshold with the best other
    rate among those reaching ``target`` for the named one.
    """
    fpr, tpr, thresholds = roc_curve_points(y_val, s_val)
    if rule == "youden":
        if target is not None:
            raise ValueError("rule='youden' takes no target")
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if rule not in ("sensitivity", "specificity"):
        raise ValueError(f"unknown rule {rule!r}; use 'youden', 'sensitivity' or 'specificity'")
    if target is None or not 0.0 <= target <= 1.0:
        raise ValueError(f"rule={rule!r} needs a target in [0, 1], got {target}")
    if rule == "sensitivity":
        # tpr grows along the curve: the first point reaching the target has the lowest fpr.
        return float(thresholds[int(np.flatnonzero(tpr >= target)[0])])
    ok = np.flatnonzero(1.0 - fpr >= target)
    return float(thresholds[ok[-1]])


def sensitivity_specificity(
    y: Sequence[int] | np.ndarray, s: Sequence[float] | np.ndarray, threshold: float
) -> tuple[float, float]:
    """Sensitivity and specificity when ``s >= threshold`` is called positive.

    A rate whose class is absent from ``y`` is NaN (it is undefined, not zero).
    """
    y_arr, s_arr = _binary_inputs(y, s, need_both=False)
    pred = s_arr >= threshold
    pos, neg = y_arr == 1, y_arr == 0
    sens = float(pred[pos].mean()) if pos.any() else float("nan")
    spec = float((~pred[neg]).mean()) if neg.any() else float("nan")
    return sens, spec


def one_vs_rest_aucs(
    y: Sequence | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> dict:
    """One-vs-rest AUC per class for multi-class labels ``[N]`` or multi-label 0/1 ``[N, C]``.

    Returns ``{"per_class": {name: auc}, "mean": macro mean over scored classes,
    "skipped": {name: reason}}``. A class with no positive (or no negative) example in ``y``
    has no AUC; it is listed under ``skipped`` and left out of the mean.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {p.shape}")
    n, n_classes = p.shape
    y_arr = np.asarray(y)
    if y_arr.ndim == 1:
        if y_arr.shape[0] != n:
            raise ValueError(f"{y_arr.shape[0]} labels for {n} rows of probs")
        if y_arr.size and (y_arr.min() < 0 or y_arr.max() >= n_classes):
            raise ValueError(f"labels must lie in [0, {n_classes - 1}] for {n_classes} columns")
        onehot = y_arr[:, None] == np.arange(n_classes)[None, :]
    elif y_arr.shape == p.shape:
        if not np.isin(y_arr, (0, 1)).all():
            raise ValueError("a multi-label target must hold only 0 and 1")
        onehot = y_arr.astype(bool)
    else:
        raise ValueError(f"y has shape {y_arr.shape}; expected [{n}] labels or [{n}, {n_classes}]")
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} columns of probs")

    per_class: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for c, name in enumerate(names):
        positives = int(onehot[:, c].sum())
        if positives == 0:
            skipped[name] = "no positive example in y"
        elif positives == n:
            skipped[name] = "no negative example in y"
        else:
            per_class[name] = auc(onehot[:, c].astype(np.int64), p[:, c])
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"per_class": per_class, "mean": mean, "skipped": skipped}


def roc_curve_points(
    y: Sequence[int] | np.ndarray, s: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` at every distinct score, highest threshold first.

    The first point is ``(0, 0)`` at threshold +inf; point i is what ``s >= thresholds[i]`` gives.
    """
    y_arr, s_arr = _binary_inputs(y, s)
    order = np.argsort(-s_arr, kind="mergesort")
    s_desc, y_desc = s_arr[order], y_arr[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_desc) != 0), len(s_desc) - 1]
    tp = np.cumsum(y_desc)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    thresholds = np.r_[np.inf, s_desc[last_of_tie]]
    return fpr, tpr, thresholds


def plot_rocs(
    curves: Mapping[str, RocCurve],
    path: str | os.PathLike,
    title: str = "ROC on the real test split",
) -> Path:
    """Save ROC curves ``{name: (fpr, tpr, auc, ci or None)}`` to a PNG, AUCs in the legend."""
    if not curves:
        raise ValueError("plot_rocs needs at least one curve")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: only when plotting
    from matplotlib.figure import Figure  # heavy: only when plotting

    fig = Figure(figsize=(5.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    for name, (fpr, tpr, value, ci) in curves.items():
        label = f"{name}: AUC {value:.3f}"
        if ci is not None:
            label += f" ({ci[0]:.3f}-{ci[1]:.3f})"
        ax.plot(fpr, tpr, linewidth=1.5, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _binary_inputs(y_true, scores, need_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold only 0 (negative) and 1 (positive)")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    y = y.astype(np.int64)
    if need_both and (y.min(initial=1) == 1 or y.max(initial=0) == 0):
        raise ValueError("y needs at least one positive and one negative example")
    return y, s


def _tie_bins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending order of the scores and, per sorted position, the index of its tie group."""
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    bins = np.r_[0, np.cumsum(np.diff(s_sorted) != 0)]
    return order, bins


def _weighted_auc(y_sorted: np.ndarray, bins: np.ndarray, weights: np.ndarray) -> float:
    """Mann-Whitney AUC with per-image weights (integer weights = duplicated images).

    Each positive beats the negative weight in lower tie groups and half of its own group's.
    NaN when one class has zero total weight.
    """
    n_bins = int(bins[-1]) + 1
    pos = np.bincount(bins, weights=weights * y_sorted, minlength=n_bins)
    neg = np.bincount(bins, weights=weights * (1 - y_sorted), minlength=n_bins)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (total_pos * total_neg))


CHANCE_AUC = 0.5


def signal_retained(auc_arm: float, auc_reference: float) -> float | None:
    """(AUC − 0.5) / (reference AUC − 0.5): 0 is chance, 1 is as good as the real data.

    Unlike the ratio AUC / reference AUC it does not credit an arm for the 0.5 every
    classifier gets for free. None when the reference itself is at or below chance.
    """
    if auc_reference <= CHANCE_AUC:
        return None
    return (auc_arm - CHANCE_AUC) / (auc_reference - CHANCE_AUC)


def paired_bootstrap_aucs(
    y: np.ndarray,
    scores: Mapping[str, np.ndarray],
    groups: Sequence | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-resample AUCs of several classifiers scored on the same test rows, patients paired.

    ``y`` is 0/1 ``[N, K]`` (one column per output) and ``scores[name]`` is ``[N, K]``. Every
    resample draws patients with replacement once and weighs every classifier's rows by the same
    draw, so differences and ratios between classifiers get intervals that account for their
    shared test set. Returns ``{name: [n_boot, K]}``; a resample holding one class of an output
    gives NaN for that output.
    """
    y_arr = np.asarray(y)
    if y_arr.ndim == 1:
        y_arr = y_arr[:, None]
    g = np.asarray(groups)
    if g.shape[0] != y_arr.shape[0]:
        raise ValueError(f"{g.shape[0]} groups for {y_arr.shape[0]} rows")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    _, group_of = np.unique(g, return_inverse=True)
    n_groups = int(group_of.max()) + 1
    prepared = {}
    for name, s in scores.items():
        s_arr = np.asarray(s, dtype=np.float64)
        if s_arr.ndim == 1:
            s_arr = s_arr[:, None]
        if s_arr.shape != y_arr.shape:
            raise ValueError(f"scores of {name!r} have shape {s_arr.shape}, expected {y_arr.shape}")
        columns = []
        for k in range(y_arr.shape[1]):
            yk, sk = _binary_inputs(y_arr[:, k], s_arr[:, k], need_both=False)
            order, bins = _tie_bins(sk)
            columns.append((yk[order], bins, group_of[order]))
        prepared[name] = columns
    rng = np.random.default_rng(seed)
    out = {name: np.full((n_boot, y_arr.shape[1]), np.nan) for name in scores}
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        counts = counts.astype(np.float64)
        for name, columns in prepared.items():
            for k, (y_sorted, bins, g_sorted) in enumerate(columns):
                out[name][b, k] = _weighted_auc(y_sorted, bins, counts[g_sorted])
    return out


def paired_utility(
    aucs: np.ndarray,
    reference_aucs: np.ndarray,
    boot: np.ndarray,
    reference_boot: np.ndarray,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Signal retained and AUC difference of one arm against the reference, with intervals.

    ``aucs`` / ``reference_aucs`` are the point AUCs per output ``[K]`` and ``boot`` /
    ``reference_boot`` the paired resamples ``[B, K]`` of :func:`paired_bootstrap_aucs`. The
    macro value (K > 1) is the mean over outputs scored in every resample. A resample where the
    reference is at or below chance has no signal retained; when more than ``alpha / 2`` of
    them lack one the interval is unbounded and reported as None. When the reference's own
    interval contains chance, signal retained is None: its denominator is indistinguishable
    from zero.
    """
    aucs, reference_aucs = np.atleast_1d(aucs), np.atleast_1d(reference_aucs)
    scored = ~(np.isnan(aucs) | np.isnan(reference_aucs))
    if not scored.any():
        raise ValueError("no output has an AUC for both classifiers")
    arm_b = np.nanmean(boot[:, scored], axis=1) if scored.sum() > 1 else boot[:, scored][:, 0]
    ref_b = (
        np.nanmean(reference_boot[:, scored], axis=1)
        if scored.sum() > 1
        else reference_boot[:, scored][:, 0]
    )
    point, ref_point = float(aucs[scored].mean()), float(reference_aucs[scored].mean())
    ok = ~(np.isnan(arm_b) | np.isnan(ref_b))
    arm_b, ref_b = arm_b[ok], ref_b[ok]
    lo_q, hi_q = 100 * alpha / 2, 100 * (1 - alpha / 2)

    def interval(values: np.ndarray) -> list[float] | None:
        if not len(values):
            return None
        lo, hi = np.percentile(values, [lo_q, hi_q])
        return [float(lo), float(hi)]

    arm_ci = interval(arm_b)
    defined = ref_b > CHANCE_AUC
    retained_ci = None
    if len(ref_b) and (1 - defined.mean()) <= alpha / 2:
        # An undefined resample has the reference at chance: the ratio there is unbounded, so
        # it counts as +inf or -inf by the arm's side of chance (never dropped, which would
        # narrow the interval).
        values = np.where(
            defined,
            (arm_b - CHANCE_AUC) / np.where(defined, ref_b - CHANCE_AUC, 1.0),
            np.where(arm_b >= CHANCE_AUC, np.inf, -np.inf),
        )
        retained_ci = interval(values)
        if retained_ci is not None and not all(np.isfinite(retained_ci)):
            retained_ci = None
    contains = arm_ci is None or arm_ci[0] <= CHANCE_AUC <= arm_ci[1]
    ref_ci = interval(ref_b)
    ref_contains = ref_ci is None or ref_ci[0] <= CHANCE_AUC <= ref_ci[1]
    # With the real-data classifier's own interval reaching chance the denominator cannot be told
    # from zero: any ratio (0.09, 23.5, ...) would be noise read as a result.
    retained = None if ref_contains else signal_retained(point, ref_point)
    return {
        "auc": point,
        "ci": arm_ci,
        "ci_contains_chance": bool(contains),
        "reference_auc": ref_point,
        "reference_ci": ref_ci,
        "reference_contains_chance": bool(ref_contains),
        "signal_retained": retained,
        "signal_retained_ci": None if ref_contains else retained_ci,
        "difference": point - ref_point,
        "difference_ci": interval(arm_b - ref_b),
        "ratio": point / ref_point if ref_point > 0 else None,
        "resamples": int(len(arm_b)),
    }


def utility_verdict(result: Mapping[str, Any], arm: str = "TSTR") -> str:
    """One sentence a reader cannot misread: is there signal, and how much of the real data's."""
    retained = result.get("signal_retained")
    ci = result.get("signal_retained_ci")
    amount = (
        "signal retained undefined (TRTR's own 95 % interval contains chance: the real data "
        "teach this classifier nothing measurable on this test set)"
        if retained is None
        else f"signal retained {retained:.2f}"
        + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else " [interval unbounded]")
    )
    if result.get("ci_contains_chance"):
        return f"no evidence of signal: {arm}'s 95 % interval contains chance (AUC 0.5); {amount}"
    if result["auc"] < CHANCE_AUC:
        return f"worse than chance: {arm}'s 95 % interval lies below AUC 0.5; {amount}"
    return f"signal above chance: {arm}'s 95 % interval excludes AUC 0.5; {amount}"
