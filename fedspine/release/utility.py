"""Whether the released generator carries any signal: the TSTR verdict of a ``fedspine evaluate``.

A generator can pass every privacy gate and still be useless: one at chance carries no class
signal however small its ε. ``make_release`` therefore takes an optional evaluation folder
(``--evaluation EVAL``, what ``fedspine evaluate`` wrote) and states its TSTR verdict on the
console. The evaluation must have judged this very generator: its synthetic set's
``generation.json`` (kept in ``report.json`` as ``inputs.synthetic.generation``) must name the
released ``generator.pt``'s SHA-256 under ``generator_sha256``; an evaluation of another
generator, of a set with no such record, or a folder that is not an evaluation is refused before
anything is generated or written.

The TSTR figures (AUC, intervals, signal retained, test counts) are computed on the steward's
real test images, outside the DP guarantee, so they stay with the steward like the audits'
figures. The release's privacy report records only the coarse category (one of
:data:`UTILITY_CATEGORIES`, about 1.6 bits, assumed leaked) and the generator it judged; without
an evaluation it says that utility was not evaluated.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from fedspine.evaluation.classification import utility_verdict
from fedspine.evaluation.records import UtilityResult, read_evaluation
from fedspine.fileio import EVAL_REPORT_JSON
from fedspine.formatting import auc_ci
from fedspine.release.errors import ReleaseError

UTILITY_ARM = "TSTR"
UTILITY_CATEGORIES = ("signal above chance", "no evidence of signal", "worse than chance")
"""The coarse verdicts of :func:`~fedspine.evaluation.classification.utility_verdict`, the only
utility a release records."""
UTILITY_OUTSIDE_DP = (
    "the utility category is computed from a classifier trained on the synthetic images and "
    "scored on the steward's real test images, outside the DP guarantee: it is assumed to leak "
    "what it says, one of three categories (about 1.6 bits); the evaluation's figures stay with "
    "the data steward"
)
UTILITY_NOT_EVALUATED = (
    "utility was not evaluated: nothing shows that the synthetic images carry any class signal "
    "(a generator at chance carries none, however private it is)"
)


@dataclass(frozen=True)
class ReleaseUtility:
    """The TSTR utility of the released generator, or the fact that it was not evaluated.

    ``result`` (the evaluation's figures) is the steward's; only :meth:`report_entry` goes into
    the release.
    """

    evaluation: Path | None = None
    generator_sha256: str | None = None
    result: UtilityResult | None = None
    category: str | None = None
    verdict: str | None = None

    @property
    def evaluated(self) -> bool:
        return self.result is not None

    def report_entry(self) -> dict:
        """``privacy_report.json``'s ``utility``: the category and the generator it judged only."""
        if not self.evaluated:
            return {"evaluated": False, "statement": UTILITY_NOT_EVALUATED}
        return {
            "evaluated": True,
            "arm": UTILITY_ARM,
            "category": self.category,
            "generator_sha256": self.generator_sha256,
            "outside_dp": UTILITY_OUTSIDE_DP,
        }

    def console_line(self, release: str | os.PathLike = "RELEASE") -> str:
        """One console line: the verdict with its figures, or how to evaluate."""
        if not self.evaluated:
            return (
                f"{UTILITY_NOT_EVALUATED}. Evaluate a synthetic set of this generator (the "
                f"release's {Path(release).name}/synthetic, or one from `fedspine generate RUN`) "
                "against the real test split: `fedspine evaluate --synthetic SYNTHETIC --train "
                "PREPARED --test PREPARED --out EVAL`, then release again with --evaluation EVAL"
            )
        assert self.result is not None and self.evaluation is not None
        return (
            f"utility (from {self.evaluation.name}, on the real test split): {UTILITY_ARM} AUC "
            f"{auc_ci(self.result.auc, self.result.ci)}; {self.verdict}. The release records "
            f"only '{self.category}'; these figures stay with the steward"
        )


def read_utility(evaluation: str | os.PathLike, generator_sha256: str) -> ReleaseUtility:
    """The TSTR utility of ``evaluation`` (a ``fedspine evaluate`` folder), checked to have
    judged the generator whose SHA-256 is ``generator_sha256``; ReleaseError otherwise."""
    folder = Path(evaluation)
    where = f"--evaluation {folder}"
    redo = (
        "give the folder `fedspine evaluate --synthetic SYNTHETIC ... --out EVAL` wrote for a "
        "synthetic set of this run's generator.pt (or leave --evaluation out)"
    )
    report = folder / EVAL_REPORT_JSON
    if not report.is_file():
        raise ReleaseError(f"{where} is not an evaluation folder (no {EVAL_REPORT_JSON}); {redo}")
    try:
        record = read_evaluation(report)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ReleaseError(f"{where}: {EVAL_REPORT_JSON} cannot be read ({err}); {redo}") from None
    synthetic = record.inputs.synthetic if record.inputs else None
    if synthetic is None:
        raise ReleaseError(
            f"{where}: {EVAL_REPORT_JSON} records no synthetic input, so it is not an evaluation "
            f"of a generator; {redo}"
        )
    generation = synthetic.generation if isinstance(synthetic.generation, dict) else {}
    judged = generation.get("generator_sha256")
    if not isinstance(judged, str) or not judged:
        raise ReleaseError(
            f"{where}: its synthetic set names no generator (no generator_sha256 in the "
            "generation.json it recorded), so nothing ties it to this release's generator; "
            f"{redo}"
        )
    if judged.lower() != generator_sha256.lower():
        raise ReleaseError(
            f"{where} judged generator {judged[:12]}, not this release's generator.pt "
            f"{generator_sha256[:12]}; {redo}"
        )
    arms = (record.utility.arms if record.utility else None) or {}
    result = arms.get(UTILITY_ARM)
    if not _complete(result):
        raise ReleaseError(
            f"{where}: no {UTILITY_ARM} utility result with a 95 % interval (utility.arms."
            f"{UTILITY_ARM} of {EVAL_REPORT_JSON}); rerun `fedspine evaluate` on this generator's "
            "synthetic set against the real test split"
        )
    assert result is not None
    verdict = utility_verdict(result.to_json(), UTILITY_ARM)
    category = next((c for c in UTILITY_CATEGORIES if verdict.startswith(c)), None)
    if category is None:  # utility_verdict's wording changed: fail loudly, never guess
        raise ReleaseError(f"{where}: unrecognised {UTILITY_ARM} verdict {verdict!r}")
    return ReleaseUtility(
        evaluation=folder,
        generator_sha256=generator_sha256,
        result=result,
        category=category,
        verdict=verdict,
    )


def _complete(result: UtilityResult | None) -> bool:
    """An arm's result holds a finite AUC, a two-sided interval and the chance flag."""
    if result is None or not isinstance(result.ci_contains_chance, bool):
        return False
    numbers = [result.auc, *(result.ci or [])]
    return (
        isinstance(result.ci, list)
        and len(result.ci) == 2
        and all(isinstance(v, int | float) and math.isfinite(v) for v in numbers)
    )


__all__ = [
    "UTILITY_ARM",
    "UTILITY_CATEGORIES",
    "UTILITY_NOT_EVALUATED",
    "UTILITY_OUTSIDE_DP",
    "ReleaseUtility",
    "read_utility",
]
