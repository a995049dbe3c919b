"""What the server may ask of a site, and what a site tells the server (issue 13, item 4)."""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import pytest

from fedspine import __version__
from fedspine.federated.client_app import public_reason
from fedspine.federated.deploy import SiteProcessConfig
from fedspine.federated.site import RoundConfig, SiteConfig, SiteRefusal, train_round


def _round(local_kimg: float, resolution: int = 16) -> RoundConfig:
    config = {"network": {"resolution": resolution}}
    return RoundConfig("f", 1, local_kimg, config, [0.5, 0.5], ["normal", "abnormal"], __version__)


def test_a_site_refuses_more_work_or_a_bigger_network_than_its_admin_allows(tmp_path):
    site = SiteConfig.from_node_config(
        {
            "data-path": str(tmp_path / "nowhere"),
            "site-name": "a",
            "max-local-kimg": 2.0,
            "max-resolution": 64,
        }
    )
    # Refused before any data is read (the data path does not even exist).
    with pytest.raises(SiteRefusal, match="asks for 5 kimg this round; this site trains at most 2"):
        train_round(site, _round(5.0), {})
    with pytest.raises(SiteRefusal, match="256 px network; this site trains at most 64 px"):
        train_round(site, _round(1.0, resolution=256), {})
    with pytest.raises(SiteRefusal, match="asks for -1 kimg"):
        train_round(site, _round(-1.0), {})
    # Within the limits the round goes on to the site's data (here: missing, so refused there).
    with pytest.raises(Exception, match="nowhere|prepared"):
        train_round(site, _round(1.0, resolution=32), {})
    defaults = SiteConfig.from_node_config({"data-path": "d", "site-name": "a"})
    assert defaults.max_local_kimg == 50.0 and defaults.max_resolution == 256


def test_the_limits_travel_in_the_node_config_the_site_admin_sets(tmp_path):
    cfg = SiteProcessConfig(
        server="s:1",
        data=tmp_path / "d",
        site="a",
        workdir=tmp_path / "w",
        privacy_home=tmp_path / "p",
        max_local_kimg=3.5,
        max_resolution=128,
    )
    items = dict(item.split("=", 1) for item in shlex.split(cfg.node_config()))
    site = SiteConfig.from_node_config({k: v for k, v in items.items()})
    assert site.max_local_kimg == 3.5 and site.max_resolution == 128


def test_a_failure_reaches_the_server_as_one_line_without_local_paths():
    try:
        Path("/hospital/site_a/patient_0042/study.npy").read_bytes()
    except OSError as err:
        reason = public_reason(err)
    assert reason.startswith("FileNotFoundError: ")
    assert "hospital" not in reason and "patient_0042" not in reason
    assert "<local path>" in reason and "\n" not in reason
    multi = public_reason(ValueError("bad row in C:\\data\\site\\labels.csv\nTraceback ...\n  x"))
    assert multi == "ValueError: bad row in <local path>"
    assert public_reason(ValueError("TSTR/TRTR is 1/(10·N)")) == "ValueError: TSTR/TRTR is 1/(10·N)"
    assert len(public_reason(ValueError("x" * 1000))) <= 300


def test_checkpoints_and_keys_are_readable_by_their_owner_only(tmp_path):
    import torch

    from fedspine.federated.security import make_server_certificates, make_site_keypair
    from fedspine.training.checkpoint import save_checkpoint

    state = save_checkpoint(tmp_path / "trainer.pt", "trainer", {"w": torch.zeros(1)})
    pair = make_site_keypair(tmp_path / "site.key")
    certs = make_server_certificates(tmp_path / "certs", hosts=["coordinator.example"])
    for path in (state, pair.private_key, certs.server_key, certs.ca_key):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == 0o600, (path.name, oct(mode))


def test_a_stale_pid_file_never_signals_an_unrelated_process(tmp_path):
    """PIDs are reused: `server stop` must not kill whatever process now holds the number."""
    import subprocess
    import sys

    from fedspine.federated.deploy import stop_superlink, stop_supernode
    from fedspine.federated.processes import pid_alive

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in ("superlink.pid", "front.pid", "supernode.pid"):
            (tmp_path / name).write_text(f"{bystander.pid}\n")
        assert stop_superlink(tmp_path) is False and stop_supernode(tmp_path) is False
        assert pid_alive(bystander.pid) and bystander.poll() is None
        assert not list(tmp_path.glob("*.pid"))
    finally:
        bystander.kill()
        bystander.wait()


def test_a_hostile_round_number_cannot_crash_the_sites_own_record(tmp_path):
    """The site notes every request in state/last_round.json; what the server sent there is
    untrusted: a non-number round or huge names must neither raise nor bloat the file."""
    import json
    from types import SimpleNamespace

    from fedspine.federated.client_app import _note_round

    site = SiteConfig(data_path=tmp_path / "d", site_name="s", state_dir=tmp_path / "state")
    msg = SimpleNamespace(
        content={"config": {"server-round": "DROP TABLE", "federation": "f" * 10_000}},
        metadata=SimpleNamespace(message_type="train", group_id="g" * 10_000),
    )
    _note_round(site, msg, "refused", "refused: x")
    record = json.loads((tmp_path / "state" / "last_round.json").read_text())
    assert record["round"] is None and len(record["federation"]) == 200
    assert len(record["group"]) == 100 and record["outcome"] == "refused"
