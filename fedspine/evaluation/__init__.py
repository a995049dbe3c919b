"""Evaluation: classifier AUCs with patient-level intervals, distribution metrics between real and
synthetic features, and memorisation audits.

Feature extractors live in :mod:`fedspine.evaluation.features` (imports torch); everything
re-exported here needs only numpy and scipy at import time.

``fedspine evaluate`` is :func:`fedspine.reporting.evaluation_report.evaluate`; its run is
:mod:`~fedspine.evaluation.pipeline`, in steps: :mod:`~fedspine.evaluation.inputs` (reading and
refusals), :mod:`~fedspine.evaluation.arms` (TRTR/TSTR/mixed), :mod:`~fedspine.evaluation.trts`
(the independent judge), :mod:`~fedspine.evaluation.image_metrics` (KID, FID...) and
:mod:`~fedspine.evaluation.memorisation_audit`; what it writes is typed in
:mod:`~fedspine.evaluation.records` and rendered by ``fedspine.reporting``.
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
