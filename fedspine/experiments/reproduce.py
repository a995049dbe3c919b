"""`fedspine reproduce`: the paper's experiment table, rebuilt on one dataset at a chosen budget.

Schonfeld & Veeravagu trained a real abnormality classifier, conditional StyleGAN2-ADAs on
abnormality and on lesion type, SpineGAN (a cGAN with a clinical loss) and a "DP" GAN, and
reported test AUCs of classifiers trained on each GAN's images (reference/paper.md). This module
runs the same arms with fedspine's parts, on the same prepared data, and writes one table with
our numbers beside theirs:

1. the real classifier (TRTR) and 2. the abnormality cGAN (TSTR, mixed, GAN metrics) come from
   one `evaluate` call; 3. the lesion-type cGAN is scored on the 8-class lesion task;
4. SpineGAN runs only when this build's training library offers it;
5. patient-level DP-SGD arms at several ε, each with its own ledger, ε read from the run, and
   the paper's DP ablation beside them on the same data and budget (not private, and marked so
   in their privacy.json): DP-SGD's clipping without noise, DP-SGD's noise (the σ of one DP
   arm) without clipping, and the paper's own noise-then-clip scheme at batch 1, with the ε
   standard accounting gives it.

A reproduction is a budget (:mod:`~fedspine.experiments.budgets`), a plan of arms as data
(:mod:`~fedspine.experiments.plan`), calls of the library for each arm
(:mod:`~fedspine.experiments.execute`, with the requests and the equivalent commands in
:mod:`~fedspine.experiments.commands`), a typed record (:mod:`~fedspine.experiments.record`:
the table of :mod:`~fedspine.experiments.table`, the paper's numbers and errors of
:mod:`~fedspine.experiments.paper`) and a renderer (:mod:`~fedspine.experiments.reproduce_report`).
This module is the entry point the CLI and the tests import; it re-exports their public names.

``seeds`` > 1 repeats every arm with the next training seeds (GAN, generation, classifiers,
evaluation) in ``OUT/arms/NAME-seedS``; replicate 0 keeps ``OUT/arms/NAME``, so a folder made
with one seed is continued by a run with more. The table gives replicate 0 with its interval
and the mean and range across seeds, the variation the test-set intervals do not cover.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedspine import __version__
from fedspine.data.prepared import load_prepared
from fedspine.experiments.budgets import (
    BUDGETS,
    ReproduceBudget,
    ReproduceError,
    get_budget,
)
from fedspine.experiments.commands import format_plan
from fedspine.experiments.execute import run_arm, threads
from fedspine.experiments.paper import PAPER, PAPER_ERRORS, error_notes
from fedspine.experiments.plan import (
    ARMS_DIR,
    DATA_DIR,
    LOGS_DIR,
    SPINEGAN_UNAVAILABLE,
    ArmKind,
    ArmPlan,
    ReproducePlan,
    make_plan,
    spinegan_available,
)
from fedspine.experiments.prepare import RunContext, Stage, prepare_data
from fedspine.experiments.public_run import PublicRun, check_public_run
from fedspine.experiments.record import DataSection, ReproduceRecord
from fedspine.experiments.reproduce_report import render_markdown
from fedspine.experiments.summaries import plain, seed_summary
from fedspine.experiments.table import build_table
from fedspine.fileio import (
    PHANTOM_SITE,
    REPRODUCE_JSON,
    REPRODUCE_MD,
    REPRODUCE_PLAN,
    write_json_atomic,
    write_text_atomic,
)

PLAN_FILE = REPRODUCE_PLAN
REPORT_MD = REPRODUCE_MD
REPORT_JSON = REPRODUCE_JSON

__all__ = [
    "ARMS_DIR",
    "BUDGETS",
    "DATA_DIR",
    "PAPER",
    "PAPER_ERRORS",
    "PLAN_FILE",
    "REPORT_JSON",
    "REPORT_MD",
    "SPINEGAN_UNAVAILABLE",
    "ArmKind",
    "ArmPlan",
    "ReproduceBudget",
    "ReproduceError",
    "ReproducePlan",
    "ReproduceRecord",
    "build_record",
    "check_previous",
    "format_plan",
    "get_budget",
    "make_plan",
    "render_markdown",
    "reproduce",
    "spinegan_available",
]


def reproduce(
    root: str | os.PathLike,
    out: str | os.PathLike,
    budget: str | ReproduceBudget = "smoke",
    overrides: Mapping[str, Any] | None = None,
    stage: Stage | None = None,
    inception: str | None = None,
    classifier_weights: str | None = None,
    public_run: str | os.PathLike | PublicRun | None = None,
) -> dict[str, Any]:
    """Run every arm of the plan under ``out`` (skipping complete ones) and write the report.

    Returns what ``reproduce.json`` holds. An arm that fails is recorded as failed with its
    reason and the others still run; its work folder stays for a rerun to continue.
    ``public_run`` (a run trained on data declared public) adds the public arms; it is refused
    before anything is written when it is not one, and before any arm trains when it was
    trained on this very dataset or does not fit the budget's networks.
    """
    stage = stage or (lambda _msg: None)
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ReproduceError(f"{root}: no such folder (a VinDr-SpineXR root or a phantom site)")
    plan = make_plan(root, out, budget, overrides, inception, classifier_weights, public_run)
    check_previous(plan)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / LOGS_DIR).mkdir(exist_ok=True)
    write_json_atomic(out / PLAN_FILE, plan.to_dict())
    ctx = RunContext(plan=plan, stage=stage)
    stage(f"budget {plan.budget.name}: {sum(1 for a in plan.arms if not a.not_run)} arms to run")

    with threads(plan.budget.threads):
        prepare_data(ctx)
        if plan.public is not None:
            info = ctx.data_info["abnormality"]
            patients = load_prepared(ctx.data["abnormality"]).patient_ids.tolist()
            check_public_run(
                plan.public,
                plan.budget,
                info["content_hash"],
                len(info["class_names"]),
                patient_ids=patients,
            )
            stage(f"public checkpoint {plan.public.short}: declared public, of other data")
        results: dict[str, dict[str, Any]] = {}
        for arm in plan.arms:
            if arm.not_run:
                stage(f"{arm.folder}: {arm.not_run}")
                results[arm.folder] = {"status": "not run", "reason": arm.not_run}
                continue
            if arm.data not in ctx.data:
                reason = ctx.data_info.get(arm.data, {}).get("not_run", "no prepared data")
                results[arm.folder] = {"status": "not run", "reason": reason}
                stage(f"{arm.folder}: {reason}")
                continue
            results[arm.folder] = run_arm(ctx, arm)

    record = build_record(ctx, results, time.perf_counter() - started)
    report = record.to_json()
    write_json_atomic(out / REPORT_JSON, report)
    write_text_atomic(out / REPORT_MD, render_markdown(record))
    stage(f"wrote {out / REPORT_MD} and {out / REPORT_JSON}")
    return report


def build_record(
    ctx: RunContext, results: dict[str, dict[str, Any]], seconds: float
) -> ReproduceRecord:
    """The record of a reproduction from its arms' results: the table, the errors, the seeds."""
    plan = ctx.plan
    phantom = (plan.root / PHANTOM_SITE).is_file()
    data = DataSection(
        root=str(plan.root),
        kind="phantom (synthetic DICOMs from `fedspine phantom`)"
        if phantom
        else "VinDr-SpineXR layout (real radiographs)",
        abnormality=plain(ctx.data_info.get("abnormality", {})),
        lesion=plain(
            ctx.data_info.get("lesion", {"not_run": "not prepared: no arm of this budget uses it"})
        ),
    )
    seeds = seed_summary(plan.arms, results)
    return ReproduceRecord(
        fedspine_version=__version__,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        seconds=round(seconds, 1),
        budget=plan.budget,
        spinegan_available=plan.spinegan[0],
        spinegan_how=plan.spinegan[1],
        data=data,
        table=tuple(build_table(results, ctx.data_info, seeds)),
        paper=dict(PAPER),
        errors=tuple(error_notes(plan.budget, results, ctx.data_info)),
        arms=plain(results),
        seeds=plain(seeds),
        inception=plan.inception,
        classifier_weights=plan.classifier_weights,
        public_run=plan.public.to_json() if plan.public else None,
    )


def check_previous(plan: ReproducePlan) -> None:
    """A rerun must use the same root and budget, or its arms would mix two experiments."""
    path = plan.out / PLAN_FILE
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    current = plan.to_dict()
    if Path(previous.get("root", "")).resolve() != plan.root.resolve():
        raise ReproduceError(
            f"{plan.out} holds a reproduction of {previous.get('root')}; choose another --out"
        )
    # A setting the earlier plan lacks came with a newer fedspine; it only adds arms. The number
    # of seeds only adds or leaves out replicate folders: replicate 0 is the same run either way.
    before = previous.get("budget", {})
    changed = sorted(
        k
        for k, v in current["budget"].items()
        if k in before and before[k] != v and k not in ("ingest_workers", "threads", "seeds")
    )
    if changed:
        raise ReproduceError(
            f"{plan.out} was made with budget {previous['budget'].get('name')} and other "
            f"settings ({', '.join(changed)}); rerun with the same budget or choose another --out"
        )
    # Without --public-run the public arms are only left out; with another checkpoint they
    # would mix two starting points.
    before_public = (previous.get("public_run") or {}).get("sha256")
    now_public = plan.public.sha256 if plan.public else None
    if before_public and now_public and before_public != now_public:
        raise ReproduceError(
            f"{plan.out} was made with the public checkpoint sha256:{before_public[:12]}, not "
            f"{plan.public.short}; rerun with the same --public-run or choose another --out"
        )
