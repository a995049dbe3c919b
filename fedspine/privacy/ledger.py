"""A site's privacy ledger: every DP mechanism run on its patients, written ahead of the steps.

One JSON file in the site's privacy home (:mod:`fedspine.privacy.home`). Each record is one DP
mechanism run (σ, q, steps, clip norm, privacy unit, run id, round, times, notes) and names the
patients it touched as a *cohort*: a sorted list of keyed patient hashes, stored once and shared
by every record on the same people. A patient's ε composes every record whose cohort holds
them; a run's spend, plan and cap use its worst patient (:meth:`PrivacyLedger.histories`).

Records are written ahead (:meth:`PrivacyLedger.reserve`): the steps are in the file, durably,
before any of them runs, and a record stays ``reserved`` (counted in full) until
:meth:`PrivacyLedger.settle` lowers it to the steps that provably ran. A crash at any instant
therefore leaves the ledger at or above the truth, never below.

The ledger is never reset: a missing-after-open, unreadable or malformed file is an error naming
the file. Writes are atomic (:func:`fedspine.fileio.write_text_atomic`: temp file, fsync,
``os.replace``, then the folder fsynced; the file keeps its mode, 0600 when new) and serialised
across processes by ``flock`` on ``<ledger>.lock`` (local file systems; flock on some network
file systems is advisory only or absent).
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import math
import os
import stat
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedspine.fileio import write_text_atomic
from fedspine.privacy.accounting import (
    PLAN_ACCOUNTANT,
    REPORT_ACCOUNTANT,
    Accountant,
    Mechanism,
    epsilon,
)

LEDGER_FORMAT = "fedspine.privacy-ledger"
LEDGER_VERSION = 2
RESERVED = "reserved"
SETTLED = "settled"
_NUMERIC = (int, float)


class LedgerError(RuntimeError):
    """The ledger file cannot be used as it is; the message names it and says what to do."""


@dataclass(frozen=True)
class CapDecision:
    """Whether a planned mechanism fits the worst patient's ε cap, with the numbers behind it."""

    allowed: bool
    spent: float
    projected: float
    remaining: float
    cap: float
    delta: float
    accountant: str
    message: str


class PrivacyLedger:
    """The site's ledger file. Every query re-reads the file, so it sees other processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path, create: bool = True) -> PrivacyLedger:
        """Open (and validate) the ledger at ``path``; create an empty one only if absent."""
        ledger = cls(path)
        if ledger.path.is_dir():
            raise LedgerError(f"privacy ledger {ledger.path} is a directory, not a ledger file")
        if not ledger.path.exists():
            if not create:
                raise LedgerError(
                    f"privacy ledger {ledger.path} does not exist; pass create=True to start a "
                    "new ledger (only for a site that has never spent privacy budget)"
                )
            ledger.path.parent.mkdir(parents=True, exist_ok=True)
            with ledger._lock():
                if not ledger.path.exists():
                    ledger._write(_empty_ledger())
        ledger._read()
        return ledger

    # -- writing -------------------------------------------------------------------------------

    def reserve(
        self,
        patients: Sequence[str],
        mechanism: Mechanism,
        run_id: str,
        clip_norm: float,
        *,
        unit: str,
        round: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Write ``mechanism.steps`` steps on ``patients`` ahead of running them; returns the
        record's id. Until :meth:`settle`, the record counts in full."""
        cohort = _check_patients(patients)
        if not isinstance(mechanism, Mechanism):
            raise TypeError(f"mechanism must be a Mechanism, got {type(mechanism).__name__}")
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        if not _positive(clip_norm):
            raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm!r}")
        if round is not None and (isinstance(round, bool) or not isinstance(round, int)):
            raise ValueError(f"round must be an integer or None, got {round!r}")
        if not isinstance(unit, str) or not unit:
            raise ValueError(f"unit must be a non-empty string, got {unit!r}")
        notes = dict(extra or {})
        try:
            json.dumps(notes, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"extra must be JSON-serialisable: {error}") from error
        now = _iso(None)
        cohort_id = _cohort_id(cohort)
        record = {
            "id": uuid.uuid4().hex,
            "state": RESERVED,
            "kind": mechanism.kind,
            "label": mechanism.label,
            "noise_multiplier": mechanism.noise_multiplier,
            "sample_rate": mechanism.sample_rate,
            "steps": mechanism.steps,
            "reserved_steps": mechanism.steps,
            "clip_norm": float(clip_norm),
            "unit": unit,
            "run_id": run_id,
            "round": round,
            "cohort": cohort_id,
            "reserved": now,
            "settled": None,
            "notes": notes,
        }
        with self._lock():
            data = self._read()
            data["cohorts"].setdefault(cohort_id, cohort)
            data["records"].append(record)
            self._write(data)
        return record["id"]

    def extend(self, record_id: str, more_steps: int) -> int:
        """Reserve ``more_steps`` further steps on an open record; returns its reserved total."""
        more = int(more_steps)
        if more < 0:
            raise ValueError(f"more_steps must be >= 0, got {more_steps}")
        with self._lock():
            data = self._read()
            record = _find(data, record_id, self.path)
            if record["state"] != RESERVED:
                raise LedgerError(
                    f"privacy ledger {self.path}: record {record_id[:8]} is already settled; "
                    "reserve a new record for further steps"
                )
            record["reserved_steps"] += more
            record["steps"] = record["reserved_steps"]
            self._write(data)
            return int(record["reserved_steps"])

    def settle(self, record_id: str, steps_run: int) -> dict[str, Any]:
        """Lower an open record to the steps that ran (never raise it: steps that ran beyond
        the reservation are recorded too, so the ledger never under-counts)."""
        steps = int(steps_run)
        if steps < 0:
            raise ValueError(f"steps_run must be >= 0, got {steps_run}")
        with self._lock():
            data = self._read()
            record = _find(data, record_id, self.path)
            if record["state"] == SETTLED:
                return copy.deepcopy(record)
            record["steps"] = max(steps, 0)
            if steps > record["reserved_steps"]:
                record["notes"]["ran_beyond_reservation"] = steps - record["reserved_steps"]
            record["state"] = SETTLED
            record["settled"] = _iso(None)
            self._write(data)
            return copy.deepcopy(record)

    # -- reading -------------------------------------------------------------------------------

    def records(
        self, run_id: str | None = None, patients: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Records oldest first (the audit trail), of one run and/or touching ``patients``."""
        data = self._read()
        wanted = set(patients) if patients is not None else None
        out = []
        for record in data["records"]:
            if run_id is not None and record["run_id"] != run_id:
                continue
            if wanted is not None and wanted.isdisjoint(data["cohorts"][record["cohort"]]):
                continue
            out.append(copy.deepcopy(record))
        return out

    def cohort(self, record: dict[str, Any]) -> list[str]:
        """The patient keys a record touched."""
        return list(self._read()["cohorts"][record["cohort"]])

    def histories(self, patients: Sequence[str]) -> list[list[Mechanism]]:
        """The mechanisms each of ``patients`` went through, one list per distinct history
        that no other patient's history contains (so the worst patient is among them).

        ``[[]]`` when none of them was ever touched.
        """
        data = self._read()
        wanted = set(patients)
        touching: dict[str, list[int]] = {p: [] for p in wanted}
        for index, record in enumerate(data["records"]):
            if record["steps"] == 0:
                continue
            for p in wanted.intersection(data["cohorts"][record["cohort"]]):
                touching[p].append(index)
        signatures = {frozenset(v) for v in touching.values()}
        maximal = [s for s in signatures if not any(s < other for other in signatures)]
        if not maximal:
            return [[]]
        return [
            [_mechanism(data["records"][i]) for i in sorted(signature)]
            for signature in sorted(maximal, key=lambda s: sorted(s))
        ]

    def spent(
        self, patients: Sequence[str], delta: float, accountant: Accountant = REPORT_ACCOUNTANT
    ) -> float:
        """ε of the worst of ``patients`` at ``delta`` (0.0 where none was touched)."""
        return max(epsilon(h, delta, accountant) for h in self.histories(patients))

    def check_cap(
        self,
        patients: Sequence[str],
        mechanism: Mechanism,
        delta: float,
        cap: float,
        accountant: Accountant = PLAN_ACCOUNTANT,
    ) -> CapDecision:
        """Whether ``mechanism`` on ``patients`` keeps their worst within ``cap``, and why."""
        if not _positive(cap):
            raise ValueError(f"cap must be a positive finite ε, got {cap!r}")
        histories = self.histories(patients)
        spent = max(epsilon(h, delta, accountant) for h in histories)
        projected = max(epsilon([*h, mechanism], delta, accountant) for h in histories)
        remaining = max(cap - spent, 0.0)
        allowed = projected <= cap
        left = f"ε={_fmt(remaining)} remains" if remaining > 0 else "nothing remains (ε=0)"
        head = (
            f"privacy ledger {self.path}: the worst of these {len(set(patients))} patients has "
            f"spent ε={_fmt(spent)} of the cap {_fmt(cap)} at δ={delta:.3g} "
            f"({accountant.upper()}), so {left}; {_describe(mechanism)} would bring it to "
            f"ε={_fmt(projected)}"
        )
        if allowed:
            message = f"{head}, within the cap, leaving ε={_fmt(cap - projected)}."
        else:
            message = f"{head}, over the cap; refusing."
        return CapDecision(allowed, spent, projected, remaining, cap, delta, accountant, message)

    def to_dict(self) -> dict[str, Any]:
        """The whole ledger as stored (a copy)."""
        return self._read()

    def summary(
        self, patients: Sequence[str], delta: float, accountant: Accountant = REPORT_ACCOUNTANT
    ) -> dict[str, Any]:
        """ε of the worst of ``patients`` in total and per label, with the records behind it."""
        records = self.records(patients=patients)
        histories = self.histories(patients)
        labels = sorted({r["label"] for r in records})
        return {
            "ledger": str(self.path),
            "delta": delta,
            "accountant": accountant,
            "patients": len(set(patients)),
            "epsilon": max(epsilon(h, delta, accountant) for h in histories),
            "by_label": {
                label: max(
                    epsilon([m for m in h if m.label == label], delta, accountant)
                    for h in histories
                )
                for label in labels
            },
            "steps": sum(int(r["steps"]) for r in records),
            "records": len(records),
            "open_reservations": sum(r["state"] == RESERVED for r in records),
            "runs": sorted({r["run_id"] for r in records}),
            "units": sorted({r["unit"] for r in records}),
        }

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"

    # -- the file ------------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        """Load and validate the file; any problem is a LedgerError naming it."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise self._error(
                "is missing (it existed when opened, or was never created); a missing ledger "
                "would forget the budget already spent, so fedspine will not start a new one "
                "silently. Restore it from a backup, or open it with create=True only for a "
                "site that has never spent budget"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise self._error(f"cannot be read ({error})") from error
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except ValueError as error:
            raise self._error(f"is not valid JSON ({error})") from error
        _validate(data, self._error)
        return data

    def _write(self, data: dict[str, Any]) -> None:
        """Replace the file atomically and durably: a crash leaves the old or the new ledger."""
        text = json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n"
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o600
        write_text_atomic(self.path, text, durable=True, mode=mode)
        _fsync_dir(self.path.parent)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive flock on ``<ledger>.lock`` for read-modify-write.

        Readers need no lock: ``os.replace`` means they see the old file or the new one whole.
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise LedgerError(
                f"privacy ledger {self.path}: cannot create its lock file {lock_path} "
                f"({error}); the ledger's folder must be writable by the site's process"
            ) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _error(self, reason: str) -> LedgerError:
        return LedgerError(
            f"privacy ledger {self.path} {reason}. The ledger records privacy budget already "
            "spent, so fedspine never resets or overwrites a bad one: restore it from a backup "
            "or repair it by hand."
        )


def _empty_ledger() -> dict[str, Any]:
    return {
        "format": LEDGER_FORMAT,
        "version": LEDGER_VERSION,
        "created": _iso(None),
        "cohorts": {},
        "records": [],
    }


_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "state": (str,),
    "kind": (str,),
    "label": (str,),
    "noise_multiplier": _NUMERIC,
    "sample_rate": _NUMERIC,
    "steps": (int,),
    "reserved_steps": (int,),
    "clip_norm": _NUMERIC,
    "unit": (str,),
    "run_id": (str,),
    "round": (int, type(None)),
    "cohort": (str,),
    "reserved": (str,),
    "settled": (str, type(None)),
    "notes": (dict,),
}


def _validate(data: Any, error: Any) -> None:
    """Check the structure a ledger must have; ``error(reason)`` builds the exception."""
    if not isinstance(data, dict):
        raise error("does not hold a JSON object")
    if data.get("format") != LEDGER_FORMAT:
        raise error(f"is not a fedspine privacy ledger (format {data.get('format')!r})")
    version = data.get("version")
    if version == 1:
        raise error(
            "is a version-1 ledger, keyed by prepared-folder content hashes: those reset "
            "whenever the same patients were re-ingested, so this fedspine does not read them. "
            "Its spend cannot be tied to patients automatically; keep the file for the audit "
            "trail and start the site's privacy home (--privacy-home) fresh only after the "
            "steward has accounted for it by hand"
        )
    if version != LEDGER_VERSION:
        raise error(
            f"has version {version!r}, this fedspine reads version {LEDGER_VERSION} "
            "(a newer fedspine wrote it? upgrade fedspine at this site)"
        )
    cohorts = data.get("cohorts")
    records = data.get("records")
    if not isinstance(cohorts, dict) or not isinstance(records, list):
        raise error("has no 'cohorts' object or no 'records' list")
    for cohort_id, keys in cohorts.items():
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise error(f"cohort {cohort_id[:12]} is not a list of patient keys")
    for index, record in enumerate(records):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise error(f"{where} is not an object")
        for field, types in _RECORD_FIELDS.items():
            value = record.get(field)
            if field not in record or isinstance(value, bool) or not isinstance(value, types):
                raise error(f"{where} has a missing or bad {field!r}: {value!r}")
        if record["state"] not in (RESERVED, SETTLED):
            raise error(f"{where} has an unknown state {record['state']!r}")
        if record["cohort"] not in cohorts:
            raise error(f"{where} names cohort {record['cohort'][:12]}, which the file lacks")
        if record["state"] == RESERVED and record["steps"] != record["reserved_steps"]:
            raise error(f"{where} is reserved but counts fewer steps than it reserved")
        try:
            _mechanism(record)
        except ValueError as problem:
            raise error(f"{where} is not a valid mechanism ({problem})") from problem
        if not _positive(record["clip_norm"]):
            raise error(f"{where} has a bad clip_norm {record['clip_norm']!r}")


def _find(data: dict[str, Any], record_id: str, path: Path) -> dict[str, Any]:
    for record in data["records"]:
        if record["id"] == record_id:
            return record
    raise LedgerError(f"privacy ledger {path}: no record {record_id!r}")


def _mechanism(record: dict[str, Any]) -> Mechanism:
    return Mechanism(
        noise_multiplier=record["noise_multiplier"],
        sample_rate=record["sample_rate"],
        steps=record["steps"],
        label=record["label"],
        kind=record["kind"],
    )


def mechanisms_of(records: Sequence[dict[str, Any]]) -> list[Mechanism]:
    """One Mechanism per ledger record (as :meth:`PrivacyLedger.records` returns them)."""
    return [_mechanism(r) for r in records]


def _check_patients(patients: Sequence[str]) -> list[str]:
    if isinstance(patients, str):
        raise TypeError("patients must be a sequence of patient keys, not one string")
    cohort = sorted({str(p) for p in patients})
    if not cohort or not all(cohort):
        raise ValueError("a mechanism must name the (non-empty) patient keys it touches")
    return cohort


def _cohort_id(cohort: list[str]) -> str:
    return hashlib.sha256("\n".join(cohort).encode()).hexdigest()[:24]


def _positive(value: Any) -> bool:
    return (
        isinstance(value, _NUMERIC)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _iso(value: datetime | str | None) -> str:
    """ISO 8601 in UTC; naive datetimes are taken as local time."""
    if value is None:
        return datetime.now(UTC).isoformat(timespec="seconds")
    if isinstance(value, str):
        datetime.fromisoformat(value)  # raises ValueError on a malformed time
        return value
    return value.astimezone(UTC).isoformat(timespec="seconds")


def _fmt(eps: float) -> str:
    if math.isinf(eps):
        return "inf"
    return f"{eps:.2f}" if eps >= 0.1 else f"{eps:.3g}"


def _describe(mechanism: Mechanism) -> str:
    what = mechanism.label or mechanism.kind
    return (
        f"{mechanism.steps} step{'' if mechanism.steps == 1 else 's'} of {what} "
        f"at σ={mechanism.noise_multiplier:.3g}, "
        f"q={mechanism.sample_rate:.3g}"
    )


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in the ledger")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
