"""Tables that appear in more than one report, built once as rows of text cells.

The Markdown report and the HTML page draw the same cells, so a number reads the same in both.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedspine.evaluation.records import ArmRecord, EvaluationRecord, TrainData
from fedspine.formatting import auc_ci, num
from fedspine.reporting.privacy_records import PrivacySummary, SitePrivacy

ARM_HEAD = ("arm", "trained on", "test AUC [95 % CI]", "sensitivity", "specificity")
"""The columns every arms table starts with; each renderer adds its checkpoint column(s)."""


def train_text(train_data: TrainData | None) -> str:
    """What an arm trained on, in words: "120 real + 200 synthetic"."""
    if train_data is None:
        return "?"
    parts = []
    if train_data.real_train:
        parts.append(f"{train_data.real_train} real")
    if train_data.synthetic:
        parts.append(f"{train_data.synthetic} synthetic")
    return " + ".join(parts) or "?"


def arm_cells(name: str, arm: ArmRecord) -> list[str]:
    """The ARM_HEAD cells of one arm."""
    return [
        name,
        train_text(arm.train_data),
        auc_ci(arm.auc, arm.ci),
        num(arm.sensitivity),
        num(arm.specificity),
    ]


def arms_of(report: EvaluationRecord) -> dict[str, ArmRecord]:
    """The arms in report order (none in a record without them)."""
    return dict(report.arms or {})


def per_output_auc(arm: ArmRecord, output: str) -> str:
    """One arm's AUC [CI] on one output of a multi-output task."""
    score = (arm.per_output or {}).get(output)
    return "n/a" if score is None else auc_ci(score.auc, score.ci)


def counts_text(counts: dict[str, int] | None) -> str:
    """Class counts as "normal: 30, abnormal: 20"."""
    return ", ".join(f"{name}: {n}" for name, n in (counts or {}).items())


# A SpineGAN federation spends ε in two phases; their columns show each alone beside the total.
PHASE_COLUMNS = (("classifier", "classifier ε"), ("gan", "GAN ε"))


def phase_cells(site: SitePrivacy) -> list[str]:
    """One cell per PHASE_COLUMNS: "ε (n steps)" of that phase at this site, "-" where none."""
    phases = site.phases or {}
    cells = []
    for key, _ in PHASE_COLUMNS:
        phase = phases.get(key)
        if phase is None:
            cells.append("-")
        else:
            steps = "?" if phase.steps is None else phase.steps
            cells.append(f"{num(phase.epsilon)} ({steps} steps)")
    return cells


def privacy_site_table(summary: PrivacySummary) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-site privacy table: ε (and each phase's, when a site has
    phases), δ, the distinct σ, clipping norms and sample rates, steps, ledger complete."""
    sites = summary.sites or {}
    phased = any(site.phases for site in sites.values())
    header = [
        "site",
        *(["ε (total)", *(label for _, label in PHASE_COLUMNS)] if phased else ["ε"]),
        "δ",
        "σ",
        "clip C",
        "sample rate q",
        "steps",
        "ledger complete",
    ]
    rows = []
    for name, site in sites.items():
        mechs = site.mechanisms or []
        rows.append(
            [
                name,
                num(site.epsilon),
                *(phase_cells(site) if phased else []),
                general(site.delta),
                _distinct(general(m.noise_multiplier) for m in mechs),
                _distinct(general(m.clip_norm) for m in mechs),
                _distinct(general(m.sample_rate) for m in mechs),
                str(site.steps),
                "yes" if site.ledger_complete is True else "NO",
            ]
        )
    return header, rows


def general(value: object) -> str:
    """A number at 4 significant digits (δ, σ, q), or "n/a"."""
    return num(value, 4, "g")


def _distinct(values: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(values)) or "-"
