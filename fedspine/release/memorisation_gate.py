"""Gate 7 of a release (listed in :mod:`fedspine.release.gate`): the memorisation gate.

The synthetic set is generated first, in the staging folder, and compared in raw pixels (at the
generator's resolution) with the audit data's labelled ``train`` split (what the generator saw)
and its labelled ``val`` + ``test`` splits (held out). The threshold t is the ``percentile``-th
percentile (default 1st, linear interpolation) of the held-out images' distances to their
nearest training image: how close two distinct real images of this distribution naturally come.
A synthetic image is *flagged* when its distance to its nearest training image is <= t. For m
held-out images the share flagged among draws that behave like unseen real images is expected to
be ``e = ((m - 1) q + 1) / (m + 1)`` (q = percentile / 100; the expected CDF value of the
interpolated order statistic, about q for large m). With n synthetic images the release is
refused when the flagged share exceeds ``max_ratio * e + z * sqrt(e (1 - e) / n)`` (defaults:
max_ratio 2, z 3 binomial standard errors). At least ``min_heldout`` (20) held-out images are
required. A generator that copies training images puts them at distance 0 and is refused; one
whose images are no closer to training images than unseen real ones passes. Pixel distances
favour blurry, mean-like images (the mean lies closer to every image than two images lie to each
other), so a collapsed generator can be refused without copying anyone; the steward's
closest-pairs figure shows which case it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedspine.evaluation.memorisation import memorisation_audit
from fedspine.release.errors import ReleaseRefused

MEMORISATION_RULE = (
    "threshold = percentile-th percentile of held-out real images' distances to their closest "
    "training image; flagged = synthetic images whose distance to their closest training image "
    "is <= threshold; expected = ((m-1)q+1)/(m+1) for m held-out images, q = percentile/100; "
    "refused when the flagged share > max_ratio*expected + z*sqrt(expected*(1-expected)/n) "
    "for n synthetic images"
)


@dataclass
class MemorisationGate:
    """The memorisation gate's settings (see the module docstring for the rule)."""

    percentile: float = 1.0
    max_ratio: float = 2.0
    z: float = 3.0
    min_heldout: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.percentile < 100:
            raise ValueError(f"percentile must lie in (0, 100), got {self.percentile}")
        if self.max_ratio < 1 or self.z < 0 or self.min_heldout < 2:
            raise ValueError("need max_ratio >= 1, z >= 0 and min_heldout >= 2")


@dataclass
class GateDecision:
    """The memorisation gate's numbers; ``passed`` is the verdict."""

    passed: bool
    threshold: float
    flagged: int
    n_synthetic: int
    n_train: int
    n_heldout: int
    share_flagged: float
    expected_share: float
    allowed_share: float
    gate: MemorisationGate

    def reason(self) -> str:
        return (
            f"memorisation audit: {self.share_flagged:.1%} of synthetic images "
            f"({self.flagged} of {self.n_synthetic}) lie closer to a training image than "
            f"{100 - self.gate.percentile:g} % of held-out real images do "
            f"(allowed {self.allowed_share:.1%}, expected by chance {self.expected_share:.1%})"
        )

    def summary(self) -> dict:
        return {
            "passed": self.passed,
            "threshold": self.threshold,
            "flagged": self.flagged,
            "n_synthetic": self.n_synthetic,
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "share_flagged": self.share_flagged,
            "expected_share": self.expected_share,
            "allowed_share": self.allowed_share,
            "settings": asdict(self.gate),
            "rule": MEMORISATION_RULE,
        }


def memorisation_gate(
    synthetic: np.ndarray,
    train: np.ndarray,
    heldout: np.ndarray,
    gate: MemorisationGate | None = None,
) -> tuple[GateDecision, Any]:
    """Apply the memorisation rule (module docstring) in raw pixels.

    Returns the decision and the :class:`~fedspine.evaluation.memorisation.MemorisationResult`
    it was computed from. Images are uint8 or float [0, 1], all of one size.
    """
    gate = gate or MemorisationGate()
    if len(heldout) < gate.min_heldout:
        raise ReleaseRefused(
            f"memorisation audit: {len(heldout)} held-out (val/test) images in --audit-data; "
            f"the calibration needs at least {gate.min_heldout}"
        )
    if len(train) == 0 or len(synthetic) == 0:
        raise ReleaseRefused("memorisation audit: no training or no synthetic images to compare")
    result = memorisation_audit(synthetic, train, heldout, extractor="pixels")
    threshold = float(np.percentile(result.heldout_to_train, gate.percentile))
    flagged = int(np.sum(result.syn_to_train <= threshold))
    n, m, q = len(synthetic), len(heldout), gate.percentile / 100.0
    expected = ((m - 1) * q + 1) / (m + 1)
    allowed = gate.max_ratio * expected + gate.z * math.sqrt(expected * (1 - expected) / n)
    share = flagged / n
    decision = GateDecision(
        passed=share <= allowed,
        threshold=threshold,
        flagged=flagged,
        n_synthetic=n,
        n_train=int(len(train)),
        n_heldout=m,
        share_flagged=share,
        expected_share=expected,
        allowed_share=allowed,
        gate=gate,
    )
    return decision, result
