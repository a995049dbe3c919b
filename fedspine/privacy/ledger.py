"""A site's privacy ledger: every DP mechanism run on its data, on the site's own disk.

One JSON file per site (the site chooses the path), keyed by the prepared dataset's content hash,
so one file can hold several datasets. Each record is one DP mechanism run (σ, q, steps, clip
norm, privacy unit, run id, round, times, notes); records are kept one by one for the audit
trail and composed by summing steps per (σ, q), which equals one uninterrupted run.

The ledger is what stops a site from spending more than its cap across rounds, runs and
restarts, so it is never reset: a missing-after-open, unreadable or malformed file is an error
naming the file. Appends are atomic (temp file, fsync, ``os.replace``) and serialised across
processes by ``flock`` on a ``<ledger>.lock`` file beside it (local file systems; flock on some
network file systems is advisory only or absent).
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedspine.privacy.accounting import (
    Accountant,
    Mechanism,
    epsilon,
    merge_mechanisms,
)

LEDGER_FORMAT = "fedspine.privacy-ledger"
LEDGER_VERSION = 1
_NUMERIC = (int, float)


class LedgerError(RuntimeError):
    """The ledger file cannot be used as it is; the message names it and says what to do."""


@dataclass(frozen=True)
class CapDecision:
    """Whether a planned mechanism fits a dataset's ε cap, with the numbers behind it."""

    allowed: bool
    spent: float
    projected: float
    remaining: float
    cap: float
    delta: float
    accountant: str
    message: str


class PrivacyLedger:
    """The per-site ledger file. Every query re-reads the file, so it sees other processes."""

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

    def datasets(self) -> list[str]:
        """Dataset hashes with an entry in this ledger."""
        return list(self._read()["datasets"])

    def records(self, dataset_hash: str) -> list[dict[str, Any]]:
        """The individual records of one dataset, oldest first (the audit trail)."""
        _check_hash(dataset_hash)
        entry = self._read()["datasets"].get(dataset_hash)
        return copy.deepcopy(entry["records"]) if entry else []

    def mechanisms(self, dataset_hash: str) -> list[Mechanism]:
        """One Mechanism per record, oldest first."""
        return [_mechanism(r) for r in self.records(dataset_hash)]

    def spent(self, dataset_hash: str, delta: float, accountant: Accountant = "prv") -> float:
        """ε spent so far on this dataset at ``delta`` (0.0 for a dataset with no records)."""
        return epsilon(self.mechanisms(dataset_hash), delta, accountant)

    def record(
        self,
        dataset_hash: str,
        mechanism: Mechanism,
        run_id: str,
        clip_norm: float,
        round: int | None = None,
        extra: dict[str, Any] | None = None,
        *,
        unit: str = "patient",
        started: datetime | str | None = None,
        finished: datetime | str | None = None,
    ) -> dict[str, Any]:
        """Append one mechanism run and save atomically; returns the stored record.

        Record what was actually run, even over a cap: the ledger must never under-count.
        """
        _check_hash(dataset_hash)
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
        entry = {
            "kind": mechanism.kind,
            "label": mechanism.label,
            "noise_multiplier": mechanism.noise_multiplier,
            "sample_rate": mechanism.sample_rate,
            "steps": mechanism.steps,
            "clip_norm": float(clip_norm),
            "unit": unit,
            "run_id": run_id,
            "round": round,
            "started": _iso(started) if started is not None else None,
            "finished": _iso(finished) if finished is not None else now,
            "recorded": now,
            "notes": notes,
        }
        with self._lock():
            data = self._read()
            data["datasets"].setdefault(dataset_hash, {"records": []})["records"].append(entry)
            self._write(data)
        return copy.deepcopy(entry)

    def project(
        self,
        dataset_hash: str,
        mechanism: Mechanism,
        delta: float,
        accountant: Accountant = "rdp",
    ) -> float:
        """ε this dataset would have spent if ``mechanism`` were added (RDP: for planning)."""
        return epsilon([*self.mechanisms(dataset_hash), mechanism], delta, accountant)

    def check_cap(
        self,
        dataset_hash: str,
        mechanism: Mechanism,
        delta: float,
        cap: float,
        accountant: Accountant = "rdp",
    ) -> CapDecision:
        """Whether adding ``mechanism`` keeps this dataset within ``cap``, and a sentence why."""
        if not _positive(cap):
            raise ValueError(f"cap must be a positive finite ε, got {cap!r}")
        prior = self.mechanisms(dataset_hash)
        spent = epsilon(prior, delta, accountant)
        projected = epsilon([*prior, mechanism], delta, accountant)
        remaining = max(cap - spent, 0.0)
        allowed = projected <= cap
        left = f"ε={_fmt(remaining)} remains" if remaining > 0 else "nothing remains (ε=0)"
        head = (
            f"site ledger {self.path}: dataset {dataset_hash[:12]} has spent ε={_fmt(spent)} of "
            f"its cap {_fmt(cap)} at δ={delta:.3g} ({accountant.upper()}), so {left}; "
            f"this round ({_describe(mechanism)}) would bring it to ε={_fmt(projected)}"
        )
        if allowed:
            message = f"{head}, within the cap, leaving ε={_fmt(cap - projected)}."
        else:
            message = f"{head}, over the cap; refusing."
        return CapDecision(allowed, spent, projected, remaining, cap, delta, accountant, message)

    def max_steps_within_cap(
        self,
        dataset_hash: str,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        cap: float,
        accountant: Accountant = "rdp",
        *,
        label: str = "",
        max_steps: int = 10**9,
    ) -> int:
        """Most further steps of (σ, q) that keep this dataset within ``cap`` (0 if none).

        The boundary by bisection: n steps fit and n + 1 do not (or ``max_steps`` fit). A
        trainer uses it to stop cleanly at the last safe snapshot instead of overshooting.
        """
        if not _positive(cap):
            raise ValueError(f"cap must be a positive finite ε, got {cap!r}")
        prior = self.mechanisms(dataset_hash)

        def fits(steps: int) -> bool:
            new = Mechanism(noise_multiplier, sample_rate, steps, label=label)
            return epsilon([*prior, new], delta, accountant) <= cap

        if not fits(1):
            return 0
        low, high = 1, 2
        while fits(high):
            if high >= max_steps:
                return max_steps
            low, high = high, min(2 * high, max_steps)
        while high - low > 1:
            mid = (low + high) // 2
            if fits(mid):
                low = mid
            else:
                high = mid
        return low

    def to_dict(self) -> dict[str, Any]:
        """The whole ledger as stored (a copy)."""
        return self._read()

    def summary(self, delta: float, accountant: Accountant = "prv") -> dict[str, Any]:
        """Per dataset: ε in total and per label, steps, runs and time span, for reports."""
        data = self._read()
        datasets = {}
        for dataset_hash, entry in data["datasets"].items():
            records = entry["records"]
            mechanisms = [_mechanism(r) for r in records]
            labels = sorted({m.label for m in mechanisms})
            by_label = {
                label: {
                    "epsilon": epsilon(
                        [m for m in mechanisms if m.label == label], delta, accountant
                    ),
                    "steps": sum(m.steps for m in mechanisms if m.label == label),
                }
                for label in labels
            }
            times = [t for r in records for t in (r["started"], r["finished"]) if t]
            datasets[dataset_hash] = {
                "epsilon": epsilon(mechanisms, delta, accountant),
                "records": len(records),
                "steps": sum(m.steps for m in mechanisms),
                "by_label": by_label,
                "composed": [
                    {
                        "kind": m.kind,
                        "noise_multiplier": m.noise_multiplier,
                        "sample_rate": m.sample_rate,
                        "steps": m.steps,
                    }
                    for m in merge_mechanisms(mechanisms)
                ],
                "runs": sorted({r["run_id"] for r in records}),
                "units": sorted({r["unit"] for r in records}),
                "first": min(times) if times else None,
                "last": max(times) if times else None,
            }
        return {
            "ledger": str(self.path),
            "delta": delta,
            "accountant": accountant,
            "datasets": datasets,
        }

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"

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
        """Replace the file atomically: a crash leaves the old or the new ledger, never half."""
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o644
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.path.parent)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive flock on ``<ledger>.lock`` for read-modify-write.

        Readers need no lock: ``os.replace`` means they see the old file or the new one whole.
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
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
        "datasets": {},
    }


_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "label": (str,),
    "noise_multiplier": _NUMERIC,
    "sample_rate": _NUMERIC,
    "steps": (int,),
    "clip_norm": _NUMERIC,
    "unit": (str,),
    "run_id": (str,),
    "round": (int, type(None)),
    "started": (str, type(None)),
    "finished": (str, type(None)),
    "notes": (dict,),
}


def _validate(data: Any, error: Any) -> None:
    """Check the structure a ledger must have; ``error(reason)`` builds the exception."""
    if not isinstance(data, dict):
        raise error("does not hold a JSON object")
    if data.get("format") != LEDGER_FORMAT:
        raise error(f"is not a fedspine privacy ledger (format {data.get('format')!r})")
    version = data.get("version")
    if version != LEDGER_VERSION:
        raise error(
            f"has version {version!r}, this fedspine reads version {LEDGER_VERSION} "
            "(a newer fedspine wrote it? upgrade fedspine at this site)"
        )
    datasets = data.get("datasets")
    if not isinstance(datasets, dict):
        raise error("has no 'datasets' object")
    for dataset_hash, entry in datasets.items():
        records = entry.get("records") if isinstance(entry, dict) else None
        if not isinstance(records, list):
            raise error(f"dataset {dataset_hash[:12]} has no 'records' list")
        for index, record in enumerate(records):
            where = f"dataset {dataset_hash[:12]} record {index}"
            if not isinstance(record, dict):
                raise error(f"{where} is not an object")
            for field, types in _RECORD_FIELDS.items():
                value = record.get(field)
                if field not in record or isinstance(value, bool) or not isinstance(value, types):
                    raise error(f"{where} has a missing or bad {field!r}: {value!r}")
            try:
                _mechanism(record)
            except ValueError as problem:
                raise error(f"{where} is not a valid mechanism ({problem})") from problem
            if not _positive(record["clip_norm"]):
                raise error(f"{where} has a bad clip_norm {record['clip_norm']!r}")


def _mechanism(record: dict[str, Any]) -> Mechanism:
    return Mechanism(
        noise_multiplier=record["noise_multiplier"],
        sample_rate=record["sample_rate"],
        steps=record["steps"],
        label=record["label"],
        kind=record["kind"],
    )


def _check_hash(dataset_hash: str) -> None:
    if not isinstance(dataset_hash, str) or not dataset_hash.strip():
        raise ValueError(f"dataset_hash must be a non-empty string, got {dataset_hash!r}")


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
