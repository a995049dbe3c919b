"""The HTML page's evaluation parts: samples, classifiers and signal retained, image metrics.

Each reads the :class:`EvaluationRecord` (and the figures' bytes) from :class:`ReportInputs`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from fedspine.evaluation.config import EvaluateConfig
from fedspine.evaluation.records import EvaluationRecord
from fedspine.fileio import EVAL_REPORT_JSON
from fedspine.formatting import auc_ci, finite, num
from fedspine.reporting.html_inputs import EVAL_PNGS, ReportInputs
from fedspine.reporting.html_parts import esc, figure, na, table
from fedspine.reporting.tables import ARM_HEAD, arm_cells, arms_of, per_output_auc

# `fedspine evaluate` options, in the order its --help lists them (EvaluateConfig field names).
EVALUATE_OPTIONS = (
    "arch",
    "task",
    "epochs",
    "batch",
    "patience",
    "input_size",
    "weights",
    "mix_per_class",
    "inception",
    "domain_epochs",
    "bootstrap",
    "heldout",
    "max_train_images",
    "max_metric_images",
    "seed",
    "device",
    "threads",
)


def samples_section(inp: ReportInputs) -> str:
    """Per-class images: the evaluation's grid, else the release's, else the run's last one."""
    parts = []
    if "samples" in inp.eval_pngs:
        parts.append(
            figure(
                inp.eval_pngs["samples"],
                "Per class: a row of synthetic images above a row of real training images "
                f"({inp.evaluation.name}/{EVAL_PNGS['samples']}). The real rows are private.",
                pixelated=True,
            )
        )
    elif inp.eval_report is not None:
        parts.append(na(f"{inp.evaluation.name} has no readable {EVAL_PNGS['samples']}"))
    if inp.release_grids:
        parts.append("<h3>Released synthetic images, per class</h3>")
        for name, png, shown, total in inp.release_grids:
            parts.append(
                figure(png, f"synthetic: {name} ({shown} of {total} in the release)", True)
            )
    if not parts and inp.run_samples is not None:
        name, png = inp.run_samples
        parts.append(
            figure(png, f"The run's G_ema at its last snapshot, one row per class ({name})", True)
        )
    return "\n".join(parts) or na(
        "no evaluation (samples.png), release (synthetic images) or run samples were given"
    )


def classifiers_section(inp: ReportInputs) -> str:
    """The arms on the real test split, the ratios, TRTS, per-output AUCs and the ROC figure."""
    report = inp.eval_report
    if report is None:
        return na("no evaluation given; `fedspine evaluate` writes the classifier results")
    arms = arms_of(report)
    rows = []
    for name, arm in arms.items():
        history = arm.history or {}
        rows.append(
            arm_cells(name, arm)
            + [
                f"step {history.get('best_steps', '?')} of {history.get('steps', '?')} "
                f"(val AUC {num(history.get('best_val_auc'))})"
            ]
        )
    ratios, test_set, selection = report.ratios, report.test_set, report.selection
    budget = report.classifier_budget
    parts = [
        utility_html(report),
        f"<p>Task: {esc(report.task)} over classes {esc(', '.join(map(str, report.class_names or [])))}. "
        "TRTR trains on real images, TSTR on synthetic images only, mixed on both; all are "
        f"tested on the same real test split ({esc(_or_unknown(test_set, 'images'))} images of "
        f"{esc(_or_unknown(test_set, 'patients'))} patients), with 95 % intervals from a "
        "patient-level bootstrap.</p>",
        table([*ARM_HEAD, "selected checkpoint"], rows),
        f"<p>Training budget, the same for every arm: {esc(budget.rule)}.</p>"
        if budget is not None and budget.rule
        else "",
        table(
            ["ratio (credits chance; see signal retained above)", "value"],
            [
                ["TSTR / TRTR (AUC)", num(ratios.tstr_over_trtr if ratios else None)],
                ["mixed / TRTR (AUC)", num(ratios.mixed_over_trtr if ratios else None)],
            ],
        ),
        f"<p>Every arm chose its epoch and threshold on the real validation split "
        f"({esc(_or_unknown(selection, 'images'))} images of "
        f"{esc(_or_unknown(selection, 'patients'))} patients); sensitivity and specificity are "
        "at the threshold maximising Youden's J there.</p>",
    ]
    parts += _class_fidelity(report)
    shared = test_set.patients_shared_with_train_or_val if test_set else None
    if shared:
        parts.append(
            f'<p class="bad">{esc(shared)} test patient '
            "id(s) also appear in the training or validation split: the AUCs may be optimistic.</p>"
        )
    names = report.output_names or []
    if len(names) > 1:
        per = [[out] + [per_output_auc(arm, out) for arm in arms.values()] for out in names]
        parts.append("<h3>Per output (one-vs-rest)</h3>")
        parts.append(table(["output", *arms], per))
    if "roc" in inp.eval_pngs:
        parts.append(
            figure(
                inp.eval_pngs["roc"],
                f"ROC curves of TRTR, TSTR and mixed on the real test split "
                f"({inp.evaluation.name}/{EVAL_PNGS['roc']})",
            )
        )
    else:
        parts.append(na(f"ROC curves: {inp.evaluation.name} has no readable {EVAL_PNGS['roc']}"))
    return "\n".join(parts)


def _or_unknown(record: Any, name: str) -> Any:
    value = None if record is None else getattr(record, name)
    return "?" if value is None else value


def _class_fidelity(report: EvaluationRecord) -> list[str]:
    trts = report.class_fidelity
    if trts is None:
        return []
    parts = [
        "<p>Does each synthetic class look like its real class? TRTS (train real, test "
        f"synthetic): {esc(trts.classifier or 'the TRTR classifier')} scored on the "
        f"{esc(_or_unknown(trts, 'images'))} synthetic images against the class each was "
        f"generated for: AUC <b>{auc_ci(trts.auc, trts.ci)}</b> "
        "(0.5: the generator's classes are indistinguishable to a classifier that knows the "
        "real ones).</p>"
    ]
    independence = trts.judge.independence if trts.judge else None
    if independence:
        parts.append(
            "<p>The judge must be a classifier the generator never trained against; "
            f"independence: {esc(independence)}.</p>"
        )
    scores = [
        f"{esc(name)}: mean score {num(o.mean_score_positive)} on images generated "
        f"as {esc(name)}, {num(o.mean_score_negative)} on the others"
        for name, o in (trts.per_output or {}).items()
        if o.auc is not None
    ]
    if scores:
        parts.append(
            "<p>"
            + "; ".join(scores)
            + ". Scores all near 0 or all near 1 mean the synthetic images lie outside what "
            "the classifier has seen, and the AUC then ranks tiny differences.</p>"
        )
    return parts


def utility_html(report: EvaluationRecord) -> str:
    """Signal retained per arm with its paired interval, and whether TSTR beats chance."""
    utility = (report.utility.arms if report.utility else None) or {}
    if not utility:
        return na("signal retained: this evaluation predates it; rerun `fedspine evaluate`")
    rows = []
    for arm, u in utility.items():
        ci = u.signal_retained_ci
        rows.append(
            [
                arm,
                num(u.signal_retained)
                + (f" [{num(ci[0])}, {num(ci[1])}]" if ci else " [unbounded]"),
                auc_ci(u.auc, u.ci),
                num(u.reference_auc),
                esc(u.verdict or ""),
            ]
        )
    return (
        "<p>Signal retained = (AUC − 0.5) / (TRTR AUC − 0.5): 0 = no more than chance, 1 = as "
        "much as the real training data; paired patient-level bootstrap intervals.</p>"
        + table(["arm", "signal retained [95 % CI]", "AUC [95 % CI]", "TRTR AUC", "verdict"], rows)
    )


def fidelity_section(inp: ReportInputs) -> str:
    """KID, FID, precision/recall and density/coverage, each with its extractor."""
    report = inp.eval_report
    if report is None:
        return na("no evaluation given; `fedspine evaluate` computes FID, KID and the rest")
    gen = report.generative
    results = (gen.results if gen else None) or []
    if not results:
        return na(f"{inp.evaluation.name}/{EVAL_REPORT_JSON} holds no distribution metrics")
    rows = [
        [
            r.extractor or "?",
            r.compared or "?",
            f"{num(_times(r.kid, 1e3))} ± {num(_times(r.kid_std, 1e3))}",
            num(r.fid, 4),
            num(r.precision),
            num(r.recall),
            num(r.density),
            num(r.coverage),
        ]
        for r in results
    ]
    reference = gen.reference or f"{'?' if gen.n_real is None else gen.n_real} real images"
    return "\n".join(
        [
            f"<p>Reference: {esc(reference)}. "
            + (f"The {esc(gen.equal_n)}. " if gen.equal_n else "")
            + f"Precision/recall and density/coverage with k = {esc(_or_unknown(gen, 'k'))}. "
            "Each number holds only for the feature extractor named in its row. The floor rows "
            "are what a second real sample reaches at the same size and class mix; KID leads "
            "because it is unbiased, while FID grows at small n.</p>",
            table(
                [
                    "extractor",
                    "compared",
                    "KID × 10³ (± std)",
                    "FID",
                    "precision",
                    "recall",
                    "density",
                    "coverage",
                ],
                rows,
            ),
            "<p>Extractors:</p><ul>"
            + "".join(f"<li>{esc(d)}</li>" for d in gen.extractors or [])
            + "</ul>",
        ]
    )


def evaluate_command(
    report: EvaluationRecord, cfg: dict[str, Any], evaluation: Path
) -> tuple[str, str]:
    """The `fedspine evaluate` line that reproduces ``report``, and settings it cannot carry."""
    inputs = dict(report.inputs.items()) if report.inputs else {}
    words = ["fedspine", "evaluate"]
    for option, key in (("--synthetic", "synthetic"), ("--train", "train"), ("--test", "test")):
        info = inputs.get(key)
        path = info.path if info is not None and info.path is not None else "?"
        words += [option, str(path)]
    words += ["--out", str(evaluation)]
    for key in EVALUATE_OPTIONS:
        value = cfg.get(key)
        if value is not None:
            words += ["--" + key.replace("_", "-"), str(value)]
    defaults = EvaluateConfig().to_dict()
    outside = [
        f"{key} = {cfg[key]!r}"
        for key in defaults
        if key not in EVALUATE_OPTIONS and key in cfg and cfg[key] != defaults[key]
    ]
    return shlex.join(words), ", ".join(outside)


def _times(value: Any, factor: float) -> float | None:
    number = finite(value)
    return None if number is None else number * factor
