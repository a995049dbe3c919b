"""End to end on Flower's real deployment engine: a SuperLink and SuperNodes over loopback sockets,
with TLS and SuperNode authentication, driven through the `fedspine` command line.

Every process a test starts is stopped by PID (its whole process group) on success and failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedspine.federated.deploy import (
    SiteProcessConfig,
    start_supernode,
    stop_superlink,
)
from fedspine.federated.processes import free_port
from fedspine.federated.run_folder import read_rounds, read_status
from tests.federated.conftest import make_site_dataset

pytestmark = pytest.mark.slow

FEDSPINE = [sys.executable, "-m", "fedspine.cli"]


def _cli(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*FEDSPINE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fedspine {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def _federation_toml(
    path: Path, out: Path, rounds: int, min_sites: int, timeout: float = 600
) -> Path:
    path.write_text(
        "[federation]\n"
        f'name = "e2e"\noutput_dir = "{out}"\nrounds = {rounds}\nmin_sites = {min_sites}\n'
        f"round_timeout = {timeout}\n"
        "[training]\n"
        'preset = "cpu"\nresolution = 16\nlocal_kimg = 0.064\nclass_names = ["normal", "abnormal"]\n'
        "seed = 3\n"
    )
    return path


@pytest.fixture
def coordinator(tmp_path):
    """A TLS + node-auth SuperLink on a free loopback port, stopped afterwards."""
    workdir = tmp_path / "server"
    port = free_port()
    _cli("server", "certs", "--workdir", str(workdir), "--host", "127.0.0.1", "--host", "localhost")
    _cli("server", "start", "--workdir", str(workdir), "--host", "127.0.0.1", "--port", str(port))
    try:
        yield workdir, port
    finally:
        stop_superlink(workdir)


def _site(tmp_path, coordinator, k: int, register: bool = True, data: Path | None = None):
    workdir, port = coordinator
    key = tmp_path / f"site{k}.key"
    _cli("client", "keygen", "--out", str(key))
    if register:
        _cli("server", "register-site", str(key) + ".pub", "--workdir", str(workdir))
    if data is None:
        data = make_site_dataset(tmp_path / f"data{k}", n=40, seed=k, brightness=20.0 * k)
    return start_supernode(
        SiteProcessConfig(
            server=f"127.0.0.1:{port}",
            data=data,
            site=f"site-{k}",
            workdir=tmp_path / f"site{k}",
            ca=workdir / "certs" / "ca.crt",
            key=key,
            port=free_port(),
            privacy_home=tmp_path / f"privacy{k}",
        )
    )


def test_two_sites_two_rounds_with_tls_and_node_auth(tmp_path, coordinator):
    workdir, _ = coordinator
    sites = []
    try:
        sites = [_site(tmp_path, coordinator, k) for k in range(2)]
        stranger = _site(tmp_path, coordinator, 9, register=False)
        sites.append(stranger)
        out = tmp_path / "fed-out"
        config = _federation_toml(tmp_path / "federation.toml", out, rounds=2, min_sites=2)
        result = _cli("server", "run", "--config", str(config), "--workdir", str(workdir))
        assert "federation complete" in result.stdout, result.stdout + result.stderr
        assert "round 2/2" in result.stdout

        rounds = read_rounds(out)
        assert [r["round"] for r in rounds] == [1, 2]
        assert sorted(s["site"] for s in rounds[-1]["sites"]) == ["site-0", "site-1"]
        assert read_status(out)["state"] == "completed"
        assert (out / "rounds" / "round_0002.pt").is_file()

        # What the operators see: the coordinator and each site at a glance.
        server = json.loads(_cli("server", "status", "--workdir", str(workdir), "--json").stdout)
        assert server["superlink"]["alive"] and server["front"]["alive"]
        assert {s["name"]: s["status"] for s in server["sites"]} == {
            "site0": "online",
            "site1": "online",
        }
        assert server["last_run"]["status"]["state"] == "completed"
        assert server["last_run"]["last_round"] == 2
        assert server["certificate"]["days_left"] > 800 and not server["problems"]
        site = json.loads(
            _cli("client", "status", "--workdir", str(tmp_path / "site0"), "--json").stdout
        )
        assert site["supernode"]["alive"] and site["node_id"] is not None
        assert site["last_round"]["outcome"] == "trained" and site["last_round"]["round"] == 2
        outsider = _cli("client", "status", "--workdir", str(tmp_path / "site9"), check=False)
        assert outsider.returncode == 1 and "not accepted by the coordinator" in outsider.stdout

        # A site removed by name can no longer be listed as registered.
        gone = _cli("server", "unregister-site", "site1", "--workdir", str(workdir))
        assert "unregistered node" in gone.stdout
        after = json.loads(_cli("server", "status", "--workdir", str(workdir), "--json").stdout)
        assert [s["name"] for s in after["sites"]] == ["site0"]

        # The unregistered site never took part and was turned away by the SuperLink.
        assert all(s["site"] != "site-9" for r in rounds for s in r["sites"])
        log = stranger.log.read_text(errors="replace")
        assert "Failed to activate SuperNode" in log, log[-2000:]

        synthetic = tmp_path / "syn"
        _cli("generate", str(out), "--out", str(synthetic), "--per-class", "3")
        assert len(list(synthetic.glob("**/*.png"))) == 6
    finally:
        for site in sites:
            site.stop()
    for site in sites:
        assert not site.alive()


def _wait_for_rounds(out: Path, n: int, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(read_rounds(out)) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"{out}: fewer than {n} rounds after {timeout:.0f} s")


def test_site_killed_and_server_restarted_mid_run(tmp_path, coordinator):
    """A killed site costs only its contribution; a restarted server resumes after its last round."""
    workdir, port = coordinator
    sites = []
    run = None
    try:
        sites = [_site(tmp_path, coordinator, k) for k in range(2)]
        out = tmp_path / "fed-out"
        config = _federation_toml(tmp_path / "fed.toml", out, rounds=3, min_sites=1, timeout=150)
        run = subprocess.Popen(
            [*FEDSPINE, "server", "run", "--config", str(config), "--workdir", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _wait_for_rounds(out, 1, timeout=400)
        sites[1].stop()  # site-1 dies: the next rounds complete with site-0 alone
        _wait_for_rounds(out, 2, timeout=400)
        second = read_rounds(out)[1]
        assert [s["site"] for s in second["sites"]] == ["site-0"]
        ((site, reason),) = [(f["site"], f["reason"]) for f in second["failures"]]
        assert site == "site-1"
        assert "heartbeat" in reason or reason == "no reply within the round timeout"

        # The coordinator restarts; the waiting `server run` loses its SuperLink and fails.
        stop_superlink(workdir)
        run.wait(timeout=120)
        assert run.returncode != 0
        _cli(
            "server", "start", "--workdir", str(workdir), "--host", "127.0.0.1", "--port", str(port)
        )
        result = _cli("server", "run", "--config", str(config), "--workdir", str(workdir))
        assert "federation complete" in result.stdout, result.stdout + result.stderr
        rounds = read_rounds(out)
        assert [r["round"] for r in rounds][-1] == 3
        assert read_status(out)["state"] == "completed"
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        for site in sites:
            site.stop()


def test_spinegan_classifier_phase_runs_through_supernodes(tmp_path, coordinator):
    """Flower's custom train action (`train.classifier`) reaches real SuperNodes, and the GAN
    rounds that follow carry the averaged classifier."""
    workdir, _ = coordinator
    sites = []
    try:
        sites = [_site(tmp_path, coordinator, k) for k in range(2)]
        out = tmp_path / "fed-out"
        config = _federation_toml(tmp_path / "federation.toml", out, rounds=1, min_sites=2)
        text = config.read_text().replace(
            "local_kimg = 0.064", 'local_kimg = 0.032\nmodel = "spinegan"'
        )
        config.write_text(text + "[classifier]\nrounds = 1\nlocal_steps = 2\nbatch = 8\n")
        result = _cli("server", "run", "--config", str(config), "--workdir", str(workdir))
        assert "classifier round 1/1" in result.stdout, result.stdout + result.stderr
        assert "federation complete" in result.stdout
        rounds = read_rounds(out)
        assert [(r["phase"], r["round"]) for r in rounds] == [("classifier", 1), ("gan", 1)]
        assert all(s["steps"] == 2 for s in rounds[0]["sites"])
        assert all(s["loss-clinical"] > 0 for s in rounds[1]["sites"])
        assert (out / "classifier.pt").is_file() and (out / "generator.pt").is_file()
    finally:
        for site in sites:
            site.stop()


def test_client_start_from_site_toml_says_running_only_once_accepted(tmp_path, coordinator):
    from fedspine.federated.operations import client_status

    workdir, port = coordinator
    # The SuperLink logs through Flower's own rotating file; its console output sits beside it.
    cmdline = Path(f"/proc/{int((workdir / 'superlink.pid').read_text())}/cmdline").read_bytes()
    assert b"--log-file\0" + str(workdir / "superlink.log").encode() in cmdline
    assert (workdir / "superlink.log").stat().st_size > 0
    assert (workdir / "superlink.console.log").is_file()
    key = tmp_path / "s.key"
    _cli("client", "keygen", "--out", str(key))
    make_site_dataset(tmp_path / "d", n=40, seed=1)
    toml = tmp_path / "site.toml"
    toml.write_text(
        f'server = "127.0.0.1:{port}"\nca = "{workdir / "certs" / "ca.crt"}"\nkey = "s.key"\n'
        f'data = "d"\nsite = "site-x"\nport = {free_port()}\nprivacy_home = "privacy"\n'
    )
    site = tmp_path / "w"
    start = ["client", "start", "--config", str(toml), "--workdir", str(site), "--detach"]
    try:
        refused = _cli(*start, "--auth-timeout", "15", check=False)
        assert refused.returncode == 1
        assert "did not accept this site within 15 s" in refused.stdout + refused.stderr
        assert not client_status(site)["supernode"]["alive"]  # stopped, not left retrying

        _cli("server", "register-site", f"{key}.pub", "--workdir", str(workdir), "--name", "x")
        accepted = _cli(*start)
        assert "accepted by the coordinator as node" in accepted.stdout
        status = json.loads(_cli("client", "status", "--workdir", str(site), "--json").stdout)
        assert status["supernode"]["alive"] and status["node_id"] is not None
    finally:
        _cli("client", "stop", "--workdir", str(site), check=False)


def test_following_a_run_asks_flower_only_when_the_status_file_turns_final(tmp_path, monkeypatch):
    """Each `flwr ls` costs about a second of CPU: asked every poll, it took a core from the
    run. Flower is asked at the start, then once the ServerApp's status file says the run ended."""
    from fedspine.federated import deploy
    from fedspine.federated.run_folder import STATUS_FILE

    asked, polls = [], []
    out = tmp_path / "fed"
    out.mkdir()
    (out / STATUS_FILE).write_text(json.dumps({"state": "completed"}))  # an earlier run's
    old = (out / STATUS_FILE).stat().st_mtime - 100
    os.utime(out / STATUS_FILE, (old, old))

    def run_status(workdir, run_id):
        asked.append(len(polls))
        state = (read_status(out) or {}).get("state")
        return "finished:completed" if state == "completed" and len(polls) > 5 else "running"

    def sleep(_seconds):
        polls.append(1)
        if len(polls) == 20:
            (out / STATUS_FILE).write_text(json.dumps({"state": "completed"}))

    monkeypatch.setattr(deploy, "run_status", run_status)
    monkeypatch.setattr(deploy.time, "sleep", sleep)
    status = deploy.wait_for_run(tmp_path, 1, out, poll=0.0, ask_every=1e9)
    assert status == "finished:completed"
    assert asked == [0, 20], asked  # at the start, and when the status file turned final
