"""The run's privacy summary (``RUN/privacy.json``) and the content of its privacy report.

Training (centralised or federated) writes ``privacy.json``; :func:`build_report` adds ε
recomputed from each site's mechanisms and the overall ε, and :func:`plot_report` draws ε
against steps. ``fedspine privacy report`` renders that content as Markdown, JSON or a
self-contained HTML page in :mod:`fedspine.reporting.privacy` (a higher layer, which reads it
as a typed ``PrivacyReport`` record). The report says what was private and what was public, and
what fedspine cannot promise (noise from torch's PRNG, not a cryptographically secure
generator).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedspine import __version__
from fedspine.data.prepared import UNIT_DESCRIPTIONS
from fedspine.fileio import PRIVACY_SUMMARY, RUN_GENERATOR, file_sha256, write_json_atomic
from fedspine.privacy.accounting import (
    PLAN_ACCOUNTANT,
    REPORT_ACCOUNTANT,
    Mechanism,
    epsilon,
    epsilon_curve,
    plot_epsilon_curve,
)

PRIVACY_FILE = PRIVACY_SUMMARY
GENERATOR_FILE = RUN_GENERATOR
FORMAT = "fedspine-privacy/1"
PRNG_NOTE = (
    "DP noise and the Poisson draws of patients come from torch's and numpy's pseudo-random "
    "generators, seeded from OS entropy for every run (never from the recorded seed): no "
    "cryptographically secure generator (torchcsprng) is installable here, so the guarantee "
    "assumes an attacker cannot predict those generators' state."
)
FORMATS = ("md", "json", "html")


class PrivacyReportError(Exception):
    """The run has no readable privacy summary; the message says what to do."""


def describe_unit(unit: str | None) -> str:
    """The privacy unit in words: VinDr's study is a patient proxy, an image may not be a person."""
    parts = [p.strip() for p in str(unit or "?").split("/")]
    return " / ".join(UNIT_DESCRIPTIONS.get(p, p) for p in parts)


def site_entry(
    epsilon: float,
    delta: float,
    mechanisms: Sequence[dict[str, Any]],
    *,
    unit: str,
    patients: int,
    ledger_complete: bool = True,
    epsilon_per_round: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """One site's part of ``privacy.json``: ε of its worst patient, and every mechanism on its
    patients (noise_multiplier, sample_rate, steps, clip). No fingerprint of the data: the
    patient count is treated as public, as in Opacus."""
    return {
        "epsilon": float(epsilon),
        "delta": float(delta),
        "unit": str(unit),
        "patients": int(patients),
        "ledger_complete": bool(ledger_complete),
        "mechanisms": [dict(m) for m in mechanisms],
        "epsilon_per_round": [dict(r) for r in epsilon_per_round],
    }


def write_privacy_summary(
    run: str | os.PathLike,
    sites: dict[str, dict[str, Any]],
    components: dict[str, str],
    accountant: str = REPORT_ACCOUNTANT,
    not_private_reasons: Sequence[str] = (),
    unit: str = "patient",
    run_id: str | None = None,
) -> Path:
    """Write ``RUN/privacy.json`` atomically. A run with any reason listed is not private.

    It binds itself to ``RUN/generator.pt`` where that exists (its SHA-256), so a release can
    refuse any other generator put in its place.
    """
    deltas = {float(s["delta"]) for s in sites.values()}
    generator = Path(run) / GENERATOR_FILE
    data = {
        "format": FORMAT,
        "fedspine_version": __version__,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "private": not not_private_reasons and bool(sites),
        "not_private_reasons": list(not_private_reasons),
        "accountant": accountant,
        "delta": max(deltas) if deltas else None,
        "unit": unit,
        "run_id": run_id,
        "generator_sha256": file_sha256(generator) if generator.is_file() else None,
        "sites": sites,
        "components": dict(components),
        "prng": PRNG_NOTE,
    }
    return write_json_atomic(Path(run) / PRIVACY_FILE, data)


def read_privacy_summary(run: str | os.PathLike) -> dict[str, Any]:
    """``RUN/privacy.json``, checked to be fedspine's format."""
    path = Path(run) / PRIVACY_FILE
    if not path.is_file():
        raise PrivacyReportError(
            f"{path}: missing; this run has no privacy summary (was it trained by fedspine "
            "with or without --dp?)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PrivacyReportError(f"{path}: not valid JSON ({err})") from None
    if data.get("format") != FORMAT:
        raise PrivacyReportError(f"{path}: unknown format {data.get('format')!r}")
    return data


def build_report(run: str | os.PathLike) -> dict[str, Any]:
    """The report's content: the summary plus ε recomputed from each site's mechanisms."""
    summary = read_privacy_summary(run)
    sites = {}
    for name, site in summary["sites"].items():
        mechanisms = [_mechanism(m) for m in site.get("mechanisms", [])]
        recomputed = (
            epsilon(mechanisms, float(site["delta"]), summary.get("accountant", REPORT_ACCOUNTANT))
            if mechanisms
            else None
        )
        sites[name] = {**site, "epsilon_recomputed": recomputed}
    eps = [s["epsilon"] for s in sites.values() if s.get("epsilon") is not None]
    return {
        **summary,
        "sites": sites,
        "overall_epsilon": max(eps) if eps else None,
        "overall_note": (
            "The released generator is (max over sites ε, δ)-DP when no patient is at two sites: "
            "each site's data is touched only by its own DP-SGD steps, and averaging is "
            "post-processing."
        ),
        "run": Path(run).name,
        "report_fedspine_version": __version__,
        "_mechanisms": {
            n: [Mechanism(**_mech_args(m)) for m in s.get("mechanisms", [])]
            for n, s in sites.items()
        },
    }


def _mech_args(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "noise_multiplier": float(m["noise_multiplier"]),
        "sample_rate": float(m["sample_rate"]),
        "steps": int(m["steps"]),
        "label": str(m.get("label", "gan-discriminator")),
    }


def _mechanism(m: dict[str, Any]) -> Mechanism:
    return Mechanism(**_mech_args(m))


def plot_report(report: dict[str, Any], path: Path) -> Path | None:
    """ε against steps per site (the accountant's curve) as a PNG at ``path``; None without
    mechanisms."""
    curves = {}
    for name, mechanisms in report["_mechanisms"].items():
        if mechanisms:
            curves[name] = epsilon_curve(
                mechanisms, float(report["sites"][name]["delta"]), PLAN_ACCOUNTANT
            )
    if not curves:
        return None
    return plot_epsilon_curve(curves, path)
