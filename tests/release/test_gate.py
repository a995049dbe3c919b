"""The gated, signed release: one refusal per reason (nothing written), a real release, verify.

Runs are written as a DP run writes them: generator.pt first, then privacy.json (through
``write_privacy_summary``, which binds the generator's SHA-256), with the run's spend recorded
in a privacy home's ledger on the audit set's training patients.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedspine.cli.release import EXIT_REFUSED
from fedspine.data.prepared import load_prepared, write_prepared
from fedspine.models import Generator, NetworkConfig
from fedspine.privacy.accounting import Mechanism, epsilon
from fedspine.privacy.home import PrivacyHome
from fedspine.privacy.report import site_entry, write_privacy_summary
from fedspine.privacy.signing import (
    SigningError,
    fingerprint,
    load_private_key,
    load_public_key,
    make_signing_key,
    sha256_file,
    verify_release,
)
from fedspine.release import gate as release_module
from fedspine.release.gate import (
    MemorisationGate,
    ReleaseError,
    ReleaseRefused,
    check_generator_binding,
    check_generator_checkpoint,
    make_release,
    memorisation_gate,
)
from fedspine.training.checkpoint import save_checkpoint
from fedspine.training.generate import save_generator

NET = NetworkConfig(resolution=16, c_dim=2, z_dim=32, w_dim=32, channel_base=256, channel_max=32)
CLASSES = ["normal", "abnormal"]
SPLIT_SIZES = {"train": 60, "val": 20, "test": 20}
RUN_ID = "run-0123456789ab"
MECHANISM = Mechanism(noise_multiplier=1.1, sample_rate=0.05, steps=400, label="gan-discriminator")
TRAINING = {"kimg": 1.0, "dp_scheme": "dpsgd", "clinical": {"classifier_sha256": "ab" * 32}}
COMPONENTS = {
    "discriminator": "DP-SGD (patient-level)",
    "clinical_classifier": "none",
    "label_prior": "public: uniform",
    "ada_p": "fixed 0.0",
    "pretraining": "none",
}
ROW_KEYS = ("label", "noise_multiplier", "sample_rate", "steps", "clip_norm")
ROW_KEYS += ("state", "run_id", "round", "unit")


def _images(n: int, seed: int, size: int = 16) -> np.ndarray:
    """Random grey uint8 images: 4x4 blocks of noise upsampled, plus a little pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(128, 40, (n, 4, 4))
    smooth = np.kron(coarse, np.ones((size // 4, size // 4)))
    return np.clip(smooth + rng.normal(0, 8, (n, size, size)), 0, 255).astype(np.uint8)


def _write_audit(root: Path, seed: int = 0, patients: str = "p") -> Path:
    n = sum(SPLIT_SIZES.values())
    labels = np.arange(n) % 2
    findings = np.eye(2, dtype=np.uint8)[labels]
    return write_prepared(
        root,
        images=_images(n, seed),
        files=[f"img{i:04d}.png" for i in range(n)],
        patient_ids=[f"{patients}{i:04d}" for i in range(n)],
        splits=[s for s, k in SPLIT_SIZES.items() for _ in range(k)],
        labels=labels,
        findings=findings,
        finding_names=CLASSES,
        class_names=CLASSES,
        rejected=[],
        manifest={"source": "random test images"},
    )


def _spend(home: Path, audit: Path, mechanism: Mechanism = MECHANISM) -> list[dict]:
    """Record ``mechanism`` of run RUN_ID on the audit set's train patients in ``home``'s
    ledger, as a DP run does; returns privacy.json's mechanism rows of the run."""
    privacy_home = PrivacyHome(home)
    keys = privacy_home.keys_of(load_prepared(audit).select("train").patient_ids)
    ledger = privacy_home.ledger()
    record = ledger.reserve(keys, mechanism, RUN_ID, 1.0, unit="patient")
    ledger.settle(record, mechanism.steps)
    return [{k: r[k] for k in ROW_KEYS} for r in ledger.records(run_id=RUN_ID)]


def _save_generator(run: Path, seed: int = 0, training: dict | None = None) -> Path:
    torch.manual_seed(seed)
    G = Generator(NET).eval()
    training = TRAINING if training is None else training
    return save_generator(run / "generator.pt", G, dataclasses.asdict(NET), CLASSES, training)


def _make_run(
    root: Path,
    rows: list[dict] | None,
    eps: float = 0.0,
    *,
    seed: int = 0,
    training: dict | None = None,
    generator_after: bool = False,
    more_sites: dict | None = None,
    not_private_reasons: tuple[str, ...] = (),
    run_id: str = RUN_ID,
) -> Path:
    """A run folder: generator.pt, then privacy.json (``rows`` None: no privacy.json)."""
    root.mkdir(parents=True, exist_ok=True)
    if not generator_after:
        _save_generator(root, seed, training)
    if rows is not None:
        sites = {"site_1": site_entry(eps, 1e-5, rows, unit="patient", patients=60)}
        sites.update(more_sites or {})
        write_privacy_summary(
            root,
            sites,
            COMPONENTS,
            accountant="prv",
            not_private_reasons=not_private_reasons,
            run_id=run_id,
        )
    if generator_after:
        _save_generator(root, seed, training)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Audit data, a privacy home, a run, a key pair and one finished release, shared
    (read-only) by tests."""
    root = tmp_path_factory.mktemp("base")
    audit = _write_audit(root / "audit" / "site_1")
    home = root / "privacy-home"
    rows = _spend(home, audit)
    eps = epsilon([MECHANISM], 1e-5, "prv")
    run = _make_run(root / "run", rows, eps)
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
        privacy_homes=[home],
    )
    return {
        "root": root,
        "audit": audit,
        "hash": load_prepared(audit).content_hash,
        "home": home,
        "rows": rows,
        "eps": eps,
        "run": run,
        "key": key,
        "pub": pub,
        "release": release,
        "steward": root / "steward-audit",
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
        "steward_audit_dir": out.parent.parent / "steward",
        "privacy_homes": [base["home"]],
    }
    args.update(kwargs)
    return make_release(run, out, **args)


def _assert_nothing_written(outdir: Path) -> None:
    assert list(outdir.iterdir()) == [], "a refused release left files behind"


# Refusals: one per reason, nothing written ----------------------------------------------------


def test_refused_when_a_site_is_over_the_epsilon_cap(base, tmp_path, outdir):
    run = _make_run(tmp_path / "run", base["rows"], base["eps"])
    expected = f"site site_1 spent epsilon {base['eps']:.4g}, over the cap --max-epsilon 2$"
    with pytest.raises(ReleaseRefused, match=expected):
        _release(base, run, outdir / "rel", max_epsilon=2.0)
    _assert_nothing_written(outdir)


def test_refused_when_the_stated_epsilon_understates_the_mechanisms(base, tmp_path, outdir):
    run = _make_run(tmp_path / "run", base["rows"], 3.2)
    expected = rf"site site_1 states epsilon 3\.2, but its mechanisms compose to {base['eps']:.4g}"
    with pytest.raises(ReleaseRefused, match=expected):
        _release(base, run, outdir / "rel")
    _assert_nothing_written(outdir)


def test_refused_when_a_site_states_a_delta_above_the_sites(base, tmp_path, outdir):
    run = _make_run(tmp_path / "run", base["rows"], base["eps"])
    summary = json.loads((run / "privacy.json").read_text())
    summary["sites"]["site_1"]["delta"] = 0.5
    (run / "privacy.json").write_text(json.dumps(summary))
    with pytest.raises(ReleaseRefused, match=r"site site_1 states delta 0\.5, above"):
        _release(base, run, outdir / "rel")
    _assert_nothing_written(outdir)


def test_refused_without_privacy_json(base, tmp_path, outdir):
    run = _make_run(tmp_path / "run", None)
    with pytest.raises(ReleaseRefused, match="no complete privacy ledger: no privacy.json"):
        _release(base, run, outdir / "rel")
    _assert_nothing_written(outdir)


def test_refused_when_a_site_ledger_is_incomplete(base, tmp_path, outdir):
    site_2 = site_entry(1.0, 1e-5, [], unit="patient", patients=10, ledger_complete=False)
    run = _make_run(tmp_path / "run", base["rows"], base["eps"], more_sites={"site_2": site_2})
    with pytest.raises(ReleaseRefused, match="incomplete ledger for site.s. site_2$"):
        _release(base, run, outdir / "rel")
    _assert_nothing_written(outdir)


def test_refused_when_part_of_the_run_was_not_private(base, tmp_path, outdir):
    reasons = ("ADA p adapted from D(real)", "clinical classifier trained on private data")
    run = _make_run(tmp_path / "run", base["rows"], base["eps"], not_private_reasons=reasons)
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
    steward = json.loads((tmp_path / "steward" / "memorisation.json").read_text())
    assert steward["gate"]["passed"] is False and steward["gate"]["flagged"] == 20
    assert os.stat(tmp_path / "steward").st_mode & 0o777 == 0o700


@pytest.mark.parametrize("where", ["top-level D", "tensor hidden in metadata", "trainer kind"])
def test_refused_when_the_checkpoint_holds_more_than_g_ema(base, tmp_path, outdir, where):
    run = _make_run(tmp_path / "run", base["rows"], base["eps"])
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


def test_refused_when_another_runs_generator_is_swapped_in(base, tmp_path, outdir):
    """G_ema of another run copied into a DP run folder after its privacy.json was written."""
    run = _make_run(tmp_path / "run", base["rows"], base["eps"])
    covered = sha256_file(run / "generator.pt")
    other = _save_generator(tmp_path / "other-run", seed=1)
    shutil.copyfile(other, run / "generator.pt")
    swapped = sha256_file(run / "generator.pt")
    assert swapped != covered
    with pytest.raises(ReleaseRefused) as info:
        _release(base, run, outdir / "rel")
    assert info.value.reason == (
        f"run/generator.pt (sha256 {swapped[:12]}) is not the generator privacy.json covers "
        f"(privacy.json records generator_sha256 {covered[:12]}); only the generator its "
        "privacy ledger was written for can be released"
    )
    assert "\n" not in info.value.reason
    _assert_nothing_written(outdir)


def test_the_untouched_run_passes_the_binding_gate(base):
    privacy = json.loads((base["run"] / "privacy.json").read_text())
    meta = check_generator_checkpoint(base["run"] / "generator.pt")
    sha = check_generator_binding(base["run"], privacy, meta)
    assert sha == privacy["generator_sha256"] == sha256_file(base["run"] / "generator.pt")
    manifest = json.loads((base["release"] / "manifest.json").read_text())
    assert manifest["run"]["generator_sha256"] == sha


def test_refused_when_privacy_json_records_no_generator(base, tmp_path, outdir):
    """privacy.json written before the generator: it binds nothing, so nothing is released."""
    run = _make_run(tmp_path / "run", base["rows"], base["eps"], generator_after=True)
    assert json.loads((run / "privacy.json").read_text())["generator_sha256"] is None
    actual = sha256_file(run / "generator.pt")
    with pytest.raises(ReleaseRefused) as info:
        _release(base, run, outdir / "rel")
    assert info.value.reason.startswith(
        f"run/generator.pt (sha256 {actual[:12]}) is not the generator privacy.json covers "
        "(privacy.json records no generator_sha256)"
    )
    _assert_nothing_written(outdir)


def test_refused_when_the_generator_says_it_was_not_dpsgd(base, tmp_path, outdir):
    training = {**TRAINING, "dp_scheme": "clip-only"}
    run = _make_run(tmp_path / "run", base["rows"], base["eps"], training=training)
    with pytest.raises(ReleaseRefused, match="trained with dp_scheme 'clip-only', not 'dpsgd'"):
        _release(base, run, outdir / "rel")
    _assert_nothing_written(outdir)


@pytest.mark.parametrize("case", ["other run", "other patients", "no ledger"])
def test_refused_when_the_audit_data_is_not_the_training_data(base, tmp_path, outdir, case):
    rows, audit, home = base["rows"], base["audit"], base["home"]
    match = "no --audit-data set is the training data of any site"
    if case == "other run":
        rows = [{**r, "run_id": "another-run"} for r in rows]
    elif case == "other patients":
        audit = _write_audit(tmp_path / "audit" / "site_1", seed=5, patients="q")
    else:
        home = tmp_path / "no-such-home"
        match = rf"no privacy ledger in {home}.*--privacy-home"
    run_id = "another-run" if case == "other run" else RUN_ID
    run = _make_run(tmp_path / "run", rows, base["eps"], run_id=run_id)
    with pytest.raises(ReleaseRefused, match=match):
        _release(base, run, outdir / "rel", audit_data=[audit], privacy_homes=[home])
    _assert_nothing_written(outdir)
    assert not (tmp_path / "no-such-home").exists(), "a release must not create a privacy home"


def test_no_steward_audit_folder_is_an_error_before_anything_runs(base, outdir):
    with pytest.raises(ReleaseError, match=r"--audit-dir.*never into the release") as info:
        _release(base, base["run"], outdir / "rel", steward_audit_dir=None)
    assert not isinstance(info.value, ReleaseRefused)
    with pytest.raises(ReleaseError, match="lies inside the release"):
        _release(base, base["run"], outdir / "rel", steward_audit_dir=outdir / "rel" / "audit")
    _assert_nothing_written(outdir)


def test_refused_when_the_generator_carries_a_dataset_fingerprint(base, tmp_path, outdir):
    """A generator whose metadata names the training set's content hash never ships."""
    training = {**TRAINING, "dataset_content_hash": base["hash"]}
    run = _make_run(tmp_path / "run", base["rows"], base["eps"], training=training)
    with pytest.raises(ReleaseRefused, match="generator.pt holds the content hash of audit set"):
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


def test_a_site_without_audit_data_is_a_warning(base, tmp_path):
    """Two sites, only site_1's ledger given: released, site_2 named as not covered."""
    other = Mechanism(noise_multiplier=1.1, sample_rate=0.1, steps=100, label="gan-discriminator")
    row = {**base["rows"][0], "sample_rate": 0.1, "steps": 100}
    site_2 = site_entry(epsilon([other], 1e-5, "prv"), 1e-5, [row], unit="patient", patients=30)
    run = _make_run(tmp_path / "run", base["rows"], base["eps"], more_sites={"site_2": site_2})
    result = _release(base, run, tmp_path / "out" / "rel")
    assert result.warnings == [
        "site site_2: no --audit-data set holds its training patients under the given "
        "--privacy-home(s); the memorisation and membership audits do not cover it"
    ]
    report = json.loads((result.out / "privacy_report.json").read_text())
    assert report["release_decision"]["audit_coverage"] == {"site_1": True, "site_2": False}
    steward = json.loads((tmp_path / "steward" / "memorisation.json").read_text())
    (detail,) = steward["coverage_detail"]
    assert detail["sites"] == ["site_1"] and detail["train_patients_in_the_run"] == 60


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

_BASE64 = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")
AUDIT_WORDS = ("nearest", "auc", "tpr")
AUDIT_KEYS = {"threshold", "flagged", "n_train", "n_heldout", "share_flagged", "n_members"}
AUDIT_KEYS |= {"n_nonmembers", "content_hash", "dataset_hash", "patients", "coverage_detail"}


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_release_layout_manifest_and_signature(base):
    rel, result = base["release"], base["result"]
    manifest = json.loads((rel / "manifest.json").read_text())
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(paths)
    for required in (
        "generator.pt",
        "privacy_report.json",
        "steward.pub",
        "synthetic/labels.csv",
        "synthetic/classes.txt",
        "synthetic/generation.json",
        "synthetic/images/syn-000039.png",
    ):
        assert required in paths
    assert "manifest.json" not in paths and "manifest.sig" not in paths
    on_disk = sorted(p.relative_to(rel).as_posix() for p in rel.rglob("*") if p.is_file())
    assert on_disk == sorted([*paths, "manifest.json", "manifest.sig"])
    # images, csv, classes, generation.json; generator, privacy report, public key
    assert len(paths) == result.files == 40 + 3 + 3

    assert (rel / "generator.pt").read_bytes() == (base["run"] / "generator.pt").read_bytes()
    assert manifest["format"] == "fedspine-release/2"
    assert manifest["run"]["name"] == "run"
    assert manifest["configuration"]["max_epsilon"] == 8.0
    assert manifest["configuration"]["per_class"] == 20 and manifest["configuration"]["seed"] == 3
    site = {"epsilon": base["eps"], "delta": 1e-5, "epsilon_recomputed": base["eps"]}
    assert manifest["privacy"]["sites"] == {"site_1": site}
    assert manifest["privacy"]["covers"] == ["generator.pt", "synthetic/"]
    assert "dataset sizes are treated as public" in manifest["privacy"]["dataset_sizes"]
    assert "stay with the data steward" in manifest["audits"]["statement"]
    assert (
        manifest["signing_key"] == fingerprint(load_private_key(base["key"])) == result.fingerprint
    )
    assert load_public_key(rel / "steward.pub") == load_public_key(base["pub"])
    # No path of this machine anywhere in the release's text files.
    for path in rel.rglob("*"):
        if path.suffix in (".json", ".csv", ".txt", ".pub"):
            assert str(base["root"]) not in path.read_text(), path

    report = json.loads((rel / "privacy_report.json").read_text())
    site_1 = report["privacy"]["sites"]["site_1"]
    assert site_1["epsilon"] == pytest.approx(base["eps"]) and site_1["delta"] == 1e-5
    assert site_1["unit"] == "patient" and site_1["accountant"] == "prv"
    assert site_1["mechanisms"] == [
        {
            "label": "gan-discriminator",
            "noise_multiplier": 1.1,
            "sample_rate": 0.05,
            "steps": 400,
            "clip_norm": 1.0,
        }
    ]
    decision = report["release_decision"]
    assert decision["released"] is True and decision["audit_coverage"] == {"site_1": True}
    assert all(g["passed"] for g in decision["gates"]) and len(decision["gates"]) == 8
    assert decision["checks"] == [g["name"] for g in decision["gates"]]
    with open(rel / "synthetic/labels.csv", newline="") as fh:
        labels = [row["label"] for row in csv.DictReader(fh)]
    assert labels.count("normal") == labels.count("abnormal") == 20


def test_release_holds_no_audit_statistic_and_no_dataset_fingerprint(base):
    rel = base["release"]
    fingerprints = [base["hash"], load_prepared(base["audit"]).manifest["content_hash"]]
    assert all(len(h) == 64 for h in fingerprints)
    for path in (p for p in rel.rglob("*") if p.is_file()):
        data = path.read_bytes().lower()
        for digest in fingerprints:
            assert digest.lower().encode() not in data, path
            assert digest[:16].lower().encode() not in data, path
        if path.suffix in (".json", ".csv", ".txt", ".pub", ".sig"):
            text = data.decode()
            if path.suffix in (".pub", ".sig"):
                # Key and signature bytes are base64, where "auc" appears by chance: search
                # only the words around them (the key's type and comment).
                text = " ".join(t for t in text.split() if not _BASE64.fullmatch(t))
            for word in AUDIT_WORDS:
                assert word not in text, (path, word)
        if path.suffix == ".json":
            leaked = _keys(json.loads(path.read_text())) & AUDIT_KEYS
            assert not leaked, (path, leaked)
    assert not (rel / "audit").exists()
    assert not any("closest_pairs" in p.name for p in rel.rglob("*"))
    # generation.json keeps the generator's own hash, drops every other one of its metadata.
    info = json.loads((rel / "synthetic/generation.json").read_text())
    assert info["generator_sha256"] == sha256_file(rel / "generator.pt")
    assert info["run"] == "run" and info["generator"] == "generator.pt"
    assert info["training"] == {"kimg": 1.0, "dp_scheme": "dpsgd", "clinical": {}}
    hash_keys = [k for k in _keys(info) if "hash" in k.lower() or "sha" in k.lower()]
    assert hash_keys == ["generator_sha256"]


def test_the_audits_stay_in_the_stewards_folder(base):
    steward, result = base["steward"], base["result"]
    assert result.steward_audit == steward
    assert sorted(p.name for p in steward.iterdir()) == [
        "closest_pairs.png",
        "membership.json",
        "memorisation.json",
    ]
    assert os.stat(steward).st_mode & 0o777 == 0o700
    mem = json.loads((steward / "memorisation.json").read_text())
    assert mem["gate"]["passed"] is True and mem["gate"]["n_synthetic"] == 40
    assert mem["gate"] == result.memorisation.summary()
    assert mem["coverage"] == {"site_1": True} and mem["release"] == "release"
    assert mem["audit_data"] == [
        {"name": "site_1", "content_hash": base["hash"], "n_train": 60, "n_heldout": 40}
    ]
    membership = json.loads((steward / "membership.json").read_text())
    assert membership["n_members"] == 60 and membership["n_nonmembers"] == 40
    assert membership["nearest"] == result.membership["nearest"]


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
        ("add", "ADDED: synthetic/extra.txt"),
    ],
)
def test_verify_names_each_changed_file(base, copy, change, expected):
    if change == "tamper":
        with open(copy / "synthetic/labels.csv", "a") as fh:
            fh.write("images/syn-000000.png,abnormal,syn-000000\n")
    elif change == "remove":
        (copy / "synthetic/images/syn-000007.png").unlink()
    else:
        (copy / "synthetic/extra.txt").write_text("not signed")
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


def test_cli_keygen_release_and_verify(base, cli, tmp_path, monkeypatch):
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
    assert result.exit_code == 1 and "--audit-dir" in result.output
    assert not out.exists()

    # No --privacy-home: the one FEDSPINE_PRIVACY_HOME names.
    monkeypatch.setenv("FEDSPINE_PRIVACY_HOME", str(base["home"]))
    steward = tmp_path / "steward"
    result = runner.invoke(cli, ["release", *args, "--audit-dir", str(steward)])
    assert result.exit_code == 0, result.output
    assert "released" in result.output and f"in {steward} (private" in result.output
    assert (steward / "memorisation.json").is_file()

    result = runner.invoke(cli, ["verify", str(out), "--public-key", str(key) + ".pub"])
    assert result.exit_code == 0, result.output
    assert (
        f"release verified: 16 files, signed by {fingerprint(load_public_key(str(key) + '.pub'))}"
        in result.output
    )

    (out / "synthetic/classes.txt").write_text("other\n")
    result = runner.invoke(cli, ["verify", str(out)])
    assert result.exit_code == 1
    assert "ALTERED: synthetic/classes.txt" in result.output


def test_cli_privacy_homes_are_repeatable_and_a_missing_one_is_skipped(base, cli, tmp_path):
    runner = CliRunner()
    missing = tmp_path / "missing-home"
    args = [
        "make",
        str(base["run"]),
        "--out",
        str(tmp_path / "rel"),
        "--max-epsilon",
        "8",
        "--per-class",
        "5",
        "--audit-data",
        str(base["audit"]),
        "--key",
        str(base["key"]),
        "--audit-dir",
        str(tmp_path / "steward"),
        "--privacy-home",
        str(missing),
        "--privacy-home",
        str(base["home"]),
        "--device",
        "cpu",
    ]
    result = runner.invoke(cli, ["release", *args])
    assert result.exit_code == 0, result.output
    assert not missing.exists()


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
        "--steward-audit",
        str(outdir.parent / "steward"),
        "--privacy-home",
        str(base["home"]),
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
