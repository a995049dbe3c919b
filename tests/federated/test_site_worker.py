"""A site runs only the fedspine app it has installed, in a warm long-lived worker (issue 13,
items 2 and 10).

The bundle check is tested on FABs built by Flower's own builder (that of `flwr run`); end to end,
a foreign bundle is submitted with `flwr run` to real SuperNodes and their workers, then the
genuine federation trains through the same worker processes.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedspine.federated.bundle_check import (
    ForeignBundle,
    check_fab,
    fab_identity,
    installed_bundle_dir,
    installed_identity,
)
from fedspine.federated.deploy import WORKER_PID, run_status
from fedspine.federated.processes import CONNECTION, flwr_cli, pid_alive, read_pid_file
from fedspine.federated.run_folder import read_rounds
from tests.federated import test_deployment as deployment
from tests.federated.test_deployment import _cli, _federation_toml, _site

coordinator = deployment.coordinator  # the TLS + node-auth SuperLink fixture, used by name

# Flower's FAB builder uses a pathspec API that pathspec now deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*")


def _copy_bundle(dest: Path) -> Path:
    shutil.copytree(
        installed_bundle_dir(), dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return dest


def test_the_installed_bundle_as_flwr_run_packs_it_is_accepted(tmp_path):
    expected = installed_identity()
    app = _copy_bundle(tmp_path / "app")
    # Comments and the federations table are not app content: Flower drops them from the FAB.
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        "# a comment\n" + pyproject.read_text() + '\n[tool.flwr.federations]\ndefault = "x"\n'
    )
    identity = check_fab(build_fab_from_disk(app), expected)
    assert identity.digest == expected.digest
    assert identity.app_id == "fedspine/fedspine-flower"
    assert set(identity.files) == {
        "pyproject.toml",
        "fedspine_flower/__init__.py",
        "fedspine_flower/client_app.py",
        "fedspine_flower/server_app.py",
    }


@pytest.mark.parametrize(
    "change, reason",
    [
        (
            lambda app: (app / "fedspine_flower" / "client_app.py").write_text(
                "import os\nos.system('true')\nfrom fedspine.federated.client_app import app\n"
            ),
            "changed: fedspine_flower/client_app.py",
        ),
        (
            lambda app: (app / "fedspine_flower" / "helper.py").write_text("x = 1\n"),
            "extra: fedspine_flower/helper.py",
        ),
        (
            lambda app: (app / "pyproject.toml").write_text(
                (app / "pyproject.toml")
                .read_text()
                .replace('clientapp = "fedspine_flower.client_app:app"', 'clientapp = "os:system"')
            ),
            "changed: pyproject.toml",
        ),
        (
            lambda app: (app / "pyproject.toml").write_text(
                (app / "pyproject.toml")
                .read_text()
                .replace('version = "0.1.0"', 'version = "9.9.9"')
            ),
            "app fedspine/fedspine-flower 9.9.9",
        ),
        (lambda app: (app / "fedspine_flower" / "server_app.py").unlink(), "missing"),
    ],
)
def test_a_foreign_bundle_is_refused_with_the_difference(tmp_path, change, reason):
    app = _copy_bundle(tmp_path / "app")
    change(app)
    with pytest.raises(ForeignBundle, match="not the fedspine app installed") as err:
        check_fab(build_fab_from_disk(app), installed_identity())
    assert reason in str(err.value)


def test_a_bundle_that_is_not_a_fab_is_refused():
    with pytest.raises(ForeignBundle, match="not a readable FAB"):
        fab_identity(b"#!/bin/sh\necho hello\n")


# ---- end to end: real SuperLink, SuperNodes and site workers ---------------------------------

_FOREIGN_CLIENT = '''
"""A ClientApp that is not fedspine's: it leaves a marker wherever it runs."""
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

MARKER = Path({marker!r})
MARKER.write_text("imported")

app = ClientApp()


@app.train()
def train(msg, context):
    MARKER.write_text("ran")
    return Message(RecordDict(), reply_to=msg)
'''

_FOREIGN_SERVER = '''
"""Sends one train message to every connected site and records what came back."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

REPORT = Path({report!r})
app = ServerApp()


@app.main()
def main(grid, context):
    deadline = time.monotonic() + 120
    nodes = list(grid.get_node_ids())
    while len(nodes) < {sites} and time.monotonic() < deadline:
        time.sleep(1)
        nodes = list(grid.get_node_ids())
    messages = [
        Message(RecordDict({{"config": ConfigRecord({{"x": 1}})}}), dst_node_id=n,
                message_type="train")
        for n in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=180)
    REPORT.write_text(json.dumps(
        [r.error.reason if r.has_error() else "no error" for r in replies]
    ))
'''


def _foreign_bundle(root: Path, marker: Path, report: Path, sites: int) -> Path:
    """The fedspine bundle with its name and version, but other code in both apps."""
    app = _copy_bundle(root / "app")
    (app / "fedspine_flower" / "client_app.py").write_text(
        textwrap.dedent(_FOREIGN_CLIENT.format(marker=str(marker)))
    )
    (app / "fedspine_flower" / "server_app.py").write_text(
        textwrap.dedent(_FOREIGN_SERVER.format(report=str(report), sites=sites))
    )
    return app


def _wait_finished(workdir: Path, run_id: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        status = run_status(workdir, run_id)
        if status.startswith("finished"):
            return status
        time.sleep(2)
    raise AssertionError(f"run {run_id} not finished after {timeout:.0f} s ({status})")


@pytest.mark.slow
def test_sites_refuse_a_foreign_bundle_and_train_through_one_warm_worker(tmp_path, coordinator):
    workdir, _ = coordinator
    sites = []
    try:
        sites = [_site(tmp_path, coordinator, k) for k in range(2)]
        site_dirs = [tmp_path / f"site{k}" for k in range(2)]
        workers = [read_pid_file(d / WORKER_PID) for d in site_dirs]
        assert all(workers) and all(
            s.companions[0].pid == w for s, w in zip(sites, workers, strict=True)
        )

        # 1. A bundle with fedspine's name and version but its own code, submitted with `flwr run`.
        marker, report = tmp_path / "marker", tmp_path / "replies.json"
        app = _foreign_bundle(tmp_path / "foreign", marker, report, sites=2)
        data = flwr_cli(
            ["run", str(app), CONNECTION, "--format", "json"], workdir / "flwr_home", timeout=300
        )
        _wait_finished(workdir, int(data["run-id"]), timeout=400)
        replies = json.loads(report.read_text())
        assert len(replies) == 2, replies
        assert all(r.startswith("refused: the app bundle is not the fedspine app") for r in replies)
        assert not marker.exists()
        for d in site_dirs:
            log = (d / "worker.log").read_text(errors="replace")
            assert "REFUSED the app bundle" in log, log[-3000:]
            assert "changed: fedspine_flower/client_app.py, fedspine_flower/server_app.py" in log

        # 2. The genuine bundle trains two rounds through the same workers.
        out = tmp_path / "fed-out"
        config = _federation_toml(tmp_path / "federation.toml", out, rounds=2, min_sites=2)
        result = _cli("server", "run", "--config", str(config), "--workdir", str(workdir))
        assert "federation complete" in result.stdout, result.stdout + result.stderr
        rounds = read_rounds(out)
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(sorted(s["site"] for s in r["sites"]) == ["site-0", "site-1"] for r in rounds)
        assert not marker.exists()

        # 3. One worker per site served every task of both runs, each in a fork of itself.
        for d, pid, site in zip(site_dirs, workers, sites, strict=True):
            assert read_pid_file(d / WORKER_PID) == pid and pid_alive(pid) and site.alive()
            log = (d / "worker.log").read_text(errors="replace")
            assert f"of worker {pid}" in log
            assert f"[site-worker {pid}]" in log
            for group in ("gan-round-1", "gan-round-2"):
                assert f"train, {group}: app bundle fedspine/fedspine-flower 0.1.0" in log, log[
                    -3000:
                ]
                assert f"train, {group}: done in" in log
            supernode_log = (d / "supernode.log").read_text(errors="replace")
            assert "flwr-clientapp" not in supernode_log
    finally:
        for site in sites:
            site.stop()
    for site in sites:
        assert not site.alive()
        assert not pid_alive(site.companions[0].pid)
