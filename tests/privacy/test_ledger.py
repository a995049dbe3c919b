"""The site's privacy ledger: restarts, concurrent appends, caps, corruption."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from pathlib import Path

import pytest

from fedspine.privacy.accounting import Mechanism, epsilon
from fedspine.privacy.ledger import LedgerError, PrivacyLedger

DELTA = 1e-5
HASH = "3f2a9c41d07be5a8c6e1f0b2d4a79e13c5b8f06d2e4a1c7b9f3d5e8a0c2b4d6f"
OTHER = "a" * 64
D_STEP = Mechanism(1.0, 0.02, 100, label="gan-discriminator")


def test_open_creates_an_empty_ledger_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "site" / "privacy-ledger.json"
    with pytest.raises(LedgerError, match=re.escape(str(path))):
        PrivacyLedger.open(path, create=False)
    ledger = PrivacyLedger.open(path)
    stored = json.loads(path.read_text())
    assert stored["format"] == "fedspine.privacy-ledger"
    assert stored["datasets"] == {}
    assert ledger.spent(HASH, DELTA) == 0.0
    assert ledger.mechanisms(HASH) == []


def test_ledger_across_restarts_composes_like_one_run(tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    split = tmp_path / "split.json"
    for run in range(3):
        ledger = PrivacyLedger.open(split)  # a restart: a fresh object each time
        ledger.record(HASH, D_STEP, run_id=f"run-{run}", clip_norm=1.0, round=run)
    whole = PrivacyLedger.open(tmp_path / "whole.json")
    whole.record(HASH, Mechanism(1.0, 0.02, 300, label="gan-discriminator"), "run", 1.0)

    reopened = PrivacyLedger.open(split, create=False)
    assert len(reopened.records(HASH)) == 3  # the audit trail keeps every record
    assert [r["round"] for r in reopened.records(HASH)] == [0, 1, 2]
    rdp_split = reopened.spent(HASH, DELTA, "rdp")
    assert rdp_split == pytest.approx(whole.spent(HASH, DELTA, "rdp"), rel=1e-9, abs=1e-12)
    prv_split = reopened.spent(HASH, DELTA, "prv")
    assert prv_split == pytest.approx(whole.spent(HASH, DELTA, "prv"), rel=1e-6)
    assert prv_split < rdp_split

    accountant = RDPAccountant()
    for _ in range(300):
        accountant.step(noise_multiplier=1.0, sample_rate=0.02)
    assert rdp_split == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9, abs=1e-12)
    # And it really accumulates: three rounds spend more than two.
    assert rdp_split > epsilon([Mechanism(1.0, 0.02, 200)], DELTA, "rdp")


def test_datasets_in_one_ledger_are_kept_apart(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    ledger.record(HASH, D_STEP, "run-1", 1.0)
    ledger.record(OTHER, Mechanism(2.0, 0.05, 50, label="clinical-classifier"), "run-2", 0.5)
    assert set(ledger.datasets()) == {HASH, OTHER}
    assert ledger.spent(HASH, DELTA, "rdp") == pytest.approx(epsilon([D_STEP], DELTA, "rdp"))
    assert ledger.mechanisms(OTHER) == [Mechanism(2.0, 0.05, 50, label="clinical-classifier")]


def test_record_stores_the_audit_fields(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    ledger.record(
        HASH,
        D_STEP,
        run_id="run-7",
        clip_norm=1.5,
        round=4,
        extra={"secure_mode": False, "noise_source": "torch PRNG"},
        started="2025-01-02T03:04:05+00:00",
    )
    (stored,) = json.loads((tmp_path / "ledger.json").read_text())["datasets"][HASH]["records"]
    assert stored["kind"] == "dp-sgd-poisson"
    assert stored["label"] == "gan-discriminator"
    assert (stored["noise_multiplier"], stored["sample_rate"], stored["steps"]) == (1.0, 0.02, 100)
    assert (stored["clip_norm"], stored["unit"], stored["run_id"]) == (1.5, "patient", "run-7")
    assert stored["round"] == 4
    assert stored["started"] == "2025-01-02T03:04:05+00:00"
    assert stored["finished"].endswith("+00:00")
    assert stored["notes"] == {"secure_mode": False, "noise_source": "torch PRNG"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": float("nan")}, "clip_norm"),
        ({"run_id": ""}, "run_id"),
        ({"round": "3"}, "round"),
        ({"extra": {"x": object()}}, "extra"),
    ],
)
def test_record_refuses_bad_fields_and_leaves_the_file_alone(
    tmp_path: Path, kwargs: dict, match: str
) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    before = (tmp_path / "ledger.json").read_bytes()
    args = {"run_id": "run", "clip_norm": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        ledger.record(HASH, D_STEP, **args)
    assert (tmp_path / "ledger.json").read_bytes() == before


def _append_worker(path: str, name: str, count: int, barrier) -> None:
    ledger = PrivacyLedger.open(path)
    barrier.wait()
    for i in range(count):
        ledger.record(HASH, Mechanism(1.0, 0.02, 1), run_id=f"{name}-{i}", clip_norm=1.0)


def test_concurrent_appends_from_two_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger.open(path)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=_append_worker, args=(str(path), name, 20, barrier))
        for name in ("p0", "p1")
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    records = PrivacyLedger.open(path, create=False).records(HASH)
    assert sorted(r["run_id"] for r in records) == sorted(
        f"{p}-{i}" for p in ("p0", "p1") for i in range(20)
    )
    assert PrivacyLedger(path).mechanisms(HASH) == [Mechanism(1.0, 0.02, 1)] * 40
    assert sorted(os.listdir(tmp_path)) == ["ledger.json", "ledger.json.lock"]


def test_a_failed_save_keeps_the_old_ledger(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    ledger.record(HASH, D_STEP, "run-1", 1.0)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ledger.record(HASH, D_STEP, "run-2", 1.0)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ledger.json", "ledger.json.lock"]


def test_cap_check_allows_then_refuses_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    ledger.record(HASH, Mechanism(1.0, 0.05, 300, label="gan-discriminator"), "run-1", 1.0)
    spent = ledger.spent(HASH, DELTA, "rdp")
    cap = 8.0
    assert 2 < spent < cap

    small = Mechanism(1.0, 0.05, 50, label="gan-discriminator")
    ok = ledger.check_cap(HASH, small, DELTA, cap)
    assert ok.allowed
    assert ok.spent == pytest.approx(spent)
    assert ok.projected == pytest.approx(ledger.project(HASH, small, DELTA))
    assert spent < ok.projected <= cap
    assert "within the cap" in ok.message

    big = Mechanism(1.0, 0.05, 2000, label="gan-discriminator")
    no = ledger.check_cap(HASH, big, DELTA, cap)
    assert not no.allowed
    assert no.projected > cap
    assert no.remaining == pytest.approx(cap - spent)
    assert str(path) in no.message
    assert HASH[:12] in no.message
    assert f"spent ε={spent:.2f}" in no.message
    assert f"cap {cap:.2f}" in no.message
    assert f"ε={cap - spent:.2f} remains" in no.message
    assert f"ε={no.projected:.2f}, over the cap; refusing." in no.message
    assert "δ=1e-05" in no.message


def test_cap_already_spent_leaves_nothing(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    ledger.record(HASH, Mechanism(0.8, 0.05, 1000), "run-1", 1.0)  # ε ≈ 19
    decision = ledger.check_cap(HASH, Mechanism(5.0, 0.01, 1), DELTA, 8.0)
    assert not decision.allowed
    assert decision.remaining == 0.0
    assert "nothing remains" in decision.message
    assert "(1 step of dp-sgd-poisson at σ=5, q=0.01)" in decision.message
    assert ledger.max_steps_within_cap(HASH, 5.0, 0.01, DELTA, 8.0) == 0


def test_max_steps_within_cap_is_the_boundary(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    ledger.record(HASH, Mechanism(1.2, 0.03, 250, label="clinical-classifier"), "cls", 1.0)
    cap, sigma, q = 6.0, 1.0, 0.05
    n = ledger.max_steps_within_cap(HASH, sigma, q, DELTA, cap)
    assert n > 0
    assert ledger.project(HASH, Mechanism(sigma, q, n), DELTA) <= cap
    assert ledger.project(HASH, Mechanism(sigma, q, n + 1), DELTA) > cap
    assert ledger.check_cap(HASH, Mechanism(sigma, q, n), DELTA, cap).allowed
    assert not ledger.check_cap(HASH, Mechanism(sigma, q, n + 1), DELTA, cap).allowed
    # Without the prior classifier spending, more discriminator steps fit.
    assert ledger.max_steps_within_cap(OTHER, sigma, q, DELTA, cap) > n


def test_max_steps_within_cap_stops_at_its_limit(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    assert ledger.max_steps_within_cap(HASH, 50.0, 0.001, DELTA, 10.0, max_steps=1000) == 1000


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "[]",
        '{"format": "something-else", "version": 1, "datasets": {}}',
        '{"format": "fedspine.privacy-ledger", "version": 99, "datasets": {}}',
        '{"format": "fedspine.privacy-ledger", "version": 1}',
    ],
)
def test_a_corrupt_ledger_is_an_error_naming_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(LedgerError, match=re.escape(str(path))):
        PrivacyLedger.open(path)
    ledger = PrivacyLedger(path)
    with pytest.raises(LedgerError, match="never resets"):
        ledger.record(HASH, D_STEP, "run", 1.0)
    assert path.read_text() == content  # never reset, never overwritten


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", -5), ("steps", 1.5), ("noise_multiplier", "NaN"), ("sample_rate", 2.0),
     ("clip_norm", 0), ("run_id", None), ("kind", "laplace"), ("round", True)],
)  # fmt: skip
def test_a_malformed_record_is_an_error_naming_the_file(
    tmp_path: Path, field: str, value: object
) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger.open(path).record(HASH, D_STEP, "run", 1.0)
    text = path.read_text()
    data = json.loads(text)
    data["datasets"][HASH]["records"][0][field] = value
    text = json.dumps(data).replace('"NaN"', "NaN")
    path.write_text(text)
    where = "not valid JSON" if value == "NaN" else f"record 0 .*{field}"
    with pytest.raises(LedgerError, match=f"{re.escape(str(path))} .*{where}"):
        PrivacyLedger(path).spent(HASH, DELTA)
    assert path.read_text() == text


def test_a_ledger_deleted_after_opening_is_not_recreated(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    ledger.record(HASH, D_STEP, "run-1", 1.0)
    path.unlink()
    with pytest.raises(LedgerError, match="missing"):
        ledger.record(HASH, D_STEP, "run-2", 1.0)
    with pytest.raises(LedgerError, match="missing"):
        ledger.spent(HASH, DELTA)
    assert not path.exists()


def test_summary_reports_each_dataset_and_label(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    classifier = Mechanism(1.5, 0.02, 200, label="clinical-classifier")
    ledger.record(HASH, classifier, "cls-run", 1.0, started="2025-01-01T00:00:00+00:00")
    ledger.record(HASH, D_STEP, "gan-run", 1.0, round=1)
    ledger.record(HASH, D_STEP, "gan-run", 1.0, round=2)
    summary = ledger.summary(DELTA, accountant="rdp")
    entry = summary["datasets"][HASH]
    assert entry["records"] == 3
    assert entry["steps"] == 400
    assert entry["runs"] == ["cls-run", "gan-run"]
    assert entry["units"] == ["patient"]
    assert entry["first"] == "2025-01-01T00:00:00+00:00"
    assert entry["epsilon"] == pytest.approx(ledger.spent(HASH, DELTA, "rdp"))
    gan = entry["by_label"]["gan-discriminator"]
    assert gan["steps"] == 200
    assert gan["epsilon"] == pytest.approx(
        epsilon([Mechanism(1.0, 0.02, 200)], DELTA, "rdp"), rel=1e-12
    )
    assert entry["by_label"]["clinical-classifier"]["epsilon"] < entry["epsilon"]
    assert [c["steps"] for c in entry["composed"]] == [200, 200]
    assert ledger.to_dict()["datasets"][HASH]["records"][1]["round"] == 1
