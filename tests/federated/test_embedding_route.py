"""The DP mean-embedding route across sites: one Flower round of releases, then the server's fit."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedspine.data.prepared import load_prepared
from fedspine.federated.client_app import app as client_app
from fedspine.federated.embedding_route import release_problem, request_for
from fedspine.federated.embedding_site import FEATURE_NETWORK, EmbeddingRoundConfig, release_round
from fedspine.federated.federation import FederationError, read_rounds, run_federation
from fedspine.federated.federation_config import (
    EMBEDDING_ROUTE,
    EmbeddingRouteConfig,
    FederationConfig,
)
from fedspine.federated.grid import InProcessGrid, InProcessNode
from fedspine.federated.site_config import SiteConfig, SiteRefusal
from fedspine.federated.weights import weight_records
from fedspine.fileio import file_sha256
from fedspine.privacy.home import PrivacyHome
from fedspine.training.checkpoint import load_checkpoint, state_sha256
from fedspine.training.generate import load_generator
from fedspine.training.mean_embedding import read_release
from tests.training import public_checkpoint

CAP = 8.0


def _nodes(datasets, tmp_path, cap: float | None = CAP):
    nodes = []
    for k, data in enumerate(datasets):
        config = {
            "data-path": str(data),
            "site-name": f"site-{k}",
            "state-dir": str(tmp_path / f"state_{k}"),
            "privacy-home": str(tmp_path / f"privacy_{k}"),
        }
        if cap is not None:
            config["max-epsilon"] = cap
        nodes.append(InProcessNode(node_id=100 + k, node_config=config, app=client_app))
    return nodes


def _config(tmp_path, **kw) -> FederationConfig:
    base = dict(
        name="embed-fed",
        output_dir=str(tmp_path / "out"),
        min_sites=3,
        resolution=16,
        seed=1,
        dp=True,
        dp_epsilon=4.0,
        route=EMBEDDING_ROUTE,
        embedding=EmbeddingRouteConfig(
            dim=32, feature_resolution=16, fit_steps=3, fit_batch_per_class=4
        ),
    )
    base.update(kw)
    return FederationConfig(**base)


def _ledger_of(tmp_path, k: int) -> list[dict]:
    """Site k's ledger records (its privacy home), oldest first."""
    home = tmp_path / f"privacy_{k}"
    return PrivacyHome(home).ledger().records() if home.exists() else []


def test_each_site_releases_once_and_the_server_fits_the_generator(site_datasets, tmp_path):
    grid = InProcessGrid(_nodes(site_datasets, tmp_path))
    status = run_federation(grid, _config(tmp_path), log=lambda _m: None)
    out = tmp_path / "out"
    assert status["state"] == "completed" and status["phase"] == "embedding"
    (record,) = read_rounds(out)
    assert record["phase"] == "embedding" and not record["failures"]
    assert sorted(s["site"] for s in record["sites"]) == ["site-0", "site-1", "site-2"]
    assert all(0 < s["epsilon"] <= 4.0 + 1e-6 for s in record["sites"])
    assert sorted(p.name for p in (out / "releases").glob("*.npz")) == [
        "site-0.npz",
        "site-1.npz",
        "site-2.npz",
    ]
    assert (out / "generator.pt").is_file()
    privacy = json.loads((out / "privacy.json").read_text())
    assert sorted(privacy["sites"]) == ["site-0", "site-1", "site-2"]
    assert all(0 < s["epsilon"] <= 4.0 + 1e-6 for s in privacy["sites"].values())
    # Every site's ledger holds exactly its one release, and it kept the file it sent.
    for k in range(3):
        labels = [r["label"] for r in _ledger_of(tmp_path, k)]
        assert labels.count("mean-embedding") == 1, labels
        assert len(list((tmp_path / f"state_{k}" / "embed-fed").glob("embedding-release-*"))) == 1
    # The round summed exactly what the sites released: each release as the server received it
    # is bit for bit the one its site kept, and the pooled sums and counts are their sum.
    import numpy as np

    from fedspine.training.mean_embedding import combine_releases, read_release

    kept = [
        read_release(next((tmp_path / f"state_{k}" / "embed-fed").glob("embedding-release-*")))
        for k in range(3)
    ]
    received = [read_release(out / "releases" / f"site-{k}.npz") for k in range(3)]
    for mine, theirs in zip(kept, received, strict=True):
        assert np.array_equal(mine.sums, theirs.sums)
        assert np.array_equal(mine.counts, theirs.counts)
    pooled = combine_releases(received)
    assert np.allclose(pooled.sums, kept[0].sums + kept[1].sums + kept[2].sums, rtol=1e-12, atol=0)
    assert np.array_equal(pooled.counts, kept[0].counts + kept[1].counts + kept[2].counts)

    # Run again: the releases on disk are fitted again, nothing is asked of the sites.
    before = [len(_ledger_of(tmp_path, k)) for k in range(3)]
    status = run_federation(grid, _config(tmp_path), log=lambda _m: None)
    assert status["state"] == "completed"
    assert [len(_ledger_of(tmp_path, k)) for k in range(3)] == before
    assert len(read_rounds(out)) == 1

    from fedspine.training.generate import load_generator, synthesize

    G, meta = load_generator(out / "generator.pt")
    assert meta["class_names"] == ["normal", "abnormal"]
    assert synthesize(G, torch.randn(2, G.z_dim), torch.tensor([0, 1])).shape == (2, 16, 16)

    # The release gate takes the route's output as it takes a GAN federation's: ε recomputed
    # from each site's mechanisms, the ledgers cover them, the generator is bound, then signed.
    from fedspine.privacy.signing import make_signing_key, verify_release
    from fedspine.release.gate import make_release

    key, _ = make_signing_key(tmp_path / "keys" / "steward.key")
    result = make_release(
        out,
        tmp_path / "release",
        max_epsilon=CAP,
        per_class=4,
        audit_data=site_datasets,
        signing_key=key,
        steward_audit_dir=tmp_path / "steward",
        privacy_homes=[tmp_path / f"privacy_{k}" for k in range(3)],
    )
    assert sorted(result.sites) == ["site-0", "site-1", "site-2"]
    assert verify_release(tmp_path / "release").ok


def test_a_site_without_an_epsilon_cap_refuses_and_the_round_fails(site_datasets, tmp_path):
    grid = InProcessGrid(_nodes(site_datasets, tmp_path, cap=None))
    with pytest.raises(FederationError, match="only 0 site"):
        run_federation(grid, _config(tmp_path), log=lambda _m: None)
    (record,) = read_rounds(tmp_path / "out")
    assert all("no ε cap" in f["reason"] for f in record["failures"])
    assert not (tmp_path / "out" / "generator.pt").exists()


def _site(data, tmp_path, cap=CAP) -> SiteConfig:
    return SiteConfig(
        data_path=data,
        site_name="s",
        state_dir=tmp_path / "state",
        max_epsilon=cap,
        privacy_home=tmp_path / "home",
    )


def test_a_hostile_request_is_refused_before_anything_is_spent(site_datasets, tmp_path):
    site = _site(site_datasets[0], tmp_path)
    good = request_for(_config(tmp_path))
    bad = {
        "above the site's cap": replace(good, epsilon=CAP * 4),
        "another version": replace(good, fedspine_version="0.0.0"),
        "finer features than the data": replace(good, feature_resolution=64),
        "other classes": replace(good, class_names=("a", "b", "c")),
    }
    for why, rc in bad.items():
        with pytest.raises(SiteRefusal):
            release_round(site, rc)
        assert not (tmp_path / "home" / "ledger.json").exists() or not _spent(tmp_path), why
    malformed = [
        {**good.to_record(), "dim": 10**6},
        {**good.to_record(), "epsilon": float("nan")},
        {**good.to_record(), "epsilon": True},
        {**good.to_record(), "bandwidths": []},
        {**good.to_record(), "seed": -1},
        {**good.to_record(), "seed": 2**64},
        {k: v for k, v in good.to_record().items() if k != "clip"},
    ]
    for record in malformed:
        with pytest.raises(SiteRefusal):
            EmbeddingRoundConfig.from_record(record)
    # The good request spends once, within the cap.
    arrays, metrics, extra = release_round(site, good)
    assert arrays["sums"].shape == (2, 32) and metrics["num-examples"] > 0
    assert json.loads(extra["release"])["epsilon"] <= good.epsilon + 1e-6


def _spent(tmp_path) -> bool:
    return bool(PrivacyHome(tmp_path / "home").ledger().records())


def _reply(arrays, extra, metrics=None):
    content = RecordDict(
        {
            **weight_records(arrays),
            "metrics": MetricRecord(metrics or {"num-examples": 10}),
            "site": ConfigRecord(extra),
        }
    )
    return SimpleNamespace(content=content)


def test_the_server_refuses_a_tampered_release(site_datasets, tmp_path):
    rc = request_for(_config(tmp_path))
    from fedspine.federated.embedding_route import _expected

    expected = _expected(rc)
    arrays, _, extra = release_round(_site(site_datasets[0], tmp_path), rc)
    problem, release = release_problem(_reply(arrays, extra), expected)
    assert problem is None and release.site == "s"
    meta = json.loads(extra["release"])

    def with_meta(**changes):
        return {**extra, "release": json.dumps({**meta, **changes})}

    nan = {**arrays, "sums": arrays["sums"].clone().fill_(float("nan"))}
    tampered = {
        "other shape": (_reply({**arrays, "sums": arrays["sums"][:, :8]}, extra), "sums"),
        "NaN": (_reply(nan, extra), "NaN"),
        "more arrays": (_reply({**arrays, "x": torch.zeros(1)}, extra), "arrays"),
        "ε above": (_reply(arrays, with_meta(epsilon=rc.epsilon * 2)), "not within"),
        "feature map": (_reply(arrays, with_meta(feature_map={"dim": 32})), "feature map"),
        "site name": (_reply(arrays, with_meta(site="other")), "another site"),
        "unknown key": (_reply(arrays, with_meta(secret=1)), "format"),
        "round": (_reply(arrays, {**extra, "round": "1"}), "answers round"),
        "federation": (_reply(arrays, {**extra, "federation": "x"}), "federation"),
        "no metadata": (_reply(arrays, {k: v for k, v in extra.items() if k != "release"}), ""),
    }
    for why, (reply, words) in tampered.items():
        problem, release = release_problem(reply, expected)
        assert problem is not None and release is None, why
        assert words in problem, (why, problem)


def test_the_route_config_is_checked_and_travels(tmp_path):
    with pytest.raises(FederationError, match="only under DP"):
        _config(tmp_path, dp=False).validate()
    with pytest.raises(FederationError, match="feature_resolution"):
        _config(tmp_path, embedding=EmbeddingRouteConfig(feature_resolution=64)).validate()
    with pytest.raises(FederationError, match="seed -1"):
        _config(tmp_path, embedding=EmbeddingRouteConfig(seed=-1)).validate()
    with pytest.raises(FederationError, match="route must be"):
        _config(tmp_path, route="magic").validate()
    config = _config(tmp_path)
    again = FederationConfig.from_run_config(config.to_run_config())
    assert again.route == EMBEDDING_ROUTE and again.embedding == config.embedding
    toml = tmp_path / "fed.toml"
    toml.write_text(
        '[federation]\nname = "t"\noutput_dir = "o"\nroute = "dp-mean-embedding"\n'
        "[training]\nresolution = 32\n[privacy]\nenabled = true\nepsilon = 3.0\n"
        "[embedding]\ndim = 64\nfit_steps = 10\n"
    )
    loaded = FederationConfig.from_toml(toml)
    assert loaded.route == EMBEDDING_ROUTE and loaded.embedding.dim == 64
    assert loaded.embedding.fit_steps == 10 and loaded.embedding.feature_resolution == 32
    toml.write_text(toml.read_text() + "nonsense = 1\n")
    with pytest.raises(FederationError, match="unknown setting"):
        FederationConfig.from_toml(toml)


def test_the_server_template_loads_as_shipped_and_as_the_embedding_route(tmp_path):
    """server/federation.toml is what operators copy: it loads as is, and with the route set."""
    from pathlib import Path

    template = Path(__file__).resolve().parents[2] / "server" / "federation.toml"
    copy = tmp_path / "federation.toml"
    copy.write_text(template.read_text())
    shipped = FederationConfig.from_toml(copy)
    assert shipped.route == "gan" and shipped.embedding == EmbeddingRouteConfig()
    copy.write_text(template.read_text().replace('route = "gan"', f'route = "{EMBEDDING_ROUTE}"'))
    assert FederationConfig.from_toml(copy).route == EMBEDDING_ROUTE


# -- DP-MEPF: the public discriminator's features, sent by the server ---------------------------


def _mepf_config(tmp_path, public, **kw) -> FederationConfig:
    embedding = EmbeddingRouteConfig(
        features="rff+public", dim=32, feature_resolution=16, fit_steps=3, fit_batch_per_class=4
    )
    return _config(tmp_path, initial_checkpoint=str(public), embedding=embedding, **kw)


def test_dp_mepf_sites_use_the_servers_public_discriminator(site_datasets, tmp_path):
    public = public_checkpoint(tmp_path / "public.pt", "phantom images (fedspine phantom)")
    D = load_checkpoint(public, kind="trainer")["trainer"]["D"]
    grid = InProcessGrid(_nodes(site_datasets, tmp_path))
    logged: list[str] = []
    status = run_federation(grid, _mepf_config(tmp_path, public), log=logged.append)
    out = tmp_path / "out"
    assert status["state"] == "completed"
    assert any("fit step 3/3" in line for line in logged), logged  # the fit reports progress
    for path in sorted((out / "releases").glob("*.npz")):
        parts = read_release(path).metadata["feature_map"]["parts"]
        assert [p["kind"] for p in parts] == ["rff", "network"]
        # The site hashed the weights it used: exactly the checkpoint's D.
        assert parts[1]["weights_sha256"] == state_sha256(D)
        assert parts[1]["checkpoint_sha256"] == file_sha256(public)
    for k in range(3):
        (row,) = [r for r in _ledger_of(tmp_path, k) if r["label"] == "mean-embedding"]
        assert "network" in json.dumps(row)
    components = json.loads((out / "privacy.json").read_text())["components"]
    assert "public-discriminator-feature" in components["release"]
    assert "one bit outside the mechanism" in components["feature network"]
    # The start is named by hash and costs no ε, as the GAN route's summary says it.
    assert f"sha256:{file_sha256(public)}" in components["pretraining"]
    assert "costs no ε" in components["pretraining"]
    # The fit started from the checkpoint and moved only G's mapping.
    G, _ = load_generator(out / "generator.pt")
    start = load_checkpoint(public, kind="trainer")["trainer"]["G_ema"]
    fitted = G.state_dict()
    assert all(torch.equal(fitted[k], start[k]) for k in start if k.startswith("synthesis."))

    # Rerun with another initial checkpoint: the releases on disk name the first one's features,
    # so the fit is refused in federation.toml's words, and nothing is asked of the sites.
    before = [len(_ledger_of(tmp_path, k)) for k in range(3)]
    other = public_checkpoint(tmp_path / "other.pt", "phantom images", content_hash="another")
    with pytest.raises(FederationError) as err:
        run_federation(grid, _mepf_config(tmp_path, other), log=lambda _m: None)
    assert "initial_checkpoint in federation.toml" in str(err.value)
    assert file_sha256(public) in str(err.value) and "--feature-network" not in str(err.value)
    assert [len(_ledger_of(tmp_path, k)) for k in range(3)] == before


def test_the_public_features_need_the_initial_checkpoint(tmp_path):
    embedding = EmbeddingRouteConfig(features="rff+public", dim=32, feature_resolution=16)
    with pytest.raises(FederationError, match="initial_checkpoint"):
        _config(tmp_path, embedding=embedding).validate()
    with pytest.raises(FederationError, match="features must be"):
        _config(tmp_path, embedding=EmbeddingRouteConfig(features="pixels")).validate()


def _hostile(good, records, **claim_changes):
    claim = {**json.loads(good.feature_network), **claim_changes}
    return replace(good, feature_network=json.dumps(claim)), records


def test_a_hostile_feature_network_is_refused_before_anything_is_spent(site_datasets, tmp_path):
    from fedspine.federated.embedding_route import public_network

    public = public_checkpoint(tmp_path / "public.pt", "phantom images (fedspine phantom)")
    config = _mepf_config(tmp_path, public)
    network = public_network(config)
    good = request_for(config, network)
    state = network.D.state_dict()
    records = weight_records(state, FEATURE_NETWORK)
    site = _site(site_datasets[0], tmp_path)
    own_hash = load_prepared(site_datasets[0]).content_hash
    swapped = {k: v.clone() for k, v in state.items()}
    first = next(k for k, v in swapped.items() if v.is_floating_point())
    swapped[first] += 1.0
    nan = {k: v.clone() for k, v in state.items()}
    nan[first].view(-1)[0] = float("nan")
    huge = {**json.loads(good.feature_network)["network"], "channel_max": 4096}
    wide = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    bad = {
        "cannot be read": (good, {}),
        "do not hash": (good, weight_records(swapped, FEATURE_NETWORK)),
        "NaN": _hostile(
            good, weight_records(nan, FEATURE_NETWORK), weights_sha256=state_sha256(nan)
        ),
        "channel_max 4096": _hostile(good, records, network=huge),
        "changed when loaded": _hostile(
            good, weight_records(wide, FEATURE_NETWORK), weights_sha256=state_sha256(wide)
        ),
        "very dataset": _hostile(good, records, dataset_content_hash=own_hash),
        "max-resolution": (good, records),
    }
    for words, (rc, content) in bad.items():
        limited = replace(site, max_resolution=8) if words == "max-resolution" else site
        with pytest.raises(SiteRefusal, match=words):
            release_round(limited, rc, content)
        assert not (tmp_path / "home" / "ledger.json").exists() or not _spent(tmp_path), words
    with pytest.raises(SiteRefusal, match="exactly when"):
        EmbeddingRoundConfig.from_record({**good.to_record(), "feature-network": ""})
    with pytest.raises(SiteRefusal, match="features"):
        EmbeddingRoundConfig.from_record({**good.to_record(), "features": "everything"})
    # A network whose activations overflow is still a fixed map: each patient's embedding that
    # is not finite counts as zero, so the release stays finite and within its sensitivity.
    loud = {k: v * 1e30 if v.is_floating_point() else v for k, v in state.items()}
    rc, content = _hostile(
        good, weight_records(loud, FEATURE_NETWORK), weights_sha256=state_sha256(loud)
    )
    arrays, _, extra = release_round(site, rc, content)
    assert bool(arrays["sums"].isfinite().all())
    assert json.loads(extra["release"])["epsilon"] <= good.epsilon + 1e-6
    # The good request spends once.
    arrays, _, extra = release_round(site, good, records)
    assert arrays["sums"].shape == (2, network.dim + 32)
