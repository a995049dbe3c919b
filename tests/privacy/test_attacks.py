"""The privacy engine attacked the way a privacy officer would: crashes, re-ingests, a greedy δ,
data without patient identifiers, a classifier whose spend is not on record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedspine.cli.main import app
from fedspine.data.prepared import load_prepared, write_prepared
from fedspine.privacy.accounting import Mechanism, epsilon
from fedspine.privacy.engine import PrivacyEngine, PrivacyError
from fedspine.privacy.ledger import mechanisms_of
from fedspine.training.clinical import ClinicalPrivacyError, classifier_patients_on_record
from tests.conftest import home_records, spend
from tests.federated.conftest import make_site_dataset

TRAIN = ["train", "--preset", "cpu", "--resolution", "16", "--batch", "16", "--device", "cpu"]
DP = ["--dp", "--noise-multiplier", "1.5", "--patients-per-step", "4"]


def _prepared(root: Path, resolution: int, moved: int = 0, files_as_ids: bool = False) -> Path:
    """The same 20 patients as another 'ingest': other resolution, ``moved`` val patients moved
    into train; with ``files_as_ids`` no patient identifiers at all (each image its own id)."""
    n = 40
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = rng.integers(0, 255, size=(n, resolution, resolution), dtype=np.uint8)
    files = [f"img{i}.png" for i in range(n)]
    patients = files if files_as_ids else [f"p{i // 2}" for i in range(n)]
    val_from = 32 + 2 * moved
    splits = ["train" if i < val_from else "val" for i in range(n)]
    return write_prepared(
        root,
        images=images,
        files=files,
        patient_ids=patients,
        splits=splits,
        labels=labels,
        findings=np.eye(2, dtype=np.uint8)[labels],
        finding_names=["normal", "abnormal"],
        class_names=["normal", "abnormal"],
        rejected=[],
        manifest={"source": "test"},
    )


def test_a_re_ingest_of_the_same_patients_hits_the_same_spend(tmp_path, privacy_home):
    first = load_prepared(_prepared(tmp_path / "a", 16)).select("train")
    spend(privacy_home, first.patient_ids, Mechanism(1.0, 0.2, 200, label="gan-discriminator"))
    spent = PrivacyEngine(first.patient_ids, unit="patient").spent()
    assert spent > 0
    # Another resolution, and a patient moved from val into train: the same people.
    again = load_prepared(_prepared(tmp_path / "b", 8, moved=1)).select("train")
    assert len(np.unique(again.patient_ids)) == len(np.unique(first.patient_ids)) + 1
    assert PrivacyEngine(again.patient_ids, unit="patient").spent() == pytest.approx(spent)
    result = CliRunner().invoke(
        app,
        [*TRAIN[:1], str(tmp_path / "b"), *TRAIN[1:], "--out", str(tmp_path / "run"),
         "--kimg", "0.032", *DP, "--max-epsilon", f"{spent * 1.01:g}"],
    )  # fmt: skip
    assert result.exit_code != 0 and "over the cap" in result.output, result.output
    assert not (tmp_path / "run" / "generator.pt").exists()


def test_a_delta_larger_than_the_sites_is_refused_everywhere(tmp_path, privacy_home):
    data = make_site_dataset(tmp_path / "prep", n=48, seed=0)
    result = CliRunner().invoke(
        app, [TRAIN[0], str(data), *TRAIN[1:], "--out", str(tmp_path / "r"), *DP,
              "--delta", "0.5"],
    )  # fmt: skip
    assert result.exit_code != 0 and "δ must be in (0, 1e-05]" in result.output
    assert home_records(privacy_home) == [] and not (tmp_path / "r" / "generator.pt").exists()
    with pytest.raises(PrivacyError, match="the server's δ 0.01"):
        PrivacyEngine(["a", "b"], unit="patient", delta=0.01, delta_source="the server's δ")
    assert PrivacyEngine(["a", "b"], unit="patient", delta=1e-9).delta == 1e-9


def test_data_without_patient_ids_needs_privacy_unit_image(tmp_path, privacy_home):
    data = _prepared(tmp_path / "noids", 16, files_as_ids=True)
    assert load_prepared(data).privacy_unit == "image"
    args = [TRAIN[0], str(data), *TRAIN[1:], "--kimg", "0.016", *DP]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r1")])
    assert refused.exit_code != 0 and "--privacy-unit image" in refused.output
    assert home_records(privacy_home) == []
    accepted = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "r2"), "--privacy-unit", "image"]
    )
    assert accepted.exit_code == 0, accepted.output
    summary = json.loads((tmp_path / "r2" / "privacy.json").read_text())
    assert summary["unit"] == "image" and home_records(privacy_home)[0]["unit"] == "image"
    assert "not linked" in summary["components"]["privacy unit"]


def test_a_classifier_is_accepted_only_with_its_spend_on_record(tmp_path, privacy_home):
    from fedspine.privacy.home import PrivacyHome

    ledger = PrivacyHome(privacy_home).ledger()
    meta = {"dp": {"epsilon": 1.0, "delta": 1e-5, "run_id": "classifier-abc"}}
    with pytest.raises(ClinicalPrivacyError, match="holds no mechanism of its run"):
        classifier_patients_on_record(ledger, meta, where="the classifier")
    with pytest.raises(ClinicalPrivacyError, match="no run id"):
        classifier_patients_on_record(ledger, {"dp": {"epsilon": 1.0}}, where="c")
    spend(privacy_home, ["p1", "p2"], Mechanism(1.0, 0.5, 10), run_id="classifier-abc")
    keys = classifier_patients_on_record(ledger, meta, where="the classifier")
    assert keys == PrivacyHome(privacy_home).keys_of(["p1", "p2"])


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from fedspine.training import config as config_module
    from fedspine.training import dp as dp_module
    from tests.training import tiny_config

    config_module.PRESETS["cpu"] = lambda res, nc: tiny_config(resolution=res or 16,
                                                               num_classes=nc)
    original = dp_module.DPDiscriminatorStep.step
    kill_at = int(os.environ["KILL_AT_STEP"])

    def step(self, *args, **kwargs):
        if self.steps_taken == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    dp_module.DPDiscriminatorStep.step = step
    from fedspine.cli.main import app
    sys.argv = ["fedspine", *sys.argv[1:]]
    app()
    """
)


@pytest.mark.slow
def test_sigkill_after_a_snapshot_then_resume_never_under_counts(tmp_path, privacy_home):
    """A process killed by SIGKILL runs no cleanup: only the write-ahead reservation records
    the steps that ran after the last snapshot."""
    from fedspine.training.checkpoint import load_checkpoint

    data = make_site_dataset(tmp_path / "prep", n=48, seed=0)
    run = tmp_path / "run"
    base = [TRAIN[0], str(data), *TRAIN[1:], "--out", str(run), "--kimg", "0.064",
            "--snapshot-kimg", "0.032", *DP]  # fmt: skip
    env = {**os.environ, "KILL_AT_STEP": "3", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, *base],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run / "latest.json").is_file()  # a snapshot at 2 steps, killed before step 4
    (reserved,) = home_records(privacy_home)
    assert reserved["state"] == "reserved" and reserved["steps"] >= 3

    # Resuming at the run's target would pass it (the crash over-counts): refused.
    resume = [TRAIN[0], str(data), "--out", str(run), "--device", "cpu", "--resume", "--dp"]
    refused = CliRunner().invoke(app, [*resume, "--epsilon", "0.5", "--patients-per-step", "4"])
    assert refused.exit_code != 0 and "past the target" in refused.output, refused.output
    resumed = CliRunner().invoke(app, [*resume, *DP[1:]])
    assert resumed.exit_code == 0, resumed.output
    latest = json.loads((run / "latest.json").read_text())
    state = load_checkpoint(run / latest["snapshot"], kind="trainer")["trainer"]
    behind_g_ema = int(state["dp"]["step"]["steps_taken"])
    records = home_records(privacy_home)
    assert behind_g_ema == 4
    assert sum(r["steps"] for r in records) >= behind_g_ema + 1  # the lost step counts too
    summary = json.loads((run / "privacy.json").read_text())
    (site,) = summary["sites"].values()
    assert site["epsilon"] == pytest.approx(
        epsilon(mechanisms_of(records), site["delta"]), rel=1e-6
    )
    assert site["epsilon"] > epsilon([Mechanism(1.5, 4 / 20, behind_g_ema)], site["delta"])


def test_an_upgrade_keeps_a_version_1_ledgers_spend(tmp_path, privacy_home):
    """A v1 ledger in the prepared folder is not silently forgotten: DP is refused until it is
    imported, and then its spend counts for every patient of that folder."""
    data = _prepared(tmp_path / "old", 16)
    mech = {"kind": "dp-sgd-poisson", "label": "gan-discriminator", "noise_multiplier": 0.8,
            "sample_rate": 0.2, "steps": 300, "clip_norm": 1.0, "unit": "patient",
            "run_id": "old-run", "round": None, "started": None,
            "finished": "2026-11-01T00:00:00+00:00", "notes": {}}  # fmt: skip
    v1 = {
        "format": "fedspine.privacy-ledger",
        "version": 1,
        "datasets": {"abc": {"records": [mech]}},
    }
    (data / "privacy_ledger.json").write_text(json.dumps(v1))
    args = [TRAIN[0], str(data), *TRAIN[1:], "--kimg", "0.016", *DP]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r1")])
    assert refused.exit_code != 0 and "fedspine privacy import-ledger" in refused.output
    assert home_records(privacy_home) == []

    imported = CliRunner().invoke(app, ["privacy", "import-ledger", str(data)])
    assert imported.exit_code == 0, imported.output
    assert not (data / "privacy_ledger.json").exists()
    assert (data / "privacy_ledger.json.imported").exists()
    (record,) = home_records(privacy_home)
    assert record["run_id"] == "old-run" and record["steps"] == 300
    spent = epsilon([Mechanism(0.8, 0.2, 300)], 1e-5)
    patients = load_prepared(data).select("train").patient_ids
    assert PrivacyEngine(patients, unit="patient").spent() == pytest.approx(spent)
    capped = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "r2"), "--max-epsilon", f"{spent:.3f}"]
    )
    assert capped.exit_code != 0 and "over the cap" in capped.output


def test_merging_the_same_patients_in_twice_keeps_one_unit_and_one_spend(tmp_path, privacy_home):
    """merge_prepared prefixes patient ids with each part's name; DP must still see one person
    (one sampling unit, one ledger key), or merging two ingests of one source would double a
    patient's weight in every step and give them a fresh budget."""
    from fedspine.data.prepared import merge_prepared
    from fedspine.training.dp import PatientPoissonSampler

    first = load_prepared(_prepared(tmp_path / "a", 16))
    again = load_prepared(_prepared(tmp_path / "b", 16, moved=1))
    merged = load_prepared(merge_prepared([first, again], tmp_path / "m", ["a", "b"]))
    nested = load_prepared(merge_prepared([merged, first], tmp_path / "n", ["m", "c"]))
    train = first.select("train")
    spend(privacy_home, train.privacy_ids, Mechanism(1.0, 0.2, 200, label="gan-discriminator"))
    spent = PrivacyEngine(train.privacy_ids, unit="patient").spent()
    for data in (merged, nested):
        rows = data.select("train")
        assert set(rows.privacy_ids) == set(again.select("train").privacy_ids)
        assert PrivacyEngine(rows.privacy_ids, unit="patient").spent() == pytest.approx(spent)
        sampler = PatientPoissonSampler(rows.privacy_ids, 0.5, np.random.default_rng(0))
        assert sampler.num_patients == len(set(again.select("train").privacy_ids))
    result = CliRunner().invoke(
        app,
        [TRAIN[0], str(tmp_path / "m"), *TRAIN[1:], "--out", str(tmp_path / "run"),
         "--kimg", "0.032", *DP, "--max-epsilon", f"{spent * 1.01:g}"],
    )  # fmt: skip
    assert result.exit_code != 0 and "over the cap" in result.output, result.output
