"""`fedspine reproduce`: the paper's experiment table on a VinDr-SpineXR root or a phantom site."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from fedspine.cli.common import fail
from fedspine.experiments.budgets import BUDGETS
from fedspine.fileio import REPRODUCE_MD

BUDGET_NAMES = tuple(BUDGETS)


def register(app: typer.Typer) -> None:
    """Add the `reproduce` command to the root app."""
    app.command("reproduce")(reproduce)


def reproduce(
    root: Path = typer.Argument(
        ...,
        help="VinDr-SpineXR folder (train_images/, test_images/, annotations/) or a phantom site.",
    ),
    out: Path = typer.Option(..., "--out", help="Folder for every output (rerun to continue)."),
    budget: str = typer.Option(
        "smoke",
        "--budget",
        help="smoke (2 CPU cores, ~15 min, phantom data), quick (every arm, the DP ablation "
        "included, CPU), full (the paper's configuration, for a GPU).",
    ),
    seeds: int | None = typer.Option(
        None,
        "--seeds",
        help="Train every arm with N training seeds (the budget's seed, +1, ...) and report the "
        "mean and range across them (default: the budget's; smoke and quick 1, full 3).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit."),
    inception: Path = typer.Option(
        None,
        "--inception",
        help="Local Inception-v3 TorchScript file for FID (else a domain CNN; nothing downloads).",
    ),
    classifier_weights: Path = typer.Option(
        None,
        "--classifier-weights",
        help="State dict to start every classifier from (e.g. ImageNet DenseNet-121 for full).",
    ),
    public_run: Path = typer.Option(
        None,
        "--public-run",
        help="A run trained with --public-data (e.g. `fedspine pretrain`'s OUT) at the budget's "
        "resolution: adds the public-only arm and, per ε, DP-SGD from it with D's head "
        "privatised and the DP mean-embedding route fitted from it.",
    ),
) -> None:
    """Run the paper's experiments (real classifier, cGANs, SpineGAN, DP-SGD at several ε) on one
    dataset and write OUT/reproduce.md and OUT/reproduce.json: one table with our numbers and ε
    beside the published ones, and which of the paper's errors each setting corrects.

    The DP ablation (quick and full) trains, beside DP-SGD, clipping without noise, noise without
    clipping, and the paper's own noise-then-clip scheme; these arms are not private and are
    marked so (`fedspine train --dp-scheme`).

    With --public-run RUN the public checkpoint's own generator (no private data, ε 0) and,
    at each ε, DP-SGD from it on few D parameters and the one-shot DP mean embedding fitted from
    it run too; the table gives each DP arm minus the public-only arm.

    Each arm is written to OUT/arms/NAME only when complete; rerunning the same command skips
    complete arms and continues an interrupted one. With --seeds N, seed replicates after the
    first are written to OUT/arms/NAME-seedS; rerunning with a larger N adds replicates.
    """
    from fedspine.experiments.reproduce import (  # lazy: keeps torch out of `fedspine --help`
        ReproduceError,
        ReproduceRecord,
        format_plan,
        make_plan,
    )
    from fedspine.experiments.reproduce import reproduce as run_reproduction  # lazy: as above

    if budget not in BUDGET_NAMES:
        fail(f"--budget {budget}: choose one of {', '.join(BUDGET_NAMES)}")
    for option, path in (("--inception", inception), ("--classifier-weights", classifier_weights)):
        if path is not None and not path.is_file():
            fail(f"{option} {path}: no such file")
    extra = {
        "inception": str(inception) if inception else None,
        "classifier_weights": str(classifier_weights) if classifier_weights else None,
        "public_run": public_run,
    }
    overrides = {"seeds": seeds} if seeds is not None else None
    try:
        if dry_run:
            typer.echo(format_plan(make_plan(root, out, budget, overrides, **extra)), nl=False)
            if not root.is_dir():
                typer.echo(f"note: {root} does not exist yet; a real run needs it")
            return
        start = time.perf_counter()
        report = run_reproduction(
            root,
            out,
            budget,
            overrides,
            stage=lambda msg: typer.echo(f"==> {msg}", err=True),
            **extra,
        )
    except ReproduceError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail(f"interrupted; complete arms are kept under {out}/arms, rerun to continue", 130)
    record = ReproduceRecord.from_json(report)
    typer.echo("")
    for row in record.table:
        typer.echo(
            f"  {row.experiment}: ours {row.ours}"
            + (f"; signal retained {row.signal}" if row.signal else "")
            + (f"; ε {row.epsilon}" if row.epsilon else "")
            + f"; paper {row.paper}"
        )
    typer.echo(f"wrote {out / REPRODUCE_MD} in {(time.perf_counter() - start) / 60:.1f} min")
    failed = [n for n, a in record.arms.items() if a["status"] == "failed"]
    if failed:
        fail(f"arm(s) failed: {', '.join(failed)} (see {out}/logs); rerun to retry them")
