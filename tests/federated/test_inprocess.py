"""The ServerApp round loop and the ClientApp, wired through an in-process Grid."""

from __future__ import annotations

import json

import pytest
import torch

from fedspine import __version__
from fedspine.federated.client_app import app as client_app
from fedspine.federated.federation import (
    FederationConfig,
    FederationError,
    read_rounds,
    read_status,
    run_federation,
)
from fedspine.federated.grid import InProcessGrid, InProcessNode
from tests.federated.reference import fedavg


def _nodes(datasets, tmp_path, overrides=None):
    overrides = overrides or {}
    nodes = []
    for k, data in enumerate(datasets):
        config = {
            "data-path": str(data),
            "site-name": f"site-{k}",
            "state-dir": str(tmp_path / f"state_{k}"),
            "privacy-home": str(tmp_path / f"privacy_{k}"),
        }
        config.update(overrides.get(k, {}))
        nodes.append(InProcessNode(node_id=100 + k, node_config=config, app=client_app))
    return nodes


def _config(tmp_path, **kw):
    base = dict(
        name="test-fed",
        output_dir=str(tmp_path / "out"),
        rounds=2,
        local_kimg=0.064,
        min_sites=2,
        preset="cpu",
        resolution=16,
        seed=1,
    )
    base.update(kw)
    return FederationConfig(**base)


@pytest.mark.slow
def test_three_sites_two_rounds(site_datasets, tmp_path):
    grid = InProcessGrid(_nodes(site_datasets, tmp_path))
    status = run_federation(grid, _config(tmp_path), log=lambda _m: None)
    assert status["state"] == "completed" and status["completed_rounds"] == 2
    rounds = read_rounds(tmp_path / "out")
    assert [r["round"] for r in rounds] == [1, 2]
    assert sorted(s["site"] for s in rounds[0]["sites"]) == ["site-0", "site-1", "site-2"]
    assert all(s["num-examples"] > 0 and s["images-seen"] >= 64 for s in rounds[1]["sites"])
    out = tmp_path / "out"
    assert (out / "rounds" / "round_0002.pt").is_file()
    assert (out / "generator.pt").is_file()
    # Site state persisted between rounds: the second round continued the counters.
    from fedspine.training.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "state_0" / "test-fed" / "trainer.pt", kind="trainer")
    assert state["round"] == 2
    assert state["trainer"]["counters"]["cur_nimg"] >= 128

    from fedspine.training.generate import load_generator, synthesize

    G, meta = load_generator(out / "generator.pt")
    assert meta["class_names"] == ["normal", "abnormal"]
    imgs = synthesize(G, torch.randn(4, G.z_dim), torch.tensor([0, 1, 0, 1]))
    assert imgs.shape == (4, 16, 16)


@pytest.mark.slow
def test_failed_and_silent_sites_do_not_kill_the_run(site_datasets, tmp_path):
    broken = {1: {"data-path": str(tmp_path / "missing")}}
    nodes = _nodes(site_datasets, tmp_path, broken)
    nodes[2].behaviour = lambda msg: "silent"
    grid = InProcessGrid(nodes)
    with pytest.raises(FederationError, match="min_sites=2"):
        run_federation(grid, _config(tmp_path, rounds=1), log=lambda _m: None)
    status = read_status(tmp_path / "out")
    assert status["state"] == "failed" and status["completed_rounds"] == 0
    (failed_round,) = read_rounds(tmp_path / "out")
    reasons = {f["node_id"]: f["reason"] for f in failed_round["failures"]}
    assert "not a prepared dataset" in reasons[101]
    assert reasons[102] == "no reply within the round timeout"

    grid = InProcessGrid(_nodes(site_datasets, tmp_path, broken))
    status = run_federation(
        grid, _config(tmp_path, rounds=1, output_dir=str(tmp_path / "o2")), log=lambda _m: None
    )
    assert status["state"] == "completed"
    (record,) = read_rounds(tmp_path / "o2")
    assert len(record["sites"]) == 2
    (failure,) = record["failures"]
    assert "refused" in failure["reason"] and "not a prepared dataset" in failure["reason"]


@pytest.mark.slow
def test_resume_continues_from_last_round(site_datasets, tmp_path):
    grid = InProcessGrid(_nodes(site_datasets[:2], tmp_path))
    run_federation(grid, _config(tmp_path, rounds=1), log=lambda _m: None)
    logs = []
    status = run_federation(grid, _config(tmp_path, rounds=2), log=logs.append)
    assert status["completed_rounds"] == 2
    assert any("resuming" in m for m in logs)
    assert [r["round"] for r in read_rounds(tmp_path / "out")] == [1, 2]


def test_version_mismatch_is_refused(site_datasets, tmp_path):
    from fedspine.federated.site import RoundConfig, SiteConfig, SiteRefusal, train_round

    site = SiteConfig.from_node_config({"data-path": str(site_datasets[0]), "site-name": "a"})
    rc = RoundConfig("f", 1, 0.01, {}, [0.5, 0.5], ["normal", "abnormal"], "0.0.0-other")
    with pytest.raises(SiteRefusal, match="same version"):
        train_round(site, rc, {})
    with pytest.raises(SiteRefusal, match="node config lacks"):
        SiteConfig.from_node_config({"site-name": "a"})


def test_fedavg_is_the_example_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([3])}
    out = fedavg([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["n"], torch.tensor([3]))
    with pytest.raises(ValueError):
        fedavg([a, {"w": a["w"], "n": torch.tensor([4])}], [1, 1])


def test_flower_fedavg_matches_ours(tmp_path):
    """Flower's FedAvg aggregation of our weight records equals our weighted mean."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    g = torch.Generator().manual_seed(0)
    sds = [
        {"x": torch.randn(3, 4, generator=g), "y": torch.randn(5, generator=g)} for _ in range(3)
    ]
    counts = [10, 30, 60]
    records = [
        RecordDict({"arrays": ArrayRecord(sd), "metrics": MetricRecord({"num-examples": n})})
        for sd, n in zip(sds, counts, strict=True)
    ]
    flower = aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()
    ours = fedavg(sds, counts)
    for k in ours:
        assert torch.allclose(flower[k], ours[k], atol=1e-6)


def test_federation_config_round_trips_through_run_config(tmp_path):
    config = _config(tmp_path, class_names=["a", "b", "c"], label_prior=[1, 1, 2])
    again = FederationConfig.from_run_config(config.to_run_config())
    assert again.class_names == ["a", "b", "c"]
    assert again.prior() == [0.25, 0.25, 0.5]
    bad = config.to_run_config()
    bad["fedspine-version"] = "9.9"
    with pytest.raises(FederationError, match="9.9"):
        FederationConfig.from_run_config(bad)
    assert json.loads(config.to_run_config()["class-names"]) == ["a", "b", "c"]
    assert config.to_run_config()["fedspine-version"] == __version__


@pytest.mark.slow
def test_dp_federation_records_each_sites_epsilon_and_enforces_caps(site_datasets, tmp_path):
    from fedspine.privacy.accounting import epsilon
    from fedspine.privacy.ledger import mechanisms_of
    from fedspine.privacy.report import read_privacy_summary
    from tests.conftest import home_records

    caps = {0: {"max-epsilon": 50.0}, 1: {"max-epsilon": 50.0}, 2: {"max-epsilon": 1e-3}}
    grid = InProcessGrid(_nodes(site_datasets, tmp_path, caps))
    config = _config(tmp_path, rounds=2, dp=True, dp_epsilon=20.0, dp_patients_per_step=4)
    status = run_federation(grid, config, log=lambda _m: None)
    assert status["state"] == "completed"
    rounds = read_rounds(tmp_path / "out")
    # The site whose cap is tiny refuses every round, with a reason that reaches the server.
    refusals = [f for r in rounds for f in r["failures"]]
    assert len(refusals) == 2 and all("refused" in f["reason"] for f in refusals)
    summary = read_privacy_summary(tmp_path / "out")
    assert summary["private"] is True
    assert sorted(summary["sites"]) == ["site-0", "site-1"]
    for name, site in summary["sites"].items():
        assert 0 < site["epsilon"] <= 20.0
        assert [r["round"] for r in site["epsilon_per_round"]] == [1, 2]
        eps = [r["epsilon"] for r in site["epsilon_per_round"]]
        assert eps[1] > eps[0]
        k = int(name.split("-")[1])
        records = home_records(tmp_path / f"privacy_{k}")
        assert records and all(r["state"] == "settled" for r in records)
        recomputed = epsilon(mechanisms_of(records), site["delta"], "prv")
        assert recomputed == pytest.approx(site["epsilon"])


def test_a_site_with_a_cap_refuses_a_non_dp_federation(site_datasets, tmp_path):
    from fedspine.federated.site import RoundConfig, SiteConfig, SiteRefusal, train_round

    site = SiteConfig.from_node_config(
        {"data-path": str(site_datasets[0]), "site-name": "a", "max-epsilon": 5.0}
    )
    rc = RoundConfig("f", 1, 0.01, {}, [0.5, 0.5], ["normal", "abnormal"], __version__)
    with pytest.raises(SiteRefusal, match="only with differential privacy"):
        train_round(site, rc, {})
