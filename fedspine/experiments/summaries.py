"""What ``reproduce`` keeps of each arm's outputs, and how those records are read.

An arm's record (``arm.json``) holds a summary of its evaluation, its privacy and its DP
ablation. :func:`summarise_evaluation` is the one place an evaluation's ``report.json`` is read,
through the evaluation's typed records (``fedspine.evaluation.records``); the table, the paper's
error notes and the renderer read only the summary it returns. :func:`seed_summary` gathers the
replicates of each arm across training seeds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedspine.evaluation.records import ArmRecord, EvaluationRecord, MetricRow
from fedspine.experiments.plan import CEILING_ARM, ArmPlan
from fedspine.fileio import EVAL_REPORT_MD
from fedspine.privacy.report import PrivacyReportError, build_report
from fedspine.training.dp_ablation import AblationError, read_ablation_summary

_GAN_METRICS = ("extractor", "fid", "kid", "precision", "recall", "density", "coverage")
SEED_METRICS = ("tstr_auc", "signal_retained", "trtr_auc", "mixed_auc")
_REPLICATE_SUFFIX = re.compile(r"-seed\d+$")


def summarise_evaluation(path: Path) -> dict[str, Any]:
    """The numbers the table needs from an evaluation's report.json at ``path``.

    The ``utility`` block (signal retained per arm, with intervals) is kept as the evaluation
    wrote it; it is None in reports written before it existed.
    """
    raw = json.loads(path.read_text())
    report = EvaluationRecord.from_json(raw)
    arms = report.arms or {}
    fidelity = report.class_fidelity
    results = (report.generative.results if report.generative else None) or []
    primary = _first_row(results, "synthetic vs real")
    reference = _first_row(results, "real val vs real")
    memorisation = report.memorisation.to_json() if report.memorisation else {}
    return {
        "task": report.task,
        "class_names": report.class_names,
        "trtr": _arm_summary(arms.get("TRTR")),
        "tstr": _arm_summary(arms.get("TSTR")),
        "mixed": _arm_summary(arms.get("mixed")),
        "dp_classifier": _arm_summary(arms.get(CEILING_ARM)),
        "ratios": report.ratios.to_json() if report.ratios else None,
        "trts": fidelity.auc if fidelity else None,
        "trts_judge": fidelity.classifier if fidelity else None,
        "classifier_budget": report.classifier_budget.to_json()
        if report.classifier_budget
        else None,
        "trts_scores": [
            [o.mean_score_positive, o.mean_score_negative]
            for o in ((fidelity.per_output if fidelity else None) or {}).values()
            if o.auc is not None
        ],
        "gan_metrics": _metric_subset(primary) if primary else None,
        "gan_metrics_real_reference": _metric_subset(reference) if reference else None,
        "memorisation": {k: v for k, v in memorisation.items() if isinstance(v, int | float | str)},
        "test_images": report.test_set.images if report.test_set else None,
        "utility": raw.get("utility"),
        "report": f"{path.parent.name}/{EVAL_REPORT_MD}",
    }


def summarise_privacy(run: Path) -> dict[str, Any]:
    """ε and δ of the run from its privacy.json (recomputed from its mechanisms by the report)."""
    try:
        report = build_report(run)
    except PrivacyReportError as err:
        return {"private": False, "error": str(err)}
    sites = report.get("sites", {})
    mechanisms = [m for s in sites.values() for m in s.get("mechanisms", [])]
    return {
        "private": report["private"],
        "not_private_reasons": report.get("not_private_reasons", []),
        "epsilon": report.get("overall_epsilon"),
        "epsilon_recomputed": next((s.get("epsilon_recomputed") for s in sites.values()), None),
        "delta": report.get("delta"),
        "accountant": report.get("accountant"),
        "mechanisms": mechanisms,
        "components": report.get("components", {}),
    }


def summarise_ablation(run: Path) -> dict[str, Any] | None:
    """RUN/ablation.json of an ablation arm (scheme, mechanism, ε), None for the others."""
    try:
        return read_ablation_summary(run)
    except (AblationError, ValueError) as err:
        return {"error": str(err), "private": False}


def done(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The evaluation summary of a completed arm; None for one not run or failed."""
    result = result or {}
    return result.get("evaluation") if result.get("status") == "done" else None


def utility(ev: dict[str, Any], arm: str) -> dict[str, Any]:
    """One arm of the evaluation's utility block; empty for reports written before it."""
    return ((ev.get("utility") or {}).get("arms") or {}).get(arm) or {}


def status(result: dict[str, Any]) -> str:
    """Why an arm has no numbers: not run (with the reason), failed, or its status."""
    if not result:
        return "not run"
    if result.get("status") == "not run":
        return result.get("reason", "not run")
    if result.get("status") == "failed":
        return f"failed: {result.get('reason', '')}"
    return result.get("status", "?")


def is_replicate(folder: str) -> bool:
    """Whether an arm folder is a seed replicate (``NAME-seedS``) rather than replicate 0."""
    return bool(_REPLICATE_SUFFIX.search(folder))


def seed_summary(
    arms: Sequence[ArmPlan], results: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per arm: its replicates' seeds and folders, and each of :data:`SEED_METRICS` across them.

    The patient-level intervals resample the test set of one trained model; how far a result
    moves when the training seed changes is only seen here.
    """
    groups: dict[str, list[ArmPlan]] = {}
    for arm in arms:
        groups.setdefault(arm.name, []).append(arm)
    summary: dict[str, dict[str, Any]] = {}
    for name, replicates in groups.items():
        replicates.sort(key=lambda a: a.replicate)
        entry: dict[str, Any] = {
            "replicates": len(replicates),
            "seeds": [a.seed for a in replicates],
            "folders": [a.folder for a in replicates],
        }
        for metric in SEED_METRICS:
            found = [(a.seed, _seed_metric(results.get(a.folder), metric)) for a in replicates]
            entry[metric] = _spread_stats([(s, v) for s, v in found if v is not None])
        summary[name] = entry
    return summary


def _seed_metric(result: dict[str, Any] | None, metric: str) -> float | None:
    """One replicate's value of a :data:`SEED_METRICS` entry; None when it has none."""
    ev = done(result)
    if ev is None:
        return None
    if metric == "signal_retained":
        return utility(ev, "TSTR").get("signal_retained")
    arm = ev.get(metric.removesuffix("_auc"))
    return arm.get("auc") if arm else None


def _spread_stats(pairs: list[tuple[int, float]]) -> dict[str, Any]:
    """n, the seeds and their values, mean, sample SD (None under two values), min and max."""
    values = [float(v) for _, v in pairs]
    n = len(values)
    return {
        "n": n,
        "seeds": [s for s, _ in pairs],
        "values": values,
        "mean": float(np.mean(values)) if n else None,
        "sd": float(np.std(values, ddof=1)) if n > 1 else None,
        "min": min(values) if n else None,
        "max": max(values) if n else None,
    }


def _arm_summary(arm: ArmRecord | None) -> dict[str, Any] | None:
    if arm is None:
        return None
    return {
        "auc": arm.auc,
        "ci": arm.ci,
        "sensitivity": arm.sensitivity,
        "specificity": arm.specificity,
        "best_epoch": (arm.history or {}).get("best_epoch"),
        "test_images": arm.test_images,
        "skipped_outputs": arm.skipped_outputs or [],
    }


def _first_row(results: list[MetricRow], compared: str) -> MetricRow | None:
    """The first learned-feature row comparing ``compared`` (pixel rows are a sanity check)."""
    for row in results:
        if (row.compared or "").startswith(compared) and not (row.extractor or "").startswith(
            "pixel"
        ):
            return row
    return None


def _metric_subset(row: MetricRow) -> dict[str, Any]:
    return {k: getattr(row, k) for k in _GAN_METRICS}


def plain(value: Any) -> Any:
    """A JSON-ready copy: dict keys as strings, tuples as lists, paths as text, numpy scalars
    as Python numbers (NaN is kept: the JSON files have always written it)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
