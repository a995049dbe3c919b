"""Typed views of what the privacy engine and the release write: privacy.json and
privacy_report.json, as the renderers read them.

They live in the reporting layer, not in ``fedspine.privacy``: the engine writes these files
from its own ledger rows (``privacy.report.write_privacy_summary``), and the records exist so
that the Markdown and HTML renderers read typed fields instead of string keys. Every field is
optional, because the HTML page reads whatever folder it is given (an older privacy.json, one
written by hand); keys this version does not know are ignored, and keys written only when set
are named in ``OPTIONAL`` so that ``to_json()`` reproduces what the engine wrote.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fedspine.evaluation.records import JsonRecord
from fedspine.fileio import PRIVACY_SUMMARY


@dataclass(frozen=True)
class MechanismRecord(JsonRecord):
    """One DP mechanism applied to a site's patients: σ, q, steps and the clipping norm."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"label", "clip_norm", "cap", "target_epsilon", "state", "run_id", "round", "unit"}
    )

    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    clip_norm: float | None = None
    label: str | None = None
    cap: float | None = None
    target_epsilon: float | None = None
    state: str | None = None
    run_id: str | None = None
    round: int | None = None
    unit: str | None = None


@dataclass(frozen=True)
class RoundEpsilon(JsonRecord):
    """ε a site had spent after one federated round."""

    round: int | None = None
    epsilon: float | None = None


@dataclass(frozen=True)
class PhaseSpend(JsonRecord):
    """ε of one phase (SpineGAN's clinical classifier, then the GAN) at one site."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"rounds", "clip_norm"})

    epsilon: float | None = None
    steps: int | None = None
    rounds: list[int] | None = None
    clip_norm: float | None = None


@dataclass(frozen=True)
class SitePrivacy(JsonRecord):
    """One site's entry of privacy.json; ``epsilon_recomputed`` only in the privacy report."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"cap", "phases", "dataset_hash", "epsilon_recomputed"}
    )

    epsilon: float | None = None
    delta: float | None = None
    unit: str | None = None
    patients: int | None = None
    ledger_complete: bool | None = None
    mechanisms: list[MechanismRecord] | None = None
    epsilon_per_round: list[RoundEpsilon] | None = None
    cap: float | None = None
    phases: dict[str, PhaseSpend] | None = None
    dataset_hash: str | None = None
    epsilon_recomputed: float | None = None

    @property
    def steps(self) -> int:
        """Steps of every mechanism together."""
        return sum(int(m.steps or 0) for m in self.mechanisms or [])


@dataclass(frozen=True)
class PrivacySummary(JsonRecord):
    """A run's ``privacy.json``: whether it is private, per site ε and what was public."""

    format: str | None = None
    fedspine_version: str | None = None
    written: str | None = None
    private: bool | None = None
    not_private_reasons: list[str] | None = None
    accountant: str | None = None
    delta: float | None = None
    unit: str | None = None
    run_id: str | None = None
    generator_sha256: str | None = None
    sites: dict[str, SitePrivacy] | None = None
    components: dict[str, str] | None = None
    prng: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrivacySummary:
        """Read the summary; a site entry that is not an object is skipped."""
        sites = data.get("sites") if isinstance(data.get("sites"), dict) else {}
        kept = {k: v for k, v in sites.items() if isinstance(v, dict)}
        return super().from_json({**data, "sites": kept})


@dataclass(frozen=True)
class PrivacyReport(PrivacySummary):
    """``fedspine privacy report``'s content: the summary, ε recomputed per site, the overall ε."""

    overall_epsilon: float | None = None
    overall_note: str | None = None
    run: str | None = None
    report_fedspine_version: str | None = None


def read_privacy_record(run: str | os.PathLike) -> PrivacySummary:
    """A run folder's privacy.json as a record (the file must exist and be JSON)."""
    return PrivacySummary.from_json(json.loads((Path(run) / PRIVACY_SUMMARY).read_text()))
