"""`python -m fedspine`: the same as the `fedspine` console script."""

from fedspine.cli.main import app

app(prog_name="fedspine")
