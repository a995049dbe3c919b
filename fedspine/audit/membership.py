"""Membership inference from the synthetic set alone: could an outsider tell who was trained on?

The attacker holds only the released synthetic images and a candidate real image, and guesses
"member" when the candidate lies close to the synthetic set (the full black-box attack of Chen
et al., GAN-Leaks, CCS 2020; the Monte-Carlo attack of Hilprecht et al., PoPETs 2019). Two
scores, both larger = more likely a member:

- ``nearest``: minus the distance from the candidate to its nearest synthetic image;
- ``monte_carlo``: the fraction of synthetic images within a ball of radius r around the
  candidate, r being the median of all candidates' nearest-synthetic distances (so about half
  the candidates have a non-zero count).

The audit scores the audit data's training images (members) and held-out images (non-members)
and reports, per score, the ROC AUC (0.5 = no better than chance) and the true-positive rate at
1 % false-positive rate. With fewer than 100 non-members the 1 % point means "no false
positives at all" and is coarse.

What the numbers show: how well this one attack, on this release, tells these members from these
non-members. It is an empirical measurement, not a guarantee, and no formal bound follows from
the generator's DP ε. DP bounds a hypothesis test about ONE individual's inclusion: for any one
patient, telling a release trained with them from one trained without them. This audit instead
compares two populations (the training images against different, held-out people, each scored
once against one release), so its TPR and AUC are not such a test and ε caps neither of them;
they also move with any difference between the two sets besides membership (patients, sites,
acquisition). A high AUC or TPR at low FPR is evidence that the release reveals who was trained
on (or that the sets differ); a low AUC is evidence, not proof, of privacy: this attack with
these features found nothing, and a stronger attack might.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from fedspine.evaluation.features import FeatureExtractor, as_float_images, extract
from fedspine.evaluation.generative import distance_blocks
from fedspine.evaluation.memorisation import nearest_distances

FPR_TARGET = 0.01
PIXELS_NAME = "raw pixels (flattened, full resolution)"


@dataclass
class MembershipResult:
    """AUC and TPR at 1 % FPR of both attacks; ``summary()`` is JSON-ready.

    Empirical results of these attacks on one release: no DP-derived bound applies to them (see
    the module doc), and a value near chance is evidence, not proof, of privacy.
    """

    features: str
    n_synthetic: int
    n_members: int
    n_nonmembers: int
    auc: float
    tpr_at_1pct_fpr: float
    mc_auc: float
    mc_tpr_at_1pct_fpr: float
    mc_radius: float

    def summary(self) -> dict:
        return {
            "attack": "synthetic-only membership inference (GAN-Leaks full black-box; "
            "Hilprecht et al. Monte-Carlo)",
            "features": self.features,
            "n_synthetic": self.n_synthetic,
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "nearest": {"auc": self.auc, "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr},
            "monte_carlo": {
                "auc": self.mc_auc,
                "tpr_at_1pct_fpr": self.mc_tpr_at_1pct_fpr,
                "radius": self.mc_radius,
            },
            "interpretation": (
                "members: the audit data's training images; non-members: held-out images. "
                "An empirical attack on this release, not a guarantee: AUC 0.5 and TPR@1%FPR "
                "near 0.01 mean this attack could not tell them apart, which is evidence, not "
                "proof, of privacy (a stronger attack might); the generator's DP ε gives no "
                "formal bound on this population-level TPR or AUC, since DP bounds a test about "
                "one individual's inclusion"
            ),
        }


def membership_audit(
    synthetic: np.ndarray | torch.Tensor,
    members: np.ndarray | torch.Tensor,
    nonmembers: np.ndarray | torch.Tensor,
    features: FeatureExtractor | Literal["pixels"] = "pixels",
    batch: int = 64,
) -> MembershipResult:
    """Run both synthetic-only attacks on members vs non-members: an empirical measurement on
    this release, with no DP-derived bound on its results (see the module doc).

    Images are uint8 or float [0, 1], ``[N, H, W]`` or ``[N, 1, H, W]``; raw-pixel features need
    one image size for all three sets.
    """
    sizes = (len(synthetic), len(members), len(nonmembers))
    if min(sizes) == 0:
        raise ValueError(
            "membership audit needs synthetic, member and non-member images; got {}, {}, {}".format(
                *sizes
            )
        )
    name, f_syn, f_mem, f_non = _embed(features, batch, synthetic, members, nonmembers)
    candidates = np.concatenate([f_mem, f_non])
    is_member = np.r_[np.ones(len(f_mem), bool), np.zeros(len(f_non), bool)]
    dist, _ = nearest_distances(candidates, f_syn)
    radius = float(np.median(dist))
    counts = _count_within(candidates, f_syn, radius) / len(f_syn)
    auc, tpr = _roc_summary(is_member, -dist)
    mc_auc, mc_tpr = _roc_summary(is_member, counts)
    return MembershipResult(
        features=name,
        n_synthetic=int(len(f_syn)),
        n_members=int(len(f_mem)),
        n_nonmembers=int(len(f_non)),
        auc=auc,
        tpr_at_1pct_fpr=tpr,
        mc_auc=mc_auc,
        mc_tpr_at_1pct_fpr=mc_tpr,
        mc_radius=radius,
    )


def _roc_summary(is_member: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """(AUC, best TPR with FPR <= 1 %); tied scores are handled as one threshold."""
    fpr, tpr, _ = roc_curve(is_member, score)
    allowed = fpr <= FPR_TARGET + 1e-12
    return float(roc_auc_score(is_member, score)), float(tpr[allowed].max())


def _count_within(points: np.ndarray, centres: np.ndarray, radius: float) -> np.ndarray:
    """How many ``centres`` lie within ``radius`` of each point (chunked distances)."""
    counts = np.zeros(len(points))
    for start, block in distance_blocks(points, centres):
        counts[start : start + len(block)] = (block <= radius).sum(axis=1)
    return counts


def _embed(features, batch: int, *image_sets) -> tuple:
    if isinstance(features, str):
        if features != "pixels":
            raise ValueError(f"features must be a FeatureExtractor or 'pixels', got {features!r}")
        grey = [as_float_images(x)[:, 0].double().numpy() for x in image_sets]
        shapes = {g.shape[1:] for g in grey}
        if len(shapes) > 1:
            raise ValueError(f"raw-pixel distances need one image size, got {sorted(shapes)}")
        return (PIXELS_NAME, *(g.reshape(len(g), -1) for g in grey))
    return (features.name, *(extract(features, x, batch=batch) for x in image_sets))
