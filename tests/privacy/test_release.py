"""The gated, signed release: one refusal per reason (nothing written), a real release, verify."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from fedspine.cli.release import EXIT_REFUSED, register
from fedspine.data.prepared import load_prepared, write_prepared
from fedspine.models import Generator, NetworkConfig
from fedspine.privacy import release as release_module
from fedspine.privacy.accounting import Mechanism, epsilon
from fedspine.privacy.release import (
    MemorisationGate,
    ReleaseError,
    ReleaseRefused,
    make_release,
    memorisation_gate,
)
from fedspine.privacy.signing import (
    SigningError,
    fingerprint,
    load_private_key,
    load_public_key,
    make_signing_key,
    verify_release,
)
from fedspine.training.checkpoint import save_checkpoint
from fedspine.training.generate import save_generator

NET = NetworkConfig(resolution=16, c_dim=2, z_dim=32, w_dim=32, channel_base=256, channel_max=32)
CLASSES = ["normal", "abnormal"]
SPLIT_SIZES = {"train": 60, "val": 20, "test": 20}


def _images(n: int, seed: int, size: int = 16) -> np.ndarray:
    """Random grey uint8 images: 4x4 blocks of noise upsampled, plus a little pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(128, 40, (n, 4, 4))
    smooth = np.kron(coarse, np.ones((size // 4, size // 4)))
    return np.clip(smooth + rng.normal(0, 8, (n, size, size)), 0, 255).astype(np.uint8)


def _write_audit(root: Path, seed: int = 0) -> Path:
    n = sum(SPLIT_SIZES.values())
    labels = np.arange(n) % 2
    findings = np.eye(2, dtype=np.uint8)[labels]
    return write_prepared(
        root,
        images=_images(n, seed),
        files=[f"img{i:04d}.png" for i in range(n)],
        patient_ids=[f"p{i:04d}" for i in range(n)],
        splits=[s for s, k in SPLIT_SIZES.items() for _ in range(k)],
        labels=labels,
        findings=findings,
        finding_names=CLASSES,
        class_names=CLASSES,
        rejected=[],
        manifest={"source": "random test images"},
    )


def _privacy(dataset_hash: str, epsilon: float, **changes) -> dict:
    mechanism = {
        "label": "gan-discriminator",
        "noise_multiplier": 1.1,
        "sample_rate": 0.05,
        "steps": 400,
        "clip_norm": 1.0,
    }
    data = {
        "format": "fedspine-privacy/1",
        "private": True,
        "not_private_reasons": [],
        "accountant": "prv",
        "delta": 1e-5,
        "unit": "patient",
        "sites": {
            "site_1": {
                "epsilon": epsilon,
                "delta": 1e-5,
                "dataset_hash": dataset_hash,
                "ledger_complete": True,
                "mechanisms": [mechanism],
            },
        },
        "components": {
            "discriminator": "DP-SGD (patient-level)",
            "clinical_classifier": "none",
            "label_prior": "public: uniform",
            "ada_p": "fixed 0.0",
            "pretraining": "none",
        },
    }
    data.update(changes)
    return data


def _make_run(root: Path, privacy: dict | None) -> Path:
    torch.manual_seed(0)
    G = Generator(NET).eval()
    save_generator(root / "generator.pt", G, dataclasses.asdict(NET), CLASSES, {"kimg": 1.0})
    if privacy is not None:
        (root / "privacy.json").write_text(json.dumps(privacy, indent=2))
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Audit data, a run, a key pair and one finished release, shared (read-only) by tests."""
    root = tmp_path_factory.mktemp("base")
    audit = _write_audit(root / "audit" / "site_1")
    dataset_hash = load_prepared(audit).content_hash
    eps = epsilon([Mechanism(noise_multiplier=1.1, sample_rate=0.05, steps=400)], 1e-5, "prv")
    run = _make_run(root / "run", _privacy(dataset_hash, eps))
    key, pub = make_signing_key(root / "keys" / "steward.key")
    release = root / "release"
    result = make_release(
        run,
        release,
        max_epsilon=8.0,
        per_class=20,
        audit_data=[audit],
        signing_key=key,
        seed=3,
        steward_audit_dir=root / "steward-audit",
    )
    return {
        "root": root,
        "audit": audit,
        "hash": dataset_hash,
        "eps": eps,
        "run": run,
        "key": key,
        "pub": pub,
        "release": release,
        "result": result,
    }


@pytest.fixture
def outdir(tmp_path):
    """An empty folder to release into; tests assert it stays empty after a refusal."""
    folder = tmp_path / "releases"
    folder.mkdir()
    return folder


def _release(base, run: Path, out: Path, **kwargs):
    args = {
        "max_epsilon": 8.0,
        "per_class": 10,
        "audit_data": [base["audit"]],
        "signing_key": base["key"],
    }
    args.update(kwargs)
    return make_release(run, out, **args)


def _assert_nothing_written(outdir: Path) -> None:
    assert list(outdir.iterdir()) == [], "a refused release left files behind"


# Refusals: one per reason, nothing written ----------------------------------------------------


def test_refused_when_a_site_is_over_the_epsilon_cap(base, tmp_path, outdir):
    run = _make_run(tmp_path / "run", _privacy(base["hash"], base["eps"]))
    expected = f"site site_1 spent epsilon {base['eps']:.4g}, over the cap --max-epsilon 2$"
    with pytest.raises(ReleaseRefused, match=expected):
        _release(base, run, outdir / "rel", max_epsilon=2.0)
    _assert_nothing_written(outdir)


def test_refused_when_the_stated_epsilon_understates_the_mechanisms(base, tmp_path, outdir):
    run = _make_run(tmp_path / "run", _privacy(base["hash"], 3.2))
    expected = rf"site site_1 states epsilon 3\.2, but its mechanisms compose to {base['eps']:.4g}"
    with pytest.raises(ReleaseRefused, match=expected):
        _release(base, run, outdir / "rel")
    _assert_nothing_written(outdir)


def test_refused_without_privacy_json(base, tmp_path, outdir):
    run = _make_run(tmp_path / "run", None)
    with pytest.raises(ReleaseRefused, match="no complete privacy ledger: no privacy.json"):
        _release(base, run, outdir / "rel")
    _assert_nothing_written(outdir)


def test_refused_when_a_site_ledger_is_incomplete(base, tmp_path, outdir):
    privacy = _privacy(base["hash"], base["eps"])
    privacy["sites"]["site_2"] = {
        "epsilon": 1.0,
        "delta": 1e-5,
        "dataset_hash": "ab" * 32,
        "ledger_complete": False,
        "mechanisms": [],
    }
    run = _make_run(tmp_path / "run", privacy)
    with pytest.raises(ReleaseRefused, match="incomplete ledger for site.s. site_2$"):
        _release(base, run, outdir / "rel")
    _assert_nothing_written(outdir)


def test_refused_when_part_of_the_run_was_not_private(base, tmp_path, outdir):
    reasons = ["ADA p adapted from D(real)", "clinical classifier trained on private data"]
    run = _make_run(
        tmp_path / "run",
        _privacy(base["hash"], base["eps"], private=False, not_private_reasons=reasons),
    )
    with pytest.raises(ReleaseRefused) as info:
        _release(base, run, outdir / "rel")
    assert info.value.reason == "parts of the run were not private: " + "; ".join(reasons)
    _assert_nothing_written(outdir)


def test_refused_when_the_generator_copies_training_images(base, tmp_path, monkeypatch):
    """End to end through make_release, with a 'generator' that writes training images."""
    train = load_prepared(base["audit"]).select("train").images

    def copying_generator(gen_path, out, per_class, progress=None, **_):
        (out / "images").mkdir(parents=True)
        rows = []
        for i in range(2 * per_class):
            Image.fromarray(np.asarray(train[i])).save(out / f"images/syn-{i:06d}.png")
            rows.append((f"images/syn-{i:06d}.png", CLASSES[i % 2], f"syn-{i:06d}"))
        with open(out / "labels.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("file", "label", "patient_id"), *rows])
        (out / "classes.txt").write_text("".join(c + "\n" for c in CLASSES))
        return out

    monkeypatch.setattr(release_module, "_write_synthetic", copying_generator)
    out = tmp_path / "new" / "deeper" / "rel"
    with pytest.raises(ReleaseRefused, match=r"memorisation audit: 100\.0% of synthetic images"):
        _release(base, base["run"], out, steward_audit_dir=tmp_path / "steward")
    assert not (tmp_path / "new").exists(), "folders created for the release were left behind"
    assert (tmp_path / "steward" / "closest_pairs.png").is_file()


@pytest.mark.parametrize("where", ["top-level D", "tensor hidden in metadata", "trainer kind"])
def test_refused_when_the_checkpoint_holds_more_than_g_ema(base, tmp_path, outdir, where):
    run = _make_run(tmp_path / "run", _privacy(base["hash"], base["eps"]))
    g_state = Generator(NET).state_dict()
    payload = {
        "network": dataclasses.asdict(NET),
        "class_names": CLASSES,
        "G_ema": g_state,
        "training": {},
    }
    kind = "generator"
    if where == "top-level D":
        payload["D"] = {"b16.conv0.weight": torch.zeros(3, 3)}
        match = "holds 'D' besides G_ema"
    elif where == "tensor hidden in metadata":
        payload["training"] = {"discriminator": {"fc.weight": torch.zeros(2)}}
        match = r"tensors outside G_ema \(training\.discriminator\.fc\.weight\)"
    else:
        kind = "trainer"
        match = "is a trainer checkpoint"
    save_checkpoint(run / "generator.pt", kind, payload)
    with pytest.raises(ReleaseRefused, match=match):
        _release(base, run, outdir / "rel")
    _assert_nothing_written(outdir)


def test_refused_when_the_audit_data_is_not_the_training_data(base, tmp_path, outdir):
    run = _make_run(tmp_path / "run", _privacy("cd" * 32, base["eps"]))
    with pytest.raises(ReleaseRefused, match="no --audit-data set is the training data"):
        _release(base, run, outdir / "rel")
    _assert_nothing_written(outdir)


def test_an_existing_out_is_an_error_and_left_alone(base, outdir):
    out = outdir / "rel"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ReleaseError, match="already exists") as info:
        _release(base, base["run"], out)
    assert not isinstance(info.value, ReleaseRefused)
    assert [p.name for p in outdir.iterdir()] == ["rel"] and (out / "keep.txt").is_file()


# The memorisation gate on its own ------------------------------------------------------------


def test_gate_refuses_copies_and_passes_independent_draws():
    train, heldout = _images(200, 10), _images(100, 11)
    copies, _ = memorisation_gate(train[:100], train, heldout)
    assert not copies.passed and copies.flagged == 100 and copies.share_flagged == 1.0
    honest, result = memorisation_gate(_images(200, 12), train, heldout)
    assert honest.passed, honest.reason()
    assert honest.threshold == pytest.approx(np.percentile(result.heldout_to_train, 1))
    # The rule as documented: e = ((m-1) q + 1) / (m+1); allowed = 2 e + 3 sqrt(e (1-e) / n).
    e = (99 * 0.01 + 1) / 101
    assert honest.expected_share == pytest.approx(e)
    assert honest.allowed_share == pytest.approx(2 * e + 3 * np.sqrt(e * (1 - e) / 200))


def test_gate_catches_partial_copying_and_needs_enough_heldout_images():
    train, heldout = _images(200, 20), _images(100, 21)
    partly = np.concatenate([train[:30], _images(270, 22)])  # 10 % copies
    decision, _ = memorisation_gate(partly, train, heldout)
    assert not decision.passed and decision.flagged >= 30
    with pytest.raises(ReleaseRefused, match="at least 20"):
        memorisation_gate(partly, train, heldout[:10])
    loose, _ = memorisation_gate(partly, train, heldout, MemorisationGate(max_ratio=20.0))
    assert loose.passed


# A real release ------------------------------------------------------------------------------


def test_release_layout_manifest_and_signature(base):
    rel, result = base["release"], base["result"]
    manifest = json.loads((rel / "manifest.json").read_text())
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(paths)
    for required in (
        "generator.pt",
        "privacy_report.json",
        "audit/memorisation.json",
        "audit/membership.json",
        "steward.pub",
        "synthetic/labels.csv",
        "synthetic/classes.txt",
        "synthetic/images/syn-000039.png",
    ):
        assert required in paths
    assert "manifest.json" not in paths and "manifest.sig" not in paths
    assert not any("closest_pairs" in p for p in paths), "real training images must not ship"
    assert (base["root"] / "steward-audit" / "closest_pairs.png").is_file()
    on_disk = sorted(p.relative_to(rel).as_posix() for p in rel.rglob("*") if p.is_file())
    assert on_disk == sorted([*paths, "manifest.json", "manifest.sig"])
    assert len(paths) == result.files == 40 + 3 + 5  # images, csv, classes, generation.json

    assert (rel / "generator.pt").read_bytes() == (base["run"] / "generator.pt").read_bytes()
    assert manifest["run"]["name"] == "run"
    assert manifest["configuration"]["max_epsilon"] == 8.0
    assert manifest["configuration"]["per_class"] == 20 and manifest["configuration"]["seed"] == 3
    site = {"epsilon": base["eps"], "delta": 1e-5, "epsilon_recomputed": base["eps"]}
    assert manifest["privacy"]["sites"] == {"site_1": site}
    assert (
        manifest["signing_key"] == fingerprint(load_private_key(base["key"])) == result.fingerprint
    )
    assert load_public_key(rel / "steward.pub") == load_public_key(base["pub"])
    # No path of this machine anywhere in the release's text files.
    for path in rel.rglob("*"):
        if path.suffix in (".json", ".csv", ".txt", ".pub"):
            assert str(base["root"]) not in path.read_text(), path

    report = json.loads((rel / "privacy_report.json").read_text())
    assert report["privacy"] == json.loads((base["run"] / "privacy.json").read_text())
    assert report["release_decision"]["released"] is True
    mem = json.loads((rel / "audit/memorisation.json").read_text())
    assert mem["gate"]["passed"] is True and mem["gate"]["n_synthetic"] == 40
    assert mem["coverage"] == {"site_1": True}
    membership = json.loads((rel / "audit/membership.json").read_text())
    assert membership["n_members"] == 60 and membership["n_nonmembers"] == 40
    with open(rel / "synthetic/labels.csv", newline="") as fh:
        labels = [row["label"] for row in csv.DictReader(fh)]
    assert labels.count("normal") == labels.count("abnormal") == 20


def test_verify_accepts_the_fresh_release(base):
    with_key = verify_release(base["release"], base["pub"])
    assert with_key.ok, with_key.problems
    assert with_key.files == base["result"].files and with_key.key_source == "given"
    shipped = verify_release(base["release"])
    assert shipped.ok and shipped.key_source == "release"
    assert "proves the files are intact, not who made them" in shipped.notes[0]


@pytest.fixture
def copy(base, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(base["release"], target)
    return target


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("tamper", "ALTERED: synthetic/labels.csv"),
        ("remove", "MISSING: synthetic/images/syn-000007.png"),
        ("add", "ADDED: audit/extra.txt"),
    ],
)
def test_verify_names_each_changed_file(base, copy, change, expected):
    if change == "tamper":
        with open(copy / "synthetic/labels.csv", "a") as fh:
            fh.write("images/syn-000000.png,abnormal,syn-000000\n")
    elif change == "remove":
        (copy / "synthetic/images/syn-000007.png").unlink()
    else:
        (copy / "audit/extra.txt").write_text("not signed")
    result = verify_release(copy, base["pub"])
    assert not result.ok
    assert [p for p in result.problems if p.startswith(expected)], result.problems
    assert len(result.problems) == 1, result.problems


def test_verify_fails_with_a_wrong_key_and_with_an_edited_manifest(base, copy, tmp_path):
    _, other_pub = make_signing_key(tmp_path / "other.key")
    wrong = verify_release(copy, other_pub)
    assert not wrong.ok
    assert wrong.problems == [
        f"manifest.sig: signature does not verify with {other_pub} "
        f"({fingerprint(load_public_key(other_pub))})"
    ]
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["privacy"]["sites"]["site_1"]["epsilon"] = 0.1
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    edited = verify_release(copy)
    assert any("signature does not verify with steward.pub" in p for p in edited.problems)


def test_a_re_signed_release_passes_only_with_its_own_key(base, copy, tmp_path):
    """Integrity vs origin: an attacker may re-sign with their key and ship their steward.pub."""
    from fedspine.privacy.signing import encode_signature, public_key_line, sha256_file

    attacker_key, _ = make_signing_key(tmp_path / "attacker.key")
    key = load_private_key(attacker_key)
    (copy / "steward.pub").write_bytes(public_key_line(key.public_key()))
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["files"]:
        entry["sha256"] = sha256_file(copy / entry["path"])
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (copy / "manifest.json").write_bytes(data)
    (copy / "manifest.sig").write_bytes(encode_signature(key.sign(data)))
    assert verify_release(copy).ok
    assert not verify_release(copy, base["pub"]).ok


def test_keygen_never_overwrites(tmp_path):
    private, public = make_signing_key(tmp_path / "k")
    assert public.name == "k.pub" and os.stat(private).st_mode & 0o777 == 0o600
    before = private.read_bytes()
    with pytest.raises(SigningError, match="already exists"):
        make_signing_key(tmp_path / "k")
    assert private.read_bytes() == before


# The command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    register(app)
    return app


def test_cli_keygen_release_and_verify(base, cli, tmp_path):
    runner = CliRunner()
    key = tmp_path / "steward.key"
    result = runner.invoke(cli, ["release", "keygen", "--out", str(key)])
    assert result.exit_code == 0, result.output
    assert key.is_file() and (tmp_path / "steward.key.pub").is_file()
    assert runner.invoke(cli, ["release", "keygen", "--out", str(key)]).exit_code == 1

    out = tmp_path / "rel"
    args = [
        str(base["run"]),
        "--out",
        str(out),
        "--max-epsilon",
        "8",
        "--per-class",
        "5",
        "--audit-data",
        str(base["audit"]),
        "--key",
        str(key),
        "--device",
        "cpu",
    ]
    result = runner.invoke(cli, ["release", *args])
    assert result.exit_code == 0, result.output
    assert "released" in result.output

    result = runner.invoke(cli, ["verify", str(out), "--public-key", str(key) + ".pub"])
    assert result.exit_code == 0, result.output
    assert (
        f"release verified: 18 files, signed by {fingerprint(load_public_key(str(key) + '.pub'))}"
        in result.output
    )

    (out / "synthetic/classes.txt").write_text("other\n")
    result = runner.invoke(cli, ["verify", str(out)])
    assert result.exit_code == 1
    assert "ALTERED: synthetic/classes.txt" in result.output


def test_cli_refusal_is_one_line_and_writes_nothing(base, cli, outdir):
    runner = CliRunner()
    args = [
        "make",
        str(base["run"]),
        "--out",
        str(outdir / "rel"),
        "--max-epsilon",
        "3",
        "--audit-data",
        str(base["audit"]),
        "--key",
        str(base["key"]),
        "--device",
        "cpu",
    ]
    result = runner.invoke(cli, ["release", *args])
    assert result.exit_code == EXIT_REFUSED
    refusals = [line for line in result.output.splitlines() if line.startswith("release refused:")]
    assert refusals == [
        f"release refused: site site_1 spent epsilon {base['eps']:.4g}, over the cap "
        "--max-epsilon 3"
    ]
    _assert_nothing_written(outdir)
