"""Running one arm through the library: clinical classifier, GAN, synthetic set, evaluation.

Each arm is built in a hidden work folder (``OUT/arms/.NAME.partial``) and renamed into
``OUT/arms/NAME`` when complete, so an arm folder is either complete or absent. Every stage
first looks for its own finished output, so a rerun continues an interrupted arm from its last
finished stage. The real-data classifier (TRTR) is trained once per task and seed and shared by
every arm's evaluation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedspine.data.prepared import load_prepared
from fedspine.evaluation.config import EvaluateConfig, EvaluateError
from fedspine.experiments.budgets import ReproduceError
from fedspine.experiments.commands import (
    ceiling_args,
    ceiling_request,
    classifier_args,
    classifier_request,
    embedding_features,
    fit_args,
    fit_request,
    release_args,
    train_args,
    train_request,
)
from fedspine.experiments.logs import PlainClassifierReporter, PlainReporter, logged
from fedspine.experiments.plan import (
    ARMS_DIR,
    CEILING_ARM,
    CEILING_DIR,
    CLASSIFIER_DIR,
    DATA_DIR,
    EVALUATION_DIR,
    LOGS_DIR,
    PRIVACY_HOME_DIR,
    RELEASE_DIR,
    RELEASE_FILE,
    RUN_DIR,
    SYNTHETIC_DIR,
    ArmKind,
    ArmPlan,
)
from fedspine.experiments.prepare import RunContext
from fedspine.experiments.summaries import (
    plain,
    summarise_ablation,
    summarise_evaluation,
    summarise_privacy,
)
from fedspine.fileio import (
    CLASSIFIER_WEIGHTS,
    EVAL_REPORT_JSON,
    PRIVACY_LEDGER,
    REPRODUCE_ARM,
    RUN_GENERATOR,
    RUN_LATEST,
    SYNTHETIC_LABELS,
    write_json_atomic,
)
from fedspine.formatting import num
from fedspine.privacy.engine import PrivacyEngine
from fedspine.privacy.home import PrivacyHomeError
from fedspine.privacy.ledger import LedgerError, PrivacyLedger

# `evaluate` and `generate_dataset` are called through their modules, so a test can stand in.
from fedspine.reporting import evaluation_report
from fedspine.training import generate as generation
from fedspine.training.checkpoint import CheckpointError
from fedspine.training.classifier_dp import MECHANISM_LABEL
from fedspine.training.classifier_run import ClassifierRunError, train_classifier_run
from fedspine.training.dp_run import dp_unit_of
from fedspine.training.gan_trainer import resolve_device
from fedspine.training.generate import GenerationError
from fedspine.training.mean_embedding import release_embedding
from fedspine.training.mean_embedding_fit import fit_generator
from fedspine.training.run import TrainRunError, train


def run_arm(ctx: RunContext, arm: ArmPlan) -> dict[str, Any]:
    """Build one arm in its work folder (continuing what an earlier run finished), then rename.

    Returns the arm's record (what ``arm.json`` holds), or a failed record with the reason.
    """
    plan = ctx.plan
    final = plan.out / ARMS_DIR / arm.folder
    if (final / REPRODUCE_ARM).is_file():
        ctx.stage(f"{arm.folder}: complete from an earlier run, skipped")
        record = json.loads((final / REPRODUCE_ARM).read_text())
        record["skipped_this_time"] = True
        return record
    if final.exists():
        raise ReproduceError(f"{final}: an arm folder without {REPRODUCE_ARM}; remove it and rerun")
    work = plan.out / ARMS_DIR / f".{arm.folder}.partial"
    work.mkdir(parents=True, exist_ok=True)
    log_path = plan.out / LOGS_DIR / f"{arm.folder}.log"
    seconds: dict[str, float] = {}
    data = ctx.data[arm.data]
    ctx.stage(f"{arm.folder}: {arm.title}" + (f" (seed {arm.seed})" if arm.replicate else ""))
    ceiling = None
    try:
        with timed(seconds, "classifier"):
            if arm.kind.clinical:
                train_clinical_classifier(ctx, arm, data, work, log_path)
        with timed(seconds, "train"):
            if arm.kind.trains_gan:
                train_gan(ctx, arm, data, work, log_path)
            elif arm.kind is ArmKind.DP_EMBEDDING:
                release_and_fit(ctx, arm, data, work, log_path)
        with timed(seconds, "generate"):
            generate_arm(ctx, arm, work)
        with timed(seconds, "dp_classifier"):
            if arm.kind.ceiling:
                ceiling = train_dp_ceiling(ctx, arm, data, work, log_path)
        with timed(seconds, "evaluate"):
            evaluate_arm(ctx, arm, data, work, ceiling)
        spent = home_epsilon(arm, data, work)
    except ReproduceError as err:
        ctx.stage(f"{arm.folder}: FAILED: {err}")
        return {"status": "failed", "reason": str(err), "log": str(log_path)}
    record: dict[str, Any] = {
        "status": "done",
        "name": arm.name,
        "folder": arm.folder,
        "seed": arm.seed,
        "replicate": arm.replicate,
        "title": arm.title,
        "kind": arm.kind.value,
        "data": arm.data,
        "kimg": arm.kimg,
        "epsilon_target": arm.epsilon,
        "epsilon_home": spent,
        "dp_scheme": arm.kind.dp_scheme,
        "train_args": train_args(plan, arm, data, final / RUN_DIR) if arm.kind.trains_gan else [],
        "evaluation": summarise_evaluation(work / EVALUATION_DIR / EVAL_REPORT_JSON),
        "privacy": summarise_privacy(generator_run(ctx, arm, work)),
        "ablation": summarise_ablation(work / RUN_DIR),
        "seconds": {k: round(v, 1) for k, v in seconds.items() if v >= 0.05},
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "built_in": work.name,
    }
    if arm.kind is ArmKind.DP_EMBEDDING:
        release = final / RELEASE_DIR / RELEASE_FILE
        record["commands"] = [
            "fedspine embedding release " + " ".join(release_args(plan, arm, data, release)),
            "fedspine embedding fit " + " ".join(fit_args(plan, arm, release, final)),
        ]
    if ceiling is not None and not ceiling.is_relative_to(work):
        record["ceiling_shared_with"] = ceiling.parent.parent.name
    if plan.public is not None and arm.kind.public:
        record["public_run"] = plan.public.to_json()
    write_json_atomic(work / REPRODUCE_ARM, plain(record))
    os.replace(work, final)
    auc = record["evaluation"]["tstr"]["auc"]
    ctx.stage(f"{arm.folder}: done, TSTR AUC {num(auc)} ({sum(seconds.values()) / 60:.1f} min)")
    return record


def train_clinical_classifier(
    ctx: RunContext, arm: ArmPlan, data: Path, work: Path, log_path: Path
) -> None:
    """SpineGAN's frozen classifier, on the real training split (with DP-SGD for DP SpineGAN)."""
    target = work / CLASSIFIER_DIR
    if (target / CLASSIFIER_WEIGHTS).is_file():
        ctx.stage(f"{arm.folder}: clinical classifier trained earlier, reused")
        return
    if target.exists():
        shutil.rmtree(target)
    if arm.kind is ArmKind.DP_SPINEGAN:
        # A new classifier starts the arm's privacy account afresh: nothing else has run yet.
        shutil.rmtree(work / RUN_DIR, ignore_errors=True)
        shutil.rmtree(work / PRIVACY_HOME_DIR, ignore_errors=True)
        ctx.stage(f"{arm.folder}: training the clinical classifier with DP-SGD")
    else:
        ctx.stage(f"{arm.folder}: training the clinical classifier on the real training split")
    command = "fedspine classifier train " + " ".join(classifier_args(ctx.plan, data, target, arm))
    with logged(log_path, command, "`fedspine classifier train`"):
        try:
            train_classifier_run(
                classifier_request(ctx.plan, data, target, arm), PlainClassifierReporter()
            )
        except ClassifierRunError as err:
            raise ReproduceError(f"`fedspine classifier train` stopped: {err}") from None


def train_dp_ceiling(ctx: RunContext, arm: ArmPlan, data: Path, work: Path, log_path: Path) -> Path:
    """A DP arm's ceiling: the evaluation's classifier trained directly with DP-SGD at the
    arm's ε, in its own privacy home (issue 15): a synthetic set at that ε is worth releasing
    for classification only where it comes near this. A public arm shares the DP-SGD arm's of
    the same ε and seed when that one finished (the same recipe on the same patients); returns
    the classifier's folder."""
    shared = ctx.plan.shared_ceiling(arm)
    if shared is not None:
        theirs = ctx.plan.out / ARMS_DIR / shared.folder / CEILING_DIR / CLASSIFIER_DIR
        if (theirs / CLASSIFIER_WEIGHTS).is_file():
            ctx.stage(f"{arm.folder}: DP classifier (ceiling) of {shared.folder} used")
            return theirs
    target = work / CEILING_DIR / CLASSIFIER_DIR
    if (target / CLASSIFIER_WEIGHTS).is_file():
        ctx.stage(f"{arm.folder}: DP classifier (ceiling) trained earlier, reused")
        return target
    # A half-trained attempt's steps are on record in its privacy home: start both afresh.
    shutil.rmtree(work / CEILING_DIR, ignore_errors=True)
    ctx.stage(f"{arm.folder}: training the DP-SGD classifier at ε = {arm.epsilon:g} (the ceiling)")
    command = "fedspine classifier train " + " ".join(ceiling_args(ctx.plan, data, target, arm))
    with logged(log_path, command, "`fedspine classifier train`"):
        try:
            train_classifier_run(
                ceiling_request(ctx.plan, data, target, arm), PlainClassifierReporter()
            )
        except ClassifierRunError as err:
            raise ReproduceError(
                f"`fedspine classifier train` (DP ceiling) stopped: {err}"
            ) from None
    return target


def train_gan(ctx: RunContext, arm: ArmPlan, data: Path, work: Path, log_path: Path) -> None:
    """Train (or continue) the arm's GAN through the library's one training call."""
    run = work / RUN_DIR
    if (run / RUN_GENERATOR).is_file():
        ctx.stage(f"{arm.folder}: GAN trained earlier, reused")
        return
    resume = (run / RUN_LATEST).is_file()
    if resume:
        ctx.stage(f"{arm.folder}: continuing the interrupted GAN run")
    else:
        if run.exists():
            shutil.rmtree(run)
        if arm.kind in (ArmKind.DP, ArmKind.DP_PUBLIC):
            shutil.rmtree(work / PRIVACY_HOME_DIR, ignore_errors=True)
        if arm.kind is ArmKind.DP_SPINEGAN:
            _check_only_the_classifier_spent(work / PRIVACY_HOME_DIR / PRIVACY_LEDGER)
        ctx.stage(f"{arm.folder}: training the GAN ({arm.kimg:g} kimg)")
    request = train_request(ctx.plan, arm, data, run, resume)
    command = "fedspine train " + " ".join(train_args(ctx.plan, arm, data, run))
    with logged(log_path, command + (" (resumed)" if resume else ""), "`fedspine train`"):
        try:
            train(request, PlainReporter())
        except TrainRunError as err:
            raise ReproduceError(f"`fedspine train` stopped: {err}") from None


def release_and_fit(ctx: RunContext, arm: ArmPlan, data: Path, work: Path, log_path: Path) -> None:
    """The DP mean-embedding route: one release at the arm's ε into the arm's own privacy home
    (the only step that reads private data), then G fitted to it (no further ε)."""
    release = work / RELEASE_DIR / RELEASE_FILE
    if release.is_file():
        ctx.stage(f"{arm.folder}: DP mean-embedding release made earlier, reused")
    else:
        # An interrupted release may have reserved its spend: start its privacy home afresh.
        shutil.rmtree(work / RELEASE_DIR, ignore_errors=True)
        shutil.rmtree(work / PRIVACY_HOME_DIR, ignore_errors=True)
        release.parent.mkdir(parents=True)
        ctx.stage(f"{arm.folder}: releasing the DP mean embedding at ε = {arm.epsilon:g}")
        args = release_args(ctx.plan, arm, data, release)
        command = "fedspine embedding release " + " ".join(args)
        with logged(log_path, command, "`fedspine embedding release`"):
            try:
                release_embedding(
                    data,
                    release,
                    epsilon=float(arm.epsilon),
                    privacy_home=work / PRIVACY_HOME_DIR,
                    features=embedding_features(ctx.plan, arm),
                )
            except (ValueError, LedgerError, PrivacyHomeError) as err:  # as the CLI catches
                raise ReproduceError(f"`fedspine embedding release` stopped: {err}") from None
    run = work / RUN_DIR
    if (run / RUN_GENERATOR).is_file():
        ctx.stage(f"{arm.folder}: generator fitted earlier, reused")
        return
    shutil.rmtree(run, ignore_errors=True)
    steps = ctx.plan.budget.embedding_steps
    ctx.stage(f"{arm.folder}: fitting G to the release ({steps} steps)")
    command = "fedspine embedding fit " + " ".join(fit_args(ctx.plan, arm, release, work))
    with logged(log_path, command, "`fedspine embedding fit`"):
        try:
            fit_generator(fit_request(ctx.plan, arm, release, work))
        except ValueError as err:  # EmbeddingFitError included, as the CLI catches
            raise ReproduceError(f"`fedspine embedding fit` stopped: {err}") from None


def generator_run(ctx: RunContext, arm: ArmPlan, work: Path) -> Path:
    """The run folder the arm's images come from: the public checkpoint's for public-only."""
    if arm.kind is ArmKind.PUBLIC_ONLY:
        if ctx.plan.public is None:
            raise ReproduceError(f"{arm.folder}: planned without a public checkpoint")
        return ctx.plan.public.path
    return work / RUN_DIR


def home_epsilon(arm: ArmPlan, data: Path, work: Path) -> float | None:
    """ε of the worst patient in the arm's own privacy home, every mechanism there composed
    (0 for public-only, which reads no private data; None for an arm without DP)."""
    if arm.kind is ArmKind.PUBLIC_ONLY:
        return 0.0
    home = work / PRIVACY_HOME_DIR
    if not arm.kind.private or not home.is_dir():
        return None
    dataset = load_prepared(data).select("train")
    engine = PrivacyEngine(dataset.privacy_ids, unit=dp_unit_of(dataset, None), home=home)
    return float(engine.spent())


def generate_arm(ctx: RunContext, arm: ArmPlan, work: Path) -> None:
    """The arm's synthetic set: ``per_class`` images per class from its generator."""
    target = work / SYNTHETIC_DIR
    if (target / SYNTHETIC_LABELS).is_file():
        ctx.stage(f"{arm.folder}: synthetic images generated earlier, reused")
        return
    b = ctx.plan.budget
    ctx.stage(f"{arm.folder}: generating {b.per_class} images per class")
    if target.exists():
        shutil.rmtree(target)
    try:
        generation.generate_dataset(
            generator_run(ctx, arm, work),
            target,
            per_class=b.per_class,
            seed=arm.seed,
            device=resolve_device(b.device),
        )
    except (GenerationError, CheckpointError) as err:
        raise ReproduceError(f"generate: {err}") from None


def evaluate_arm(
    ctx: RunContext, arm: ArmPlan, data: Path, work: Path, ceiling: Path | None = None
) -> None:
    """TRTR, TSTR (and mixed), GAN metrics and the memorisation audit of the arm's images;
    ``ceiling`` (default: the arm's own) is the DP classifier scored beside them."""
    target = work / EVALUATION_DIR
    if (target / EVAL_REPORT_JSON).is_file():
        ctx.stage(f"{arm.folder}: evaluated earlier, reused")
        return
    b = ctx.plan.budget
    cfg = EvaluateConfig(
        arch=b.classifier_arch,
        weights=ctx.plan.classifier_weights,
        epochs=b.classifier_epochs,
        patience=b.classifier_patience,
        input_size=b.classifier_input_size,
        seed=arm.seed,
        mix_per_class=None if arm.mixed else 0,
        bootstrap=b.bootstrap,
        inception=ctx.plan.inception,
        domain_epochs=b.domain_epochs,
        kid_subsets=b.kid_subsets,
        device=b.device,
        threads=b.threads,
        max_metric_images=b.max_metric_images,
    )
    ctx.stage(f"{arm.folder}: evaluating ({arm.evaluation_note})")

    def progress(event: dict[str, Any]) -> None:
        if event.get("stage") == "classifier" and event.get("event") in ("start", "end"):
            what = "training" if event["event"] == "start" else f"test AUC {num(event['auc'])}"
            ctx.stage(f"{arm.folder}: evaluate: {event['arm']} classifier {what}")
        elif event.get("event") == "extractor":
            ctx.stage(f"{arm.folder}: evaluate: GAN metrics with {event['description']}")

    # One TRTR per task and seed: the first evaluation trains it, every later arm reuses it, so
    # the whole table is measured against the same real-data classifier.
    trtr_cache = ctx.plan.out / DATA_DIR / "trtr" / f"{arm.data}-seed{arm.seed}"
    ceiling = ceiling or work / CEILING_DIR / CLASSIFIER_DIR
    compare = {CEILING_ARM: ceiling} if (ceiling / CLASSIFIER_WEIGHTS).is_file() else None
    try:
        evaluation_report.evaluate(
            work / SYNTHETIC_DIR,
            data,
            data,
            target,
            cfg,
            progress=progress,
            trtr_cache=trtr_cache,
            compare=compare,
        )
    except EvaluateError as err:
        raise ReproduceError(f"evaluate: {err}") from None


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """torch threads for every stage; the training run keeps them when OMP_NUM_THREADS is set."""
    before_threads = torch.get_num_threads()
    before_env = os.environ.get("OMP_NUM_THREADS")
    if count > 0:
        torch.set_num_threads(count)
        os.environ["OMP_NUM_THREADS"] = str(count)
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        if before_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_env


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to ``seconds[name]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0


def _check_only_the_classifier_spent(ledger_path: Path) -> None:
    """A fresh DP SpineGAN run must compose with its classifier alone; GAN steps of an earlier
    attempt would be counted again (safe, but not what the table says)."""
    if not ledger_path.is_file():
        raise ReproduceError(
            f"{ledger_path}: missing, so the DP classifier's ε is not on record; remove the "
            "arm's folder and rerun"
        )
    ledger = PrivacyLedger.open(ledger_path, create=False)
    stale = [r for r in ledger.records() if r["label"] != MECHANISM_LABEL]
    if stale:
        raise ReproduceError(
            f"{ledger_path}: holds {len(stale)} GAN record(s) of an earlier attempt beside the "
            "classifier's; remove the arm's folder and rerun to start its privacy account afresh"
        )
