"""What operators ask of a federation (fedspine.federated.operations) and the site's settings file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedspine.federated.deploy import SiteProcessConfig
from fedspine.federated.operations import (
    client_status,
    node_id_from_log,
    registered_sites,
    server_status,
    wait_for_authentication,
)
from fedspine.federated.processes import FlowerProcessError
from fedspine.federated.security import make_server_certificates

TEMPLATE = Path(__file__).resolve().parents[2] / "sites" / "site.toml"


def test_the_site_template_loads_as_is_and_options_win(tmp_path):
    cfg = SiteProcessConfig.from_toml(TEMPLATE)
    assert cfg.server == "coordinator.hospital.example:9092" and cfg.site == "site-a"
    assert cfg.ca == TEMPLATE.parent / "ca.crt" and cfg.data == TEMPLATE.parent / "prepared/site"
    assert cfg.port == 9094 and cfg.max_epsilon is None
    mine = SiteProcessConfig.from_toml(TEMPLATE, {"site": "site-b", "port": 9100, "ca": None})
    assert mine.site == "site-b" and mine.port == 9100 and mine.ca == cfg.ca
    bad = tmp_path / "site.toml"
    bad.write_text('server = "a:1"\ndata = "d"\nsite = "s"\nledger = "x.json"\n')
    with pytest.raises(FlowerProcessError, match=r"unknown setting\(s\) \['ledger'\]"):
        SiteProcessConfig.from_toml(bad)
    bad.write_text('server = "a:1"\n')
    with pytest.raises(FlowerProcessError, match="no data, site"):
        SiteProcessConfig.from_toml(bad)


def test_the_node_id_is_read_once_the_coordinator_accepted_the_site(tmp_path):
    log = tmp_path / "supernode.log"
    log.write_text("INFO: starting\nERROR: PERMISSION_DENIED: node not registered\n")
    assert node_id_from_log(log) == (None, "PERMISSION_DENIED: node not registered")
    log.write_text(log.read_text() + "INFO :      SuperNode ID: 1234567\n")
    assert node_id_from_log(log) == (1234567, None)
    assert wait_for_authentication(log, os.getpid(), timeout=1) == 1234567


def test_waiting_for_acceptance_fails_with_the_reason(tmp_path):
    log = tmp_path / "supernode.log"
    log.write_text("ERROR: UNAUTHENTICATED: invalid signature\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(FlowerProcessError, match="exited before .*UNAUTHENTICATED"):
        wait_for_authentication(log, dead.pid, timeout=5)
    with pytest.raises(FlowerProcessError, match="did not accept this site within 1 s"):
        wait_for_authentication(log, os.getpid(), timeout=1)


def test_statuses_name_what_needs_an_operator_without_any_process(tmp_path):
    make_server_certificates(tmp_path / "server" / "certs", hosts=["coordinator.example"], days=10)
    server = server_status(tmp_path / "server")
    assert not server["superlink"]["alive"] and server["sites"] == []
    assert server["certificate"]["days_left"] < 11
    assert any("expires" in p for p in server["problems"])
    assert any("SuperLink is not running" in p for p in server["problems"])
    assert registered_sites(tmp_path / "server") == []

    site = tmp_path / "site"
    (site / "state").mkdir(parents=True)
    last = {
        "federation": "f",
        "round": 3,
        "action": "train",
        "outcome": "refused",
        "reason": "refused: over the cap",
        "privacy": {"epsilon": 2.5, "delta": 1e-5, "cap": 3.0, "phases": {"gan": {"epsilon": 2.5}}},
    }
    (site / "state" / "last_round.json").write_text(json.dumps(last))
    status = client_status(site)
    assert status["privacy"]["phases"] == {"gan": 2.5} and status["privacy"]["epsilon"] == 2.5
    assert any("last round 3: refused: over the cap" in p for p in status["problems"])
    assert any("not running" in p for p in status["problems"])
