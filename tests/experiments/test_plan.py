"""The arms of every budget as data: well-formed plans and the behaviour each kind carries."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedspine.experiments.budgets import BUDGETS
from fedspine.experiments.plan import (
    SPINEGAN_UNAVAILABLE,
    ArmKind,
    make_plan,
    spinegan_available,
)
from fedspine.experiments.public_run import PublicRun


def _public(resolution: int = 32) -> PublicRun:
    """A public checkpoint as the plan records it (the plan itself reads no weights)."""
    return PublicRun(
        path=Path("public/run"),
        checkpoint="snapshots/snapshot_00001.000.pt",
        sha256="ab" * 32,
        declaration="fedspine phantom simulator",
        dataset_content_hash="cd" * 32,
        resolution=resolution,
        classes=2,
    )


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("public", [False, True])
def test_every_budget_plans_well_formed_arms(budget, seeds, public, tmp_path):
    plan = make_plan(
        tmp_path, tmp_path / "o", budget, {"seeds": seeds}, public_run=_public() if public else None
    )
    b = plan.budget
    folders = [a.folder for a in plan.arms]
    assert len(folders) == len(set(folders)), "one folder per arm and replicate"
    assert {a.seed for a in plan.arms} <= set(b.training_seeds)
    for arm in plan.arms:
        assert isinstance(arm.kind, ArmKind) and arm.data in ("abnormality", "lesion")
        assert arm.seed == b.seed + arm.replicate
        if arm.not_run:
            assert arm.replicate == 0, "an arm left out appears once"
            assert arm.not_run.startswith("not run: ")
            continue
        if arm.kind.trains_gan:
            assert arm.kimg and arm.kimg > 0
        else:
            assert arm.kimg is None and arm.kind.public
        if arm.kind.private:
            assert arm.epsilon and arm.epsilon > 0
        if arm.kind is ArmKind.NOISE_ONLY:
            assert arm.noise_epsilon in b.dp_epsilons, "its σ is a DP arm's"
    dp = [a for a in plan.arms if a.kind is ArmKind.DP and a.replicate == 0]
    assert [a.epsilon for a in dp] == list(b.dp_epsilons)
    replicates = {a.replicate for a in plan.arms}
    assert replicates == set(range(seeds))
    publics = [a for a in plan.arms if a.kind.public and a.replicate == 0]
    if not public:
        assert not publics, "the public arms need --public-run"
        return
    assert [a.name for a in publics] == (
        ["public_only"]
        + [f"dp_public_eps{e:g}" for e in b.dp_epsilons]
        + [f"dp_embedding_eps{e:g}" for e in b.dp_epsilons]
    )
    for arm in publics:
        if arm.kind.ceiling:
            shared = plan.shared_ceiling(arm)
            assert shared.kind is ArmKind.DP and shared.epsilon == arm.epsilon
            assert shared.replicate == arm.replicate
    assert plan.to_dict()["public_run"]["sha256"] == "ab" * 32


def test_the_full_budget_runs_every_kind(tmp_path):
    plan = make_plan(tmp_path, tmp_path / "o", "full", public_run=_public(256))
    runs = {a.kind for a in plan.arms if not a.not_run}
    expected = set(ArmKind)
    if not spinegan_available()[0]:
        expected -= {ArmKind.SPINEGAN, ArmKind.DP_SPINEGAN}
        assert all(a.not_run == SPINEGAN_UNAVAILABLE for a in plan.arms if a.kind.clinical)
    assert runs == expected


def test_each_kind_says_what_it_trains():
    assert [k for k in ArmKind if k.clinical] == [ArmKind.SPINEGAN, ArmKind.DP_SPINEGAN]
    assert [k for k in ArmKind if k.private] == [
        ArmKind.DP,
        ArmKind.DP_SPINEGAN,
        ArmKind.DP_PUBLIC,
        ArmKind.DP_EMBEDDING,
    ]
    assert [k for k in ArmKind if k.public] == [
        ArmKind.PUBLIC_ONLY,
        ArmKind.DP_PUBLIC,
        ArmKind.DP_EMBEDDING,
    ]
    assert [k for k in ArmKind if not k.trains_gan] == [ArmKind.PUBLIC_ONLY, ArmKind.DP_EMBEDDING]
    assert [k for k in ArmKind if k.ceiling] == [
        ArmKind.DP,
        ArmKind.DP_SPINEGAN,
        ArmKind.DP_PUBLIC,
        ArmKind.DP_EMBEDDING,
    ]
    assert [k.value for k in ArmKind if k.ablation] == ["clip-only", "noise-only", "paper"]
    assert not any(k.private and k.ablation for k in ArmKind)
    assert {k.value: k.dp_scheme for k in ArmKind} == {
        "cgan": "none",
        "spinegan": "none",
        "dp": "dpsgd",
        "dp-spinegan": "dpsgd",
        "clip-only": "clip-only",
        "noise-only": "noise-only",
        "paper": "paper",
        "public-only": "none",
        "dp-public": "dpsgd",
        "dp-embedding": "dp-mean-embedding",
    }
    assert [k for k in ArmKind if not k.keeps_batch] == [ArmKind.PAPER], "batch 1"
    assert ArmKind.SPINEGAN.model == "spinegan" and ArmKind.DP.model is None
    assert ArmKind("dp-spinegan") is ArmKind.DP_SPINEGAN and ArmKind.DP == "dp"


def test_the_plan_file_records_kinds_as_text(tmp_path):
    import json

    plan = make_plan(tmp_path, tmp_path / "o", "quick")
    written = json.loads(json.dumps(plan.to_dict()))
    assert [a["kind"] for a in written["arms"]] == [a.kind.value for a in plan.arms]
    assert written["budget"]["dp_epsilons"] == [1.0, 3.0, 10.0]
