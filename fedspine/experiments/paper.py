"""The paper's published numbers and its seven errors, as data.

Schonfeld & Veeravagu (arXiv:2205.02843; Sci. Rep. 2023; reference/paper.md) published a few
AUCs and no numbers for most arms; :data:`PAPER` holds what they published, derived values
marked as such. :data:`PAPER_ERRORS` lists each of the seven errors of their pipeline: what the
paper did, what fedspine does instead, and which arm kinds show the correction. The note each
error gets in ``reproduce.md`` says whether this run exercised the correction, from the arms'
results (:func:`error_notes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedspine.experiments.budgets import ReproduceBudget
from fedspine.experiments.plan import DP_ARM_PREFIX, ArmKind
from fedspine.experiments.record import ErrorNote
from fedspine.experiments.summaries import is_replicate, status
from fedspine.fileio import PREPARED_REJECTED, PRIVACY_SUMMARY
from fedspine.formatting import num

# What the paper published (reference/paper.md); derived values are marked as such.
PAPER = {
    "trtr": "0.856 (journal); 0.886 (preprint)",
    "cgan_tstr": "0.814",
    "cgan_ratio": "0.951 (derived: 0.814 / 0.856, journal TRTR) or 0.919 (derived: "
    "0.814 / 0.886, preprint TRTR)",
    "cgan_signal": "0.882 (derived: (0.814 − 0.5) / (0.856 − 0.5), journal TRTR)",
    "mixed": "trained, no AUC published",
    "cgan_metrics": "no numbers published",
    "lesion": "trained, no AUC published",
    "spinegan_tstr": "0.830",
    "spinegan_ratio": "0.970 (derived: 0.830 / 0.856, journal TRTR) or 0.937 (derived: "
    "0.830 / 0.886, preprint TRTR)",
    "spinegan_signal": "0.927 (derived: (0.830 − 0.5) / (0.856 − 0.5), journal TRTR)",
    "spinegan_metrics": "higher FID, lower precision, higher recall than the cGAN (no numbers)",
    "dp": '"differential privacy impositions severely impede GAN training" (no numbers)',
    "dp_ablation": "ablated clipping, noise and micro-batch of 1; blamed the failure on the "
    "noise (no numbers)",
    "dp_paper": '"severely impede GAN training"; its ε never stated (error 6)',
}


@dataclass(frozen=True)
class RunOutcome:
    """What an error's note may depend on: the budget, the arms' records and the data."""

    budget: ReproduceBudget
    results: dict[str, dict[str, Any]]
    data_info: dict[str, dict[str, Any]]

    def arm(self, name: str) -> dict[str, Any]:
        """The record of the arm folder ``name``; empty when it is not in the results."""
        return self.results.get(name, {})

    def done(self, name: str) -> bool:
        """Whether the arm folder ``name`` completed."""
        return self.arm(name).get("status") == "done"


@dataclass(frozen=True)
class PaperError:
    """One of the paper's errors: what it did, what fedspine does, which arms show it.

    ``error`` is what the paper did (the heading in ``reproduce.md``); ``demonstrated_by`` the
    arm kinds whose results show the correction (every arm shares the data stage and the
    evaluation, so errors 1-4 name the cGAN). ``note`` words what this run did about it from the outcome; without one the note is
    ``fedspine_does`` as it stands (a correction every arm has, such as the label rule).
    """

    error: str
    fedspine_does: str
    demonstrated_by: tuple[ArmKind, ...]
    note: Callable[[RunOutcome], str] | None = None

    def here(self, outcome: RunOutcome) -> str:
        """What this reproduction did about the error, as ``reproduce.md`` says it."""
        return self.note(outcome) if self.note else self.fedspine_does


def error_notes(
    budget: ReproduceBudget,
    results: dict[str, dict[str, Any]],
    data_info: dict[str, dict[str, Any]],
) -> list[ErrorNote]:
    """Which of the paper's seven errors each of our settings corrects, in this run's words."""
    outcome = RunOutcome(budget, results, data_info)
    return [ErrorNote(e.error, e.here(outcome)) for e in PAPER_ERRORS]


def _decoding_note(o: RunOutcome) -> str:
    ab = o.data_info.get("abnormality", {})
    return (
        "Corrected: every file is decoded with the pylibjpeg plugins; "
        f"{ab.get('images', '?')} decoded, {ab.get('rejected', '?')} rejected, each "
        f"rejection listed with its reason in {PREPARED_REJECTED}."
    )


def _clinical_input_note(o: RunOutcome) -> str:
    if o.done("spinegan"):
        return (
            "Corrected: SpineGAN's frozen classifier receives the generator's output mapped to "
            "its own training input ([0, 1], resized to its input size) — `fedspine train "
            "--model spinegan` with the default `--clinical-input default`."
        )
    return (
        f"Not exercised in this run (SpineGAN arm: {status(o.arm('spinegan'))}). "
        "`fedspine train --model spinegan` maps the generator output to the classifier's "
        "own [0, 1] resized input by default."
    )


def _dp_note(o: RunOutcome) -> str:
    from_dp = [
        r
        for n, r in o.results.items()
        if n.startswith(DP_ARM_PREFIX) and not is_replicate(n) and r["status"] == "done"
    ]
    if from_dp:
        text = (
            "Corrected: DP-SGD on the discriminator only, per-patient clipping then Gaussian "
            "noise N(0, σ²C²), Poisson sampling of patients, no minibatch-std, fixed ADA p, "
            "fake labels from a public prior; σ calibrated to the target ε and the ε spent "
            f"read back from each run's {PRIVACY_SUMMARY} (PRV accountant). Arms: "
            + ", ".join(
                f"target {r['epsilon_target']:g} → spent {num(r['privacy'].get('epsilon'), 2)}"
                for r in from_dp
            )
            + ". Each arm has its own ledger: they are separate experiments, and releasing "
            "several would compose their ε."
        )
    else:
        text = (
            "Not exercised in this run: no DP arm completed. `fedspine train --dp` is real "
            "DP-SGD with accounting."
        )
    paper_arm = o.arm("dp_paper")
    accounting = ((paper_arm.get("ablation") or {}).get("accounting") or {}) if paper_arm else {}
    if paper_arm.get("status") == "done" and accounting.get("epsilon") is not None:
        text += (
            " The paper's scheme itself ran as the arm `dp_paper` (`fedspine train --dp-scheme "
            f"paper`), marked not private; standard accounting gives it ε = "
            f"{accounting['epsilon']:.3g} here ({accounting['accountant'].upper()}, per image)."
        )
    if any(o.done(n) for n in ("dp_clip_only", "dp_noise_only")):
        text += (
            " Its clipping-only / noise-only ablation is redone with DP-SGD's own clipping and "
            "noise (arms `dp_clip_only`, `dp_noise_only`; ε = ∞, not private)."
        )
    return text


def _private_classifier_note(o: RunOutcome) -> str:
    if o.done("dp_spinegan"):
        p = o.arm("dp_spinegan").get("privacy", {})
        return (
            "Corrected in the `dp_spinegan` arm: its clinical classifier was trained with "
            f"patient-level DP-SGD (target ε = {o.budget.dp_spinegan_classifier_epsilon:g}), "
            "and the DP SpineGAN composed with it in one ledger, so ε = "
            f"{num(p.get('epsilon'), 2)} covers both. "
            + (
                "The `spinegan` arm beside it is the paper's non-private comparison and its "
                f"{PRIVACY_SUMMARY} says so."
                if o.done("spinegan")
                else ""
            )
        ).strip()
    if o.done("spinegan"):
        return (
            "Not corrected in the `spinegan` arm, and said so: it is the paper's comparison, not "
            "private (no DP), and its classifier was trained on the real images, which its "
            f"{PRIVACY_SUMMARY} records. The DP arms have no clinical loss, so no classifier "
            "touches their generator."
        )
    return (
        "Not exercised (no SpineGAN arm ran). The DP arms have no clinical loss, so no "
        "classifier trained on real images steers their generator."
    )


# The seven errors, in the order of reference/paper.md.
PAPER_ERRORS: tuple[PaperError, ...] = (
    PaperError(
        error="Labels: a single-row lesion was called normal.",
        fedspine_does="Corrected: ingest with label rule `correct` (abnormal iff any "
        "lesion_type ≠ 'No finding').",
        demonstrated_by=(ArmKind.CGAN,),
    ),
    PaperError(
        error="Decoding: undecodable DICOMs were skipped silently (3,773 of ~8,400).",
        fedspine_does="Corrected: every file is decoded with the pylibjpeg plugins; each "
        f"rejection is listed with its reason in {PREPARED_REJECTED}.",
        demonstrated_by=(ArmKind.CGAN,),
        note=_decoding_note,
    ),
    PaperError(
        error="Intensities: no rescale, VOI LUT/window or MONOCHROME1 inversion.",
        fedspine_does="Corrected: decoding applies the Modality LUT (rescale slope/intercept), "
        "the VOI LUT or window, and MONOCHROME1 inversion before the centre crop and resize.",
        demonstrated_by=(ArmKind.CGAN,),
    ),
    PaperError(
        error="Model selection on the test set.",
        fedspine_does="Corrected: every classifier (TRTR, TSTR, mixed, SpineGAN's) chooses its "
        "epoch and threshold on a validation split carved by patient from the training "
        "data; the test split gives the final numbers only.",
        demonstrated_by=(ArmKind.CGAN, ArmKind.SPINEGAN),
    ),
    PaperError(
        error="SpineGAN's classifier input: [-1, 1] values and a centre crop.",
        fedspine_does="Corrected: the frozen classifier receives the generator's output mapped "
        "to its own training input ([0, 1], resized), `--clinical-input default`.",
        demonstrated_by=(ArmKind.SPINEGAN,),
        note=_clinical_input_note,
    ),
    PaperError(
        error="'DP' was noise-then-clip on G and D, batch 1 (ε ≈ 10^10).",
        fedspine_does="Corrected: DP-SGD on the discriminator with patient-level accounting; "
        "the paper's scheme and its clip-only / noise-only ablation run beside it, not private.",
        demonstrated_by=(ArmKind.DP, ArmKind.PAPER, ArmKind.CLIP_ONLY, ArmKind.NOISE_ONLY),
        note=_dp_note,
    ),
    PaperError(
        error="The clinical classifier saw real images.",
        fedspine_does="Corrected: the DP SpineGAN's clinical classifier is trained with "
        "DP-SGD and composed with the GAN in one ledger.",
        demonstrated_by=(ArmKind.DP_SPINEGAN,),
        note=_private_classifier_note,
    ),
)
