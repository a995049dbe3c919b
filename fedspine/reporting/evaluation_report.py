"""`fedspine evaluate`: how useful and how private is a synthetic dataset, in one report.

Three classifiers are trained and tested on the same real test split:

- TRTR: trained on the real training split (the reference);
- TSTR: trained on the synthetic images only;
- mixed: the real training split plus N synthetic images per class.

Every arm selects its epoch and its operating threshold on the same real validation split
(carved by patient from the training data), so the arms are comparable, and every arm gets the
same optimizer steps (TRTR's epoch length sets the steps between validation checks). That split
is private real data; it is used for selection only, never for training, and the test split is
used for nothing but the final numbers. Test AUCs carry 95 % intervals from a patient-level
bootstrap, and the report leads with the signal retained, (TSTR − 0.5) / (TRTR − 0.5), whose
interval comes from a paired bootstrap: the same resampled patients score every arm.

Beside the classifiers: KID, FID, precision/recall and density/coverage of the synthetic images
and, as the floor, of real validation images, against one real reference, at equal size and
class mix. Each number is printed with the feature extractor that made it (a user-supplied
Inception-v3, else a domain CNN trained on half of the real training patients, the other half
being the reference, plus raw pixels as a trivial baseline). TRTS is judged by a classifier the
generator never trained against. A memorisation audit shows the closest synthetic/training
pairs. The report folder is written atomically (temporary folder, then rename).

This module is the public entry: :func:`evaluate` runs :func:`~fedspine.evaluation.pipeline.
run_evaluation` (the computing, in the evaluation layer, which writes report.json as an
:class:`~fedspine.evaluation.records.EvaluationRecord`) with the Markdown renderer of
:mod:`fedspine.reporting.markdown` for report.md, staged in the same folder. It composes both,
so it sits in the reporting layer.
"""

from __future__ import annotations

import os
from typing import Any

from fedspine.evaluation.config import EvaluateConfig, ProgressFn
from fedspine.evaluation.pipeline import run_evaluation
from fedspine.fileio import EVAL_REPORT_MD
from fedspine.reporting.markdown import render_evaluation


def evaluate(
    synthetic: str | os.PathLike,
    train: str | os.PathLike,
    test: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EvaluateConfig | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    trtr_cache: str | os.PathLike | None = None,
    compare: dict[str, str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Evaluate ``synthetic`` against real data and write the report folder ``out``
    (report.json, report.md, config.json, the figures); returns what report.json holds.

    See :func:`~fedspine.evaluation.pipeline.run_evaluation` for the arguments.
    """
    record = run_evaluation(
        synthetic,
        train,
        test,
        out,
        cfg,
        progress=progress,
        overwrite=overwrite,
        trtr_cache=trtr_cache,
        renderers={EVAL_REPORT_MD: render_evaluation},
        compare=compare,
    )
    return record.to_json()
