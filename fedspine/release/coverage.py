"""Gate 6 of a release (listed in :mod:`fedspine.release.gate`): the audit data covers the run.

The memorisation gate compares the synthetic images with the audit sets' training images, so it
must know which set each site trained on, and it must find that out without any fingerprint of
the data. The sites' privacy ledgers tell it: an audit set's ``train`` patients are named by
their keyed hashes under each privacy home given, and a site is covered when that home's ledger
holds records of this run (``privacy.json``'s ``run_id`` or a run id of the site's mechanism
rows) on those patients. A home is matched to a site by its records' mechanisms (run, round,
σ, q, clip, unit, label as ``privacy.json`` lists them); a single-site run takes any matching
record. A home without ``ledger.json`` is skipped and never created.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedspine.data.prepared import PreparedDatasetError, load_prepared
from fedspine.privacy.home import LEDGER_FILE, PrivacyHome, PrivacyHomeError
from fedspine.privacy.ledger import LedgerError
from fedspine.release.checks import is_number
from fedspine.release.errors import ReleaseError, ReleaseRefused
from fedspine.release.memorisation_gate import MemorisationGate
from fedspine.training.batches import resize_uint8

HELDOUT_SPLITS = ("val", "test")


def load_audit_data(
    paths: Sequence[str | os.PathLike],
    resolution: int,
    privacy: dict,
    homes: Sequence[Path],
    gate: MemorisationGate,
) -> dict:
    """Train and held-out images of every audit set at ``resolution``, and run coverage.

    Coverage comes from the sites' privacy ledgers (module docstring, gate 6), never from a
    fingerprint of the data. ``described``, ``detail`` and ``fingerprints`` are the steward's:
    they name the audit sets' content hashes and sizes and never enter the release.
    """
    sites = privacy["sites"]
    ledgers = _open_ledgers(homes)
    run_ids = _run_ids(privacy)
    signatures = {
        name: {_signature(m) for m in site.get("mechanisms") or [] if isinstance(m, dict)}
        for name, site in sites.items()
    }
    coverage = {name: False for name in sites}
    train, heldout, described, detail = [], [], [], []
    fingerprints: dict[str, str] = {}
    for p in paths:
        try:
            data = load_prepared(p)
        except PreparedDatasetError as err:
            raise ReleaseError(str(err)) from None
        name = Path(p).name
        parts = []
        for split in ("train", HELDOUT_SPLITS):
            imgs = torch.from_numpy(np.ascontiguousarray(data.select(split).images))[:, None]
            if imgs.shape[-1] != resolution:
                imgs = resize_uint8(imgs, resolution)
            parts.append(imgs[:, 0].numpy())
        train.append(parts[0])
        heldout.append(parts[1])
        described.append(
            {
                "name": name,
                "content_hash": data.content_hash,
                "n_train": len(parts[0]),
                "n_heldout": len(parts[1]),
            }
        )
        for digest in [data.content_hash, *(data.manifest.get("parts") or {}).values()]:
            if isinstance(digest, str) and digest:
                fingerprints[digest] = name
        train_ids = data.select("train").privacy_ids
        for home, privacy_home, ledger in ledgers:
            try:
                keys = privacy_home.keys_of(train_ids)
                records = [r for r in ledger.records(patients=keys) if r["run_id"] in run_ids]
                cohorts = {r["cohort"]: set(ledger.cohort(r)) for r in records}
            except (PrivacyHomeError, LedgerError) as err:
                raise ReleaseError(f"privacy home {home}: {err}") from None
            if not records:
                continue
            matched = _sites_of(records, signatures)
            for site in matched:
                coverage[site] = True
            trained = set().union(*cohorts.values()) & set(keys)
            detail.append(
                {
                    "audit_data": name,
                    "privacy_home": str(home),
                    "sites": matched,
                    "records_of_the_run": len(records),
                    "train_patients": len(keys),
                    "train_patients_in_the_run": len(trained),
                }
            )
    if not any(coverage.values()):
        raise ReleaseRefused(_uncovered_reason(privacy, homes, ledgers, run_ids))
    warnings = [
        f"site {name}: no --audit-data set holds its training patients under the given "
        "--privacy-home(s); the memorisation and membership audits do not cover it"
        for name, covered in coverage.items()
        if not covered
    ]
    return {
        "train": np.concatenate(train),
        "heldout": np.concatenate(heldout),
        "described": described,
        "coverage": coverage,
        "detail": detail,
        "fingerprints": fingerprints,
        "warnings": warnings,
    }


def _open_ledgers(homes: Sequence[Path]) -> list[tuple[Path, Any, Any]]:
    """(path, PrivacyHome, ledger) of every home that holds a ledger; the others are skipped,
    never created (a release must not start a ledger or a site key)."""
    found, seen = [], set()
    for home in homes:
        home = Path(home)
        if home in seen or not home.joinpath(LEDGER_FILE).is_file():
            continue
        seen.add(home)
        try:
            privacy_home = PrivacyHome(home)
            found.append((home, privacy_home, privacy_home.ledger()))
        except (PrivacyHomeError, LedgerError) as err:
            raise ReleaseError(f"privacy home {home}: {err}") from None
    return found


def _run_ids(privacy: dict) -> set[str]:
    """The run's id and every run id of the sites' mechanism rows."""
    ids = {privacy.get("run_id")}
    for site in privacy["sites"].values():
        ids.update(m.get("run_id") for m in site.get("mechanisms") or [] if isinstance(m, dict))
    return {i for i in ids if isinstance(i, str) and i}


def _signature(row: dict) -> tuple:
    """What a ledger record and its row in privacy.json share (steps change as it settles)."""

    def num(value: Any) -> float | None:
        return float(value) if is_number(value) else None

    return (
        row.get("run_id"),
        row.get("round"),
        row.get("label"),
        row.get("unit"),
        num(row.get("noise_multiplier")),
        num(row.get("sample_rate")),
        num(row.get("clip_norm")),
    )


def _sites_of(records: list[dict], signatures: dict[str, set]) -> list[str]:
    """The sites whose mechanism rows list one of ``records``; for a single-site run, that
    site whenever a record of the run matched."""
    found = {_signature(r) for r in records}
    matched = sorted(name for name, rows in signatures.items() if rows & found)
    if not matched and len(signatures) == 1:
        matched = list(signatures)
    return matched


def _uncovered_reason(privacy: dict, homes: Sequence[Path], ledgers: list, run_ids: set) -> str:
    ask = (
        "pass the prepared datasets the run was trained on (--audit-data) and each site's "
        "privacy home (--privacy-home)"
    )
    if not ledgers:
        where = ", ".join(str(h) for h in homes)
        return (
            "memorisation audit: cannot tell which --audit-data set is a site's training data: "
            f"no privacy ledger in {where}; {ask}"
        )
    runs = ", ".join(sorted(run_ids)) or "(privacy.json names no run id)"
    where = ", ".join(str(h) for h, _, _ in ledgers)
    return (
        "memorisation audit: no --audit-data set is the training data of any site: the "
        f"ledgers in {where} record run {runs} on none of the audit sets' train patients "
        f"(or on none of privacy.json's sites); {ask}"
    )
