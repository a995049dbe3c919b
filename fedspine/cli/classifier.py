"""`fedspine classifier train`: the abnormality classifier on real or synthetic prepared data."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import typer

from fedspine.cli.common import (
    DELTA_HELP,
    fail,
    privacy_home_option,
    privacy_unit_option,
    progress_bar,
)

CLASSIFIER_FILE = "classifier.pt"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
PLOT_FILE = "training.png"
EXIT_INTERRUPTED = 130
NOT_PRIVATE_NOTE = (
    "computed on private data without DP, for the data owner only: the training loss of the "
    "sampled patients and the AUC on the private val split (reported, never used to choose the "
    "model); do not share history.json with the classifier"
)


def register(app: typer.Typer) -> None:
    """Add the `classifier` group (command `train`) to the root app."""
    group = typer.Typer(
        name="classifier",
        help="Train the abnormality classifier used for TSTR/TRTR and SpineGAN's clinical loss.",
        no_args_is_help=True,
    )
    group.command("train")(train)
    app.add_typer(group, name="classifier")


def train(
    data: Path = typer.Argument(
        ..., help="Prepared dataset folder (real or synthetic) to train on."
    ),
    out: Path = typer.Option(..., "--out", help="Classifier folder to write (atomically)."),
    val: Path = typer.Option(
        None,
        "--val",
        help="Prepared dataset whose 'val' split selects the epoch (default: DATA's own 'val').",
    ),
    task: str = typer.Option("auto", help="auto, binary, multiclass or multilabel."),
    arch: str = typer.Option("densenet121", help="densenet121 (the paper's) or small (CPU demo)."),
    norm: str = typer.Option(
        None,
        help="batch, or group (GroupNorm: DP-trainable). (default: batch; group with --dp, which "
        "refuses batch)",
    ),
    epochs: int = typer.Option(
        30,
        min=1,
        help="Most epochs; early stopping may end sooner. With --dp: exactly this many expected "
        "passes over the patients, epochs * patients / patients-per-step steps.",
    ),
    batch: int = typer.Option(32, min=2, help="Images per step (not used with --dp)."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    patience: int = typer.Option(
        5, min=1, help="Epochs without a better val AUC before stopping (not used with --dp)."
    ),
    input_size: int = typer.Option(
        None, "--input-size", min=8, help="Side the images are resized to (default: DATA's)."
    ),
    weights: Path = typer.Option(
        None, "--weights", help="State-dict file to start from (e.g. ImageNet DenseNet-121)."
    ),
    max_train_images: int = typer.Option(
        None, "--max-train-images", min=2, help="Train on a random subset of this many images."
    ),
    seed: int = typer.Option(
        0,
        help="Seed of initialisation, shuffling and augmentation (with --dp, patient sampling "
        "and DP noise draw fresh OS entropy instead).",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int = typer.Option(0, min=0, help="CPU threads for torch (0: all cores)."),
    overwrite: bool = typer.Option(False, help="Replace an existing classifier folder at --out."),
    dp: bool = typer.Option(
        False,
        "--dp",
        help="Patient-level DP-SGD (for SpineGAN's clinical loss under --dp); its steps are "
        "written ahead into the site's privacy ledger (--privacy-home).",
    ),
    epsilon: float = typer.Option(
        None,
        "--epsilon",
        help="With --dp: target ε of the worst training patient after this run, everything on "
        "record for them composed (σ is calibrated from it).",
    ),
    delta: float = typer.Option(None, "--delta", help=DELTA_HELP),
    noise_multiplier: float = typer.Option(
        None, "--noise-multiplier", help="With --dp: σ itself, instead of --epsilon."
    ),
    clip: float = typer.Option(
        None, "--clip", help="With --dp: L2 bound on one patient's gradient. (default: 1.0)"
    ),
    patients_per_step: int = typer.Option(
        None,
        "--patients-per-step",
        min=1,
        help="With --dp: expected patients per step, q = this / patients. (default: 32)",
    ),
    privacy_home: Path = privacy_home_option(),
    privacy_unit: str = privacy_unit_option(),
    max_epsilon: float = typer.Option(
        None,
        "--max-epsilon",
        help="With --dp: refuse to start if the worst training patient would pass this ε "
        "(everything on record for them composed).",
    ),
) -> None:
    """Train a classifier on DATA's 'train' split, keeping the epoch with the best val AUC.

    Selection uses a validation split carved from training data by patient, never a test
    split. Writes classifier.pt, config.json, history.json and training.png into --out.

    With --dp: patient-level DP-SGD for a fixed number of steps, keeping the last model (no
    selection on private data), unweighted BCE, GroupNorm. The steps are written ahead into the
    site's privacy ledger, so a later `fedspine train --dp` on the same patients composes with
    it (whatever folder they were prepared into), and the
    classifier's metadata carries its DP record (what a DP SpineGAN needs). The val AUC is
    only reported. Writes classifier.pt, config.json and history.json into --out.
    """
    import torch

    from fedspine.data.prepared import PreparedDatasetError, load_prepared
    from fedspine.models.classifier import ClassifierCheckpointError, ClassifierConfig
    from fedspine.training.classifier_trainer import (
        ClassifierTrainConfig,
        classifier_recipe,
        train_classifier,
    )

    dp_given = {
        "--epsilon": epsilon,
        "--delta": delta,
        "--noise-multiplier": noise_multiplier,
        "--clip": clip,
        "--patients-per-step": patients_per_step,
        "--privacy-home": privacy_home,
        "--privacy-unit": privacy_unit,
        "--max-epsilon": max_epsilon,
    }
    if not dp and any(v is not None for v in dp_given.values()):
        given = ", ".join(k for k, v in dp_given.items() if v is not None)
        fail(f"{given}: only with --dp")
    if dp and norm == "batch":
        fail(
            "--dp refuses --norm batch: BatchNorm mixes the patients of a batch and its running "
            "statistics escape clipping and noise; use --norm group (the default with --dp)"
        )
    norm = norm or ("group" if dp else "batch")
    if out.exists() and not overwrite:
        fail(f"{out} already exists; choose another --out or pass --overwrite")
    if weights is not None and not weights.is_file():
        fail(f"{weights}: no such weights file")
    try:
        dataset = load_prepared(data)
        val_source = load_prepared(val) if val is not None else dataset
    except PreparedDatasetError as err:
        fail(str(err))
    train_rows = dataset.select("train", labelled=False)
    val_rows = val_source.select("val", labelled=False)
    val_name = val if val is not None else data
    if len(train_rows) == 0:
        fail(f"{data}: no rows in the 'train' split")
    model_cfg = ClassifierConfig(
        arch=arch,
        norm=norm,
        input_size=input_size or dataset.resolution,
        weights_path=str(weights) if weights is not None else None,
    )
    if dp:
        if max_train_images is not None:
            fail("--max-train-images is not supported with --dp; the privacy unit is the patient")
        _train_dp(
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
        return
    if len(val_rows) == 0:
        fail(
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
        fail(str(err))
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        with progress_bar() as bar:
            bar_task = bar.add_task("training", total=None)

            def report(event: dict[str, Any]) -> None:
                if event["event"] == "batch":
                    done = (event["epoch"] - 1) * event["batches"] + event["batch"]
                    bar.update(bar_task, completed=done, total=epochs * event["batches"])
                    bar.update(
                        bar_task,
                        description=f"epoch {event['epoch']}/{epochs} loss {event['loss']:.3f}",
                    )
                else:
                    auc = event["val_auc"]
                    auc_text = "n/a" if auc is None else f"{auc:.3f}"
                    typer.echo(
                        f"epoch {event['epoch']:3d}  train loss {event['train_loss']:.4f}  "
                        f"val loss {event['val_loss']:.4f}  val AUC {auc_text}"
                        + ("  *" if event["best"] else ""),
                        err=True,
                    )

            model, history = train_classifier(train_rows, val_rows, cfg, progress=report)
            bar.update(bar_task, total=bar.tasks[0].completed)
    except (ValueError, ClassifierCheckpointError) as err:
        fail(str(err))

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
    typer.echo(
        f"wrote {out}: {history['task']} classifier, best epoch {history['best_epoch']} of "
        f"{len(history['epochs'])}, val AUC {'n/a' if best is None else f'{best:.3f}'} ({parts})"
    )


def _train_dp(
    *,
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
) -> None:
    """`classifier train --dp`: plan σ against the ledger and cap, train, record, then write.

    The order matters: nothing is written when the cap refuses; the ledger records every step
    taken (an interrupted run included) before any output exists, so no classifier leaves this
    command without its ε in the ledger.
    """
    import torch

    from fedspine.models.classifier import ClassifierCheckpointError, build_classifier
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
    )

    if (options["target_epsilon"] is None) == (options["noise_multiplier"] is None):
        fail("--dp needs exactly one of --epsilon (σ is calibrated from it) and --noise-multiplier")
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
        fail(str(err))  # PrivacyCapExceeded (a ValueError) says spent, remaining and the cap
    typer.echo(
        f"DP-SGD: {plan.steps} steps at σ={plan.noise_multiplier:.4g}, q={plan.sample_rate:.4g} "
        f"({plan.patients} patients), clip {plan.clip:g}, δ={plan.delta:.3g}; data ε after this "
        f"run ≤ {plan.projected_epsilon:.3f} (RDP, worst patient; privacy home {plan.privacy_home})",
        err=True,
    )
    notes = {"classifier": out.name, "task": resolved_task, "epochs": epochs}
    reservation = plan.reserve(notes)
    done = 0
    try:
        with progress_bar() as bar:
            bar_task = bar.add_task("DP training", total=plan.steps)

            def report(step: int) -> None:
                nonlocal done
                done = step
                bar.update(bar_task, completed=step)

            result = train_classifier_dp_steps(
                model,
                dataset,
                resolved_task,
                plan.config(lr),
                plan.steps,
                seed=seed,
                device=dev,
                progress=report,
                reservation=reservation,
            )
    except BaseException as err:
        record = record_classifier_dp(plan, reservation, {**notes, "interrupted": True})
        if isinstance(err, KeyboardInterrupt):
            fail(
                f"interrupted after {done} of {plan.steps} steps; they are in the ledger of "
                f"{plan.privacy_home} (worst patient's ε now {record['data_epsilon_after']:.3f}); "
                "nothing was written",
                code=EXIT_INTERRUPTED,
            )
        if isinstance(err, ValueError):
            fail(str(err))
        raise
    if (result["steps"], result["sample_rate"]) != (plan.steps, plan.sample_rate):
        record_classifier_dp(plan, reservation, notes)
        fail("the DP steps taken differ from the plan; recorded what ran, wrote nothing")
    dp_record = record_classifier_dp(plan, reservation, notes)

    val_eval = None
    if val_name is not None:
        try:
            val_eval = evaluate_classifier(model, val_source.select("val", labelled=False), cfg)
        except ValueError as err:
            typer.echo(f"no val AUC: {err}", err=True)
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
    typer.echo(
        f"wrote {out}: {resolved_task} DP classifier, {result['steps']} steps; "
        f"ε = {dp_record['epsilon']:.3f} at δ = {plan.delta:.2g} for this classifier, "
        f"worst patient's ε now {dp_record['data_epsilon_after']:.3f} (privacy home "
        f"{plan.privacy_home}); "
        f"final val AUC {'n/a' if auc is None else f'{auc:.3f}'} (reported only, not private)"
    )


def _write_outputs(
    out: Path,
    model: Any,
    meta: dict[str, Any],
    config: dict[str, Any],
    history: dict[str, Any],
    plot: bool = True,
) -> None:
    """Build the classifier folder beside ``out`` and rename it into place."""
    from fedspine.fileio import publish_folder
    from fedspine.models.classifier import save_classifier

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
