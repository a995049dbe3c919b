"""Starting a run from a checkpoint trained on data declared public (training.public_init)."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from fedspine.fileio import file_sha256
from fedspine.privacy.home import PrivacyHome
from fedspine.training.checkpoint import load_checkpoint
from fedspine.training.generate import load_generator
from fedspine.training.run import DPRequest, TrainRequest, TrainRunError, train
from tests.training import make_prepared

RUN = {"preset": "cpu", "kimg": 0.016, "snapshot_kimg": 0.016, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("tiny_cpu_preset")


@pytest.fixture
def public(tmp_path):
    """A run trained on other (public) data, declared public, with a DP-compatible D."""
    data = make_prepared(tmp_path / "public-data", seed=7)
    run = tmp_path / "public-run"
    train(TrainRequest(data, run, public_data="test shapes, seed 7", for_dp=True, seed=3, **RUN))
    return run


def _snapshot(run):
    latest = json.loads((run / "latest.json").read_text())["snapshot"]
    return run / latest


def test_a_run_starts_from_the_public_weights_and_records_them(tmp_path, public):
    private = make_prepared(tmp_path / "private", seed=1)
    out = tmp_path / "run"
    # No --for-dp: a run without DP builds D as the checkpoint's (no minibatch-std) itself.
    request = TrainRequest(private, out, init_from=public, seed=5, **RUN)
    # A zero-length run: its networks are exactly the public checkpoint's.
    train(TrainRequest(**{**request.__dict__, "kimg": 0.0}))
    source = load_checkpoint(_snapshot(public), kind="trainer")["trainer"]
    G, meta = load_generator(out / "generator.pt")
    for key, value in source["G_ema"].items():
        assert torch.equal(G.state_dict()[key], value), key
    sha = file_sha256(_snapshot(public))
    assert meta["training"]["init_from"] == {
        "checkpoint_sha256": sha,
        "declared_public": "test shapes, seed 7",
    }
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["init_from"]["checkpoint_sha256"] == sha and config["init_from"]["epsilon"] == 0
    assert config["train"]["network"]["mbstd_group"] == 0
    privacy = json.loads((out / "privacy.json").read_text())
    assert sha[:16] in privacy["components"]["pretraining"]
    assert "costs no ε" in privacy["components"]["pretraining"]


def test_a_dp_run_from_a_public_checkpoint_names_it_in_its_ledger_and_summary(tmp_path, public):
    private = make_prepared(tmp_path / "private", seed=1)
    home = tmp_path / "home"
    dp = DPRequest(noise_multiplier=1.0, expected_patients_per_step=8, privacy_home=home)
    train(TrainRequest(private, tmp_path / "run", init_from=public, dp=dp, **RUN))
    sha = file_sha256(_snapshot(public))
    (record,) = PrivacyHome(home).ledger().records()
    assert record["notes"]["pretraining"]["checkpoint_sha256"] == sha
    assert record["steps"] > 0
    summary = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert sha in summary["components"]["pretraining"]


def test_only_a_checkpoint_declared_public_and_of_other_data_may_start_a_run(tmp_path, public):
    private = make_prepared(tmp_path / "private", seed=1)
    secret = tmp_path / "secret-run"
    train(TrainRequest(private, secret, **RUN))
    with pytest.raises(TrainRunError, match="not trained on data declared public"):
        train(TrainRequest(private, tmp_path / "a", init_from=secret, **RUN))
    # Declared public, but trained on the very data of the new run: that is private data.
    mine = tmp_path / "mine"
    train(TrainRequest(private, mine, public_data="mislabelled", **RUN))
    with pytest.raises(TrainRunError, match="trained on this very dataset"):
        train(TrainRequest(private, tmp_path / "b", init_from=mine, **RUN))
    # A D with minibatch-std cannot start a DP run's D: the mismatch is named with what to do.
    plain = tmp_path / "plain"
    train(TrainRequest(make_prepared(tmp_path / "p2", seed=9), plain, public_data="x", **RUN))
    dp = DPRequest(noise_multiplier=1.0, privacy_home=tmp_path / "home")
    with pytest.raises(TrainRunError, match=r"mbstd_group.*--for-dp"):
        train(TrainRequest(private, tmp_path / "c", init_from=plain, dp=dp, **RUN))
    assert PrivacyHome(tmp_path / "home").ledger().records() == []  # refused before reserving
    with pytest.raises(TrainRunError, match="needs no DP"):
        train(TrainRequest(private, tmp_path / "d", public_data="x", dp=dp, **RUN))
    with pytest.raises(TrainRunError, match="omit them when resuming"):
        train(TrainRequest(private, secret, init_from=public, resume=True))


def test_a_checkpoint_trained_on_the_same_patients_is_refused_however_they_were_ingested(
    tmp_path, public
):
    """An attacker's (or a careless operator's) ways round the dataset-hash check: the site's own
    patients re-ingested at another resolution, or pooled with other data under a site prefix,
    declared public and pretrained on. Each shares no content hash with the private run's
    dataset, and each is refused by its patients, before any ε is reserved."""
    from fedspine.data.prepared import load_prepared, merge_prepared

    private = make_prepared(tmp_path / "private", seed=1)
    reingested = make_prepared(tmp_path / "reingested", seed=1, resolution=32)
    other = make_prepared(tmp_path / "other", seed=2)
    pooled = tmp_path / "pooled"
    merge_prepared([load_prepared(private), load_prepared(other)], pooled, ["site_a", "site_b"])
    hashes = {load_prepared(d).content_hash for d in (private, reingested, pooled)}
    assert len(hashes) == 3  # the dataset-hash check alone lets both through
    dp = DPRequest(noise_multiplier=1.0, privacy_home=tmp_path / "home")
    for name, data in (("re", reingested), ("pool", pooled)):
        run = tmp_path / f"{name}-run"
        train(TrainRequest(data, run, public_data="said public", for_dp=True, **RUN))
        with pytest.raises(TrainRunError, match=r"patient identifier\(s\) of this run's dataset"):
            train(TrainRequest(private, tmp_path / f"{name}-dp", init_from=run, dp=dp, **RUN))
    # The other way round: a public run on one site, a private run on a pool holding that site.
    site_run = tmp_path / "site-run"
    train(TrainRequest(other, site_run, public_data="said public", for_dp=True, **RUN))
    with pytest.raises(TrainRunError, match="patient identifier"):
        train(TrainRequest(pooled, tmp_path / "pool-dp", init_from=site_run, dp=dp, **RUN))
    assert PrivacyHome(tmp_path / "home").ledger().records() == []
    # Of other patients, the same checkpoint is accepted.
    train(TrainRequest(private, tmp_path / "ok", init_from=public, dp=dp, **RUN))


def test_a_checkpoint_that_does_not_list_its_patients_is_refused(tmp_path, public):
    """A public snapshot without the patient digests (made before fedspine recorded them, or
    stripped) cannot be checked against this run's patients: it is refused, not trusted."""
    from fedspine.training.checkpoint import save_checkpoint
    from fedspine.training.public_init import PATIENT_DIGESTS

    data = load_checkpoint(_snapshot(public), kind="trainer")
    assert len(data["dataset"][PATIENT_DIGESTS]) == 48  # 40 train + 8 val patients
    del data["dataset"][PATIENT_DIGESTS]
    stripped = tmp_path / "stripped.pt"
    header = ("fedspine_checkpoint", "format_version", "fedspine_version")
    save_checkpoint(stripped, "trainer", {k: v for k, v in data.items() if k not in header})
    private = make_prepared(tmp_path / "private", seed=1)
    with pytest.raises(TrainRunError, match="did not record its patients"):
        train(TrainRequest(private, tmp_path / "run", init_from=stripped, **RUN))
