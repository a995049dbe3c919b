"""Fixtures shared by the release tests."""

from __future__ import annotations

import pytest
import typer

from fedspine.cli.release import register


@pytest.fixture(scope="module")
def cli():
    """A root app holding only `release` and `verify`, as the real CLI registers them."""
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    register(app)
    return app
