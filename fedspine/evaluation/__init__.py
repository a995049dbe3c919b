"""Evaluation: classifier AUCs with patient-level intervals, distribution metrics between real and
synthetic features, and memorisation audits.

Feature extractors live in :mod:`fedspine.evaluation.features` (imports torch); everything
re-exported here needs only numpy and scipy at import time.
"""

from fedspine.evaluation.classification import (
    auc,
    bootstrap_auc_ci,
    choose_threshold,
    one_vs_rest_aucs,
    plot_rocs,
    roc_curve_points,
    sensitivity_specificity,
)
from fedspine.evaluation.generative import (
    density_coverage,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from fedspine.evaluation.memorisation import (
    MemorisationResult,
    closest_pairs_png,
    memorisation_audit,
    nearest_distances,
)

__all__ = [
    "MemorisationResult",
    "auc",
    "bootstrap_auc_ci",
    "choose_threshold",
    "closest_pairs_png",
    "density_coverage",
    "frechet_distance",
    "kernel_inception_distance",
    "memorisation_audit",
    "nearest_distances",
    "one_vs_rest_aucs",
    "plot_rocs",
    "precision_recall",
    "roc_curve_points",
    "sensitivity_specificity",
]
