"""`fedspine report`: one self-contained HTML page of an evaluation, a run and a release."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from fedspine.cli.common import fail


def register(app: typer.Typer) -> None:
    """Add the `report` command to the root app."""
    app.command("report")(report)


def report(
    out: Path = typer.Option(..., "--out", help="HTML file to write (written atomically)."),
    evaluation: Path = typer.Option(
        None, "--evaluation", help="Folder written by `fedspine evaluate --out`."
    ),
    run: Path = typer.Option(
        None, "--run", help="Training run or federation output folder (privacy.json, rounds)."
    ),
    release: Path = typer.Option(None, "--release", help="Folder written by `fedspine release`."),
    steward_audit: Path = typer.Option(
        None,
        "--steward-audit",
        help="The --steward-audit folder of `fedspine release` (its closest-pairs figure).",
    ),
    command: list[str] = typer.Option(
        None,
        "--command",
        help="A command line that produced the inputs, to print in the report (repeatable).",
    ),
    title: str = typer.Option("fedspine report", "--title", help="The page's title."),
) -> None:
    """Write one HTML file, images inline, that opens offline in any browser: per-class
    samples, ROC curves and AUCs with intervals, FID-type metrics with their extractor, ε per
    site and per round, the audits, what was private and public, and the settings behind it.

    Give at least one of --evaluation, --run and --release; a part without its input says so.

    The page may show real training images: it is for the data owner and the steward.
    """
    from fedspine.reporting.html import (  # matplotlib and PIL: not for `--help`
        HtmlReportError,
        write_html_report,
    )

    if evaluation is None and run is None and release is None:
        fail("give at least one of --evaluation, --run and --release")
    words = ["fedspine", "report"]
    for option, value in (
        ("--evaluation", evaluation),
        ("--run", run),
        ("--release", release),
        ("--steward-audit", steward_audit),
    ):
        if value is not None:
            words += [option, str(value)]
    words += ["--out", str(out)]
    commands = [*(command or []), "# this page:", shlex.join(words)]
    try:
        path = write_html_report(
            out,
            evaluation=evaluation,
            run=run,
            release=release,
            steward_audit=steward_audit,
            commands=commands,
            title=title,
        )
    except (HtmlReportError, OSError) as err:
        fail(str(err))
    typer.echo(f"report: {path}")
