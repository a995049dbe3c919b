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
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedspine import __version__
from fedspine.data.prepared import MANIFEST_FILE, PreparedDataset, load_prepared
from fedspine.evaluation.classification import (
    CHANCE_AUC,
    auc,
    bootstrap_auc_ci,
    choose_threshold,
    one_vs_rest_aucs,
    paired_bootstrap_aucs,
    paired_utility,
    plot_rocs,
    roc_curve_points,
    sensitivity_specificity,
    utility_verdict,
)
from fedspine.evaluation.generative import (
    density_coverage,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from fedspine.evaluation.memorisation import closest_pairs_png, memorisation_audit

if TYPE_CHECKING:
    import torch

    from fedspine.evaluation.features import FeatureExtractor

ProgressFn = Callable[[dict[str, Any]], None]

ARMS = ("TRTR", "TSTR", "mixed")
EXTRACTORS = ("auto", "domain", "inception")
HELDOUT = ("test", "val")
SYNTHETIC_SPLIT = "synthetic"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
CONFIG_JSON = "config.json"
ROC_PNG = "roc.png"
SAMPLES_PNG = "samples.png"
PAIRS_PNG = "closest_pairs.png"
WORK_DIR = "intermediate"
SYNTHETIC_PREPARED = "synthetic_prepared"
PRECISION_K = 3
PAIRS_SHOWN = 8
SAMPLES_PER_CLASS = 8


class EvaluateError(Exception):
    """The inputs cannot be evaluated; the message names the input and what to do."""


@dataclass
class EvaluateConfig:
    """Every setting of an evaluation; written as config.json beside the report.

    ``input_size`` None means the real data's resolution. ``mix_per_class`` None puts every
    synthetic image into the mixed arm; 0 skips that arm. ``extractor`` ``auto`` uses the
    Inception file when ``inception`` is given, else the domain CNN. ``heldout`` names the real
    images that calibrate the memorisation audit: ``test`` (TEST's test split) or ``val``
    (TRAIN's validation split); the generator saw neither. ``max_train_images`` caps every arm's
    training rows and ``max_metric_images`` each image set of the distribution metrics (CPU).
    ``epochs`` and ``patience`` count validation checks, TRTR's epoch length apart, so every arm
    trains for the same optimizer steps. ``judge_seed`` None picks the TRTS judge itself (the
    TRTR classifier when the generator trained against no classifier, else one of another
    seed); a seed given is refused when it would rebuild the generator's own classifier.
    """

    arch: str = "small"
    norm: str = "batch"
    weights: str | None = None
    task: str = "auto"
    epochs: int = 30
    batch: int = 32
    lr: float = 1e-3
    patience: int = 5
    input_size: int | None = None
    seed: int = 0
    mix_per_class: int | None = None
    bootstrap: int = 1000
    extractor: str = "auto"
    inception: str | None = None
    domain_epochs: int = 10
    domain_input_size: int | None = None
    pixel_size: int = 16
    kid_subsets: int = 100
    heldout: str = "test"
    device: str = "auto"
    threads: int = 0
    max_train_images: int | None = None
    max_metric_images: int | None = None
    judge_seed: int | None = None

    def validate(self) -> None:
        from fedspine.models.classifier import ARCHS, NORMS, TASKS

        if self.arch not in ARCHS:
            raise EvaluateError(f"--arch {self.arch!r}: expected one of {ARCHS}")
        if self.norm not in NORMS:
            raise EvaluateError(f"--norm {self.norm!r}: expected one of {NORMS}")
        if self.task not in (*TASKS, "auto"):
            raise EvaluateError(f"--task {self.task!r}: expected auto or one of {TASKS}")
        if self.extractor not in EXTRACTORS:
            raise EvaluateError(f"--extractor {self.extractor!r}: expected one of {EXTRACTORS}")
        if self.extractor == "inception" and not self.inception:
            raise EvaluateError("--extractor inception needs --inception FILE")
        if self.heldout not in HELDOUT:
            raise EvaluateError(f"--heldout {self.heldout!r}: expected one of {HELDOUT}")
        positive = {
            "epochs": self.epochs,
            "bootstrap": self.bootstrap,
            "domain_epochs": self.domain_epochs,
            "pixel_size": self.pixel_size,
            "kid_subsets": self.kid_subsets,
            "patience": self.patience,
        }
        for name, value in positive.items():
            if value < 1:
                raise EvaluateError(f"{name} must be at least 1, got {value}")
        if self.batch < 2:
            raise EvaluateError(f"batch must be at least 2, got {self.batch}")
        if self.mix_per_class is not None and self.mix_per_class < 0:
            raise EvaluateError(f"--mix-per-class must be 0 or more, got {self.mix_per_class}")
        if self.max_train_images is not None and self.max_train_images < 2:
            raise EvaluateError("--max-train-images must be at least 2")
        if self.max_metric_images is not None and self.max_metric_images < PRECISION_K + 1:
            raise EvaluateError(f"--max-metric-images must be at least {PRECISION_K + 1}")
        if self.inception and not Path(self.inception).is_file():
            raise EvaluateError(
                f"{self.inception}: Inception-v3 TorchScript file not found; pass a local copy "
                "(fedspine never downloads weights)"
            )
        if self.weights and not Path(self.weights).is_file():
            raise EvaluateError(f"{self.weights}: no such classifier weights file")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluateConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def evaluate(
    synthetic: str | os.PathLike,
    train: str | os.PathLike,
    test: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EvaluateConfig | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    trtr_cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate ``synthetic`` against real data and write the report folder ``out``.

    ``synthetic`` is a prepared dataset or a folder written by ``fedspine generate``
    (labels.csv + classes.txt), which is ingested at the real data's resolution into
    ``out/intermediate/synthetic_prepared``. ``train`` is a prepared dataset: its 'train' split trains
    TRTR and its 'val' split selects every arm. ``test`` is a prepared dataset whose 'test'
    split is the test set (it may be the same folder as ``train``). ``progress`` receives
    ``{"stage": ..., "event": "start"|"end", ...}`` per stage and the classifier trainer's
    batch/epoch events with ``"arm"`` added. ``trtr_cache`` is a folder that keeps the TRTR
    classifier and its test scores, so evaluations of several synthetic sets against the same
    real data and settings share one reference. Returns what report.json holds.
    """
    cfg = cfg or EvaluateConfig()
    cfg.validate()
    notify = progress or (lambda event: None)
    out = Path(out)
    if out.exists() and not overwrite:
        raise EvaluateError(f"{out} already exists; choose another --out or pass --overwrite")
    train_path, test_path, syn_path = Path(train), Path(test), Path(synthetic)
    real = _load_real(train_path, "--train")
    test_source = real if _same_folder(train_path, test_path) else _load_real(test_path, "--test")
    real_train = real.select("train", labelled=False)
    real_val = real.select("val", labelled=False)
    test_rows = test_source.select("test", labelled=False)
    _check_real(real, train_path, test_source, test_path, real_train, real_val, test_rows)
    _check_synthetic_source(syn_path, real)
    _check_generator_patients(syn_path, real, train_path, test_source, test_path, test_rows)

    import torch

    from fedspine.training.classifier_trainer import resolve_device, resolve_task

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
        syn_images = _at_resolution(syn_rows.images, real.resolution)
        _check_synthetic_rows(syn_rows, syn_path, task, real)
        notify({"stage": "synthetic", "event": "end", "images": len(syn_rows)})

        from fedspine.training.classifier_trainer import targets

        budget = _step_budget(real_train, task, cfg)
        arm_data = _arm_datasets(real_train, syn_rows, syn_images, cfg, task)
        y_test, idx_test, _ = targets(test_rows, task)
        groups = test_rows.patient_ids[idx_test]
        arms: dict[str, dict[str, Any]] = {}
        curves: dict[str, tuple] = {}
        scores: dict[str, np.ndarray] = {}
        for arm, (data, composition) in arm_data.items():
            notify({"stage": "classifier", "event": "start", "arm": arm, "rows": len(data)})
            if arm == "TRTR" and trtr_cache is not None:
                record, p_test, model = _cached_trtr(
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
                record, p_test, model = _run_arm(
                    arm, data, real_val, test_rows, task, cfg, budget, tmp, notify
                )
            if arm == "TRTR":
                trtr_model = model
            record["train_data"] = composition
            arms[arm] = record
            curves[arm] = _roc(y_test, p_test, record)
            scores[arm] = p_test
            notify({"stage": "classifier", "event": "end", "arm": arm, "auc": record["auc"]})
        utility = _utility(y_test, scores, groups, arms, cfg)

        judge_model, judge = _trts_judge(
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
        trts = _class_fidelity(judge_model, syn_rows, syn_images, task, cfg, judge)
        multi = len(arms["TRTR"]["output_names"]) > 1
        plot_rocs(
            curves,
            tmp / ROC_PNG,
            title=(
                "micro-averaged one-vs-rest ROC, real test split"
                if multi
                else "ROC on the real test split"
            ),
        )

        notify({"stage": "metrics", "event": "start", "description": "feature extractors"})
        samples = _metric_samples(real_train, real_val, syn_rows, syn_images, cfg)
        extractors = _extractors(samples, cfg, device, tmp / WORK_DIR)
        generative = _generative_metrics(extractors, samples, cfg, notify)
        notify({"stage": "metrics", "event": "end"})

        notify({"stage": "memorisation", "event": "start", "description": "memorisation audit"})
        heldout_rows = test_rows if cfg.heldout == "test" else real_val
        memorisation = _memorisation(
            syn_rows, syn_images, real_train, heldout_rows, cfg, tmp / PAIRS_PNG
        )
        memorisation["heldout"] = (
            f"the 'test' split of --test ({test_path})"
            if cfg.heldout == "test"
            else f"the 'val' split of --train ({train_path})"
        )
        notify({"stage": "memorisation", "event": "end"})

        notify({"stage": "report", "event": "start", "description": "writing the report"})
        _samples_png(tmp / SAMPLES_PNG, syn_rows, syn_images, real_train, cfg.seed)
        report = {
            "fedspine_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": cfg.to_dict(),
            "task": task,
            "class_names": list(real.class_names),
            "output_names": arms["TRTR"]["output_names"],
            "inputs": {
                "synthetic": syn_info,
                "train": _dataset_info(real, train_path, ("train", "val")),
                "test": _dataset_info(test_source, test_path, ("test",)),
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
                "patients_shared_with_train_or_val": _shared_patients(
                    real_train, real_val, test_rows
                ),
            },
            "utility": utility,
            "ratios": _ratios(arms),
            "classifier_budget": budget,
            "arms": arms,
            "class_fidelity": trts,
            "generative": generative,
            "memorisation": memorisation,
            "files": {
                "markdown": REPORT_MD,
                "json": REPORT_JSON,
                "config": CONFIG_JSON,
                "roc": ROC_PNG,
                "samples": SAMPLES_PNG,
                "closest_pairs": PAIRS_PNG,
                "intermediate": WORK_DIR,
            },
        }
        report = _plain(report)
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / CONFIG_JSON).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (tmp / REPORT_MD).write_text(render_markdown(report))
        _move_into_place(tmp, out, overwrite)
        notify({"stage": "report", "event": "end", "out": str(out)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)
    return report


def load_synthetic(
    path: str | os.PathLike, real: PreparedDataset, work: str | os.PathLike, cfg: EvaluateConfig
) -> tuple[PreparedDataset, dict[str, Any]]:
    """The synthetic images as a prepared dataset, and where they came from.

    A folder with manifest.json is read as it is; a folder with labels.csv (``fedspine
    generate``'s layout) is ingested into ``work`` at the real data's resolution, with no
    val/test carving (synthetic images have no patients to protect). The class order must equal
    the real data's, or the labels would mean other classes.
    """
    from fedspine.data.ingest import IngestConfig, ingest

    path, work = Path(path), Path(work)
    _check_synthetic_source(path, real)
    if (path / MANIFEST_FILE).is_file():
        data = load_prepared(path)
        info: dict[str, Any] = {"kind": "prepared dataset", "rejected": None}
    else:
        summary = ingest(
            path,
            work,
            IngestConfig(
                layout="folder",
                resolution=real.resolution,
                val_fraction=0.0,
                test_fraction=0.0,
                seed=cfg.seed,
            ),
        )
        data = load_prepared(work)
        info = {"kind": "generated folder", "rejected": summary.num_rejected}
    if list(data.class_names) != list(real.class_names):
        raise EvaluateError(
            f"{path}: synthetic class order {list(data.class_names)} differs from the real "
            f"data's {list(real.class_names)}; generate from a model trained on this schema "
            "(or fix classes.txt) so that label k means the same class in both"
        )
    generation = path / "generation.json"
    info.update(
        {
            "path": str(path),
            "content_hash": data.content_hash,
            "images": len(data),
            "resolution": data.resolution,
            "class_counts": data.class_counts(),
            "generation": json.loads(generation.read_text()) if generation.is_file() else None,
        }
    )
    return data, info


def utility_lines(report: dict[str, Any]) -> list[str]:
    """The lead of every report: signal retained with its interval and whether there is any."""
    utility = report.get("utility")
    if not utility:
        return []
    lines = []
    for arm, u in utility["arms"].items():
        retained = u.get("signal_retained")
        ci = u.get("signal_retained_ci")
        diff_ci = u.get("difference_ci")
        lines += [
            f"**{arm}: signal retained {_num(retained, 2)}"
            + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else " [interval unbounded]")
            + f"** ({arm} AUC {_auc_ci(u['auc'], u['ci'])}, TRTR AUC "
            f"{_num(u['reference_auc'])}; {arm} − TRTR = {_num(u['difference'])}"
            + (f" [{diff_ci[0]:.3f}, {diff_ci[1]:.3f}]" if diff_ci else "")
            + f"). {u['verdict'].split(';')[0][0].upper()}{u['verdict'].split(';')[0][1:]}.",
            "",
        ]
        for name, one in (u.get("per_output") or {}).items():
            one_ci = one.get("signal_retained_ci")
            lines.append(
                f"- {name}: signal retained {_num(one.get('signal_retained'), 2)}"
                + (f" [{one_ci[0]:.2f}, {one_ci[1]:.2f}]" if one_ci else "")
                + f", AUC {_auc_ci(one['auc'], one['ci'])}"
                + ("; interval contains chance" if one["ci_contains_chance"] else "")
            )
        if u.get("per_output"):
            lines.append("")
    lines += [
        "Signal retained is (AUC − 0.5) / (TRTR AUC − 0.5): 0 means the synthetic data teach "
        "nothing beyond chance, 1 as much as the real training data. Intervals: "
        f"{utility['method']} ({utility['bootstrap']} resamples).",
        "",
    ]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: signal retained first, then arms, metrics and memorisation."""
    lines: list[str] = ["# fedspine evaluation report", ""]
    inputs = report["inputs"]
    ratios = report["ratios"]
    arms = report["arms"]
    lines += utility_lines(report)
    lines += [
        f"For comparison with published ratios: TSTR / TRTR = {_num(ratios['tstr_over_trtr'])} "
        f"(TSTR AUC {_num(arms['TSTR']['auc'])}, TRTR AUC {_num(arms['TRTR']['auc'])})"
        + (
            f"; mixed / TRTR = {_num(ratios['mixed_over_trtr'])} "
            f"(mixed AUC {_num(arms['mixed']['auc'])})"
            if "mixed" in arms
            else ""
        )
        + ". A ratio of AUCs credits every arm with the 0.5 any classifier gets by chance; "
        "signal retained does not.",
        "",
        f"- synthetic: `{inputs['synthetic']['path']}` ({inputs['synthetic']['kind']}, "
        f"{inputs['synthetic']['images']} images, {_counts(inputs['synthetic']['class_counts'])})",
        f"- real training data: `{inputs['train']['path']}` ({_split_text(inputs['train'])})",
        f"- real test data: `{inputs['test']['path']}` ({_split_text(inputs['test'])})",
        f"- task: {report['task']} over classes {report['class_names']}; outputs "
        f"{report['output_names']}; classifier `{report['config']['arch']}`",
        "",
        "## Classifiers on the real test split",
        "",
        "| arm | trained on | test AUC [95 % CI] | sensitivity | specificity | "
        "selected at step (val AUC) | steps run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, arm in arms.items():
        history = arm["history"]
        lines.append(
            f"| {name} | {_composition(arm['train_data'])} | {_auc_ci(arm['auc'], arm['ci'])} | "
            f"{_num(arm['sensitivity'])} | {_num(arm['specificity'])} | "
            f"{history.get('best_steps', '?')} ({_num(history['best_val_auc'])}) | "
            f"{history.get('steps', '?')} |"
        )
    budget = report.get("classifier_budget")
    if budget:
        lines += ["", f"Training budget, the same for every arm: {budget['rule']}."]
    multi = len(report["output_names"]) > 1
    test_set, selection = report["test_set"], report["selection"]
    lines += [
        "",
        f"Test set: the 'test' split of `{test_set['dataset']}`, {test_set['images']} images of "
        f"{test_set['patients']} patients. 95 % intervals: percentile bootstrap over patients "
        f"({report['config']['bootstrap']} resamples; all images of a drawn patient). "
        + (
            "AUC is the macro mean of the one-vs-rest AUCs (interval on the mean); sensitivity "
            "and specificity are macro means over the outputs. "
            if multi
            else ""
        )
        + "Sensitivity and specificity are at the threshold that maximises Youden's J on the "
        "validation split.",
        "",
        f"Model selection: every arm chose its checkpoint (best validation AUC) and its threshold on "
        f"the 'val' split of `{selection['dataset']}` ({selection['images']} images, "
        f"{selection['patients']} patients), the same real split for all arms so they are "
        "comparable. That split is private real data: the classifiers use it only for "
        "selection, never for training (it is also the floor sample of the metrics table "
        "below). The test split was used for nothing but the numbers above"
        + (" and the memorisation calibration." if report["config"]["heldout"] == "test" else "."),
    ]
    if test_set["patients_shared_with_train_or_val"]:
        lines += [
            "",
            f"**Warning:** {test_set['patients_shared_with_train_or_val']} patient id(s) of the "
            "test split also appear in the training or validation split; if they are the same "
            "people the test AUCs are optimistic.",
        ]
    if multi:
        lines += ["", "| output | " + " | ".join(arms) + " |", "| --- |" + " --- |" * len(arms)]
        for out_name in report["output_names"]:
            cells = []
            for arm in arms.values():
                o = arm["per_output"][out_name]
                cells.append(
                    f"{_auc_ci(o['auc'], o['ci'])}, sens {_num(o['sensitivity'])}, "
                    f"spec {_num(o['specificity'])}"
                )
            lines.append(f"| {out_name} | " + " | ".join(cells) + " |")
    lines += ["", f"![ROC curves of the arms]({report['files']['roc']})", ""]

    trts = report.get("class_fidelity")
    if trts:
        lines += [
            "## Does each synthetic class look like its real class?",
            "",
            f"TRTS (train real, test synthetic): {trts['classifier']} scored on the "
            f"{trts['images']} synthetic images against the class they were generated for: "
            f"AUC {_auc_ci(trts['auc'], trts['ci'])}. 0.5 means the generator's classes are "
            "indistinguishable to a classifier that knows the real ones; the TRTR AUC above is "
            "what real images of the two classes give. Intervals bootstrap synthetic images.",
            "",
        ]
        judge = trts.get("judge") or {}
        if judge.get("independence"):
            lines += [
                "The judge must be a classifier the generator never trained against; "
                f"independence: {judge['independence']}.",
                "",
            ]
        for name, o in trts["per_output"].items():
            if o.get("auc") is None:
                continue
            pos, neg = o["mean_score_positive"], o["mean_score_negative"]
            lines.append(
                f"- {name}: mean score {_num(pos)} on images generated as {name}, {_num(neg)} on "
                "the others"
                + (
                    "; **the scores are saturated**: the classifier sees the synthetic images "
                    "as far from the real ones, and the AUC ranks tiny differences, not classes."
                    if min(pos, neg) > 0.95 or max(pos, neg) < 0.05
                    else "."
                )
            )
        lines.append("")
    gen = report["generative"]
    lines += [
        "## Synthetic vs real images",
        "",
        f"Reference: {gen['reference']}. The {gen['equal_n']}. Precision/recall and "
        f"density/coverage with k = {PRECISION_K}. Every number holds only for the extractor "
        "named beside it.",
        "",
        "| extractor | compared | KID × 10³ (± std) | FID | precision | recall | density | "
        "coverage |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in gen["results"]:
        lines.append(
            f"| {row['extractor']} | {row['compared']} | "
            f"{_num(_scaled(row.get('kid')), 3)} ± {_num(_scaled(row.get('kid_std')), 3)} | "
            f"{_num(row.get('fid'), 4)} | {_num(row.get('precision'))} | "
            f"{_num(row.get('recall'))} | {_num(row.get('density'))} | "
            f"{_num(row.get('coverage'))} |"
        )
    lines += [
        "",
        "The floor rows show what a second real sample of this distribution gives, at the same "
        "size and class mix as the synthetic rows: a perfect generator would match them. KID "
        "leads because it is unbiased; FID is biased upward at small n, which is why the two "
        "rows are compared at equal n and never against a floor of another size.",
        "",
        "Extractors:",
        "",
    ]
    lines += [f"- {d}" for d in gen["extractors"]]

    mem = report["memorisation"]
    lines += [
        "",
        "## Memorisation audit",
        "",
        f"Euclidean distances in the space of **{mem['extractor']}** between each synthetic "
        f"image and its closest real training image, calibrated on real held-out images: "
        f"{mem['heldout']} ({mem['n_heldout']} images), which the generator never saw. "
        f"{mem['rule'][0].upper()}{mem['rule'][1:]}.",
        "",
        f"- verdict: **{mem['verdict']}**",
        f"- exact copies of a training image: {mem['exact_copies']} of {mem['n_synthetic']}",
        f"- synthetic images closer to training than 99 % of held-out images are: "
        f"{_pct(mem['share_below_p1'])} (about 1 % expected without memorisation)",
        f"- closer than 95 % of held-out images are: {_pct(mem['share_below_p5'])} "
        "(about 5 % expected)",
        f"- closer to training than to held-out images (same-size sets): "
        f"{_pct(mem['share_closer_to_train'])} (about 50 % expected)",
        f"- median distance synthetic→train {_num(mem['median_syn_to_train'], 4)}, "
        f"held-out→train {_num(mem['median_heldout_to_train'], 4)}",
        "",
        f"![closest synthetic / training pairs]({report['files']['closest_pairs']})",
        "",
        "| pair | synthetic file | closest training file | distance |",
        "| --- | --- | --- | --- |",
    ]
    for i, pair in enumerate(mem["closest_pairs"]):
        lines.append(
            f"| {i} | {pair['synthetic_file']} | {pair['train_file']} | "
            f"{_num(pair['distance'], 4)} |"
        )
    lines += [
        "",
        "## Samples",
        "",
        f"![synthetic and real images per class]({report['files']['samples']})",
        "",
        "Each class shows a row of synthetic images above a row of real training images. The "
        "real images (and the closest-pairs figure) come from the private training data: this "
        "report is for the data owner and must not be released with the synthetic data.",
        "",
        "## Inputs and settings",
        "",
        f"- fedspine {report['fedspine_version']}, written {report['created']}",
    ]
    for key, info in inputs.items():
        lines.append(f"- {key}: `{info['path']}`, content hash `{info['content_hash']}`")
    lines += [
        f"- settings: [{report['files']['config']}]({report['files']['config']}); every number "
        f"above is in [{report['files']['json']}]({report['files']['json']})",
        "",
    ]
    return "\n".join(lines)


def _load_real(path: Path, option: str) -> PreparedDataset:
    from fedspine.data.prepared import PreparedDatasetError

    try:
        return load_prepared(path)
    except PreparedDatasetError as err:
        raise EvaluateError(f"{option} {err}") from None


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _check_real(
    real: PreparedDataset,
    train_path: Path,
    test_source: PreparedDataset,
    test_path: Path,
    real_train: PreparedDataset,
    real_val: PreparedDataset,
    test_rows: PreparedDataset,
) -> None:
    if len(real_train) == 0:
        raise EvaluateError(f"{train_path}: no rows in the 'train' split; nothing to train TRTR on")
    if len(real_val) == 0:
        raise EvaluateError(
            f"{train_path}: no rows in the 'val' split; every arm selects its epoch on it. "
            "Ingest with a validation fraction above 0"
        )
    if len(test_rows) == 0:
        raise EvaluateError(
            f"{test_path}: no rows in the 'test' split; ingest the test data with a test split"
        )
    if list(test_source.class_names) != list(real.class_names):
        raise EvaluateError(
            f"{test_path}: classes {list(test_source.class_names)} differ from the training "
            f"data's {list(real.class_names)}; test on data of the same label schema"
        )
    if test_source.resolution != real.resolution:
        raise EvaluateError(
            f"{test_path}: resolution {test_source.resolution} px differs from the training "
            f"data's {real.resolution} px; ingest both at one --resolution"
        )


def _check_synthetic_source(path: Path, real: PreparedDataset) -> None:
    """Fail before any work on a missing folder or a generated folder with another class order."""
    if not path.is_dir():
        raise EvaluateError(
            f"{path}: no such folder; pass a prepared dataset or a folder written by "
            "`fedspine generate`"
        )
    if (path / MANIFEST_FILE).is_file():
        try:
            declared = list(json.loads((path / MANIFEST_FILE).read_text())["class_names"])
        except (ValueError, KeyError, TypeError):
            raise EvaluateError(
                f"{path / MANIFEST_FILE}: unreadable or without class_names; not a prepared "
                "dataset written by fedspine"
            ) from None
        if declared != list(real.class_names):
            raise EvaluateError(
                f"{path}: synthetic class order {declared} differs from the real data's "
                f"{list(real.class_names)}; generate from a model trained on this schema so that "
                "label k means the same class in both"
            )
        return
    if not (path / "labels.csv").is_file():
        raise EvaluateError(
            f"{path}: neither a prepared dataset (manifest.json) nor a generated folder "
            "(labels.csv + classes.txt)"
        )
    classes_txt = path / "classes.txt"
    if classes_txt.is_file():
        declared = [c.strip() for c in classes_txt.read_text().splitlines() if c.strip()]
        if declared != list(real.class_names):
            raise EvaluateError(
                f"{classes_txt}: synthetic class order {declared} differs from the real data's "
                f"{list(real.class_names)}; generate from a model trained on this schema so that "
                "label k means the same class in both"
            )


def _check_synthetic_rows(
    syn_rows: PreparedDataset, path: Path, task: str, real: PreparedDataset
) -> None:
    if len(syn_rows) == 0:
        raise EvaluateError(f"{path}: no synthetic images in its 'train' or 'val' rows")
    if task == "multilabel" and list(syn_rows.finding_names) != list(real.finding_names):
        raise EvaluateError(
            f"{path}: finding columns {syn_rows.finding_names} differ from the real data's "
            f"{real.finding_names}; the multilabel task needs synthetic findings of the same kind"
        )


def _check_generator_patients(
    syn_path: Path,
    real: PreparedDataset,
    train_path: Path,
    test_source: PreparedDataset,
    test_path: Path,
    test_rows: PreparedDataset,
) -> None:
    """Refuse a test split holding patients the synthetic set's generator trained on.

    The generator's run folder (generation.json names it) records the prepared data it trained
    on by content hash; when that data is one of the inputs or still on disk, its training
    patients are compared with the test patients. A generator that saw a test patient makes every
    synthetic number on that test set optimistic.
    """
    from fedspine.training.config import read_config_toml

    generation = syn_path / "generation.json"
    if not generation.is_file():
        return
    try:
        run = Path(json.loads(generation.read_text()).get("run") or "")
        dataset = read_config_toml(run / "config.toml").get("dataset") or {}
    except (OSError, ValueError, AttributeError):
        return
    content_hash, where = dataset.get("content_hash"), dataset.get("path")
    candidates = [(real, train_path), (test_source, test_path)]
    source = next((d for d, _ in candidates if d.content_hash == content_hash), None)
    if source is None and where and Path(where).is_dir():
        try:
            other = load_prepared(where)
        except Exception:
            return
        source = other if other.content_hash == content_hash else None
    if source is None:
        return
    seen = set(source.select("train", labelled=True).patient_ids.tolist())
    shared = sorted(seen & set(test_rows.patient_ids.tolist()))
    if shared:
        raise EvaluateError(
            f"{test_path}: {len(shared)} patient(s) of its 'test' split (e.g. {shared[0]}) are "
            f"among those the generator of {syn_path} trained on (its run {run} trained on "
            f"{where}); synthetic images judged on patients their generator saw flatter it. "
            "Test on patients the generator never saw"
        )


def _at_resolution(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, R, R] -> uint8 [N, size, size] (unchanged when R == size)."""
    if images.shape[-1] == size:
        return np.asarray(images, dtype=np.uint8)
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), size, size), dtype=np.uint8)
    for start in range(0, len(images), 256):
        x = torch.from_numpy(np.asarray(images[start : start + 256], dtype=np.float32))[:, None]
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + len(x)] = x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def _arm_datasets(
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


def _generator_classifiers(syn_info: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Recipes of the classifiers the generator trained against: [] for none, None if unknown."""
    training = (syn_info.get("generation") or {}).get("training")
    if not training:
        return None
    clinical = training.get("clinical")
    if clinical is None:
        return [] if training.get("model") not in (None, "spinegan") else None
    recipe = clinical.get("classifier_recipe")
    return [recipe] if recipe else None


def _trts_judge(
    syn_info: dict[str, Any],
    trtr_model: torch.nn.Module,
    real: PreparedDataset,
    real_train: PreparedDataset,
    real_val: PreparedDataset,
    test_rows: PreparedDataset,
    task: str,
    cfg: EvaluateConfig,
    budget: dict[str, Any],
    tmp: Path,
    notify: ProgressFn,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The classifier that scores the synthetic images in TRTS: one the generator never saw.

    A SpineGAN generator was trained to please its clinical classifier; judged by a classifier
    of the same recipe (the evaluation's TRTR usually is one: same architecture, rows and seed),
    its TRTS measures how well it fooled that network, not whether its classes are right.
    """
    from fedspine.training.classifier_trainer import classifier_recipe, same_recipe

    seen = _generator_classifiers(syn_info)
    size = cfg.input_size or real.resolution

    def recipe(seed: int) -> dict[str, Any]:
        return classifier_recipe(_classifier_config(cfg, task, size, budget, seed))

    if cfg.judge_seed is not None:
        seed = cfg.judge_seed
        if any(same_recipe(recipe(seed), c) for c in seen or []):
            raise EvaluateError(
                f"--judge-seed {seed}: a classifier of this recipe ({cfg.arch}, seed {seed}, "
                f"{size} px, trained on the real training split) is the one the generator was "
                "trained against, so TRTS judged by it would be circular; choose another seed"
            )
    elif seen == []:
        return trtr_model, {
            "classifier": "the TRTR arm's classifier",
            "recipe": recipe(cfg.seed),
            "independence": "the generator trained against no classifier (generation.json)",
        }
    else:
        seed = cfg.seed + 1
        while any(same_recipe(recipe(seed), c) for c in seen or []):
            seed += 1
    if seen is None:
        independence = (
            "unverified: the synthetic set does not say which classifier its generator trained "
            f"against (no generation.json record); if it was a {cfg.arch} of seed {seed} on "
            "these rows, TRTS is circular"
        )
    elif seen:
        independence = (
            "verified: its recipe differs from that of the classifier the generator trained "
            f"against ({', '.join(f'{k} {v}' for k, v in seen[0].items())})"
        )
    else:
        independence = "the generator trained against no classifier (generation.json)"
    if seed == cfg.seed:
        return trtr_model, {
            "classifier": "the TRTR arm's classifier",
            "recipe": recipe(seed),
            "independence": independence,
        }
    notify({"stage": "classifier", "event": "start", "arm": "TRTS judge", "rows": 0})
    record, _, model = _run_arm(
        "TRTS-judge", real_train, real_val, test_rows, task, cfg, budget, tmp, notify, seed
    )
    notify({"stage": "classifier", "event": "end", "arm": "TRTS judge", "auc": record["auc"]})
    return model, {
        "classifier": (
            f"a separate {cfg.arch} classifier trained on the real training split with seed "
            f"{seed} (test AUC {record['auc']:.3f})"
        ),
        "recipe": recipe(seed),
        "independence": independence,
        "test_auc": record["auc"],
        "classifier_file": record["classifier_file"],
    }


def _class_fidelity(
    judge_model: torch.nn.Module,
    syn_rows: PreparedDataset,
    syn_images: np.ndarray,
    task: str,
    cfg: EvaluateConfig,
    judge: dict[str, Any],
) -> dict[str, Any]:
    """TRTS: a real-trained classifier scored on the synthetic images and their labels.

    It asks whether each synthetic class looks like that class to a classifier that has only
    seen real images, which shows a generator learning its classes long before TSTR does. Each
    synthetic image is its own unit in the bootstrap (generated images share no patient).
    """
    from fedspine.models.classifier import predict_proba
    from fedspine.training.classifier_trainer import targets

    y, idx, names = targets(syn_rows, task)
    probs = predict_proba(judge_model, syn_images[idx], batch=128)
    groups = np.arange(len(idx))
    scores = {}
    for k, name in enumerate(names):
        yk = y[:, k].astype(np.int64)
        if not 0 < yk.sum() < len(yk):
            scores[name] = {
                "auc": None,
                "ci": None,
                "reason": "a single class in the synthetic set",
            }
            continue
        value, lo, hi = bootstrap_auc_ci(yk, probs[:, k], groups, cfg.bootstrap, seed=cfg.seed)
        scores[name] = {
            "auc": value,
            "ci": [lo, hi],
            "mean_score_positive": float(probs[yk == 1, k].mean()),
            "mean_score_negative": float(probs[yk == 0, k].mean()),
        }
    aucs = [o["auc"] for o in scores.values() if o["auc"] is not None]
    return {
        "name": "TRTS (train real, test synthetic)",
        "classifier": judge["classifier"],
        "judge": judge,
        "images": len(idx),
        "auc": float(np.mean(aucs)) if aucs else None,
        "ci": scores[names[0]]["ci"] if len(names) == 1 else None,
        "per_output": scores,
    }


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


def _classifier_config(
    cfg: EvaluateConfig, task: str, size: int, budget: dict[str, Any], seed: int | None = None
) -> Any:
    """Every arm's classifier settings: the same steps between checks, the same checks."""
    from fedspine.models.classifier import ClassifierConfig
    from fedspine.training.classifier_trainer import ClassifierTrainConfig

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


def _step_budget(real_train: PreparedDataset, task: str, cfg: EvaluateConfig) -> dict[str, Any]:
    """One optimizer-step budget for every arm, set by TRTR's epoch length.

    Matching epochs would give an arm with more rows more steps (and more patience in steps);
    matching steps lets the arms differ only in what they learn from.
    """
    from fedspine.training.classifier_trainer import targets

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


def _run_arm(
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
    from fedspine.models.classifier import predict_proba, save_classifier
    from fedspine.training.classifier_trainer import load_images, targets, train_classifier

    size = cfg.input_size or data.resolution
    train_cfg = _classifier_config(cfg, task, size, budget, seed)
    try:
        model, history = train_classifier(
            data, val, train_cfg, progress=lambda event: notify({"arm": arm, **event})
        )
    except ValueError as err:
        raise EvaluateError(f"{arm} classifier: {err}") from None
    save_classifier(
        tmp / WORK_DIR / "classifiers" / f"{arm}.pt",
        model,
        model.classifier_config,
        {"arm": arm, "task": task, "output_names": history["output_names"]},
    )
    names = history["output_names"]
    y_val, idx_val, _ = targets(val, task)
    y_test, idx_test, _ = targets(test, task)
    p_val = predict_proba(model, load_images(val, idx_val, size), batch=128)
    p_test = predict_proba(model, load_images(test, idx_test, size), batch=128)
    groups = test.patient_ids[idx_test]
    record = _score(y_val, p_val, y_test, p_test, groups, names, cfg, arm)
    record.update(
        {
            "output_names": names,
            "history": history,
            "seed": train_cfg.seed,
            "test_images": len(idx_test),
            "test_patients": len(set(groups.tolist())),
            "classifier_file": f"{WORK_DIR}/classifiers/{arm}.pt",
        }
    )
    return record, p_test, model


def _cached_trtr(
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
    from fedspine.models.classifier import load_classifier

    train_cfg = _classifier_config(cfg, task, cfg.input_size or data.resolution, budget)
    settings = {k: v for k, v in train_cfg.to_dict().items() if k != "device"}
    key = _plain(
        {
            "fedspine_version": __version__,
            "train": real.content_hash,
            "test": test_source.content_hash,
            "task": task,
            "classifier": settings,
            "bootstrap": cfg.bootstrap,
        }
    )
    stored_file = cache / "trtr.json"
    target = tmp / WORK_DIR / "classifiers" / "TRTR.pt"
    if stored_file.is_file():
        stored = json.loads(stored_file.read_text())
        if stored.get("key") != key:
            raise EvaluateError(
                f"{cache}: holds a TRTR classifier of other data or settings; pass another "
                "TRTR cache folder or remove this one"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache / "TRTR.pt", target)
        model, _, _ = load_classifier(target)
        model.eval()
        record = dict(stored["record"], reused_from=str(cache))
        notify({"arm": "TRTR", "event": "reused", "from": str(cache)})
        return record, np.load(cache / "p_test.npy"), model
    if cache.exists():
        raise EvaluateError(f"{cache}: exists but holds no trtr.json; remove it or pass another")
    record, p_test, model = _run_arm("TRTR", data, val, test, task, cfg, budget, tmp, notify)
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{cache.name}.partial-", dir=cache.parent))
    try:
        shutil.copyfile(target, work / "TRTR.pt")
        np.save(work / "p_test.npy", p_test)
        (work / "trtr.json").write_text(
            json.dumps({"key": key, "record": _plain(record)}, indent=2) + "\n"
        )
        os.replace(work, cache)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return record, p_test, model


def _utility(
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


def _roc(y_test: np.ndarray, p_test: np.ndarray, record: dict[str, Any]) -> tuple:
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


def _ratios(arms: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    base = arms["TRTR"]["auc"]

    def ratio(arm: str) -> float | None:
        if arm not in arms or not base:
            return None
        return arms[arm]["auc"] / base

    return {"tstr_over_trtr": ratio("TSTR"), "mixed_over_trtr": ratio("mixed")}


def _metric_samples(
    real_train: PreparedDataset,
    real_val: PreparedDataset,
    syn_rows: PreparedDataset,
    syn_images: np.ndarray,
    cfg: EvaluateConfig,
) -> dict[str, Any]:
    """The image sets of the distribution metrics, chosen so that no row can flatter.

    - reference: labelled real training images (the rows the GAN trained on; unlabelled rows
      such as multi-lesion images are excluded). With the domain CNN, half of the training
      patients fit the extractor and only the other half is the reference, so no reference
      image is in-sample for the extractor.
    - floor (real val) and synthetic: the same number of images of each class, the real
      validation split's class mix, because FID is biased upward at small n and a class-balanced
      synthetic set against an unbalanced reference would be penalised (or flattered) by mix.
    """
    rng = np.random.default_rng(cfg.seed)
    labelled = real_train.select(None, labelled=True)
    fit: PreparedDataset | None = None
    reference = labelled
    if not (cfg.extractor == "inception" or (cfg.extractor == "auto" and cfg.inception)):
        fit_mask = _half_of_patients(labelled, rng)
        fit = labelled.rows(np.flatnonzero(fit_mask))
        reference = labelled.rows(np.flatnonzero(~fit_mask))
    val = real_val.select(None, labelled=True)
    per_class = {}
    for k, name in enumerate(real_train.class_names):
        per_class[name] = min(int((val.labels == k).sum()), int((syn_rows.labels == k).sum()))
    total = sum(per_class.values())
    if cfg.max_metric_images is not None and total > cfg.max_metric_images:
        scale = cfg.max_metric_images / total
        per_class = {name: int(n * scale) for name, n in per_class.items()}
    floor_idx, syn_idx = [], []
    for k, name in enumerate(real_train.class_names):
        n = per_class[name]
        if n:
            floor_idx.append(rng.choice(np.flatnonzero(val.labels == k), n, replace=False))
            syn_idx.append(rng.choice(np.flatnonzero(syn_rows.labels == k), n, replace=False))
    floor_idx_arr = np.sort(np.concatenate(floor_idx)) if floor_idx else np.zeros(0, int)
    syn_idx_arr = np.sort(np.concatenate(syn_idx)) if syn_idx else np.zeros(0, int)
    ref_images = _cap(np.asarray(reference.images), cfg.max_metric_images, rng)
    return {
        "fit": fit,
        "reference": ref_images,
        "floor": np.asarray(val.images[floor_idx_arr], dtype=np.uint8),
        "synthetic": np.asarray(syn_images[syn_idx_arr], dtype=np.uint8),
        "class_counts": per_class,
        "reference_patients": len(set(reference.patient_ids.tolist())),
        "fit_patients": None if fit is None else len(set(fit.patient_ids.tolist())),
        "excluded_unlabelled": int(np.sum(real_train.labels < 0)),
    }


def _half_of_patients(data: PreparedDataset, rng: np.random.Generator) -> np.ndarray:
    """Row mask of a random half of the patients, drawn within each patient's first class so
    both halves hold every class the data has."""
    patients, first = np.unique(data.patient_ids, return_index=True)
    chosen: list[str] = []
    for k in np.unique(data.labels[first]):
        group = patients[data.labels[first] == k]
        chosen += rng.permutation(group)[: len(group) // 2 + len(group) % 2].tolist()
    return np.isin(data.patient_ids, chosen)


def _extractors(
    samples: dict[str, Any], cfg: EvaluateConfig, device: torch.device, work: Path
) -> list[FeatureExtractor]:
    """The primary extractor (user Inception or the domain CNN), then raw pixels as a baseline."""
    from fedspine.evaluation.features import (
        DomainExtractor,
        FeatureExtractorError,
        InceptionTorchScript,
        PixelExtractor,
    )

    resolution = samples["reference"].shape[-1]
    try:
        if samples["fit"] is None:
            primary: FeatureExtractor = InceptionTorchScript(cfg.inception, device=str(device))
        else:
            primary = DomainExtractor.fit(
                samples["fit"],
                epochs=cfg.domain_epochs,
                seed=cfg.seed,
                input_size=cfg.domain_input_size or min(64, resolution),
                device=str(device),
            )
            primary.save(work / "domain_extractor.pt")
    except (FeatureExtractorError, ValueError) as err:
        raise EvaluateError(f"feature extractor: {err}") from None
    return [primary, PixelExtractor(min(cfg.pixel_size, resolution))]


def _generative_metrics(
    extractors: Sequence[FeatureExtractor],
    samples: dict[str, Any],
    cfg: EvaluateConfig,
    notify: ProgressFn,
) -> dict[str, Any]:
    n_each = len(samples["synthetic"])
    results = []
    for ext in extractors:
        notify({"stage": "metrics", "event": "extractor", "description": ext.name})
        f_ref = _features(ext, samples["reference"])
        for compared, images in (
            ("synthetic vs real reference", samples["synthetic"]),
            ("real val vs real reference (floor)", samples["floor"]),
        ):
            row = {"compared": compared, "extractor": ext.name, "n_real": len(f_ref)}
            if n_each < 2:
                row["reason"] = "fewer than 2 images of matching classes in val and synthetic"
            else:
                row.update(_distribution(f_ref, _features(ext, images), ext, cfg))
            results.append(row)
    fit = samples["fit_patients"]
    return {
        "n_real": len(samples["reference"]),
        "n_synthetic": n_each,
        "n_reference": n_each,
        "n_each": n_each,
        "class_counts": samples["class_counts"],
        "k": PRECISION_K,
        "reference": (
            f"{len(samples['reference'])} labelled real training images of "
            f"{samples['reference_patients']} patients"
            + (
                f"; the other {fit} training patients fitted the domain extractor, so no "
                "reference image is in-sample for it"
                if fit is not None
                else ""
            )
            + (
                f"; {samples['excluded_unlabelled']} unlabelled training rows excluded (the GAN "
                "never trained on them)"
                if samples["excluded_unlabelled"]
                else ""
            )
        ),
        "equal_n": (
            f"synthetic and floor rows use {n_each} images each with the same class counts "
            f"({_counts(samples['class_counts'])}), the real validation split's mix"
        ),
        "extractors": [ext.describe() for ext in extractors],
        "results": results,
    }


def _distribution(
    f_real: np.ndarray, f_other: np.ndarray, ext: FeatureExtractor, cfg: EvaluateConfig
) -> dict[str, Any]:
    kid, kid_std = kernel_inception_distance(
        f_real, f_other, subsets=cfg.kid_subsets, subset_size=1000, seed=cfg.seed
    )
    if min(len(f_real), len(f_other)) > PRECISION_K:
        precision, recall = precision_recall(f_real, f_other, k=PRECISION_K)
        density, coverage = density_coverage(f_real, f_other, k=PRECISION_K)
    else:  # k-nearest-neighbour balls need more than k points on each side
        precision = recall = density = coverage = None
    return {
        "extractor": ext.name,
        "fid": frechet_distance(f_real, f_other),
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "density": density,
        "coverage": coverage,
        "n_real": len(f_real),
        "n_other": len(f_other),
    }


def _features(ext: FeatureExtractor, images: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Features of uint8 images in chunks, so full-size float copies never exist at once."""
    from fedspine.evaluation.features import extract

    parts = [
        extract(ext, np.asarray(images[i : i + chunk], dtype=np.uint8), batch=64)
        for i in range(0, len(images), chunk)
    ]
    return np.concatenate(parts, axis=0)


def _cap(images: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or len(images) <= n:
        return images
    return images[np.sort(rng.choice(len(images), n, replace=False))]


def _memorisation(
    syn_rows: PreparedDataset,
    syn_images: np.ndarray,
    real_train: PreparedDataset,
    heldout: PreparedDataset,
    cfg: EvaluateConfig,
    pairs_png: Path,
) -> dict[str, Any]:
    """Pixel-space audit (area-downsampled to at most 64 px) and the closest pairs figure."""
    from fedspine.evaluation.features import PixelExtractor

    side = min(64, real_train.resolution)
    pixels = PixelExtractor(side)
    small = [_downsampled(x, side) for x in (syn_images, real_train.images, heldout.images)]
    result = memorisation_audit(*small, extractor=pixels, seed=cfg.seed)
    summary = result.summary()
    exact = int(np.sum(result.syn_to_train <= 1e-9))
    order = np.argsort(result.syn_to_train, kind="stable")[:PAIRS_SHOWN]
    nearest = result.syn_to_train_index[order]
    closest_pairs_png(
        pairs_png,
        syn_images[order],
        np.asarray(real_train.images[nearest], dtype=np.uint8),
        np.arange(len(order)),
        k=len(order),
        dist=result.syn_to_train[order],
    )
    suspected = summary["share_below_p1"] > 0.05 or exact > 0
    summary.update(
        {
            "extractor_description": pixels.describe(),
            "exact_copies": exact,
            "verdict": (
                "memorisation suspected: look at the closest pairs"
                if suspected
                else "no sign of memorisation"
            ),
            "flagged": bool(suspected),
            "rule": (
                "suspected when any synthetic image equals a training image in this space or "
                "more than 5 % fall below the held-out 1st percentile (about 1 % expected)"
            ),
            "closest_pairs": [
                {
                    "synthetic_file": syn_rows.files[int(i)],
                    "train_file": real_train.files[int(j)],
                    "distance": float(result.syn_to_train[i]),
                }
                for i, j in zip(order, nearest, strict=True)
            ],
        }
    )
    return summary


def _downsampled(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 [N, R, R] -> float32 [N, 1, side, side] in [0, 1], area-averaged in chunks."""
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), 1, side, side), dtype=np.float32)
    for start in range(0, len(images), 256):
        x = torch.from_numpy(np.asarray(images[start : start + 256], dtype=np.float32) / 255.0)
        out[start : start + len(x)] = F.adaptive_avg_pool2d(x[:, None], side).numpy()
    return out


def _samples_png(
    path: Path,
    syn_rows: PreparedDataset,
    syn_images: np.ndarray,
    real_train: PreparedDataset,
    seed: int,
) -> None:
    """One row of synthetic then one of real training images per class, at most 128 px."""
    from fedspine.training.generate import image_grid

    rng = np.random.default_rng(seed)
    side = min(128, real_train.resolution)
    rows, names = [], []
    for k, name in enumerate(real_train.class_names):
        for tag, labels, images in (
            ("synthetic", syn_rows.labels, syn_images),
            ("real", real_train.labels, real_train.images),
        ):
            idx = np.flatnonzero(labels == k)
            if len(idx) > SAMPLES_PER_CLASS:
                idx = np.sort(rng.choice(idx, SAMPLES_PER_CLASS, replace=False))
            picked = np.asarray(images[idx], dtype=np.uint8)
            if side != picked.shape[-1] and len(picked):
                picked = (_downsampled(picked, side)[:, 0] * 255).round().astype(np.uint8)
            rows.append(picked.reshape(len(idx), side, side))
            names.append(f"{tag}: {name}")
    image_grid(rows, names, min_cell=64).save(path, format="PNG")


def _dataset_info(data: PreparedDataset, path: Path, splits: Sequence[str]) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(path), "content_hash": data.content_hash, "splits": {}}
    for split in splits:
        rows = data.select(split, labelled=False)
        info["splits"][split] = {
            "images": len(rows),
            "patients": len(set(rows.patient_ids.tolist())),
            "class_counts": rows.class_counts(),
        }
    return info


def _shared_patients(*sets: PreparedDataset) -> int:
    *earlier, test = sets
    seen = set().union(*(set(s.patient_ids.tolist()) for s in earlier))
    return len(seen & set(test.patient_ids.tolist()))


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise EvaluateError(f"{out} already exists; choose another --out or pass --overwrite")
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays to Python, NaN and infinities to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _scaled(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _auc_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f} [no interval]"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}: {n}" for name, n in counts.items())


def _split_text(info: dict[str, Any]) -> str:
    return "; ".join(
        f"{split}: {s['images']} images of {s['patients']} patients ({_counts(s['class_counts'])})"
        for split, s in info["splits"].items()
    )


def _composition(train_data: dict[str, Any]) -> str:
    parts = []
    if train_data["real_train"]:
        parts.append(f"{train_data['real_train']} real")
    if train_data["synthetic"]:
        parts.append(f"{train_data['synthetic']} synthetic")
    return " + ".join(parts)
