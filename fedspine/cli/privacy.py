"""`fedspine privacy report`: what a run spent, per site, before anything is released."""

from __future__ import annotations

from pathlib import Path

import typer

from fedspine.cli.common import fail

privacy_app = typer.Typer(
    help="Privacy reports of training runs, and the site's privacy ledger.", no_args_is_help=True
)


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
    from fedspine.privacy.report import PrivacyReportError, build_report
    from fedspine.reporting.privacy import write_privacy_report

    try:
        path = write_privacy_report(run, fmt, out)
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


@privacy_app.command("import-ledger")
def import_ledger(
    prepared: Path = typer.Argument(
        ..., help="A prepared folder holding a version-1 privacy_ledger.json."
    ),
    privacy_home: Path = typer.Option(
        None,
        "--privacy-home",
        help="The site's privacy home (default: $FEDSPINE_PRIVACY_HOME, else "
        "~/.local/share/fedspine/privacy).",
    ),
) -> None:
    """Bring an old ledger's spend into the site's privacy home, attributed to every patient of
    PREPARED (which can only over-count); the old file is renamed *.imported."""
    from fedspine.data.prepared import PreparedDatasetError
    from fedspine.privacy.engine import PrivacyError
    from fedspine.privacy.home import PrivacyHome, PrivacyHomeError
    from fedspine.privacy.ledger import LedgerError
    from fedspine.privacy.migrate import import_v1_ledger

    try:
        home = PrivacyHome(privacy_home)
        records = import_v1_ledger(prepared, home)
    except (PrivacyError, PrivacyHomeError, LedgerError, PreparedDatasetError) as err:
        fail(str(err))
    steps = sum(r["steps"] for r in records)
    typer.echo(
        f"imported {len(records)} record(s), {steps} steps, from {prepared} into {home.path}"
    )
