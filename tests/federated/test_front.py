"""The coordinator exposes Flower's Fleet API and nothing else (issue 13, items 1 and 3).

A real SuperLink behind fedspine's TLS front, started with the certificate the README tells
operators to make (`server certs --host coordinator.example`, no loopback name given): the
Control and Runtime APIs are refused on the public port, the SuperLink itself listens on
loopback only, and the coordinator's own checks and `flwr` connection still work.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedspine.federated.deploy import SERVER_FILE, list_sites, stop_superlink
from fedspine.federated.front import allowed
from fedspine.federated.processes import free_port

FEDSPINE = [sys.executable, "-m", "fedspine.cli"]


def test_only_fleet_paths_and_health_are_allowed():
    assert allowed("/v1/fleet/pull-messages") and allowed("/health")
    for path in (
        "/v1/control/list-runs",
        "/v1/control/start-run",
        "/v1/serverappio/pull-messages",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/start-run",
        "//v1/fleet/x",
        "/",
        "/healthz",
    ):
        assert not allowed(path), path


def _cli(*args: str) -> None:
    proc = subprocess.run([*FEDSPINE, *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"


def _post(url: str, ca: Path, check_hostname: bool = True) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = check_hostname
    request = urllib.request.Request(url, data=b"\x00", method="POST")
    request.add_header("Content-Type", "application/protobuf")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def _outward_address() -> str | None:
    """This machine's address on a non-loopback interface, if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent by a UDP connect
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


@pytest.fixture
def coordinator(tmp_path):
    workdir = tmp_path / "server"
    port = free_port()
    _cli("server", "certs", "--workdir", str(workdir), "--host", "coordinator.example")
    _cli("server", "start", "--workdir", str(workdir), "--host", "0.0.0.0", "--port", str(port))
    try:
        yield workdir, port
    finally:
        stop_superlink(workdir)


def test_the_public_port_serves_the_fleet_api_only(coordinator):
    workdir, port = coordinator
    ca = workdir / "certs" / "ca.crt"
    info = json.loads((workdir / SERVER_FILE).read_text())
    assert info["superlink_port"] not in (None, port)
    # The certificate names coordinator.example; the loopback names were added for local checks.
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(
        f"https://127.0.0.1:{port}/health", timeout=10, context=context
    ) as r:
        assert r.status == 200
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/serverappio/get-run"):
        assert _post(f"https://localhost:{port}{path}", ca) == 403, path
    # A Fleet API call reaches the SuperLink (which rejects the empty, unsigned body itself).
    assert _post(f"https://localhost:{port}/v1/fleet/get-run", ca) not in (403, 404, 502)
    # The coordinator's own Control API connection (flwr, on loopback) works.
    assert list_sites(workdir) == []
    # The SuperLink, Control API and all, cannot be reached beyond loopback.
    outward = _outward_address()
    if outward is not None:
        with pytest.raises(OSError):
            socket.create_connection((outward, info["superlink_port"]), timeout=3).close()
        # What another machine sees on the public port: the front, refusing the Control API.
        url = f"https://{outward}:{port}/v1/control/list-runs"
        assert _post(url, ca, check_hostname=False) == 403
