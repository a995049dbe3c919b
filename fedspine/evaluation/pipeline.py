"""One evaluation, start to finish: check the inputs, score the arms, measure, audit, write.

``run_evaluation`` computes everything ``fedspine evaluate`` reports and writes the folder
atomically (a staged folder, then a rename): report.json (an :class:`EvaluationRecord`),
config.json, the figures, and whatever ``renderers`` turn the record into (report.md, given by
:func:`fedspine.reporting.evaluation_report.evaluate`). The steps live in their own modules: inputs,
arms, trts, image_metrics and memorisation_audit.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedspine import __version__
from fedspine.data.prepared import PreparedDataset
from fedspine.evaluation.arms import (
    arm_datasets,
    auc_ratios,
    cached_trtr,
    paired_arm_utility,
    roc_points,
    run_arm,
    score_trained_classifier,
    step_budget,
)
from fedspine.evaluation.classification import plot_rocs
from fedspine.evaluation.config import (
    SYNTHETIC_PREPARED,
    WORK_DIR,
    EvaluateConfig,
    EvaluateError,
    ProgressFn,
)
from fedspine.evaluation.image_metrics import build_extractors, generative_metrics, metric_samples
from fedspine.evaluation.inputs import (
    at_resolution,
    check_generator_patients,
    check_real,
    check_synthetic_rows,
    check_synthetic_source,
    dataset_info,
    load_real,
    load_synthetic,
    same_folder,
    shared_patients,
)
from fedspine.evaluation.memorisation_audit import audit_memorisation, samples_png
from fedspine.evaluation.records import EvaluationRecord, json_ready, write_evaluation
from fedspine.evaluation.trts import class_fidelity, trts_judge
from fedspine.fileio import (
    EVAL_CLOSEST_PAIRS,
    EVAL_CONFIG,
    EVAL_REPORT_JSON,
    EVAL_REPORT_MD,
    EVAL_ROC,
    EVAL_SAMPLES,
    publish_folder,
    write_json_atomic,
    write_text_atomic,
)
from fedspine.training.classifier_trainer import resolve_device, resolve_task, targets

Renderer = Callable[[EvaluationRecord], str]
"""Turns the record into a document written beside report.json (file name -> renderer)."""


def run_evaluation(
    synthetic: str | os.PathLike,
    train: str | os.PathLike,
    test: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EvaluateConfig | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    trtr_cache: str | os.PathLike | None = None,
    renderers: Mapping[str, Renderer] | None = None,
    compare: Mapping[str, str | os.PathLike] | None = None,
) -> EvaluationRecord:
    """Evaluate ``synthetic`` against real data and write the report folder ``out``.

    ``synthetic`` is a prepared dataset or a folder written by ``fedspine generate``
    (labels.csv + classes.txt), which is ingested at the real data's resolution into
    ``out/intermediate/synthetic_prepared``. ``train`` is a prepared dataset: its 'train' split
    trains TRTR and its 'val' split selects every arm. ``test`` is a prepared dataset whose
    'test' split is the test set (it may be the same folder as ``train``). ``progress`` receives
    ``{"stage": ..., "event": "start"|"end", ...}`` per stage and the classifier trainer's
    batch/epoch events with ``"arm"`` added. ``trtr_cache`` is a folder that keeps the TRTR
    classifier and its test scores, so evaluations of several synthetic sets against the same
    real data and settings share one reference. ``compare`` names classifiers trained
    elsewhere on the same 'train' split (e.g. a DP-SGD classifier at the synthetic set's ε: the
    ceiling to compare a DP synthetic set against); each is scored as one more arm, with its
    signal retained against TRTR on the same resampled patients. Returns the record.
    """
    cfg = cfg or EvaluateConfig()
    cfg.validate()
    notify = progress or (lambda event: None)
    out = Path(out)
    if out.exists() and not overwrite:
        raise EvaluateError(f"{out} already exists; choose another --out or pass --overwrite")
    train_path, test_path, syn_path = Path(train), Path(test), Path(synthetic)
    real = load_real(train_path, "--train")
    test_source = real if same_folder(train_path, test_path) else load_real(test_path, "--test")
    real_train = real.select("train", labelled=False)
    real_val = real.select("val", labelled=False)
    test_rows = test_source.select("test", labelled=False)
    check_real(real, train_path, test_source, test_path, real_train, real_val, test_rows)
    check_synthetic_source(syn_path, real)
    check_generator_patients(syn_path, real, train_path, test_source, test_path, test_rows)

    try:
        task = resolve_task(cfg.task, real_train)
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise EvaluateError(f"{train_path}: {err}") from None

    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        notify({"stage": "synthetic", "event": "start", "description": "reading synthetic data"})
        syn, syn_info = load_synthetic(syn_path, real, tmp / WORK_DIR / SYNTHETIC_PREPARED, cfg)
        syn_info["ingested_to"] = (
            f"{WORK_DIR}/{SYNTHETIC_PREPARED}" if syn_info["kind"] == "generated folder" else None
        )
        syn_rows = syn.select(["train", "val"], labelled=False)
        syn_images = at_resolution(syn_rows.images, real.resolution)
        check_synthetic_rows(syn_rows, syn_path, task, real)
        notify({"stage": "synthetic", "event": "end", "images": len(syn_rows)})

        budget = step_budget(real_train, task, cfg)
        arm_data = arm_datasets(real_train, syn_rows, syn_images, cfg, task)
        y_test, idx_test, _ = targets(test_rows, task)
        groups = test_rows.patient_ids[idx_test]
        arms, curves, scores, trtr_model = _train_arms(
            arm_data,
            y_test,
            real,
            test_source,
            real_val,
            test_rows,
            task,
            cfg,
            budget,
            tmp,
            notify,
            trtr_cache,
        )
        for name, path in (compare or {}).items():
            if name in arms:
                raise EvaluateError(
                    f"--compare {name}: that name is one of the arms; choose another"
                )
            notify({"stage": "classifier", "event": "start", "arm": name, "rows": 0})
            record, p_test = score_trained_classifier(
                name, Path(path), real, real_val, test_rows, task, arms["TRTR"], cfg
            )
            arms[name], scores[name] = record, p_test
            curves[name] = roc_points(y_test, p_test, record)
            notify({"stage": "classifier", "event": "end", "arm": name, "auc": record["auc"]})
        utility = paired_arm_utility(y_test, scores, groups, arms, cfg)

        judge_model, judge = trts_judge(
            syn_info,
            trtr_model,
            real,
            real_train,
            real_val,
            test_rows,
            task,
            cfg,
            budget,
            tmp,
            notify,
        )
        trts = class_fidelity(judge_model, syn_rows, syn_images, task, cfg, judge)
        multi = len(arms["TRTR"]["output_names"]) > 1
        plot_rocs(
            curves,
            tmp / EVAL_ROC,
            title=(
                "micro-averaged one-vs-rest ROC, real test split"
                if multi
                else "ROC on the real test split"
            ),
        )

        notify({"stage": "metrics", "event": "start", "description": "feature extractors"})
        samples = metric_samples(real_train, real_val, syn_rows, syn_images, cfg)
        extractors = build_extractors(samples, cfg, device, tmp / WORK_DIR)
        generative = generative_metrics(extractors, samples, cfg, notify)
        notify({"stage": "metrics", "event": "end"})

        notify({"stage": "memorisation", "event": "start", "description": "memorisation audit"})
        heldout_rows = test_rows if cfg.heldout == "test" else real_val
        memorisation = audit_memorisation(
            syn_rows, syn_images, real_train, heldout_rows, cfg, tmp / EVAL_CLOSEST_PAIRS
        )
        memorisation["heldout"] = (
            f"the 'test' split of --test ({test_path})"
            if cfg.heldout == "test"
            else f"the 'val' split of --train ({train_path})"
        )
        notify({"stage": "memorisation", "event": "end"})

        notify({"stage": "report", "event": "start", "description": "writing the report"})
        samples_png(tmp / EVAL_SAMPLES, syn_rows, syn_images, real_train, cfg.seed)
        report = {
            "fedspine_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": cfg.to_dict(),
            "task": task,
            "class_names": list(real.class_names),
            "output_names": arms["TRTR"]["output_names"],
            "inputs": {
                "synthetic": syn_info,
                "train": dataset_info(real, train_path, ("train", "val")),
                "test": dataset_info(test_source, test_path, ("test",)),
            },
            "selection": {
                "dataset": str(train_path),
                "split": "val",
                "images": len(real_val),
                "patients": len(set(real_val.patient_ids.tolist())),
                "use": (
                    "private real data: the classifiers use it only to choose each arm's epoch "
                    "and operating threshold (Youden), never to train; it is also the real "
                    "reference sample of the distribution metrics. The test split is never used "
                    "for selection"
                ),
            },
            "test_set": {
                "dataset": str(test_path),
                "split": "test",
                "images": len(test_rows),
                "patients": len(set(test_rows.patient_ids.tolist())),
                "patients_shared_with_train_or_val": shared_patients(
                    real_train, real_val, test_rows
                ),
            },
            "utility": utility,
            "ratios": auc_ratios(arms),
            "classifier_budget": budget,
            "arms": arms,
            "class_fidelity": trts,
            "generative": generative,
            "memorisation": memorisation,
            "files": {
                "markdown": EVAL_REPORT_MD,
                "json": EVAL_REPORT_JSON,
                "config": EVAL_CONFIG,
                "roc": EVAL_ROC,
                "samples": EVAL_SAMPLES,
                "closest_pairs": EVAL_CLOSEST_PAIRS,
                "intermediate": WORK_DIR,
            },
        }
        record = EvaluationRecord.from_json(json_ready(report))
        write_evaluation(tmp, record)
        write_json_atomic(tmp / EVAL_CONFIG, cfg.to_dict())
        for name, render in (renderers or {}).items():
            write_text_atomic(tmp / name, render(record))
        if out.exists() and not overwrite:
            raise EvaluateError(f"{out} already exists; choose another --out or pass --overwrite")
        publish_folder(tmp, out)
        notify({"stage": "report", "event": "end", "out": str(out)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)
    return record


def _train_arms(
    arm_data: dict[str, tuple[PreparedDataset, dict[str, Any]]],
    y_test: np.ndarray,
    real: PreparedDataset,
    test_source: PreparedDataset,
    real_val: PreparedDataset,
    test_rows: PreparedDataset,
    task: str,
    cfg: EvaluateConfig,
    budget: dict[str, Any],
    tmp: Path,
    notify: ProgressFn,
    trtr_cache: str | os.PathLike | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple], dict[str, np.ndarray], torch.nn.Module]:
    """Train and score every arm: records, ROC points, test scores and the TRTR model."""
    arms: dict[str, dict[str, Any]] = {}
    curves: dict[str, tuple] = {}
    scores: dict[str, np.ndarray] = {}
    trtr_model: torch.nn.Module | None = None
    for arm, (data, composition) in arm_data.items():
        notify({"stage": "classifier", "event": "start", "arm": arm, "rows": len(data)})
        if arm == "TRTR" and trtr_cache is not None:
            record, p_test, model = cached_trtr(
                Path(trtr_cache),
                data,
                real,
                test_source,
                real_val,
                test_rows,
                task,
                cfg,
                budget,
                tmp,
                notify,
            )
        else:
            record, p_test, model = run_arm(
                arm, data, real_val, test_rows, task, cfg, budget, tmp, notify
            )
        if arm == "TRTR":
            trtr_model = model
        record["train_data"] = composition
        arms[arm] = record
        curves[arm] = roc_points(y_test, p_test, record)
        scores[arm] = p_test
        notify({"stage": "classifier", "event": "end", "arm": arm, "auc": record["auc"]})
    assert trtr_model is not None  # arm_datasets always holds TRTR
    return arms, curves, scores, trtr_model
