"""Every command's `--help` answers without loading the heavy stack (fedspine.cli's rule)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "opacus", "flwr")

# Run in a fresh interpreter: this test session has long imported torch.
PROBE = """
import json, sys
import click
import typer
from typer.testing import CliRunner
from fedspine.cli.main import app

def paths(command, prefix):
    yield prefix
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from paths(sub, [*prefix, name])

root = typer.main.get_command(app)
runner = CliRunner()
results = []
for path in paths(root, []):
    result = runner.invoke(app, [*path, "--help"])
    results.append({"path": path, "exit": result.exit_code, "usage": "Usage" in result.output})
print(json.dumps({"results": results, "loaded": [m for m in HEAVY if m in sys.modules]}))
"""


def test_every_help_answers_without_torch_opacus_or_flwr():
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    paths = [" ".join(r["path"]) for r in report["results"]]
    assert {"train", "evaluate", "reproduce", "server start", "client status"} <= set(paths)
    broken = [r for r in report["results"] if r["exit"] != 0 or not r["usage"]]
    assert not broken, broken
    assert report["loaded"] == [], f"--help loaded {report['loaded']}"
