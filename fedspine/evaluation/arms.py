"""The classifier arms (TRTR, TSTR, mixed): their data, one step budget, training and scores.

Every arm is selected on the same real validation split and trains the same optimizer steps;
test AUCs carry patient-level bootstrap intervals, and signal retained comes from a paired
bootstrap (the same resampled patients score every arm). TRTR may come from a cache shared by
several evaluations of the same real data and settings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedspine import __version__
from fedspine.data.prepared import PreparedDataset
from fedspine.evaluation.classification import (
    CHANCE_AUC,
    auc,
    bootstrap_auc_ci,
    choose_threshold,
    one_vs_rest_aucs,
    paired_bootstrap_aucs,
    paired_utility,
    roc_curve_points,
    sensitivity_specificity,
    utility_verdict,
)
from fedspine.evaluation.config import (
    SYNTHETIC_SPLIT,
    WORK_DIR,
    EvaluateConfig,
    EvaluateError,
    ProgressFn,
)
from fedspine.evaluation.records import json_ready
from fedspine.fileio import (
    CLASSIFIER_WEIGHTS,
    EVAL_TRTR,
    EVAL_TRTR_SCORES,
    file_sha256,
    write_json_atomic,
)
from fedspine.models.classifier import (
    ClassifierCheckpointError,
    ClassifierConfig,
    load_classifier,
    predict_proba,
    save_classifier,
)
from fedspine.training.classifier_trainer import (
    ClassifierTrainConfig,
    load_images,
    targets,
    train_classifier,
)

CLASSIFIERS_DIR = "classifiers"
"""Under the work folder: one ``ARM.pt`` per trained arm."""
TRTR_WEIGHTS = "TRTR.pt"

if TYPE_CHECKING:
    import torch


def arm_datasets(
    real_train: PreparedDataset,
    syn_rows: PreparedDataset,
    syn_images: np.ndarray,
    cfg: EvaluateConfig,
    task: str,
) -> dict[str, tuple[PreparedDataset, dict[str, Any]]]:
    """Training data of each arm; synthetic rows carry the split name 'synthetic'."""
    syn_all = np.arange(len(syn_rows))
    arms = {
        "TRTR": (real_train, _composition_of(len(real_train), 0)),
        "TSTR": (
            _combine(real_train, None, syn_rows, syn_images, syn_all, task),
            _composition_of(0, len(syn_all)),
        ),
    }
    if cfg.mix_per_class != 0:
        chosen = _per_class(syn_rows.labels, cfg.mix_per_class, cfg.seed)
        arms["mixed"] = (
            _combine(real_train, real_train, syn_rows, syn_images, chosen, task),
            _composition_of(len(real_train), len(chosen)),
        )
    return arms


def _composition_of(n_real: int, n_synthetic: int) -> dict[str, Any]:
    splits = (["train"] if n_real else []) + ([SYNTHETIC_SPLIT] if n_synthetic else [])
    return {"real_train": n_real, "synthetic": n_synthetic, "splits": splits}


def _per_class(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Row indices: up to ``n`` random rows of every class (all rows when ``n`` is None)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for k in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == k)
        if n is not None and len(rows) > n:
            rows = np.sort(rng.choice(rows, n, replace=False))
        chosen.append(rows)
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def _combine(
    schema: PreparedDataset,
    real: PreparedDataset | None,
    syn: PreparedDataset,
    syn_images: np.ndarray,
    syn_idx: np.ndarray,
    task: str,
) -> PreparedDataset:
    """Real rows (optional) followed by synthetic rows, in ``schema``'s finding columns."""
    n_find = len(schema.finding_names)
    if task == "multilabel" or list(syn.finding_names) == list(schema.finding_names):
        syn_findings = syn.findings[syn_idx]
    else:  # findings are not used by the binary/multiclass tasks
        syn_findings = np.zeros((len(syn_idx), n_find), dtype=np.uint8)
    parts = {
        "images": [syn_images[syn_idx]],
        "files": [[f"synthetic:{syn.files[i]}" for i in syn_idx]],
        "patient_ids": [np.array([f"synthetic:{syn.patient_ids[i]}" for i in syn_idx], object)],
        "splits": [np.full(len(syn_idx), SYNTHETIC_SPLIT, dtype=object)],
        "labels": [syn.labels[syn_idx]],
        "findings": [syn_findings],
    }
    if real is not None:
        parts["images"].insert(0, np.asarray(real.images, dtype=np.uint8))
        parts["files"].insert(0, list(real.files))
        parts["patient_ids"].insert(0, real.patient_ids)
        parts["splits"].insert(0, real.splits)
        parts["labels"].insert(0, real.labels)
        parts["findings"].insert(0, real.findings)
    return PreparedDataset(
        root=schema.root,
        images=np.concatenate(parts["images"]),
        files=[f for chunk in parts["files"] for f in chunk],
        patient_ids=np.concatenate(parts["patient_ids"]),
        splits=np.concatenate(parts["splits"]),
        labels=np.concatenate(parts["labels"]).astype(np.int64),
        findings=np.concatenate(parts["findings"]).reshape(-1, n_find),
        finding_names=list(schema.finding_names),
        class_names=list(schema.class_names),
        manifest={"content_hash": ""},
    )


def classifier_config(
    cfg: EvaluateConfig, task: str, size: int, budget: dict[str, Any], seed: int | None = None
) -> Any:
    """Every arm's classifier settings: the same steps between checks, the same checks."""

    return ClassifierTrainConfig(
        task=task,
        epochs=cfg.epochs,
        batch=cfg.batch,
        lr=cfg.lr,
        patience=cfg.patience,
        seed=cfg.seed if seed is None else seed,
        device=cfg.device,
        max_train_images=cfg.max_train_images,
        input_size=size,
        steps_per_epoch=budget["steps_per_check"],
        model=ClassifierConfig(
            arch=cfg.arch, norm=cfg.norm, input_size=size, weights_path=cfg.weights
        ),
    )


def step_budget(real_train: PreparedDataset, task: str, cfg: EvaluateConfig) -> dict[str, Any]:
    """One optimizer-step budget for every arm, set by TRTR's epoch length.

    Matching epochs would give an arm with more rows more steps (and more patience in steps);
    matching steps lets the arms differ only in what they learn from.
    """

    _, idx, _ = targets(real_train, task)
    rows = len(idx) if cfg.max_train_images is None else min(len(idx), cfg.max_train_images)
    per_check = max(1, math.ceil(rows / cfg.batch))
    return {
        "batch": cfg.batch,
        "steps_per_check": per_check,
        "max_checks": cfg.epochs,
        "max_steps": per_check * cfg.epochs,
        "patience_checks": cfg.patience,
        "patience_steps": per_check * cfg.patience,
        "rule": (
            f"every arm: at most {per_check * cfg.epochs} optimizer steps of {cfg.batch} images, "
            f"validated every {per_check} steps (one pass over TRTR's {rows} training rows), "
            f"stopping after {per_check * cfg.patience} steps without a better validation AUC"
        ),
    }


def run_arm(
    arm: str,
    data: PreparedDataset,
    val: PreparedDataset,
    test: PreparedDataset,
    task: str,
    cfg: EvaluateConfig,
    budget: dict[str, Any],
    tmp: Path,
    notify: ProgressFn,
    seed: int | None = None,
) -> tuple[dict[str, Any], np.ndarray, torch.nn.Module]:
    """Train one arm, select on ``val``, score on ``test``; its record, test scores and model."""

    size = cfg.input_size or data.resolution
    train_cfg = classifier_config(cfg, task, size, budget, seed)
    try:
        model, history = train_classifier(
            data, val, train_cfg, progress=lambda event: notify({"arm": arm, **event})
        )
    except ValueError as err:
        raise EvaluateError(f"{arm} classifier: {err}") from None
    save_classifier(
        tmp / WORK_DIR / CLASSIFIERS_DIR / f"{arm}.pt",
        model,
        model.classifier_config,
        {"arm": arm, "task": task, "output_names": history["output_names"]},
    )
    names = history["output_names"]
    record, p_test, groups = _select_and_score(model, size, val, test, task, names, cfg, arm)
    record.update(
        {
            "output_names": names,
            "history": history,
            "seed": train_cfg.seed,
            "test_images": len(groups),
            "test_patients": len(set(groups.tolist())),
            "classifier_file": f"{WORK_DIR}/{CLASSIFIERS_DIR}/{arm}.pt",
        }
    )
    return record, p_test, model


def score_trained_classifier(
    name: str,
    path: Path,
    real: PreparedDataset,
    val: PreparedDataset,
    test: PreparedDataset,
    task: str,
    reference: dict[str, Any],
    cfg: EvaluateConfig,
) -> tuple[dict[str, Any], np.ndarray]:
    """Score a classifier trained elsewhere (e.g. ``classifier train --dp``, the DP ceiling a
    DP synthetic set is compared against) exactly as the arms: threshold on ``val``, AUC [CI]
    on ``test``. It must have been trained on this real data's 'train' split for this task."""
    try:
        model, _, meta = load_classifier(path)
    except (ClassifierCheckpointError, OSError) as err:
        raise EvaluateError(f"--compare {name}: {err}") from None
    trained_on = meta.get("training_data") or {}
    # A DP classifier carries no content hash (a fingerprint of private data, and it may be
    # released): then it must name this very folder and its train split's size.
    if "content_hash" in trained_on:
        same_data = trained_on["content_hash"] == real.content_hash
    else:
        folder = Path(str(trained_on.get("path", "")))
        same_data = bool(trained_on.get("path")) and folder.resolve() == Path(real.root).resolve()
    if not same_data or trained_on.get("split") != "train":
        raise EvaluateError(
            f"--compare {name}: {path} was not trained on the 'train' split of this --train "
            "dataset (its metadata names other data), so its test AUC could include patients "
            "it trained on; train it with `fedspine classifier train` on the same dataset"
        )
    names = list(reference["output_names"])
    if meta.get("task") != task or list(meta.get("output_names") or []) != names:
        raise EvaluateError(
            f"--compare {name}: {path} predicts {meta.get('task')} {meta.get('output_names')}, "
            f"this evaluation {task} {names}"
        )
    size = int(meta.get("input_size") or model.classifier_config.input_size)
    record, p_test, groups = _select_and_score(model, size, val, test, task, names, cfg, name)
    dp = meta.get("dp") or None
    record.update(
        {
            "output_names": names,
            "history": {},
            "test_images": len(groups),
            "test_patients": len(set(groups.tolist())),
            "train_data": {"real_train": trained_on.get("rows"), "synthetic": 0},
            "trained_elsewhere": {
                "classifier": str(path),
                "sha256": file_sha256(path / CLASSIFIER_WEIGHTS if path.is_dir() else path),
                "recipe": meta.get("recipe"),
                "dp": (
                    {k: dp.get(k) for k in ("epsilon", "delta", "accountant", "unit") if k in dp}
                    if isinstance(dp, dict)
                    else None
                ),
            },
        }
    )
    return record, p_test


def cached_trtr(
    cache: Path,
    data: PreparedDataset,
    real: PreparedDataset,
    test_source: PreparedDataset,
    val: PreparedDataset,
    test: PreparedDataset,
    task: str,
    cfg: EvaluateConfig,
    budget: dict[str, Any],
    tmp: Path,
    notify: ProgressFn,
) -> tuple[dict[str, Any], np.ndarray, torch.nn.Module]:
    """TRTR from ``cache`` when it was trained on the same data with the same settings, else
    trained here and stored there (atomically), so several evaluations share one reference."""

    train_cfg = classifier_config(cfg, task, cfg.input_size or data.resolution, budget)
    settings = {k: v for k, v in train_cfg.to_dict().items() if k != "device"}
    key = json_ready(
        {
            "fedspine_version": __version__,
            "train": real.content_hash,
            "test": test_source.content_hash,
            "task": task,
            "classifier": settings,
            "bootstrap": cfg.bootstrap,
        }
    )
    stored_file = cache / EVAL_TRTR
    target = tmp / WORK_DIR / CLASSIFIERS_DIR / TRTR_WEIGHTS
    if stored_file.is_file():
        stored = json.loads(stored_file.read_text())
        if stored.get("key") != key:
            raise EvaluateError(
                f"{cache}: holds a TRTR classifier of other data or settings; pass another "
                "TRTR cache folder or remove this one"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache / TRTR_WEIGHTS, target)
        model, _, _ = load_classifier(target)
        model.eval()
        record = dict(stored["record"], reused_from=str(cache))
        notify({"arm": "TRTR", "event": "reused", "from": str(cache)})
        return record, np.load(cache / EVAL_TRTR_SCORES), model
    if cache.exists():
        raise EvaluateError(f"{cache}: exists but holds no trtr.json; remove it or pass another")
    record, p_test, model = run_arm("TRTR", data, val, test, task, cfg, budget, tmp, notify)
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{cache.name}.partial-", dir=cache.parent))
    try:
        shutil.copyfile(target, work / TRTR_WEIGHTS)
        np.save(work / EVAL_TRTR_SCORES, p_test)
        write_json_atomic(work / EVAL_TRTR, {"key": key, "record": json_ready(record)})
        os.replace(work, cache)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return record, p_test, model


def paired_arm_utility(
    y_test: np.ndarray,
    scores: dict[str, np.ndarray],
    groups: np.ndarray,
    arms: dict[str, dict[str, Any]],
    cfg: EvaluateConfig,
) -> dict[str, Any]:
    """Signal retained and AUC difference of each arm against TRTR, paired over patients."""
    names = arms["TRTR"]["output_names"]
    boot = paired_bootstrap_aucs(y_test, scores, groups, cfg.bootstrap, cfg.seed)

    def points(arm: str) -> np.ndarray:
        return np.array(
            [np.nan if (v := arms[arm]["per_output"][n]["auc"]) is None else v for n in names],
            dtype=np.float64,
        )

    reference = points("TRTR")
    out: dict[str, Any] = {}
    for arm in arms:
        if arm == "TRTR":
            continue
        arm_points = points(arm)
        result = paired_utility(arm_points, reference, boot[arm], boot["TRTR"])
        result["verdict"] = utility_verdict(result, arm)
        if len(names) > 1:
            per_output = {}
            for k, name in enumerate(names):
                if np.isnan(reference[k]) or np.isnan(arm_points[k]):
                    continue
                one = paired_utility(
                    arm_points[k : k + 1],
                    reference[k : k + 1],
                    boot[arm][:, k : k + 1],
                    boot["TRTR"][:, k : k + 1],
                )
                one["verdict"] = utility_verdict(one, arm)
                per_output[name] = one
            result["per_output"] = per_output
        out[arm] = result
    return {
        "reference": "TRTR",
        "chance": CHANCE_AUC,
        "bootstrap": cfg.bootstrap,
        "method": (
            "paired patient-level percentile bootstrap: each resample draws test patients with "
            "replacement once and scores every arm on the same draw; signal retained is "
            "(AUC − 0.5) / (TRTR AUC − 0.5), 0 at chance and 1 at the real data's level"
            + ("; multi-output values are macro means over the outputs" if len(names) > 1 else "")
        ),
        "arms": out,
    }


def _select_and_score(
    model: torch.nn.Module,
    size: int,
    val: PreparedDataset,
    test: PreparedDataset,
    task: str,
    names: Sequence[str],
    cfg: EvaluateConfig,
    arm: str,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """A classifier's record (threshold from ``val``, AUC [CI] on ``test``), its test scores and
    the test rows' patients: the one way every arm is scored."""
    y_val, idx_val, _ = targets(val, task)
    y_test, idx_test, _ = targets(test, task)
    p_val = predict_proba(model, load_images(val, idx_val, size), batch=128)
    p_test = predict_proba(model, load_images(test, idx_test, size), batch=128)
    groups = test.patient_ids[idx_test]
    return _score(y_val, p_val, y_test, p_test, groups, names, cfg, arm), p_test, groups


def _score(
    y_val: np.ndarray,
    p_val: np.ndarray,
    y_test: np.ndarray,
    p_test: np.ndarray,
    groups: np.ndarray,
    names: Sequence[str],
    cfg: EvaluateConfig,
    arm: str,
) -> dict[str, Any]:
    """Per-output AUC [CI], Youden threshold from val and test sensitivity/specificity."""
    per_output: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(names):
        per_output[name] = _binary_metrics(
            y_val[:, k].astype(np.int64),
            p_val[:, k],
            y_test[:, k].astype(np.int64),
            p_test[:, k],
            groups,
            cfg,
        )
    if len(names) == 1:
        head = per_output[names[0]]
        if head["auc"] is None:
            raise EvaluateError(
                f"{arm}: the test split holds a single class ({head['reason']}); a test AUC "
                "needs both"
            )
        return {
            "auc": head["auc"],
            "ci": head["ci"],
            "sensitivity": head["sensitivity"],
            "specificity": head["specificity"],
            "threshold": head["threshold"],
            "per_output": per_output,
        }
    ovr = one_vs_rest_aucs(y_test.astype(np.int64), p_test, list(names))
    if not ovr["per_class"]:
        raise EvaluateError(f"{arm}: no output has both classes in the test split; AUC undefined")
    ci = _bootstrap_mean_auc(y_test, p_test, groups, cfg.bootstrap, cfg.seed)
    sens = [o["sensitivity"] for o in per_output.values() if o["sensitivity"] is not None]
    spec = [o["specificity"] for o in per_output.values() if o["specificity"] is not None]
    return {
        "auc": ovr["mean"],
        "ci": ci,
        "sensitivity": float(np.mean(sens)) if sens else None,
        "specificity": float(np.mean(spec)) if spec else None,
        "threshold": None,
        "per_output": per_output,
        "skipped_outputs": ovr["skipped"],
    }


def _binary_metrics(
    y_val: np.ndarray,
    s_val: np.ndarray,
    y_test: np.ndarray,
    s_test: np.ndarray,
    groups: np.ndarray,
    cfg: EvaluateConfig,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "auc": None,
        "ci": None,
        "threshold": None,
        "sensitivity": None,
        "specificity": None,
        "test_positives": int(y_test.sum()),
        "test_negatives": int(len(y_test) - y_test.sum()),
        "reason": None,
    }
    if 0 < y_test.sum() < len(y_test):
        try:
            value, lo, hi = bootstrap_auc_ci(y_test, s_test, groups, cfg.bootstrap, seed=cfg.seed)
            out["ci"] = [lo, hi]
        except ValueError as err:
            value = auc(y_test, s_test)
            out["reason"] = f"no interval: {err}"
        out["auc"] = value
    else:
        out["reason"] = "the test split has no " + ("positive" if y_test.sum() == 0 else "negative")
    if 0 < y_val.sum() < len(y_val):
        threshold = choose_threshold(y_val, s_val, "youden")
        out["threshold"] = threshold
        sens, spec = sensitivity_specificity(y_test, s_test, threshold)
        out["sensitivity"] = None if math.isnan(sens) else sens
        out["specificity"] = None if math.isnan(spec) else spec
    return out


def _bootstrap_mean_auc(
    y: np.ndarray, probs: np.ndarray, groups: np.ndarray, n_boot: int, seed: int
) -> list[float] | None:
    """95 % percentile interval of the macro-mean AUC, resampling patients."""
    scored = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    _, group_of = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group_of.max()) + 1
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        rows = np.repeat(np.arange(len(y)), counts[group_of])
        values = [
            auc(y[rows, k].astype(np.int64), probs[rows, k])
            for k in scored
            if 0 < y[rows, k].sum() < len(rows)
        ]
        if len(values) == len(scored):
            means.append(np.mean(values))
    if not means:
        return None
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def roc_points(y_test: np.ndarray, p_test: np.ndarray, record: dict[str, Any]) -> tuple:
    """ROC points of one arm: the binary curve, or the micro average over scored outputs."""
    if y_test.shape[1] == 1:
        fpr, tpr, _ = roc_curve_points(y_test[:, 0].astype(np.int64), p_test[:, 0])
        ci = tuple(record["ci"]) if record["ci"] else None
        return fpr, tpr, record["auc"], ci
    scored = [k for k in range(y_test.shape[1]) if 0 < y_test[:, k].sum() < len(y_test)]
    y_flat = y_test[:, scored].ravel().astype(np.int64)
    s_flat = p_test[:, scored].ravel()
    fpr, tpr, _ = roc_curve_points(y_flat, s_flat)
    return fpr, tpr, auc(y_flat, s_flat), None


def auc_ratios(arms: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    base = arms["TRTR"]["auc"]

    def ratio(arm: str) -> float | None:
        if arm not in arms or not base:
            return None
        return arms[arm]["auc"] / base

    return {"tstr_over_trtr": ratio("TSTR"), "mixed_over_trtr": ratio("mixed")}
