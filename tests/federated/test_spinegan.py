"""Federated SpineGAN: the classifier phase (its own train action, FedAvg, DP at each site with
its ε in the site's ledger), then GAN rounds that carry the frozen classifier; resume across."""

from __future__ import annotations

import json

import pytest
import torch

from fedspine import __version__
from fedspine.federated.classifier_phase import (
    MESSAGE_TYPE,
    SITE_STATE_FILE,
    ClassifierPhaseConfig,
    ClassifierRoundConfig,
    clinical_spec,
    initial_classifier,
    received_clinical_loss,
    train_classifier_round,
)
from fedspine.federated.client_app import app as client_app
from fedspine.federated.federation import (
    FederationConfig,
    FederationError,
    read_rounds,
    read_status,
    run_federation,
)
from fedspine.federated.grid import InProcessGrid, InProcessNode
from fedspine.federated.site import RoundConfig, SiteConfig, SiteRefusal, site_state_file
from fedspine.training import config as config_module
from tests.training import tiny_config

CLASSES = ["normal", "abnormal"]


@pytest.fixture(autouse=True)
def tiny_gan(monkeypatch):
    """The federation's "cpu" preset becomes a network that steps in well under a second."""
    monkeypatch.setitem(config_module.PRESETS, "cpu", lambda res, k: tiny_config(res or 16, k))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path, **kw) -> FederationConfig:
    classifier = kw.pop("classifier", {})
    base = dict(
        name="fed-spine",
        output_dir=str(tmp_path / "out"),
        rounds=1,
        local_kimg=0.016,
        min_sites=2,
        preset="cpu",
        resolution=16,
        seed=2,
        model="spinegan",
        classifier=ClassifierPhaseConfig(
            **{"rounds": 2, "local_steps": 3, "batch": 8, "dp_patients_per_step": 4, **classifier}
        ),
    )
    base.update(kw)
    return FederationConfig(**base)


def _nodes(datasets, tmp_path, seen=None, node_config=None):
    nodes = []
    for k, data in enumerate(datasets[:2]):
        config = {
            "data-path": str(data),
            "site-name": f"site-{k}",
            "state-dir": str(tmp_path / f"state_{k}"),
            "privacy-home": str(tmp_path / f"privacy_{k}"),
            **(node_config or {}),
        }
        node = InProcessNode(node_id=100 + k, node_config=config, app=client_app)
        if seen is not None:
            node.behaviour = lambda msg, k=k: seen.append(
                (k, msg.metadata.message_type, "classifier" in msg.content)
            )
        nodes.append(node)
    return nodes


def _round_config(config: FederationConfig, server_round: int = 1, dp=None):
    weights, model = initial_classifier(config.classifier, CLASSES, 16, seed=0)
    rc = ClassifierRoundConfig(
        federation=config.name,
        server_round=server_round,
        total_rounds=config.classifier.rounds,
        local_steps=config.classifier.local_steps,
        batch=config.classifier.batch,
        lr=config.classifier.lr,
        augment=True,
        seed=0,
        model=model,
        task="binary",
        class_names=CLASSES,
        fedspine_version=__version__,
        dp=dp,
    )
    return rc, weights, model


def test_config_round_trips_and_refuses_a_dp_classifier_without_a_budget(tmp_path):
    config = _config(tmp_path, classifier={"rounds": 4, "clinical_weight": 0.3, "arch": "small"})
    again = FederationConfig.from_run_config(config.to_run_config())
    assert again.model == "spinegan"
    assert again.classifier == config.classifier
    assert (
        FederationConfig.from_run_config(_config(tmp_path, model="cgan").to_run_config()).model
        == "cgan"
    )

    toml = tmp_path / "federation.toml"
    toml.write_text(
        '[federation]\nname = "f"\nrounds = 2\n[training]\nmodel = "spinegan"\n'
        "[privacy]\nenabled = true\nepsilon = 8.0\n"
        "[classifier]\nrounds = 3\nlocal_steps = 7\ndp_epsilon = 2.0\n"
    )
    loaded = FederationConfig.from_toml(toml)
    assert (loaded.classifier.rounds, loaded.classifier.local_steps) == (3, 7)
    assert loaded.classifier.dp_epsilon == 2.0

    with pytest.raises(FederationError, match="classifier.dp_epsilon"):
        _config(tmp_path, dp=True, dp_epsilon=8.0).validate()
    with pytest.raises(FederationError, match="must be below"):
        _config(tmp_path, dp=True, dp_epsilon=2.0, classifier={"dp_epsilon": 3.0}).validate()
    with pytest.raises(FederationError, match="model must be one of"):
        _config(tmp_path, model="stylegan").validate()
    toml.write_text("[classifier]\nepochs = 3\n")
    with pytest.raises(FederationError, match="unknown setting"):
        FederationConfig.from_toml(toml)


def test_classifier_round_at_a_site_trains_and_keeps_its_state(site_datasets, tmp_path):
    config = _config(tmp_path)
    rc, weights, _ = _round_config(config)
    site = SiteConfig.from_node_config(
        {"data-path": str(site_datasets[0]), "site-name": "a", "state-dir": str(tmp_path / "s")}
    )
    new, metrics, extra = train_classifier_round(site, rc, weights)
    assert set(new) == set(weights)
    assert any(not torch.equal(new[k], weights[k]) for k in weights)
    assert metrics["steps"] == 3 and metrics["num-examples"] == 32 and metrics["epsilon"] == -1.0
    assert metrics["mean-loss"] > 0 and extra == {
        "site-name": "a",
        "federation": config.name,
        "round": 1,
    }
    state = torch.load(site_state_file(site, config.name, SITE_STATE_FILE), weights_only=True)
    assert state["round"] == 1 and state["dp"] is None

    capped = SiteConfig.from_node_config(
        {"data-path": str(site_datasets[0]), "site-name": "a", "max-epsilon": 5.0}
    )
    with pytest.raises(SiteRefusal, match="only with differential privacy"):
        train_classifier_round(capped, rc, weights)


def test_dp_classifier_round_spends_from_the_sites_ledger(site_datasets, tmp_path):
    from tests.conftest import home_records

    config = _config(tmp_path, classifier={"local_steps": 2})
    dp = {"epsilon": 4.0, "patients-per-step": 4, "clip": 1.0}
    rc, weights, _ = _round_config(config, dp=dp)
    home = tmp_path / "home"
    site = SiteConfig.from_node_config(
        {
            "data-path": str(site_datasets[0]),
            "site-name": "a",
            "state-dir": str(tmp_path / "s"),
            "privacy-home": str(home),
        }
    )
    new, metrics, extra = train_classifier_round(site, rc, weights)
    assert metrics["steps"] == 2 and 0 < metrics["epsilon"] <= 4.0
    # The DP step's loss is computed without noise on real images: it never leaves the site.
    assert metrics["mean-loss"] != metrics["mean-loss"]
    (record,) = home_records(home)
    assert record["label"] == "clinical-classifier" and record["steps"] == 2
    assert record["state"] == "settled"
    assert record["round"] == 1 and record["notes"] == {"phase": "classifier"}
    assert record["run_id"] == config.name and record["sample_rate"] == pytest.approx(4 / 16)
    summary = json.loads(extra["privacy"])
    assert summary["phases"]["classifier"]["steps"] == 2
    assert summary["epsilon"] == pytest.approx(metrics["epsilon"])
    assert "hash" not in extra["privacy"]

    # Round 2 keeps round 1's σ; a site whose cap is nearly spent refuses.
    rc2, _, _ = _round_config(config, server_round=2, dp=dp)
    train_classifier_round(site, rc2, new)
    assert len({r["noise_multiplier"] for r in home_records(home)}) == 1
    tight = SiteConfig.from_node_config({**_node(site), "max-epsilon": metrics["epsilon"]})
    with pytest.raises(SiteRefusal, match="over the cap"):
        train_classifier_round(tight, rc2, new)
    # The server cannot choose δ: a larger one than the site's is refused before any step.
    rc3, _, _ = _round_config(config, server_round=3, dp={**dp, "delta": 0.5})
    before = home_records(home)
    with pytest.raises(SiteRefusal, match="the server's δ 0.5"):
        train_classifier_round(site, rc3, new)
    assert home_records(home) == before


def _node(site: SiteConfig) -> dict:
    return {
        "data-path": str(site.data_path),
        "site-name": site.site_name,
        "state-dir": str(site.state_dir),
        "privacy-home": str(site.privacy_home),
    }


def test_a_gan_round_refuses_an_altered_or_non_private_classifier(site_datasets, tmp_path):
    config = _config(tmp_path)
    weights, model = initial_classifier(config.classifier, CLASSES, 16, seed=0)
    spec = clinical_spec(config.classifier, model, CLASSES, weights)
    rc = RoundConfig(
        config.name, 1, 0.016, {}, [0.5, 0.5], CLASSES, __version__, model="spinegan", clinical=spec
    )
    site = SiteConfig.from_node_config(
        {"data-path": str(site_datasets[0]), "site-name": "a", "state-dir": str(tmp_path / "s")}
    )
    loss = received_clinical_loss(site, rc, weights, dp=False)
    assert loss.sha256 == spec["sha256"] and loss.weight == pytest.approx(0.1)
    assert not any(p.requires_grad for p in loss.classifier.parameters())
    altered = {k: v.clone() for k, v in weights.items()}
    first = next(iter(altered))
    altered[first] += 0.01
    with pytest.raises(SiteRefusal, match="altered"):
        received_clinical_loss(site, rc, altered, dp=False)
    with pytest.raises(SiteRefusal, match="must bring"):
        received_clinical_loss(site, rc, None, dp=False)
    # This site helped train the classifier without DP: a DP GAN round through it is refused.
    rc_c, _, _ = _round_config(config)
    train_classifier_round(site, rc_c, weights)
    with pytest.raises(SiteRefusal, match="without differential privacy"):
        received_clinical_loss(site, rc, weights, dp=True)


@pytest.mark.slow
def test_spinegan_federation_runs_the_classifier_phase_first(site_datasets, tmp_path):
    from fedspine.models.classifier import load_classifier
    from fedspine.training.clinical import ClinicalLoss, weights_sha256
    from fedspine.training.generate import load_generator

    seen: list = []
    config = _config(tmp_path)
    status = run_federation(
        InProcessGrid(_nodes(site_datasets, tmp_path, seen)), config, log=lambda _m: None
    )
    assert status["state"] == "completed" and status["classifier_completed_rounds"] == 2
    rounds = read_rounds(tmp_path / "out")
    assert [(r["phase"], r["round"]) for r in rounds] == [
        ("classifier", 1),
        ("classifier", 2),
        ("gan", 1),
    ]
    # Classifier rounds use Flower's custom train action; GAN rounds carry the classifier.
    assert [t for _, t, _ in seen] == [MESSAGE_TYPE] * 4 + ["train"] * 2
    assert [c for _, t, c in seen if t == "train"] == [True, True]
    assert [c for _, t, c in seen if t == MESSAGE_TYPE] == [False] * 4
    for site in rounds[0]["sites"]:
        assert site["steps"] == 3 and site["mean-loss"] > 0
    gan_sites = rounds[-1]["sites"]
    assert all(s["loss-clinical"] > 0 for s in gan_sites)

    out = tmp_path / "out"
    model, cfg, meta = load_classifier(out / "classifier.pt")
    assert cfg.norm == "group" and meta["task"] == "binary"
    assert meta["federated"]["sites"] == ["site-0", "site-1"] and "dp" not in meta
    clinical = ClinicalLoss.from_file(out / "classifier.pt", CLASSES)
    last = torch.load(out / "rounds" / "classifier_round_0002.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, last["classifier"][name])
    gan_round = torch.load(out / "rounds" / "round_0001.pt", weights_only=True)
    assert gan_round["model"] == "spinegan"
    assert gan_round["classifier_sha256"] == weights_sha256(model)
    assert clinical.task == "binary" and clinical.output_names == ["abnormal"]
    _, generator_meta = load_generator(out / "generator.pt")
    assert generator_meta["training"]["model"] == "spinegan"
    # Each site's GAN state holds the clinical identity, so a later round checks the classifier.
    state = torch.load(tmp_path / "state_0" / config.name / "trainer.pt", weights_only=True)
    assert state["trainer"]["clinical"]["classifier_sha256"] == gan_round["classifier_sha256"]
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["private"] is False
    assert "without differential privacy" in privacy["components"]["clinical_classifier"]


@pytest.mark.slow
def test_dp_spinegan_federation_ledgers_and_report_show_both_phases(site_datasets, tmp_path):
    from fedspine.models.classifier import load_classifier
    from fedspine.privacy.accounting import epsilon
    from fedspine.privacy.ledger import mechanisms_of
    from fedspine.privacy.report import read_privacy_summary
    from fedspine.reporting.privacy import write_privacy_report as write_report
    from fedspine.training.clinical import clinical_privacy
    from tests.conftest import home_records

    config = _config(
        tmp_path,
        dp=True,
        dp_epsilon=20.0,
        dp_patients_per_step=4,
        classifier={"dp_epsilon": 5.0, "local_steps": 2},
    )
    status = run_federation(InProcessGrid(_nodes(site_datasets, tmp_path)), config, lambda _m: None)
    assert status["state"] == "completed"
    out = tmp_path / "out"
    summary = read_privacy_summary(out)
    assert summary["private"] is True and sorted(summary["sites"]) == ["site-0", "site-1"]
    for name, site in summary["sites"].items():
        phases = site["phases"]
        assert phases["classifier"]["steps"] == 4 and phases["classifier"]["rounds"] == [1, 2]
        assert 0 < phases["classifier"]["epsilon"] <= 5.0
        assert phases["gan"]["steps"] >= 1 and phases["gan"]["rounds"] == [1]
        # ε composes: the total is above each phase alone and within the federation's target.
        assert max(phases["classifier"]["epsilon"], phases["gan"]["epsilon"]) < site["epsilon"]
        assert site["epsilon"] <= 20.0
        assert [(r["phase"], r["round"]) for r in site["epsilon_per_round"]] == [
            ("classifier", 1),
            ("classifier", 2),
            ("gan", 1),
        ]
        labels = [m["label"] for m in site["mechanisms"]]
        assert labels == ["clinical-classifier"] * 2 + ["gan-discriminator"]
        k = int(name.split("-")[1])
        records = home_records(tmp_path / f"privacy_{k}")
        assert [r["notes"]["phase"] for r in records] == ["classifier", "classifier", "gan"]
        recomputed = epsilon(mechanisms_of(records), site["delta"], "prv")
        assert recomputed == pytest.approx(site["epsilon"])
    report = write_report(out, "md").read_text()
    assert "| site | ε (total) | classifier ε | GAN ε | δ |" in report
    for name, site in summary["sites"].items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        phases = site["phases"]
        assert cells[1] == f"{site['epsilon']:.3f}"
        assert cells[2] == f"{phases['classifier']['epsilon']:.3f} (4 steps)"
        assert cells[3] == f"{phases['gan']['epsilon']:.3f} ({phases['gan']['steps']} steps)"
    assert "DP-SGD at each site" in report

    _, _, meta = load_classifier(out / "classifier.pt")
    per_site = meta["dp"]["sites"]
    assert sorted(per_site) == ["site-0", "site-1"]
    assert meta["dp"]["epsilon"] == pytest.approx(max(s["epsilon"] for s in per_site.values()))
    assert clinical_privacy(meta, False, False).basis == "dp"


@pytest.mark.slow
def test_resume_across_the_classifier_and_gan_phases(site_datasets, tmp_path):
    """Stopped in the classifier phase, then after it: each rerun picks up the next round."""

    def drop(phase_type: str, server_round: int | None = None):
        def behaviour(msg):
            if msg.metadata.message_type != phase_type:
                return None
            rnd = int(msg.content["config"]["server-round"])
            return "silent" if server_round is None or rnd == server_round else None

        return behaviour

    config = _config(tmp_path)
    for behaviour, expected in (
        (drop(MESSAGE_TYPE, 2), "classifier round 2"),
        (drop("train"), "round 1"),
    ):
        nodes = _nodes(site_datasets, tmp_path)
        nodes[1].behaviour = behaviour
        with pytest.raises(FederationError, match=expected):
            run_federation(InProcessGrid(nodes), config, log=lambda _m: None)
    status = read_status(tmp_path / "out")
    assert status["state"] == "failed" and status["phase"] == "gan"
    assert status["classifier_completed_rounds"] == 2 and status["completed_rounds"] == 0

    logs: list[str] = []
    status = run_federation(InProcessGrid(_nodes(site_datasets, tmp_path)), config, logs.append)
    assert status["state"] == "completed"
    assert not any(m.startswith("classifier round") for m in logs)
    rounds = read_rounds(tmp_path / "out")
    done = [(r["phase"], r["round"], len(r["sites"])) for r in rounds]
    assert done == [
        ("classifier", 1, 2),
        ("classifier", 2, 1),  # site-1 silent: the round failed
        ("classifier", 2, 2),
        ("gan", 1, 1),  # site-1 silent again
        ("gan", 1, 2),
    ]
    from fedspine.models.classifier import load_classifier

    last = tmp_path / "out" / "rounds" / "classifier_round_0002.pt"
    model_before = torch.load(last, weights_only=True)
    model, _, _ = load_classifier(tmp_path / "out" / "classifier.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, model_before["classifier"][name])

    # A cgan run cannot resume the SpineGAN rounds of the same output folder.
    with pytest.raises(FederationError, match="trained as spinegan"):
        run_federation(
            InProcessGrid(_nodes(site_datasets, tmp_path)),
            _config(tmp_path, model="cgan", rounds=2),
            log=lambda _m: None,
        )
