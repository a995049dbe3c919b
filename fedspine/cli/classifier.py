"""`fedspine classifier train`: the abnormality classifier on real or synthetic prepared data."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from fedspine.cli.common import fail, progress_bar

CLASSIFIER_FILE = "classifier.pt"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
PLOT_FILE = "training.png"


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
    norm: str = typer.Option("batch", help="batch, or group (GroupNorm: DP-trainable)."),
    epochs: int = typer.Option(30, min=1, help="Most epochs; early stopping may end sooner."),
    batch: int = typer.Option(32, min=2, help="Images per step."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    patience: int = typer.Option(5, min=1, help="Epochs without a better val AUC before stopping."),
    input_size: int = typer.Option(
        None, "--input-size", min=8, help="Side the images are resized to (default: DATA's)."
    ),
    weights: Path = typer.Option(
        None, "--weights", help="State-dict file to start from (e.g. ImageNet DenseNet-121)."
    ),
    max_train_images: int = typer.Option(
        None, "--max-train-images", min=2, help="Train on a random subset of this many images."
    ),
    seed: int = typer.Option(0, help="Seed of initialisation, shuffling and augmentation."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int = typer.Option(0, min=0, help="CPU threads for torch (0: all cores)."),
    overwrite: bool = typer.Option(False, help="Replace an existing classifier folder at --out."),
) -> None:
    """Train a classifier on DATA's 'train' split, keeping the epoch with the best val AUC.

    Selection uses a validation split carved from training data by patient, never a test
    split. Writes classifier.pt, config.json, history.json and training.png into --out.
    """
    import torch

    from fedspine.data.prepared import PreparedDatasetError, load_prepared
    from fedspine.models.classifier import ClassifierCheckpointError, ClassifierConfig
    from fedspine.training.classifier_trainer import ClassifierTrainConfig, train_classifier

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
        model=ClassifierConfig(
            arch=arch,
            norm=norm,
            input_size=input_size or dataset.resolution,
            weights_path=str(weights) if weights is not None else None,
        ),
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
    config = {"train": resolved.to_dict(), "data": str(data), "val": str(val_name)}
    _write_outputs(out, model, meta, config, history)
    per_output = history["epochs"][history["best_epoch"] - 1]["val_auc_per_output"]
    parts = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in per_output.items())
    best = history["best_val_auc"]
    typer.echo(
        f"wrote {out}: {history['task']} classifier, best epoch {history['best_epoch']} of "
        f"{len(history['epochs'])}, val AUC {'n/a' if best is None else f'{best:.3f}'} ({parts})"
    )


def _write_outputs(
    out: Path,
    model: Any,
    meta: dict[str, Any],
    config: dict[str, Any],
    history: dict[str, Any],
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
