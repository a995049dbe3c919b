"""A site killed mid-round (SIGKILL: no cleanup runs) has its whole round on record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import home_records

_ROUND = textwrap.dedent(
    """
    import dataclasses, json, os, signal, sys
    from fedspine import __version__
    from fedspine.federated.site import RoundConfig, SiteConfig, train_round
    from fedspine.federated.weights import trainer_weights
    from fedspine.training import dp as dp_module
    from fedspine.training.gan_trainer import GanTrainer
    from tests.training import tiny_config

    cfg = tiny_config(resolution=16, num_classes=2, batch=8)
    cfg.network = dataclasses.replace(cfg.network, mbstd_group=0)
    weights = trainer_weights(GanTrainer(cfg, [0.5, 0.5]))
    kill_at = int(os.environ.get("KILL_AT_STEP", "-1"))
    original = dp_module.DPDiscriminatorStep.step

    def step(self, *args, **kwargs):
        if self.steps_taken == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    dp_module.DPDiscriminatorStep.step = step
    site = SiteConfig.from_node_config(json.loads(sys.argv[1]))
    rc = RoundConfig("fed", 1, 0.032, cfg.to_dict(), [0.5, 0.5], ["normal", "abnormal"],
                     __version__, total_rounds=2, dp={"epsilon": 8.0, "patients-per-step": 4})
    _, metrics, _ = train_round(site, rc, weights)
    print(json.dumps(metrics))
    """
)


def _round(node: dict, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT_STEP": str(kill_at), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _ROUND, json.dumps(node)],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_site_killed_mid_round_has_the_whole_round_counted(site_datasets, tmp_path):
    home = tmp_path / "home"
    node = {
        "data-path": str(site_datasets[0]),
        "site-name": "a",
        "state-dir": str(tmp_path / "state"),
        "privacy-home": str(home),
    }
    killed = _round(node, kill_at=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (reserved,) = home_records(home)
    # 0.032 kimg at batch 8: 4 D steps, all written before the first ran; 2 ran, 4 count.
    assert reserved["state"] == "reserved" and reserved["steps"] == 4
    assert not list((tmp_path / "state").rglob("trainer.pt"))  # the round never finished

    done = _round(node, kill_at=-1)
    assert done.returncode == 0, done.stderr[-2000:]
    records = home_records(home)
    assert [r["state"] for r in records] == ["reserved", "settled"]
    assert sum(r["steps"] for r in records) == 8  # 2 lost steps over-counted, never under
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["d-steps-total"] == 4
