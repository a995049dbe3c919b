"""The site's privacy ledger (v2): patients, write-ahead reservations, worst patient, caps."""

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
A = ["p1", "p2"]
B = ["p2", "p3"]
D_STEP = Mechanism(1.0, 0.02, 100, label="gan-discriminator")


def _reserve(ledger: PrivacyLedger, patients=A, mechanism=D_STEP, run_id="run", **kw) -> str:
    return ledger.reserve(patients, mechanism, run_id, 1.0, unit="patient", **kw)


def test_open_creates_an_empty_ledger_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "site" / "ledger.json"
    with pytest.raises(LedgerError, match=re.escape(str(path))):
        PrivacyLedger.open(path, create=False)
    ledger = PrivacyLedger.open(path)
    stored = json.loads(path.read_text())
    assert stored["format"] == "fedspine.privacy-ledger"
    assert stored["version"] == 2
    assert stored["records"] == [] and stored["cohorts"] == {}
    assert ledger.spent(A, DELTA) == 0.0
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_reservation_counts_in_full_until_settled(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    record = _reserve(ledger, mechanism=Mechanism(1.0, 0.02, 10))
    assert ledger.records()[0]["state"] == "reserved"
    assert ledger.histories(A) == [[Mechanism(1.0, 0.02, 10)]]
    assert ledger.extend(record, 6) == 16
    assert ledger.histories(A)[0][0].steps == 16
    settled = ledger.settle(record, 11)
    assert (settled["state"], settled["steps"], settled["reserved_steps"]) == ("settled", 11, 16)
    assert ledger.histories(A)[0][0].steps == 11
    with pytest.raises(LedgerError, match="already settled"):
        ledger.extend(record, 1)


def test_steps_run_beyond_a_reservation_are_still_recorded(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    record = _reserve(ledger, mechanism=Mechanism(1.0, 0.02, 4))
    settled = ledger.settle(record, 7)
    assert settled["steps"] == 7 and settled["notes"]["ran_beyond_reservation"] == 3


def test_each_patient_composes_what_touched_them_and_the_worst_counts(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    m_a, m_b = Mechanism(1.0, 0.02, 100, label="a"), Mechanism(0.8, 0.05, 50, label="b")
    ledger.settle(_reserve(ledger, A, m_a), 100)
    ledger.settle(_reserve(ledger, B, m_b), 50)
    both = epsilon([m_a, m_b], DELTA)
    assert ledger.spent(["p1"], DELTA) == pytest.approx(epsilon([m_a], DELTA))
    assert ledger.spent(["p3"], DELTA) == pytest.approx(epsilon([m_b], DELTA))
    # p2 went through both: any run touching p2 is as bad as p2.
    assert ledger.spent(["p1", "p2", "p3"], DELTA) == pytest.approx(both)
    assert ledger.spent(["p1", "p3"], DELTA) == pytest.approx(
        max(epsilon([m_a], DELTA), epsilon([m_b], DELTA))
    )
    assert ledger.spent(["p9"], DELTA) == 0.0
    assert len(ledger.histories(["p1", "p3"])) == 2
    assert len(ledger.histories(["p1", "p2", "p3"])) == 1


def test_records_keep_the_audit_fields_and_no_patient_names(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    _reserve(ledger, run_id="run-7", round=3, extra={"phase": "gan"})
    (record,) = ledger.records(run_id="run-7")
    assert record["round"] == 3 and record["notes"] == {"phase": "gan"}
    assert record["unit"] == "patient" and record["clip_norm"] == 1.0
    assert ledger.cohort(record) == sorted(A)
    assert ledger.records(run_id="other") == []
    assert ledger.records(patients=["p9"]) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"run_id": ""}, "run_id"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"round": 1.5}, "round"),
        ({"unit": ""}, "unit"),
        ({"extra": {"x": object()}}, "JSON"),
        ({"patients": []}, "patient keys"),
    ],
)
def test_reserve_refuses_bad_fields_and_leaves_the_file_alone(
    tmp_path: Path, kwargs: dict, match: str
) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    before = (tmp_path / "ledger.json").read_bytes()
    args = {"patients": A, "run_id": "run", "clip_norm": 1.0, "unit": "patient", **kwargs}
    patients = args.pop("patients")
    with pytest.raises(ValueError, match=match):
        ledger.reserve(patients, D_STEP, **args)
    assert (tmp_path / "ledger.json").read_bytes() == before


def _reserve_worker(path: str, name: str, count: int, barrier) -> None:
    ledger = PrivacyLedger.open(path)
    barrier.wait()
    for i in range(count):
        ledger.reserve(A, Mechanism(1.0, 0.02, 1), f"{name}-{i}", 1.0, unit="patient")


def test_concurrent_reservations_from_two_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger.open(path)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=_reserve_worker, args=(str(path), name, 20, barrier))
        for name in ("p0", "p1")
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    records = PrivacyLedger.open(path, create=False).records()
    assert sorted(r["run_id"] for r in records) == sorted(
        f"{p}-{i}" for p in ("p0", "p1") for i in range(20)
    )
    assert sum(m.steps for m in PrivacyLedger(path).histories(A)[0]) == 40
    assert sorted(os.listdir(tmp_path)) == ["ledger.json", "ledger.json.lock"]


def test_a_failed_save_keeps_the_old_ledger(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    _reserve(ledger, run_id="run-1")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        _reserve(ledger, run_id="run-2")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ledger.json", "ledger.json.lock"]


def test_cap_check_uses_the_worst_patient_and_says_why(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    ledger.settle(_reserve(ledger, ["p2"], Mechanism(0.7, 0.05, 400)), 400)
    new = Mechanism(1.0, 0.02, 100)
    spent = epsilon([Mechanism(0.7, 0.05, 400)], DELTA, "rdp")
    projected = epsilon([Mechanism(0.7, 0.05, 400), new], DELTA, "rdp")
    ok = ledger.check_cap(A, new, DELTA, cap=projected + 0.01)
    assert ok.allowed and ok.spent == pytest.approx(spent)
    assert ok.projected == pytest.approx(projected)
    refused = ledger.check_cap(A, new, DELTA, cap=projected - 0.01)
    assert not refused.allowed and "refusing" in refused.message
    assert str(tmp_path / "ledger.json") in refused.message
    # p1 alone never went through the earlier mechanism.
    assert ledger.check_cap(["p1"], new, DELTA, cap=epsilon([new], DELTA, "rdp") + 1e-6).allowed


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "[]",
        '{"format": "something-else", "version": 2, "cohorts": {}, "records": []}',
        '{"format": "fedspine.privacy-ledger", "version": 99, "cohorts": {}, "records": []}',
        '{"format": "fedspine.privacy-ledger", "version": 2}',
    ],
)
def test_a_corrupt_ledger_is_an_error_naming_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(LedgerError, match=re.escape(str(path))):
        PrivacyLedger.open(path)
    ledger = PrivacyLedger(path)
    with pytest.raises(LedgerError, match="never resets"):
        _reserve(ledger)
    assert path.read_text() == content  # never reset, never overwritten


def test_a_version_1_ledger_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"format": "fedspine.privacy-ledger", "version": 1, "datasets": {}}')
    with pytest.raises(LedgerError, match="version-1 ledger.*content hashes"):
        PrivacyLedger.open(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", -5), ("steps", 1.5), ("noise_multiplier", "NaN"), ("sample_rate", 2.0),
     ("clip_norm", 0), ("run_id", None), ("kind", "laplace"), ("round", True),
     ("state", "maybe"), ("cohort", "nope")],
)  # fmt: skip
def test_a_malformed_record_is_an_error_naming_the_file(
    tmp_path: Path, field: str, value: object
) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    ledger.settle(_reserve(ledger), 100)
    data = json.loads(path.read_text())
    data["records"][0][field] = value
    text = json.dumps(data).replace('"NaN"', "NaN")
    path.write_text(text)
    with pytest.raises(LedgerError, match=re.escape(str(path))):
        PrivacyLedger(path).spent(A, DELTA)
    assert path.read_text() == text


def test_a_reserved_record_cannot_claim_fewer_steps_than_reserved(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _reserve(PrivacyLedger.open(path))
    data = json.loads(path.read_text())
    data["records"][0]["steps"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="fewer steps than it reserved"):
        PrivacyLedger(path).spent(A, DELTA)


def test_a_ledger_deleted_after_opening_is_not_recreated(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    _reserve(ledger)
    path.unlink()
    with pytest.raises(LedgerError, match="missing"):
        _reserve(ledger)
    with pytest.raises(LedgerError, match="missing"):
        ledger.spent(A, DELTA)
    assert not path.exists()


def test_summary_reports_the_worst_patient_per_label(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    clf = Mechanism(1.2, 0.05, 80, label="clinical-classifier")
    ledger.settle(_reserve(ledger, A, clf, run_id="c"), 80)
    open_id = _reserve(ledger, A, D_STEP, run_id="g")
    summary = ledger.summary(A, DELTA)
    assert summary["epsilon"] == pytest.approx(epsilon([clf, D_STEP], DELTA))
    assert summary["by_label"]["clinical-classifier"] == pytest.approx(epsilon([clf], DELTA))
    assert summary["open_reservations"] == 1 and summary["runs"] == ["c", "g"]
    ledger.settle(open_id, 0)
    assert ledger.summary(A, DELTA)["open_reservations"] == 0
