"""`fedspine classifier train`: the abnormality classifier on real or synthetic prepared data.

The command parses its flags into a ``ClassifierRequest`` and makes one library call,
``fedspine.training.classifier_run.train_classifier_run``; it only draws the progress.
"""

from __future__ import annotations

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

EXIT_INTERRUPTED = 130


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
    from fedspine.data.prepared import PreparedDatasetError
    from fedspine.models.classifier import ClassifierCheckpointError
    from fedspine.training.classifier_run import (
        ClassifierDPRequest,
        ClassifierInterrupted,
        ClassifierRequest,
        ClassifierRunError,
        train_classifier_run,
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
    request = ClassifierRequest(
        data=data,
        out=out,
        val=val,
        task=task,
        arch=arch,
        norm=norm,
        epochs=epochs,
        batch=batch,
        lr=lr,
        patience=patience,
        input_size=input_size,
        weights=weights,
        max_train_images=max_train_images,
        seed=seed,
        device=device,
        threads=threads,
        overwrite=overwrite,
        dp=ClassifierDPRequest(
            target_epsilon=epsilon,
            noise_multiplier=noise_multiplier,
            delta=delta,
            clip=1.0 if clip is None else clip,
            patients_per_step=32 if patients_per_step is None else patients_per_step,
            privacy_home=privacy_home,
            privacy_unit=privacy_unit,
            max_epsilon=max_epsilon,
        )
        if dp
        else None,
    )
    try:
        with progress_bar() as bar:
            train_classifier_run(request, _BarReporter(bar, epochs))
    except ClassifierInterrupted as stop:
        fail(stop.message, code=EXIT_INTERRUPTED)
    except (ClassifierRunError, PreparedDatasetError, ClassifierCheckpointError) as err:
        fail(str(err))


class _BarReporter:
    """A rich bar for the steps, a line per epoch on stderr, the final lines on stdout."""

    def __init__(self, bar: Any, epochs: int) -> None:
        self.bar, self.epochs = bar, epochs
        self.task = bar.add_task("training", total=None)

    def message(self, text: str) -> None:
        typer.echo(text)

    def event(self, event: dict[str, Any]) -> None:
        if event["event"] == "batch":
            done = (event["epoch"] - 1) * event["batches"] + event["batch"]
            self.bar.update(self.task, completed=done, total=self.epochs * event["batches"])
            self.bar.update(
                self.task,
                description=f"epoch {event['epoch']}/{self.epochs} loss {event['loss']:.3f}",
            )
            return
        auc = event["val_auc"]
        auc_text = "n/a" if auc is None else f"{auc:.3f}"
        typer.echo(
            f"epoch {event['epoch']:3d}  train loss {event['train_loss']:.4f}  "
            f"val loss {event['val_loss']:.4f}  val AUC {auc_text}"
            + ("  *" if event["best"] else ""),
            err=True,
        )

    def dp_start(self, steps: int) -> None:
        self.bar.update(self.task, total=steps, description="DP training")

    def dp_step(self, step: int) -> None:
        self.bar.update(self.task, completed=step)
