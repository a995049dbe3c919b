"""The one-shot DP mean-embedding route: its sensitivity, its one ledger record, what its file
holds, pooling, the generator fit and the public-network rule (issue 15, item 4)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedspine.cli.main import app
from fedspine.data.prepared import load_prepared
from fedspine.models import Generator
from fedspine.privacy.accounting import Mechanism, calibrate_noise, epsilon
from fedspine.privacy.home import PrivacyHome
from fedspine.privacy.report import build_report
from fedspine.release.checks import check_generator_binding, check_privacy
from fedspine.training import config as config_module
from fedspine.training import mean_embedding as me
from fedspine.training.checkpoint import load_checkpoint
from fedspine.training.generate import load_generator
from fedspine.training.mean_embedding_features import (
    FeatureMapError,
    NetworkFeatures,
    RandomFourierFeatures,
    build_feature_map,
    feature_map_from_description,
    to_unit_range,
)
from fedspine.training.mean_embedding_fit import FitRequest, fit_generator
from tests.training import make_prepared, public_checkpoint, tiny_config

runner = CliRunner()
DIM = 32


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def prepared(tmp_path):
    return make_prepared(tmp_path / "prepared", n_train=24, n_val=4, resolution=16)


def _release(prepared, tmp_path, name="rel.npz", home="home", **options):
    options.setdefault("dim", DIM)
    options.setdefault("feature_resolution", 16)
    return me.release_embedding(
        prepared, tmp_path / name, epsilon=5.0, privacy_home=tmp_path / home, **options
    )


def _records(tmp_path, home="home"):
    return PrivacyHome(tmp_path / home).ledger().records()


# -- sensitivity ---------------------------------------------------------------------------------


def test_one_patient_moves_the_unnoised_vector_by_at_most_the_sensitivity():
    rng = np.random.default_rng(0)
    for trial in range(200):
        k = int(rng.integers(1, 4))
        dim = int(rng.integers(1, 6))
        n = int(rng.integers(2, 30))
        clip = float(rng.uniform(0.2, 2.0))
        kappa = float(rng.uniform(0.0, 2.0)) if trial % 2 else None
        feats = rng.normal(0, rng.uniform(0.1, 3.0), size=(n, dim))
        labels = rng.integers(0, k, size=n)
        ids = np.array([f"p{i}" for i in rng.integers(0, max(2, n // 3), size=n)])
        bound = me.sensitivity(clip, clip if kappa is None else kappa)
        full = me.embedding_sums(feats, labels, ids, k, clip, kappa)
        for patient in np.unique(ids):
            keep = ids != patient
            without = me.embedding_sums(feats[keep], labels[keep], ids[keep], k, clip, kappa)
            assert np.linalg.norm(full - without) <= bound * (1 + 1e-12)


def test_a_patients_images_are_averaged_before_the_norm_bound():
    feats = np.array([[2.0, 0.0], [0.0, 2.0], [0.5, 0.0]])
    labels = np.array([0, 0, 0])
    ids = np.array(["a", "a", "b"])
    patients, rows = me.patient_contributions(feats, labels, ids, 1, clip_norm=1.0)
    assert patients == ["a", "b"]
    # Averaged first ([1, 1]) then clipped: [0.707, 0.707]; clipping each image first would
    # give [0.5, 0.5].
    np.testing.assert_allclose(rows[0, :2], [2**-0.5, 2**-0.5])
    np.testing.assert_allclose(rows[1, :2], [0.5, 0.0])
    np.testing.assert_allclose(rows[:, 2], [1.0, 1.0])  # one count each, scaled by κ = C
    # Changing patient b's image moves only b's row.
    feats2 = feats.copy()
    feats2[2] = [0.0, 0.3]
    _, rows2 = me.patient_contributions(feats2, labels, ids, 1, clip_norm=1.0)
    np.testing.assert_array_equal(rows2[0], rows[0])
    assert not np.array_equal(rows2[1], rows[1])


def test_a_non_finite_embedding_counts_as_zero_within_the_bound():
    feats = np.array([[np.nan, 1.0], [0.5, 0.0]])
    _, rows = me.patient_contributions(feats, np.array([0, 0]), np.array(["a", "b"]), 1)
    np.testing.assert_array_equal(rows[0], [0.0, 0.0, 1.0])
    assert np.all(np.isfinite(rows))


def test_a_patient_in_two_classes_is_split_by_image_share():
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    labels = np.array([0, 1, 1, 1])
    _, rows = me.patient_contributions(feats, labels, np.array(["a"] * 4), 2, clip_norm=1.0)
    np.testing.assert_allclose(rows[0], [0.25, 0.0, 0.0, 0.75, 0.25, 0.75])
    assert np.linalg.norm(rows[0]) <= me.sensitivity(1.0, 1.0)


def test_random_fourier_features_are_public_unit_norm_and_rebuildable():
    rff = RandomFourierFeatures(dim=64, seed=3, resolution=8)
    again = RandomFourierFeatures(dim=64, seed=3, resolution=8)
    assert rff.sha256 == again.sha256 and rff.sha256 != RandomFourierFeatures(64, 4).sha256
    x = to_unit_range(np.random.default_rng(0).integers(0, 256, (5, 16, 16), dtype=np.uint8))
    np.testing.assert_allclose(rff(x).norm(dim=1).numpy(), 1.0, rtol=1e-5)
    description = build_feature_map("rff", dim=64, seed=3, resolution=8).describe()
    rebuilt = feature_map_from_description(description)
    torch.testing.assert_close(rebuilt(x), rff(x))
    for seed in (-1, 2**64):
        with pytest.raises(FeatureMapError, match="seed"):
            RandomFourierFeatures(dim=64, seed=seed, resolution=8)


# -- the mechanism -------------------------------------------------------------------------------


def test_release_is_one_gaussian_mechanism_with_the_accountants_epsilon(prepared, tmp_path):
    release = _release(prepared, tmp_path)
    records = _records(tmp_path)
    assert len(records) == 1
    record = records[0]
    assert record["label"] == me.MECHANISM_LABEL
    assert (record["sample_rate"], record["steps"], record["state"]) == (1.0, 1, "settled")
    meta = release.metadata
    sigma, delta = meta["noise_multiplier"], meta["delta"]
    assert record["noise_multiplier"] == sigma
    assert record["clip_norm"] == pytest.approx(me.sensitivity(1.0, 1.0))
    assert sigma == calibrate_noise(5.0, delta, 1.0, 1, accountant="rdp")
    mech = [Mechanism(sigma, 1.0, 1)]
    assert meta["epsilon"] == pytest.approx(epsilon(mech, delta, "prv"))
    assert meta["epsilon"] == pytest.approx(epsilon(mech, delta, "pld"), rel=0.02)
    assert meta["epsilon"] <= 5.0
    assert meta["noise_std"] == pytest.approx(sigma * meta["sensitivity"])
    assert meta["patients"] == len(set(load_prepared(prepared).select("train").privacy_ids))


def test_the_step_is_on_record_before_the_noise_and_a_crash_leaves_it(
    prepared, tmp_path, monkeypatch
):
    seen = []

    def crash(shape, std):
        seen.append([(r["state"], r["steps"]) for r in _records(tmp_path)])
        raise RuntimeError("crash while drawing noise")

    monkeypatch.setattr(me, "draw_noise", crash)
    with pytest.raises(RuntimeError, match="crash"):
        _release(prepared, tmp_path)
    assert seen == [[("reserved", 1)]]
    assert [(r["state"], r["steps"]) for r in _records(tmp_path)] == [("reserved", 1)]
    assert not (tmp_path / "rel.npz").exists()


def test_the_file_holds_only_the_listed_fields(prepared, tmp_path):
    _release(prepared, tmp_path)
    path = tmp_path / "rel.npz"
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(me.ARRAYS)
        meta = json.loads(str(data["metadata"]))
        assert data["sums"].shape == (2, DIM) and data["counts"].shape == (2,)
    assert set(meta) == me.METADATA_KEYS
    dataset = load_prepared(prepared)
    raw = path.read_bytes()
    for secret in [dataset.content_hash, *dataset.patient_ids[:5].tolist()]:
        assert secret.encode() not in raw
    again = me.read_release(path)
    np.testing.assert_array_equal(again.sums, me.read_release(path).sums)
    assert again.metadata == meta


def test_summed_releases_equal_the_release_of_the_union_before_noise(tmp_path, monkeypatch):
    monkeypatch.setattr(me, "draw_noise", lambda shape, std: np.zeros(shape))
    a = make_prepared(tmp_path / "a", n_train=20, n_val=2, resolution=16, seed=1)
    b = make_prepared(tmp_path / "b", n_train=16, n_val=2, resolution=16, seed=2)
    ra = _release(a, tmp_path, "a.npz", home="home_a")
    rb = _release(b, tmp_path, "b.npz", home="home_b")
    pooled = me.combine_releases([me.read_release(tmp_path / "a.npz"), rb])
    fmap = build_feature_map("rff", dim=DIM, resolution=16)
    feats, labels, ids = [], [], []
    for name, root in (("a", a), ("b", b)):
        train = load_prepared(root).select("train")
        feats.append(me.image_features(fmap, np.asarray(train.images)))
        labels.append(train.labels)
        ids.append([f"{name}/{p}" for p in train.privacy_ids])
    union = me.embedding_sums(np.concatenate(feats), np.concatenate(labels), sum(ids, []), 2)
    sums, counts = me.split_vector(union, 2, 1.0)
    np.testing.assert_allclose(pooled.sums, sums, atol=1e-9)
    np.testing.assert_allclose(pooled.counts, counts, atol=1e-9)
    np.testing.assert_allclose(pooled.sums, ra.sums + rb.sums)
    with pytest.raises(me.EmbeddingReleaseError, match="second release of site"):
        me.combine_releases([ra, ra])
    other = dataclasses.replace(rb, metadata={**rb.metadata, "feature_map": {"dim": 1}})
    with pytest.raises(me.EmbeddingReleaseError, match="another feature map"):
        me.combine_releases([ra, other])


# -- the fit -------------------------------------------------------------------------------------


def test_fit_reduces_the_embedding_distance_and_writes_a_releasable_run(
    prepared, tmp_path, monkeypatch
):
    # Noise-free sums, so the distance measures the fit alone (the ledger still records ε).
    monkeypatch.setattr(me, "draw_noise", lambda shape, std: np.zeros(shape))
    release = _release(prepared, tmp_path)
    network = dataclasses.asdict(tiny_config(resolution=16, num_classes=2).network)
    request = FitRequest(
        releases=[tmp_path / "rel.npz"],
        out=tmp_path / "run",
        steps=30,
        batch_per_class=8,
        lr=0.0025,
        network=network,
        ema_steps=2,
    )
    result = fit_generator(request)
    assert result.distance_end < result.distance_start
    G, meta = load_generator(tmp_path / "run" / "generator.pt")
    assert isinstance(G, Generator) and meta["class_names"] == release.class_names
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    site = privacy["sites"][release.site]
    assert privacy["private"] is True
    assert site["epsilon"] == pytest.approx(release.metadata["epsilon"])
    assert [m["label"] for m in site["mechanisms"]] == [me.MECHANISM_LABEL]
    report = build_report(tmp_path / "run")
    assert report["sites"][release.site]["epsilon_recomputed"] == pytest.approx(
        site["epsilon"], rel=0.02
    )
    check = check_privacy(tmp_path / "run", max_epsilon=5.0)
    assert check.sites[release.site]["epsilon"] <= 5.0
    check_generator_binding(tmp_path / "run", privacy, meta)
    assert (tmp_path / "run" / "config.toml").is_file()


# -- public networks -----------------------------------------------------------------------------


def test_a_feature_network_not_declared_public_is_refused(prepared, tmp_path):
    private = public_checkpoint(tmp_path / "private.pt", None)
    with pytest.raises(FeatureMapError, match="not trained on data declared public"):
        NetworkFeatures.from_checkpoint(private)
    with pytest.raises(FeatureMapError, match="declared public"):
        _release(prepared, tmp_path, features=str(private))
    assert not (tmp_path / "home" / "ledger.json").exists() or not _records(tmp_path)
    same = public_checkpoint(tmp_path / "same.pt", "phantom", load_prepared(prepared).content_hash)
    with pytest.raises(FeatureMapError, match="this very dataset"):
        _release(prepared, tmp_path, features=str(same))


def test_public_network_features_release_and_fit(prepared, tmp_path):
    public = public_checkpoint(tmp_path / "public.pt", "phantom images (fedspine phantom)")
    fmap = NetworkFeatures.from_checkpoint(public)
    x = to_unit_range(np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8))
    assert torch.all(fmap(x).norm(dim=1) <= 1 + 1e-5)
    release = _release(prepared, tmp_path, features=f"rff+{public}")
    parts = release.metadata["feature_map"]["parts"]
    assert [p["kind"] for p in parts] == ["rff", "network"]
    network = dataclasses.asdict(tiny_config(resolution=16, num_classes=2).network)
    common = {"releases": [tmp_path / "rel.npz"], "steps": 2, "batch_per_class": 2}
    with pytest.raises(ValueError, match="--feature-network"):
        fit_generator(FitRequest(out=tmp_path / "r1", network=network, **common))
    fit_generator(
        FitRequest(out=tmp_path / "r2", init_from=public, feature_networks=[public], **common)
    )
    _, meta = load_generator(tmp_path / "r2" / "generator.pt")
    assert meta["training"]["init_from"]["declared_public"].startswith("phantom")


def test_a_mapping_only_fit_moves_the_mapping_and_keeps_the_public_synthesis(prepared, tmp_path):
    """From a public checkpoint the fit moves the label embedding and mapping network only (by
    default): the synthesis network stays the checkpoint's, bit for bit."""
    public = public_checkpoint(tmp_path / "public.pt", "phantom images (fedspine phantom)")
    _release(prepared, tmp_path)
    common = {"releases": [tmp_path / "rel.npz"], "steps": 3, "batch_per_class": 2}
    fit_generator(FitRequest(out=tmp_path / "run", init_from=public, **common))
    G, _ = load_generator(tmp_path / "run" / "generator.pt")
    start = load_checkpoint(public, kind="trainer")["trainer"]["G_ema"]
    fitted = G.state_dict()
    synthesis = [k for k in start if k.startswith("synthesis.")]
    mapping = [k for k, _ in G.named_parameters() if k.startswith("mapping.")]
    assert synthesis and mapping
    assert all(torch.equal(fitted[k], start[k]) for k in synthesis)
    assert any(not torch.equal(fitted[k], start[k]) for k in mapping)
    fit = json.loads((tmp_path / "run" / "config.json").read_text())["fit"]
    assert fit["g_trainable"] == "mapping"
    fit_generator(FitRequest(out=tmp_path / "all", init_from=public, g_trainable="all", **common))
    everything = load_generator(tmp_path / "all" / "generator.pt")[0].state_dict()
    assert any(not torch.equal(everything[k], start[k]) for k in synthesis)
    with pytest.raises(ValueError, match="needs --init-from"):
        fit_generator(
            FitRequest(
                out=tmp_path / "r2",
                network=dataclasses.asdict(tiny_config(resolution=16, num_classes=2).network),
                g_trainable="mapping",
                **common,
            )
        )
    with pytest.raises(ValueError, match="one of all, mapping"):
        fit_generator(FitRequest(out=tmp_path / "r3", init_from=public, g_trainable="x", **common))


# -- the command line ----------------------------------------------------------------------------


def test_cli_release_and_fit(prepared, tmp_path, monkeypatch):
    monkeypatch.setitem(
        config_module.PRESETS,
        "cpu",
        lambda res, nc: tiny_config(resolution=res or 16, num_classes=nc),
    )
    out = tmp_path / "site.npz"
    args = ["embedding", "release", str(prepared), "--epsilon", "8", "--out", str(out)]
    args += ["--dim", "16", "--feature-resolution", "16", "--privacy-home", str(tmp_path / "h")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ε =" in result.output and out.is_file()
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "already exists" in again.output
    run = tmp_path / "run"
    fit = ["embedding", "fit", str(out), "--out", str(run), "--steps", "2", "--batch", "2"]
    result = runner.invoke(app, fit)
    assert result.exit_code == 0, result.output
    assert (run / "generator.pt").is_file() and (run / "privacy.json").is_file()
