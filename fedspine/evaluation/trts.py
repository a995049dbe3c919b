"""TRTS: does each synthetic class look like its real class, to a judge the generator never saw?

A SpineGAN generator trained to please its clinical classifier; judged by a classifier of the
same recipe, TRTS would measure how well it fooled that network. The judge is therefore chosen
from the generator's recorded classifier recipes (generation.json), and the report says whether
its independence is verified.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedspine.data.prepared import PreparedDataset
from fedspine.evaluation.arms import classifier_config, run_arm
from fedspine.evaluation.classification import bootstrap_auc_ci
from fedspine.evaluation.config import EvaluateConfig, EvaluateError, ProgressFn
from fedspine.models.classifier import predict_proba
from fedspine.training.classifier_trainer import classifier_recipe, same_recipe, targets

if TYPE_CHECKING:
    import torch


def _generator_classifiers(syn_info: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Recipes of the classifiers the generator trained against: [] for none, None if unknown."""
    training = (syn_info.get("generation") or {}).get("training")
    if not training:
        return None
    clinical = training.get("clinical")
    if clinical is None:
        return [] if training.get("model") not in (None, "spinegan") else None
    recipe = clinical.get("classifier_recipe")
    return [recipe] if recipe else None


def trts_judge(
    syn_info: dict[str, Any],
    trtr_model: torch.nn.Module,
    real: PreparedDataset,
    real_train: PreparedDataset,
    real_val: PreparedDataset,
    test_rows: PreparedDataset,
    task: str,
    cfg: EvaluateConfig,
    budget: dict[str, Any],
    tmp: Path,
    notify: ProgressFn,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The classifier that scores the synthetic images in TRTS: one the generator never saw.

    A SpineGAN generator was trained to please its clinical classifier; judged by a classifier
    of the same recipe (the evaluation's TRTR usually is one: same architecture, rows and seed),
    its TRTS measures how well it fooled that network, not whether its classes are right.
    """

    seen = _generator_classifiers(syn_info)
    size = cfg.input_size or real.resolution

    def recipe(seed: int) -> dict[str, Any]:
        return classifier_recipe(classifier_config(cfg, task, size, budget, seed))

    if cfg.judge_seed is not None:
        seed = cfg.judge_seed
        if any(same_recipe(recipe(seed), c) for c in seen or []):
            raise EvaluateError(
                f"--judge-seed {seed}: a classifier of this recipe ({cfg.arch}, seed {seed}, "
                f"{size} px, trained on the real training split) is the one the generator was "
                "trained against, so TRTS judged by it would be circular; choose another seed"
            )
    elif seen == []:
        return trtr_model, {
            "classifier": "the TRTR arm's classifier",
            "recipe": recipe(cfg.seed),
            "independence": "the generator trained against no classifier (generation.json)",
        }
    else:
        seed = cfg.seed + 1
        while any(same_recipe(recipe(seed), c) for c in seen or []):
            seed += 1
    if seen is None:
        independence = (
            "unverified: the synthetic set does not say which classifier its generator trained "
            f"against (no generation.json record); if it was a {cfg.arch} of seed {seed} on "
            "these rows, TRTS is circular"
        )
    elif seen:
        independence = (
            "verified: its recipe differs from that of the classifier the generator trained "
            f"against ({', '.join(f'{k} {v}' for k, v in seen[0].items())})"
        )
    else:
        independence = "the generator trained against no classifier (generation.json)"
    if seed == cfg.seed:
        return trtr_model, {
            "classifier": "the TRTR arm's classifier",
            "recipe": recipe(seed),
            "independence": independence,
        }
    notify({"stage": "classifier", "event": "start", "arm": "TRTS judge", "rows": 0})
    record, _, model = run_arm(
        "TRTS-judge", real_train, real_val, test_rows, task, cfg, budget, tmp, notify, seed
    )
    notify({"stage": "classifier", "event": "end", "arm": "TRTS judge", "auc": record["auc"]})
    return model, {
        "classifier": (
            f"a separate {cfg.arch} classifier trained on the real training split with seed "
            f"{seed} (test AUC {record['auc']:.3f})"
        ),
        "recipe": recipe(seed),
        "independence": independence,
        "test_auc": record["auc"],
        "classifier_file": record["classifier_file"],
    }


def class_fidelity(
    judge_model: torch.nn.Module,
    syn_rows: PreparedDataset,
    syn_images: np.ndarray,
    task: str,
    cfg: EvaluateConfig,
    judge: dict[str, Any],
) -> dict[str, Any]:
    """TRTS: a real-trained classifier scored on the synthetic images and their labels.

    It asks whether each synthetic class looks like that class to a classifier that has only
    seen real images, which shows a generator learning its classes long before TSTR does. Each
    synthetic image is its own unit in the bootstrap (generated images share no patient).
    """

    y, idx, names = targets(syn_rows, task)
    probs = predict_proba(judge_model, syn_images[idx], batch=128)
    groups = np.arange(len(idx))
    scores = {}
    for k, name in enumerate(names):
        yk = y[:, k].astype(np.int64)
        if not 0 < yk.sum() < len(yk):
            scores[name] = {
                "auc": None,
                "ci": None,
                "reason": "a single class in the synthetic set",
            }
            continue
        value, lo, hi = bootstrap_auc_ci(yk, probs[:, k], groups, cfg.bootstrap, seed=cfg.seed)
        scores[name] = {
            "auc": value,
            "ci": [lo, hi],
            "mean_score_positive": float(probs[yk == 1, k].mean()),
            "mean_score_negative": float(probs[yk == 0, k].mean()),
        }
    aucs = [o["auc"] for o in scores.values() if o["auc"] is not None]
    return {
        "name": "TRTS (train real, test synthetic)",
        "classifier": judge["classifier"],
        "judge": judge,
        "images": len(idx),
        "auc": float(np.mean(aucs)) if aucs else None,
        "ci": scores[names[0]]["ci"] if len(names) == 1 else None,
        "per_output": scores,
    }
