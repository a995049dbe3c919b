"""One classifier training run, as a library call: ``train_classifier_run(ClassifierRequest)``.

`fedspine classifier train` parses its flags into a :class:`ClassifierRequest` and makes this
call; ``reproduce`` makes the same call. Without DP it trains with selection on a validation
split; with DP (``request.dp``) it plans σ against the privacy ledger and cap, reserves the
steps before they run, trains, records, then writes. The folder is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fedspine.data.prepared import PreparedDatasetError, load_prepared
from fedspine.fileio import CLASSIFIER_WEIGHTS, RUN_CONFIG, RUN_TRAINING_PLOT, publish_folder
from fedspine.models.classifier import (
    ClassifierCheckpointError,
    ClassifierConfig,
    build_classifier,
    save_classifier,
)
from fedspine.privacy.home import PrivacyHomeError
from fedspine.privacy.ledger import LedgerError
from fedspine.training.classifier_dp import (
    check_dp_model,
    plan_classifier_dp,
    record_classifier_dp,
    train_classifier_dp_steps,
)
from fedspine.training.classifier_trainer import (
    ClassifierTrainConfig,
    classifier_recipe,
    evaluate_classifier,
    resolve_device,
    resolve_task,
    targets,
    train_classifier,
)

CLASSIFIER_FILE = CLASSIFIER_WEIGHTS
CONFIG_FILE = RUN_CONFIG
HISTORY_FILE = "history.json"
PLOT_FILE = RUN_TRAINING_PLOT
NOT_PRIVATE_NOTE = (
    "computed on private data without DP, for the data owner only: the training loss of the "
    "sampled patients and the AUC on the private val split (reported, never used to choose the "
    "model); do not share history.json with the classifier"
)


class ClassifierRunError(Exception):
    """The classifier cannot be trained as asked; the message is a one-line reason."""


class ClassifierInterrupted(KeyboardInterrupt):
    """Ctrl-C during DP training, after the ledger recorded every step that ran."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class ClassifierDPRequest:
    """Patient-level DP-SGD: exactly one of ``target_epsilon`` and ``noise_multiplier``."""

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    clip: float = 1.0
    patients_per_step: int = 32
    privacy_home: str | os.PathLike | None = None
    privacy_unit: str | None = None
    max_epsilon: float | None = None


@dataclass
class ClassifierRequest:
    """Everything one classifier run needs (the defaults are the command line's)."""

    data: Path
    out: Path
    val: Path | None = None
    task: str = "auto"
    arch: str = "densenet121"
    norm: str | None = None
    epochs: int = 30
    batch: int = 32
    lr: float = 1e-3
    patience: int = 5
    input_size: int | None = None
    weights: Path | None = None
    max_train_images: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    overwrite: bool = False
    dp: ClassifierDPRequest | None = None


@dataclass
class ClassifierRunResult:
    """The written folder with the classifier's metadata and training history."""

    out: Path
    history: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class ClassifierReporter:
    """Where a classifier run's lines and progress go; this base class stays silent."""

    def message(self, text: str) -> None:
        """A line for the user."""

    def event(self, event: dict[str, Any]) -> None:
        """The trainer's batch and epoch events (see ``train_classifier``)."""

    def dp_start(self, steps: int) -> None:
        """DP training of ``steps`` steps begins."""

    def dp_step(self, step: int) -> None:
        """After every DP step."""


def train_classifier_run(
    request: ClassifierRequest, reporter: ClassifierReporter | None = None
) -> ClassifierRunResult:
    """Train the classifier ``request`` describes and write its folder; see the module doc."""
    report = reporter or ClassifierReporter()
    data, out, val = Path(request.data), Path(request.out), request.val
    val = Path(val) if val is not None else None
    task, arch, norm, epochs = request.task, request.arch, request.norm, request.epochs
    batch, lr, patience, seed = request.batch, request.lr, request.patience, request.seed
    input_size, max_train_images = request.input_size, request.max_train_images
    weights = Path(request.weights) if request.weights is not None else None
    device, threads, overwrite = request.device, request.threads, request.overwrite
    dp = request.dp is not None
    opts = request.dp or ClassifierDPRequest()
    epsilon, noise_multiplier, delta = opts.target_epsilon, opts.noise_multiplier, opts.delta
    clip, patients_per_step = opts.clip, opts.patients_per_step
    privacy_home, privacy_unit, max_epsilon = opts.privacy_home, opts.privacy_unit, opts.max_epsilon
    if dp and norm == "batch":
        raise ClassifierRunError(
            "--dp refuses --norm batch: BatchNorm mixes the patients of a batch and its running "
            "statistics escape clipping and noise; use --norm group (the default with --dp)"
        )
    norm = norm or ("group" if dp else "batch")
    if out.exists() and not overwrite:
        raise ClassifierRunError(f"{out} already exists; choose another --out or pass --overwrite")
    if weights is not None and not weights.is_file():
        raise ClassifierRunError(f"{weights}: no such weights file")
    try:
        dataset = load_prepared(data)
        val_source = load_prepared(val) if val is not None else dataset
    except PreparedDatasetError as err:
        raise ClassifierRunError(str(err)) from None
    train_rows = dataset.select("train", labelled=False)
    val_rows = val_source.select("val", labelled=False)
    val_name = val if val is not None else data
    if len(train_rows) == 0:
        raise ClassifierRunError(f"{data}: no rows in the 'train' split")
    model_cfg = ClassifierConfig(
        arch=arch,
        norm=norm,
        input_size=input_size or dataset.resolution,
        weights_path=str(weights) if weights is not None else None,
    )
    if dp:
        if max_train_images is not None:
            raise ClassifierRunError(
                "--max-train-images is not supported with --dp; the privacy unit is the patient"
            )
        return _train_dp(
            report=report,
            data=data,
            dataset=dataset,
            val_name=val_name if len(val_rows) else None,
            val_source=val_source,
            out=out,
            task=task,
            model_cfg=model_cfg,
            epochs=epochs,
            lr=lr,
            seed=seed,
            device=device,
            threads=threads,
            options={
                "target_epsilon": epsilon,
                "noise_multiplier": noise_multiplier,
                "delta": delta,
                "clip": 1.0 if clip is None else clip,
                "patients_per_step": 32 if patients_per_step is None else patients_per_step,
                "privacy_home": privacy_home,
                "privacy_unit": privacy_unit,
                "max_epsilon": max_epsilon,
            },
        )
    if len(val_rows) == 0:
        raise ClassifierRunError(
            f"{val_name}: no rows in the 'val' split; ingest with --val-fraction above 0 "
            "or pass --val PREPARED"
        )

    cfg = ClassifierTrainConfig(
        task=task,
        epochs=epochs,
        batch=batch,
        lr=lr,
        patience=patience,
        seed=seed,
        device=device,
        max_train_images=max_train_images,
        input_size=input_size,
        model=model_cfg,
    )
    try:
        cfg.validate()
        cfg.model.validate()
    except ValueError as err:
        raise ClassifierRunError(str(err)) from None
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        model, history = train_classifier(train_rows, val_rows, cfg, progress=report.event)
    except (ValueError, ClassifierCheckpointError) as err:
        raise ClassifierRunError(str(err)) from None

    meta = {
        "task": history["task"],
        "class_names": history["class_names"],
        "output_names": history["output_names"],
        "input_size": history["input_size"],
        "training_data": {
            "path": str(data),
            "content_hash": dataset.content_hash,
            "split": "train",
            "rows": history["train_rows"],
        },
        "selection_data": {
            "path": str(val_name),
            "content_hash": val_source.content_hash,
            "split": "val",
            "rows": history["val_rows"],
        },
        "best_epoch": history["best_epoch"],
        "best_val_auc": history["best_val_auc"],
    }
    resolved = replace(
        cfg,
        task=history["task"],
        input_size=history["input_size"],
        model=ClassifierConfig.from_dict(history["model_config"]),
    )
    meta["recipe"] = classifier_recipe(resolved)
    config = {"train": resolved.to_dict(), "data": str(data), "val": str(val_name)}
    _write_outputs(out, model, meta, config, history)
    per_output = history["epochs"][history["best_epoch"] - 1]["val_auc_per_output"]
    parts = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in per_output.items())
    best = history["best_val_auc"]
    report.message(
        f"wrote {out}: {history['task']} classifier, best epoch {history['best_epoch']} of "
        f"{len(history['epochs'])}, val AUC {'n/a' if best is None else f'{best:.3f}'} ({parts})"
    )
    return ClassifierRunResult(out=out, history=history, meta=meta)


def _train_dp(
    *,
    report: ClassifierReporter,
    data: Path,
    dataset: Any,
    val_name: Path | None,
    val_source: Any,
    out: Path,
    task: str,
    model_cfg: Any,
    epochs: int,
    lr: float,
    seed: int,
    device: str,
    threads: int,
    options: dict[str, Any],
) -> ClassifierRunResult:
    """`classifier train --dp`: plan σ against the ledger and cap, train, record, then write.

    The order matters: nothing is written when the cap refuses; the ledger records every step
    taken (an interrupted run included) before any output exists, so no classifier leaves this
    command without its ε in the ledger.
    """
    if (options["target_epsilon"] is None) == (options["noise_multiplier"] is None):
        raise ClassifierRunError(
            "--dp needs exactly one of --epsilon (σ is calibrated from it) and --noise-multiplier"
        )
    train_rows = dataset.select("train", labelled=False)
    try:
        resolved_task = resolve_task(task, train_rows)
        _, idx, output_names = targets(train_rows, resolved_task)
        model_cfg = replace(model_cfg, num_outputs=len(output_names))
        model_cfg.validate()
        cfg = ClassifierTrainConfig(
            task=resolved_task,
            epochs=epochs,
            lr=lr,
            seed=seed,
            device=device,
            class_weighting=False,
            input_size=model_cfg.input_size,
            model=model_cfg,
        )
        cfg.validate()
        dev = resolve_device(device)
        plan = plan_classifier_dp(dataset, resolved_task, epochs=epochs, **options)
        torch.set_num_threads(threads or os.cpu_count() or 1)
        torch.manual_seed(seed)
        model = build_classifier(model_cfg)
        check_dp_model(model)
    except (ValueError, LedgerError, PrivacyHomeError, ClassifierCheckpointError) as err:
        # PrivacyCapExceeded (a ValueError) says spent, remaining and the cap.
        raise ClassifierRunError(str(err)) from None
    report.message(
        f"DP-SGD: {plan.steps} steps at σ={plan.noise_multiplier:.4g}, q={plan.sample_rate:.4g} "
        f"({plan.patients} patients), clip {plan.clip:g}, δ={plan.delta:.3g}; data ε after this "
        f"run ≤ {plan.projected_epsilon:.3f} (RDP, worst patient; privacy home {plan.privacy_home})"
    )
    notes = {"classifier": out.name, "task": resolved_task, "epochs": epochs}
    reservation = plan.reserve(notes)
    done = 0
    try:
        report.dp_start(plan.steps)

        def on_step(step: int) -> None:
            nonlocal done
            done = step
            report.dp_step(step)

        result = train_classifier_dp_steps(
            model,
            dataset,
            resolved_task,
            plan.config(lr),
            plan.steps,
            seed=seed,
            device=dev,
            progress=on_step,
            reservation=reservation,
        )
    except BaseException as err:
        record = record_classifier_dp(plan, reservation, {**notes, "interrupted": True})
        if isinstance(err, KeyboardInterrupt):
            raise ClassifierInterrupted(
                f"interrupted after {done} of {plan.steps} steps; they are in the ledger of "
                f"{plan.privacy_home} (worst patient's ε now {record['data_epsilon_after']:.3f}); "
                "nothing was written"
            ) from None
        if isinstance(err, ValueError):
            raise ClassifierRunError(str(err)) from None
        raise
    if (result["steps"], result["sample_rate"]) != (plan.steps, plan.sample_rate):
        record_classifier_dp(plan, reservation, notes)
        raise ClassifierRunError(
            "the DP steps taken differ from the plan; recorded what ran, wrote nothing"
        )
    dp_record = record_classifier_dp(plan, reservation, notes)

    val_eval = None
    if val_name is not None:
        try:
            val_eval = evaluate_classifier(model, val_source.select("val", labelled=False), cfg)
        except ValueError as err:
            report.message(f"no val AUC: {err}")
    meta = {
        "task": resolved_task,
        "class_names": list(dataset.class_names),
        "output_names": output_names,
        "input_size": model_cfg.input_size,
        "training_data": {
            "path": str(data),
            "split": "train",
            "rows": len(idx),
            "patients": plan.patients,
        },
        "selection_data": None,
        "dp": dp_record,
        "recipe": classifier_recipe(cfg, dp=True),
    }
    history = {
        "task": resolved_task,
        "output_names": output_names,
        "class_names": list(dataset.class_names),
        "input_size": model_cfg.input_size,
        "device": str(dev),
        "dp": True,
        "train_splits": ["train"],
        "train_rows": len(idx),
        "train_patients": plan.patients,
        "steps": result["steps"],
        "sample_rate": result["sample_rate"],
        "noise_multiplier": result["noise_multiplier"],
        "clip": result["clip"],
        "model_config": asdict(model_cfg),
        "pos_weight": None,
        "not_private": NOT_PRIVATE_NOTE,
        "mean_train_loss": result["mean_loss"],
        "final_val": None
        if val_eval is None
        else {
            "path": str(val_name),
            "rows": val_eval["rows"],
            "auc": val_eval["mean_auc"],
            "auc_per_output": val_eval["auc"],
        },
    }
    config = {
        "train": cfg.to_dict(),
        "dp": {
            "target_epsilon": plan.target_epsilon,
            "noise_multiplier": plan.noise_multiplier,
            "delta": plan.delta,
            "clip": plan.clip,
            "patients_per_step": plan.patients_per_step,
            "steps": plan.steps,
            "privacy_home": str(plan.privacy_home),
            "run_id": plan.run_id,
            "max_epsilon": plan.max_epsilon,
        },
        "data": str(data),
        "val": None if val_name is None else str(val_name),
    }
    _write_outputs(out, model, meta, config, history, plot=False)
    auc = None if val_eval is None else val_eval["mean_auc"]
    report.message(
        f"wrote {out}: {resolved_task} DP classifier, {result['steps']} steps; "
        f"ε = {dp_record['epsilon']:.3f} at δ = {plan.delta:.2g} for this classifier, "
        f"worst patient's ε now {dp_record['data_epsilon_after']:.3f} (privacy home "
        f"{plan.privacy_home}); "
        f"final val AUC {'n/a' if auc is None else f'{auc:.3f}'} (reported only, not private)"
    )
    return ClassifierRunResult(out=out, history=history, meta=meta)


def _write_outputs(
    out: Path,
    model: Any,
    meta: dict[str, Any],
    config: dict[str, Any],
    history: dict[str, Any],
    plot: bool = True,
) -> None:
    """Build the classifier folder beside ``out`` and rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_classifier(tmp / CLASSIFIER_FILE, model, model.classifier_config, meta)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n")
        if plot:
            plot_history(history, tmp / PLOT_FILE)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plot_history(history: dict[str, Any], path: Path) -> None:
    """Loss (train, val) and validation AUC per epoch, the selected epoch marked."""
    import matplotlib  # lazy: only the history plot needs matplotlib, and it loads slowly

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the Agg backend is chosen
    from matplotlib.ticker import MaxNLocator  # lazy: as above

    epochs = [r["epoch"] for r in history["epochs"]]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in history["epochs"]], label="train (weighted)")
    ax_loss.plot(epochs, [r["val_loss"] for r in history["epochs"]], label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("BCE loss")
    ax_loss.legend()
    aucs = [float("nan") if r["val_auc"] is None else r["val_auc"] for r in history["epochs"]]
    ax_auc.plot(epochs, aucs, marker="o", label="val AUC (mean)")
    if history["best_epoch"] is not None and history["best_val_auc"] is not None:
        ax_auc.axvline(history["best_epoch"], color="grey", linestyle="--", label="selected")
    for ax in (ax_loss, ax_auc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("AUC")
    ax_auc.legend()
    fig.suptitle(f"classifier ({history['task']}, {history['train_rows']} training images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
