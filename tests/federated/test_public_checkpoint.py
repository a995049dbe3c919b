"""Round 1 from a public checkpoint (`initial_checkpoint` in server/federation.toml)."""

from __future__ import annotations

import json

import pytest
import torch

from fedspine.federated.client_app import app as client_app
from fedspine.federated.federation import initial_weights, run_federation
from fedspine.federated.federation_config import FederationConfig, FederationError
from fedspine.federated.grid import InProcessGrid, InProcessNode
from fedspine.federated.site_config import RoundConfig
from fedspine.federated.weights import split_weights
from fedspine.fileio import file_sha256
from fedspine.privacy.home import PrivacyHome
from fedspine.training.checkpoint import load_checkpoint
from fedspine.training.run import TrainRequest, train
from tests.federated.conftest import make_site_dataset


@pytest.fixture
def public_run(tmp_path):
    """A 16 px cpu-preset run on other images, declared public, D built for DP."""
    data = make_site_dataset(tmp_path / "public-data", n=40, seed=11, brightness=5.0)
    run = tmp_path / "public"
    train(
        TrainRequest(
            data,
            run,
            preset="cpu",
            resolution=16,
            kimg=0.016,
            snapshot_kimg=0.016,
            device="cpu",
            seed=2,
            public_data="phantom shapes for a test",
            for_dp=True,
        )
    )
    latest = json.loads((run / "latest.json").read_text())["snapshot"]
    return run, run / latest


def _config(tmp_path, **kw):
    base = dict(
        name="pub",
        output_dir=str(tmp_path / "out"),
        rounds=1,
        local_kimg=0.032,
        min_sites=2,
        preset="cpu",
        resolution=16,
        seed=1,
    )
    return FederationConfig(**{**base, **kw})


def test_round_one_starts_from_the_public_checkpoint(tmp_path, public_run):
    run, snapshot = public_run
    config = _config(tmp_path, initial_checkpoint=str(run), dp=True, dp_epsilon=20.0)
    weights, _, pretraining = initial_weights(config)
    saved = load_checkpoint(snapshot, kind="trainer")["trainer"]
    for part in ("G", "G_ema", "D"):
        ours = split_weights(weights, part)
        assert all(torch.equal(ours[k], v) for k, v in saved[part].items()), part
    assert pretraining["checkpoint_sha256"] == file_sha256(snapshot)
    assert pretraining["declared_public"] == "phantom shapes for a test"
    # The record travels to the sites with every round.
    rc = RoundConfig("pub", 1, 0.1, {}, [0.5, 0.5], ["a", "b"], "v", pretraining=pretraining)
    assert RoundConfig.from_record(rc.to_record()).pretraining == pretraining
    # A federation without DP fine-tunes the same checkpoint: its D is built as the
    # checkpoint's, without minibatch-std, and round 1 carries the checkpoint's weights.
    weights, train_config, _ = initial_weights(
        _config(tmp_path, initial_checkpoint=str(run), dp=False)
    )
    assert train_config["network"]["mbstd_group"] == 0
    assert all(torch.equal(split_weights(weights, "D")[k], v) for k, v in saved["D"].items())


def test_a_checkpoint_with_minibatch_std_cannot_start_a_dp_federation(tmp_path):
    """Pretrained without --for-dp, D has a minibatch-std layer, which mixes patients: named,
    not crashed."""
    data = make_site_dataset(tmp_path / "public-data", n=40, seed=11, brightness=5.0)
    run = tmp_path / "public"
    train(
        TrainRequest(
            data, run, preset="cpu", resolution=16, kimg=0.016, snapshot_kimg=0.016,
            device="cpu", seed=2, public_data="phantom shapes for a test",
        )
    )  # fmt: skip
    with pytest.raises(FederationError, match="mbstd_group.*--for-dp"):
        initial_weights(_config(tmp_path, initial_checkpoint=str(run), dp=True, dp_epsilon=20.0))


def test_initial_checkpoint_in_the_toml_is_resolved_and_checked(tmp_path, public_run):
    run, _ = public_run
    toml = tmp_path / "federation.toml"
    toml.write_text(f'[training]\ninitial_checkpoint = "{run.name}"\n')
    assert FederationConfig.from_toml(toml).initial_checkpoint == str(run.resolve())
    toml.write_text('[training]\ninitial_checkpoint = "missing"\n')
    with pytest.raises(FederationError, match="initial_checkpoint .* does not exist"):
        FederationConfig.from_toml(toml)


@pytest.mark.slow
def test_each_site_records_the_public_start_beside_its_dp_steps(tmp_path, public_run):
    run, snapshot = public_run
    datasets = [make_site_dataset(tmp_path / f"s{k}", n=40, seed=k) for k in range(2)]
    nodes = [
        InProcessNode(
            node_id=100 + k,
            node_config={
                "data-path": str(data),
                "site-name": f"site-{k}",
                "state-dir": str(tmp_path / f"state{k}"),
                "privacy-home": str(tmp_path / f"home{k}"),
            },
            app=client_app,
        )
        for k, data in enumerate(datasets)
    ]
    config = _config(
        tmp_path, initial_checkpoint=str(run), dp=True, dp_epsilon=20.0, dp_patients_per_step=4
    )
    status = run_federation(InProcessGrid(nodes), config, log=lambda _m: None)
    assert status["state"] == "completed"
    sha = file_sha256(snapshot)
    for k in range(2):
        (record,) = PrivacyHome(tmp_path / f"home{k}").ledger().records()
        assert record["notes"]["pretraining"]["checkpoint_sha256"] == sha
        assert record["notes"]["pretraining"]["as_declared_by"] == "the server"
    privacy = json.loads((tmp_path / "out" / "privacy.json").read_text())
    assert sha in privacy["components"]["pretraining"]


@pytest.mark.parametrize(
    "record",
    [
        {"checkpoint_sha256": "0" * 64, "declared_public": "x" * 10_000},  # bloats the ledger
        {"checkpoint_sha256": "not a hash", "declared_public": "phantom"},
        {"checkpoint_sha256": "0" * 64, "declared_public": "phantom", "extra": "anything"},
        {"checkpoint_sha256": "0" * 64, "declared_public": "phantom", "epsilon": 3.0},
        ["a", "list"],
    ],
)
def test_a_hostile_pretraining_record_is_refused_before_it_reaches_the_ledger(record):
    """The site writes the server's declaration into its own ledger: only a bounded record."""
    from fedspine.federated.site_config import SiteRefusal

    rc = RoundConfig("pub", 1, 0.1, {}, [0.5, 0.5], ["a", "b"], "v").to_record()
    rc["pretraining"] = json.dumps(record)
    with pytest.raises(SiteRefusal, match="pretraining record"):
        RoundConfig.from_record(rc)
