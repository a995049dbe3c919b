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
