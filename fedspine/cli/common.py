"""Shared pieces of the command line: one-line failures and progress bars."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit non-zero with a one-line reason on stderr."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def progress_bar() -> Progress:
    """A rich progress bar (count, rate-bearing ETA) that goes to stderr."""
    from rich.console import Console

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


PRIVACY_HOME_HELP = (
    "With --dp: the site's privacy home, holding its ledger and patient key (default: "
    "$FEDSPINE_PRIVACY_HOME, else ~/.local/share/fedspine/privacy). Every DP run on the same "
    "patients must use the same home: the ledger follows patients across re-ingests."
)
PRIVACY_UNIT_HELP = (
    "With --dp: 'image' accepts data without patient identifiers, each image counted as one "
    "person (refused otherwise). The unit ingest recorded is used in any case."
)
DELTA_HELP = (
    "With --dp: δ, at most the site's min(1e-5, 1/(10·patients)) (a larger one is refused). "
    "(default: the site's)"
)


def privacy_home_option():
    return typer.Option(None, "--privacy-home", help=PRIVACY_HOME_HELP)


def privacy_unit_option():
    return typer.Option(None, "--privacy-unit", help=PRIVACY_UNIT_HELP)
