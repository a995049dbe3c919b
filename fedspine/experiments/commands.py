"""Each arm as the library calls it makes and as the equivalent commands, and the plan as text.

The typed requests (:func:`train_request`, :func:`classifier_request`) are what ``reproduce``
runs; the argument lists (:func:`train_args`, :func:`classifier_args`) are what it prints and
records, so a reader can rerun one arm by hand. A test parses every printed command through the
CLI and asserts it builds the identical request.
"""

from __future__ import annotations

from pathlib import Path

from fedspine.experiments.budgets import ReproduceBudget
from fedspine.experiments.plan import (
    ARMS_DIR,
    CLASSIFIER_DIR,
    CLINICAL_WEIGHT,
    DATA_DIR,
    PRIVACY_HOME_DIR,
    RELEASE_DIR,
    RELEASE_FILE,
    RUN_DIR,
    ArmKind,
    ArmPlan,
    ReproducePlan,
)
from fedspine.fileio import PRIVACY_SUMMARY
from fedspine.training.classifier_run import ClassifierDPRequest, ClassifierRequest
from fedspine.training.dp_ablation import AblationOptions
from fedspine.training.gan_trainer import resolve_device
from fedspine.training.mean_embedding_fit import FitRequest
from fedspine.training.run import ClinicalRequest, DPRequest, TrainRequest


def format_plan(plan: ReproducePlan) -> str:
    """The plan as text: data, budget settings, then each arm with its commands."""
    b = plan.budget
    lines = [
        f"fedspine reproduce: budget {b.name} ({b.purpose})",
        f"  data: {plan.root} -> {plan.out / DATA_DIR}/{{abnormality,lesion}} "
        f"at {b.resolution} px (label rule: correct; val split carved by patient)",
        f"  GAN: preset {b.gan_preset}, {b.resolution} px"
        + (f", batch {b.gan_batch}" if b.gan_batch else "")
        + f", {_seeds_text(b)}, device {b.device}",
        f"  classifiers: {b.classifier_arch}"
        + (f" at {b.classifier_input_size} px" if b.classifier_input_size else "")
        + f", ≤ {b.classifier_epochs} epochs (patience {b.classifier_patience}), "
        f"{b.per_class} synthetic images per class, bootstrap {b.bootstrap}, "
        + (
            f"starting from {plan.classifier_weights}"
            if plan.classifier_weights
            else "from scratch (--classifier-weights FILE for an ImageNet start, as the paper)"
        ),
        "  (paths below are relative to OUT)",
        f"  SpineGAN in this build: {'yes' if plan.spinegan[0] else 'no'} ({plan.spinegan[1]})",
    ]
    if plan.public:
        p = plan.public
        lines.append(
            f"  public checkpoint: {p.path / p.checkpoint} ({p.short}, {p.resolution} px, "
            f"{p.classes} classes; declared public: {p.declaration}); its arms cost no ε for "
            "the checkpoint, and 'DP − public-only' in the table is what each DP arm adds to it"
        )
    if b.seeds > 1:
        lines.append(
            f"  {b.seeds} training seeds: each trains, generates, classifies and evaluates every "
            f"arm that runs; seed {b.seed} in {ARMS_DIR}/NAME, the others in {ARMS_DIR}/NAME-seedS"
        )
    replicate = -1
    for arm in plan.arms:
        if arm.replicate != replicate:
            replicate = arm.replicate
            lines.append(
                f"  arms, replicate {replicate + 1} of {b.seeds} (seed {arm.seed}):"
                if b.seeds > 1
                else "  arms:"
            )
        if arm.not_run:
            lines.append(f"    - {arm.folder}: {arm.title} -- {arm.not_run}")
            continue
        lines.append(f"    - {arm.folder}: {arm.title}")
        folder = Path(ARMS_DIR) / arm.folder
        data = Path(DATA_DIR) / arm.data
        if arm.kind.clinical:
            lines.append(
                "        fedspine classifier train "
                + " ".join(classifier_args(plan, data, folder / CLASSIFIER_DIR, arm))
            )
        if arm.kind.trains_gan:
            lines.append(
                "        fedspine train " + " ".join(train_args(plan, arm, data, folder / RUN_DIR))
            )
        elif arm.kind is ArmKind.DP_EMBEDDING:
            lines.append(
                "        fedspine embedding release "
                + " ".join(release_args(plan, arm, data, folder / RELEASE_DIR / RELEASE_FILE))
            )
            lines.append(
                "        fedspine embedding fit "
                + " ".join(fit_args(plan, arm, folder / RELEASE_DIR / RELEASE_FILE, folder))
            )
        else:
            lines.append("        no training: the public checkpoint's own generator")
        if arm.kind.ceiling:
            shared = plan.shared_ceiling(arm)
            lines.append(
                f"        ceiling: the DP-SGD classifier at ε = {arm.epsilon:g}"
                + (f" of {ARMS_DIR}/{shared.folder}" if shared else ", trained in the arm")
            )
        lines.append(
            f"        generate {b.per_class} per class, seed {arm.seed}; evaluate "
            + arm.evaluation_note
        )
    if plan.runs_ablation:
        lines.append(
            "  the DP ablation arms (dp_clip_only, dp_noise_only, dp_paper) are NOT private: each "
            f"run's {PRIVACY_SUMMARY} says so and no privacy ledger is written"
        )
    return "\n".join(lines) + "\n"


def train_request(
    plan: ReproducePlan, arm: ArmPlan, data: Path, run: Path, resume: bool = False
) -> TrainRequest:
    """The arm's training as a typed request: what :func:`train_args` spells as a command."""
    b = plan.budget
    dp = ablation = clinical = None
    if arm.kind.private:
        dp = DPRequest(
            target_epsilon=arm.epsilon,
            expected_patients_per_step=b.dp_patients_per_step,
            ada_p=b.dp_ada_p,
            trainable_d=b.dp_public_trainable_d if arm.kind is ArmKind.DP_PUBLIC else "all",
            privacy_home=run.parent / PRIVACY_HOME_DIR,
        )
    elif arm.kind is ArmKind.PAPER:
        ablation = AblationOptions(arm.kind.value)
    elif arm.kind.ablation:
        ablation = AblationOptions(
            arm.kind.value,
            noise_for_epsilon=arm.noise_epsilon if arm.kind is ArmKind.NOISE_ONLY else None,
            expected_patients_per_step=b.dp_patients_per_step,
            ada_p=b.dp_ada_p,
        )
    if arm.kind.clinical and not resume:
        clinical = ClinicalRequest(
            classifier=run.parent / CLASSIFIER_DIR, weight=CLINICAL_WEIGHT, mapping="default"
        )
    if resume:
        return TrainRequest(
            prepared=data,
            out=run,
            resume=True,
            kimg=arm.kimg,
            device=b.device,
            dp=dp,
            ablation=ablation,
        )
    return TrainRequest(
        prepared=data,
        out=run,
        preset=b.gan_preset,
        kimg=arm.kimg,
        resolution=b.resolution,
        seed=arm.seed,
        batch=b.gan_batch if b.gan_batch and arm.kind.keeps_batch else None,
        device=b.device,
        model=arm.kind.model,
        dp=dp,
        clinical=clinical,
        ablation=ablation,
        init_from=_init_from(plan, arm),
    )


def _init_from(plan: ReproducePlan, arm: ArmPlan) -> Path | None:
    """The public run a public arm starts from; None for every other arm."""
    return plan.public.path if arm.kind.public and plan.public else None


def embedding_features(plan: ReproducePlan, arm: ArmPlan) -> str:
    """The feature map a DP mean-embedding arm releases: random Fourier features of pixels
    (their public defaults) and the public checkpoint's D features (DP-MEPF), which measured
    best at ε 1-10 on pooled phantom sites (README)."""
    init = _init_from(plan, arm)
    return "rff" if init is None else f"rff+{init}"


def release_args(plan: ReproducePlan, arm: ArmPlan, data: Path, out: Path) -> list[str]:
    """`fedspine embedding release` arguments of a DP mean-embedding arm: the one step that
    reads private data, into the arm's own privacy home."""
    return [
        str(data),
        "--epsilon",
        f"{arm.epsilon:g}",
        "--features",
        embedding_features(plan, arm),
        "--out",
        str(out),
        "--privacy-home",
        str(out.parent.parent / PRIVACY_HOME_DIR),
    ]


def fit_request(plan: ReproducePlan, arm: ArmPlan, release: Path, work: Path) -> FitRequest:
    """The generator fit of a DP mean-embedding arm (no private data, no ε): from the public
    checkpoint's generator, the budget's steps and resolution, the arm's seed."""
    b = plan.budget
    init = _init_from(plan, arm)
    return FitRequest(
        releases=[release],
        out=work / RUN_DIR,
        steps=b.embedding_steps,
        preset=b.gan_preset,
        resolution=b.resolution,
        init_from=init,
        feature_networks=[] if init is None else [init],
        seed=arm.seed,
        device=str(resolve_device(b.device)),
    )


def fit_args(plan: ReproducePlan, arm: ArmPlan, release: Path, work: Path) -> list[str]:
    """`fedspine embedding fit` arguments equal to :func:`fit_request` (the device resolved
    when the budget says auto)."""
    b = plan.budget
    args = [str(release), "--out", str(work / RUN_DIR), "--steps", str(b.embedding_steps)]
    args += ["--preset", b.gan_preset, "--resolution", str(b.resolution)]
    init = _init_from(plan, arm)
    if init is not None:
        args += ["--init-from", str(init), "--feature-network", str(init)]
    args += ["--seed", str(arm.seed)]
    if b.device != "auto":
        args += ["--device", b.device]
    return args


def classifier_request(
    plan: ReproducePlan, data: Path, out: Path, arm: ArmPlan
) -> ClassifierRequest:
    """The clinical classifier as a typed request: what :func:`classifier_args` spells."""
    b = plan.budget
    epsilon = b.dp_spinegan_classifier_epsilon if arm.kind is ArmKind.DP_SPINEGAN else None
    return _classifier(plan, data, out, arm, b.spinegan_classifier_epochs, epsilon)


def ceiling_request(plan: ReproducePlan, data: Path, out: Path, arm: ArmPlan) -> ClassifierRequest:
    """A DP arm's ceiling: the evaluation's classifier recipe trained directly with DP-SGD at
    the arm's ε on the same real training split, in its own privacy home."""
    return _classifier(plan, data, out, arm, plan.budget.classifier_epochs, arm.epsilon)


def _classifier(
    plan: ReproducePlan,
    data: Path,
    out: Path,
    arm: ArmPlan,
    epochs: int,
    epsilon: float | None,
) -> ClassifierRequest:
    """The budget's classifier recipe; with ``epsilon``, patient-level DP-SGD whose steps go to
    the privacy home beside ``out``."""
    b = plan.budget
    dp = None
    if epsilon is not None:
        dp = ClassifierDPRequest(
            target_epsilon=epsilon,
            patients_per_step=b.dp_patients_per_step,
            privacy_home=out.parent / PRIVACY_HOME_DIR,
        )
    return ClassifierRequest(
        data=data,
        out=out,
        arch=b.classifier_arch,
        epochs=epochs,
        patience=b.classifier_patience,
        seed=arm.seed,
        device=b.device,
        threads=b.threads,
        input_size=b.classifier_input_size,
        weights=Path(plan.classifier_weights) if plan.classifier_weights else None,
        dp=dp,
    )


def ceiling_args(plan: ReproducePlan, data: Path, out: Path, arm: ArmPlan) -> list[str]:
    """`fedspine classifier train` arguments equal to :func:`ceiling_request`."""
    r = ceiling_request(plan, data, out, arm)
    args = [str(data), "--out", str(out), "--arch", r.arch, "--epochs", str(r.epochs)]
    args += ["--patience", str(r.patience), "--seed", str(r.seed), "--device", r.device]
    if r.input_size:
        args += ["--input-size", str(r.input_size)]
    if r.weights:
        args += ["--weights", str(r.weights)]
    args += ["--dp", "--epsilon", f"{arm.epsilon:g}", "--patients-per-step"]
    args += [str(r.dp.patients_per_step), "--privacy-home", str(r.dp.privacy_home)]
    return args


def train_args(plan: ReproducePlan, arm: ArmPlan, data: Path, run: Path) -> list[str]:
    """`fedspine train` arguments equal to :func:`train_request` (a fresh run)."""
    b = plan.budget
    args = [str(data), "--out", str(run), "--preset", b.gan_preset]
    args += ["--kimg", f"{arm.kimg:g}", "--resolution", str(b.resolution), "--seed", str(arm.seed)]
    if b.gan_batch and arm.kind.keeps_batch:
        args += ["--batch", str(b.gan_batch)]
    args += ["--device", b.device]
    if arm.kind.clinical:
        args += ["--model", "spinegan", "--classifier", str(run.parent / CLASSIFIER_DIR)]
        args += ["--clinical-weight", f"{CLINICAL_WEIGHT:g}", "--clinical-input", "default"]
    if arm.kind.private:
        args += _dp_args(b, arm, run.parent)
    elif arm.kind.ablation:
        args += _ablation_args(b, arm)
    if arm.kind is ArmKind.DP_PUBLIC:
        args += ["--dp-trainable-d", b.dp_public_trainable_d]
    init = _init_from(plan, arm)
    if init is not None:
        args += ["--init-from", str(init)]
    return args


def classifier_args(
    plan: ReproducePlan, data: Path, out: Path, arm: ArmPlan | None = None
) -> list[str]:
    """`fedspine classifier train` arguments equal to :func:`classifier_request`."""
    b = plan.budget
    args = [str(data), "--out", str(out), "--arch", b.classifier_arch]
    if arm is not None and arm.kind is ArmKind.DP_SPINEGAN:
        args += ["--dp", "--epsilon", f"{b.dp_spinegan_classifier_epsilon:g}"]
        args += ["--patients-per-step", str(b.dp_patients_per_step)]
        args += ["--privacy-home", str(out.parent / PRIVACY_HOME_DIR)]
    args += ["--epochs", str(b.spinegan_classifier_epochs)]
    seed = arm.seed if arm is not None else b.seed
    args += ["--patience", str(b.classifier_patience), "--seed", str(seed)]
    args += ["--device", b.device, "--threads", str(b.threads)]
    if b.classifier_input_size:
        args += ["--input-size", str(b.classifier_input_size)]
    if plan.classifier_weights:
        args += ["--weights", str(plan.classifier_weights)]
    return args


def _dp_args(b: ReproduceBudget, arm: ArmPlan, work: Path) -> list[str]:
    """Each DP arm is its own experiment, so it gets its own privacy home inside its folder (ε
    does not compose across arms; releasing several of them would, and a user's real ledger
    is never touched). The DP SpineGAN's home already holds its classifier's steps, so its
    target ε covers both."""
    return [
        "--dp",
        "--epsilon",
        f"{arm.epsilon:g}",
        "--patients-per-step",
        str(b.dp_patients_per_step),
        "--ada-p",
        f"{b.dp_ada_p:g}",
        "--privacy-home",
        str(work / PRIVACY_HOME_DIR),
    ]


def _ablation_args(b: ReproduceBudget, arm: ArmPlan) -> list[str]:
    """`fedspine train --dp-scheme ...` for an ablation arm: the DP arms' patients per step and
    ADA p (clip C = 1 and δ are the defaults both use); no --dp, no ledger: not private."""
    args = ["--dp-scheme", arm.kind.value]
    if arm.kind is ArmKind.PAPER:
        return args
    if arm.kind is ArmKind.NOISE_ONLY:
        args += ["--noise-for-epsilon", f"{arm.noise_epsilon:g}"]
    return args + [
        "--patients-per-step",
        str(b.dp_patients_per_step),
        "--ada-p",
        f"{b.dp_ada_p:g}",
    ]


def _seeds_text(b: ReproduceBudget) -> str:
    if b.seeds == 1:
        return f"seed {b.seed}"
    return f"seeds {', '.join(str(s) for s in b.training_seeds)}"
