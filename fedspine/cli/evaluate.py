"""`fedspine evaluate`: TSTR/TRTR classifiers, GAN metrics and a memorisation audit, one report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from fedspine.cli.common import fail, progress_bar
from fedspine.evaluation.config import EvaluateConfig, EvaluateError
from fedspine.fileio import EVAL_REPORT_MD
from fedspine.formatting import auc_ci, num

if TYPE_CHECKING:
    from fedspine.evaluation.records import EvaluationRecord


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to the root app."""
    app.command("evaluate")(evaluate)


def evaluate(
    synthetic: Path = typer.Option(
        ...,
        "--synthetic",
        help="Synthetic images: a prepared dataset, or a folder written by `fedspine generate`.",
    ),
    train: Path = typer.Option(
        ...,
        "--train",
        help="Prepared real dataset: 'train' split trains TRTR, 'val' split selects every arm.",
    ),
    test: Path = typer.Option(
        ..., "--test", help="Prepared real dataset whose 'test' split is the test set."
    ),
    out: Path = typer.Option(..., "--out", help="Report folder to write (atomically)."),
    arch: str = typer.Option("small", help="Classifier: small (CPU) or densenet121 (the paper)."),
    task: str = typer.Option("auto", help="auto, binary, multiclass or multilabel (findings)."),
    epochs: int = typer.Option(
        30,
        min=1,
        help="Most validation checks per classifier; every arm trains the same optimizer steps "
        "between checks (one pass over TRTR's training rows), so arms get equal steps.",
    ),
    batch: int = typer.Option(32, min=2, help="Classifier batch size."),
    patience: int = typer.Option(
        5, min=1, help="Checks without a better val AUC before stopping (same steps every arm)."
    ),
    input_size: int = typer.Option(
        None, "--input-size", min=8, help="Classifier input side (default: the data's)."
    ),
    weights: Path = typer.Option(
        None, "--weights", help="State-dict file every classifier starts from (e.g. ImageNet)."
    ),
    mix_per_class: int = typer.Option(
        None,
        "--mix-per-class",
        min=0,
        help="Synthetic images per class added to the real ones in the mixed arm "
        "(default: all; 0 skips the arm).",
    ),
    inception: Path = typer.Option(
        None,
        "--inception",
        help="TorchScript Inception-v3 file for FID/KID (default: a domain CNN trained on "
        "the real train split).",
    ),
    domain_epochs: int = typer.Option(10, min=1, help="Epochs of the domain feature extractor."),
    bootstrap: int = typer.Option(1000, min=1, help="Patient-level bootstrap resamples."),
    heldout: str = typer.Option(
        "test",
        help="Real held-out images for the memorisation audit: test (TEST's test split) or "
        "val (TRAIN's val split).",
    ),
    max_train_images: int = typer.Option(
        None, "--max-train-images", min=2, help="Cap on each arm's training images (CPU)."
    ),
    max_metric_images: int = typer.Option(
        None, "--max-metric-images", min=4, help="Cap on each image set of the GAN metrics."
    ),
    seed: int = typer.Option(0, help="Seed of training, sampling and bootstrap."),
    judge_seed: int = typer.Option(
        None,
        "--judge-seed",
        help="Seed of the TRTS judge (default: the TRTR classifier when the generator trained "
        "against no classifier, else another seed). Refused when it would rebuild the "
        "classifier a SpineGAN generator trained against.",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int = typer.Option(0, min=0, help="CPU threads for torch (0: torch's default)."),
    overwrite: bool = typer.Option(False, help="Replace an existing report folder at --out."),
    compare: list[str] = typer.Option(
        None,
        "--compare",
        help="NAME=CLASSIFIER: also score a classifier trained elsewhere on TRAIN's 'train' "
        "split (e.g. `classifier train --dp` at the synthetic set's ε: the DP ceiling), with its "
        "signal retained against TRTR. Repeatable.",
    ),
) -> None:
    """Evaluate synthetic images against real ones: TSTR/TRTR/mixed AUCs, FID-type metrics
    with the extractor named, and a memorisation audit.

    Writes report.md, report.json, roc.png, samples.png, closest_pairs.png and config.json
    into --out. Every classifier is selected on TRAIN's real 'val' split (private, used only
    for selection); TEST's 'test' split is used only for the final numbers.
    """
    # torch and the data readers load only when a command runs, never for `--help`
    from fedspine.data.prepared import PreparedDatasetError
    from fedspine.data.sources import SourceLayoutError
    from fedspine.evaluation.pipeline import run_evaluation
    from fedspine.models.classifier import ClassifierCheckpointError
    from fedspine.reporting.markdown import render_evaluation

    comparisons: dict[str, Path] = {}
    for item in compare or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            fail(f"--compare {item!r}: expected NAME=CLASSIFIER (a folder or classifier.pt)")
        comparisons[name.strip()] = Path(path.strip())
    cfg = EvaluateConfig(
        arch=arch,
        weights=str(weights) if weights is not None else None,
        task=task,
        epochs=epochs,
        batch=batch,
        patience=patience,
        input_size=input_size,
        seed=seed,
        mix_per_class=mix_per_class,
        bootstrap=bootstrap,
        inception=str(inception) if inception is not None else None,
        domain_epochs=domain_epochs,
        heldout=heldout,
        device=device,
        threads=threads,
        max_train_images=max_train_images,
        max_metric_images=max_metric_images,
        judge_seed=judge_seed,
    )
    try:
        with progress_bar() as bar:
            report = run_evaluation(
                synthetic,
                train,
                test,
                out,
                cfg,
                progress=_Display(bar, epochs),
                overwrite=overwrite,
                renderers={EVAL_REPORT_MD: render_evaluation},
                compare=comparisons,
            )
    except (
        EvaluateError,
        PreparedDatasetError,
        SourceLayoutError,
        ClassifierCheckpointError,
    ) as err:
        fail(str(err))
    for line in summary_lines(report, out):
        typer.echo(line)


def summary_lines(report: EvaluationRecord, out: Path) -> list[str]:
    """The final summary: whether there is signal, each arm's AUC, the ratios, KID and FID."""
    lines = []
    for arm, u in ((report.utility.arms if report.utility else None) or {}).items():
        lines.append(f"{arm}: {u.verdict}")
    for name, arm in (report.arms or {}).items():
        lines.append(f"{name} AUC " + auc_ci(arm.auc, arm.ci).replace(" [no interval]", ""))
    ratios = report.ratios
    for value, label in (
        (ratios.tstr_over_trtr if ratios else None, "TSTR/TRTR"),
        (ratios.mixed_over_trtr if ratios else None, "mixed/TRTR"),
    ):
        if value is not None:
            lines.append(f"{label} = {num(value)}")
    generative = report.generative
    for row in (generative.results or [])[:2]:
        if row.kid is not None:
            lines.append(
                f"{row.compared}: KID {num(row.kid, 4, 'g')}, FID {num(row.fid, 4, 'g')} "
                f"(n = {generative.n_each}, {row.extractor})"
            )
    mem = report.memorisation
    lines.append(
        f"memorisation audit on {mem.extractor}: {mem.verdict} "
        f"({mem.exact_copies} of {mem.n_synthetic} synthetic images are exact copies)"
    )
    lines.append(f"report: {out / report.files.markdown}")
    return lines


class _Display:
    """Turns the pipeline's progress events into one rich bar per stage and a line per epoch."""

    def __init__(self, bar: Any, epochs: int) -> None:
        self.bar = bar
        self.epochs = epochs
        self.current: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            text = event.get("description") or f"{event.get('arm')}: training the classifier"
            self.current = self.bar.add_task(text, total=None)
        elif self.current is None:
            return
        elif kind == "batch":
            done = (event["epoch"] - 1) * event["batches"] + event["batch"]
            self.bar.update(
                self.current,
                completed=done,
                total=self.epochs * event["batches"],
                description=(
                    f"{event['arm']}: epoch {event['epoch']}/{self.epochs} loss {event['loss']:.3f}"
                ),
            )
        elif kind == "epoch":
            auc = event["val_auc"]
            self.bar.console.print(
                f"{event['arm']}: epoch {event['epoch']:3d}  train loss "
                f"{event['train_loss']:.4f}  val AUC {'n/a' if auc is None else f'{auc:.3f}'}"
                + ("  *" if event["best"] else "")
            )
        elif kind == "extractor":
            self.bar.update(self.current, description=f"features: {event['description']}")
        elif kind == "end":
            task = next(t for t in self.bar.tasks if t.id == self.current)
            total = task.total if task.total is not None else 1
            update: dict[str, Any] = {"total": total, "completed": total}
            if event.get("stage") == "classifier":
                update["description"] = f"{event['arm']}: test AUC {event['auc']:.3f}"
            elif event.get("stage") == "metrics":
                update["description"] = "FID, KID, precision/recall, density/coverage"
            self.bar.update(self.current, **update)
            self.current = None
