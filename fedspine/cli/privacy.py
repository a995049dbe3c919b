"""`fedspine privacy report`: what a run spent, per site, before anything is released."""

from __future__ import annotations

from pathlib import Path

import typer

from fedspine.cli.common import fail

privacy_app = typer.Typer(help="Privacy reports of training runs.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(privacy_app, name="privacy")


@privacy_app.command("report")
def report(
    run: Path = typer.Argument(..., help="A training run or federation output folder."),
    fmt: str = typer.Option("md", "--format", help="md, json or html (self-contained)."),
    out: Path = typer.Option(
        None, "--out", help="Report file (default: RUN/privacy_report.FORMAT)."
    ),
) -> None:
    """ε at δ per site and overall, σ, C, sampling rate, steps, what was private and what public."""
    from fedspine.privacy.report import PrivacyReportError, build_report, write_report

    try:
        path = write_report(run, fmt, out)
        summary = build_report(run)
    except PrivacyReportError as err:
        fail(str(err))
    verdict = "private" if summary["private"] else "NOT PRIVATE"
    overall = summary["overall_epsilon"]
    eps = "n/a" if overall is None else f"{overall:.3f}"
    typer.echo(f"{run.name}: {verdict}, overall ε = {eps} at δ = {summary['delta']}")
    for name, site in summary["sites"].items():
        typer.echo(f"  {name}: ε = {site['epsilon']:.3f}")
    for reason in summary["not_private_reasons"]:
        typer.echo(f"  not private: {reason}")
    typer.echo(f"report: {path}")
