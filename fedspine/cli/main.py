"""The `fedspine` command line: one typer app, one module per command group.

Heavy imports (torch, pydicom, flwr) stay inside the commands so that `--help` is instant.
"""

import typer

from fedspine import __version__
from fedspine.cli import classifier as classifier_commands
from fedspine.cli import data as data_commands
from fedspine.cli import demo as demo_commands
from fedspine.cli import embedding as embedding_commands
from fedspine.cli import evaluate as evaluate_commands
from fedspine.cli import federation as federation_commands
from fedspine.cli import privacy as privacy_commands
from fedspine.cli import release as release_commands
from fedspine.cli import report as report_commands
from fedspine.cli import reproduce as reproduce_commands
from fedspine.cli import train as train_commands

app = typer.Typer(
    name="fedspine",
    help=(
        "Federated, differentially private synthetic spine radiographs.\n\n"
        "Sites prepare their DICOMs once (`ingest`), train a conditional StyleGAN2-ADA "
        "(`train`), and release synthetic images (`generate`). `phantom` makes realistic "
        "test data when no real data is at hand."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fedspine {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """fedspine command line."""


demo_commands.register(app)
data_commands.register(app)
train_commands.register(app)
embedding_commands.register(app)
classifier_commands.register(app)
evaluate_commands.register(app)
federation_commands.register(app)
privacy_commands.register(app)
release_commands.register(app)
report_commands.register(app)
reproduce_commands.register(app)
