"""Bring a version-1 ledger (kept in a prepared folder, keyed by its content hash) into the
site's privacy home, so an upgrade never resets a budget already spent.

A v1 record names a dataset, not patients, so each is attributed to every patient of the
prepared folder it was found in (all splits): that can only over-count. Each becomes a settled
record with the same σ, q, steps, clip, unit, run id and round, noted as imported. The old file
is then renamed ``privacy_ledger.json.imported`` so it is not imported twice; until then every DP
run on that folder is refused (:func:`check_no_v1_ledger`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedspine.data.prepared import load_prepared
from fedspine.fileio import PREPARED_LEDGER_V1
from fedspine.privacy.accounting import Mechanism
from fedspine.privacy.engine import PrivacyError
from fedspine.privacy.home import PrivacyHome

V1_FILE = PREPARED_LEDGER_V1
IMPORTED_SUFFIX = ".imported"


def check_no_v1_ledger(prepared_root: str | os.PathLike) -> None:
    """Refuse a DP run on a prepared folder that still holds a v1 ledger's spend."""
    path = Path(prepared_root) / V1_FILE
    if path.exists():
        raise PrivacyError(
            f"{path}: a version-1 privacy ledger with spend the site's privacy home does not "
            f"hold yet; run `fedspine privacy import-ledger {Path(prepared_root)}` (with the "
            "site's --privacy-home) first, so that spend counts"
        )


def import_v1_ledger(
    prepared_root: str | os.PathLike, home: PrivacyHome | str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Import PREPARED/privacy_ledger.json into the privacy home; returns the new records."""
    root = Path(prepared_root)
    path = root / V1_FILE
    if not path.is_file():
        raise PrivacyError(f"{path}: no version-1 ledger to import")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = [r for entry in data["datasets"].values() for r in entry["records"]]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PrivacyError(
            f"{path}: not a readable version-1 fedspine ledger ({err}); restore it from a backup"
        ) from None
    if data.get("format") != "fedspine.privacy-ledger" or data.get("version") != 1:
        raise PrivacyError(f"{path}: not a version-1 fedspine privacy ledger")
    site = home if isinstance(home, PrivacyHome) else PrivacyHome(home)
    patients = site.keys_of(load_prepared(root).privacy_ids)
    ledger = site.ledger()
    imported = []
    for record in records:
        mechanism = Mechanism(
            float(record["noise_multiplier"]),
            float(record["sample_rate"]),
            int(record["steps"]),
            label=str(record.get("label", "")),
            kind=str(record.get("kind", "dp-sgd-poisson")),
        )
        notes = {**dict(record.get("notes") or {}), "imported_from": f"{root.name}/{V1_FILE}"}
        record_id = ledger.reserve(
            patients,
            mechanism,
            str(record["run_id"]),
            float(record["clip_norm"]),
            unit=str(record.get("unit", "patient")),
            round=record.get("round"),
            extra=notes,
        )
        imported.append(ledger.settle(record_id, mechanism.steps))
    os.replace(path, path.with_name(V1_FILE + IMPORTED_SUFFIX))
    return imported
