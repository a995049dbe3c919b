"""`fedspine train` and `fedspine generate`: single-site GAN training and synthetic datasets.

The commands parse flags and print: a run is one library call,
`fedspine.training.run.train(TrainRequest)` (the same call `reproduce` and the benchmarks make),
and generation is `fedspine.training.generate.generate_dataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fedspine.cli.common import privacy_home_option, privacy_unit_option
from fedspine.training.run import CLINICAL_INPUTS, MODELS, PRESET_NAMES

# fedspine.training.precision.MIXED_PRECISION, spelled out so that --help does not import torch.
MIXED_PRECISION = ("auto", "bf16", "fp16", "off")
EXIT_INTERRUPTED = 130


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.command("train")(train_command)
    app.command("pretrain")(pretrain_command)
    app.command("generate")(generate_command)


def train_command(
    prepared: Path = typer.Argument(..., help="Prepared dataset folder (from `fedspine ingest`)."),
    out: Path = typer.Option(
        ..., "--out", help="Run folder to create (or continue with --resume)."
    ),
    model: str = typer.Option(
        None,
        "--model",
        help="cgan (conditional StyleGAN2-ADA) or spinegan (cgan plus the clinical loss of a "
        "frozen classifier, --classifier). (default: cgan; on --resume, the run's)",
    ),
    preset: str = typer.Option(
        None,
        "--preset",
        help="paper (256 px, GPU), auto (dataset resolution), cpu (32 px). "
        "(default: cpu without CUDA, else auto)",
    ),
    kimg: float = typer.Option(
        None,
        "--kimg",
        help="Total length of the run in thousands of real images shown to D. "
        "(default: the preset's)",
    ),
    resolution: int = typer.Option(
        None,
        "--resolution",
        help="Train at this resolution; images are resized once at load. (default: the preset's)",
    ),
    snapshot_kimg: float = typer.Option(
        None,
        "--snapshot-kimg",
        help="Snapshot and sample grid every N kimg. (default: the preset's)",
    ),
    seed: int = typer.Option(None, "--seed", help="Random seed. (default: 0)"),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last snapshot."
    ),
    batch: int = typer.Option(
        None, "--batch", help="Minibatch size (the preset's other settings stay as they are)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option(
        None,
        "--precision",
        help="Half precision of the forward passes (weights, optimizer state, R1 and path "
        "length stay float32): auto (bf16 on a GPU, float32 on a CPU), bf16, fp16 (CUDA only) "
        "or off. On a CPU with bf16 instructions bf16 trained the cpu preset 1.7-2x as fast as "
        "float32 but learned worse (README); without them it is refused. "
        "(default: the preset's: off for cpu, auto for paper and auto)",
    ),
    dp: bool = typer.Option(
        False, "--dp", help="Differential privacy: patient-level DP-SGD on the discriminator."
    ),
    dp_scheme: str = typer.Option(
        None,
        "--dp-scheme",
        help="dpsgd: what --dp does (patient-level DP-SGD). The others are the paper's DP "
        "ablation, NOT private, run WITHOUT --dp, marked not private in RUN/privacy.json and "
        "never written to a privacy ledger: clip-only (DP-SGD's per-patient clipping to "
        "--clip, no noise), noise-only (DP-SGD's noise σ·C on unclipped per-patient gradients; "
        "needs --noise-multiplier or --noise-for-epsilon), paper (the paper's own scheme: "
        "N(0, 0.02²) on every gradient element of G and D, then whole-model clip to 1.5, "
        "batch 1; RUN/ablation.json gives its ε under standard accounting). "
        "(default: dpsgd with --dp)",
    ),
    epsilon: float = typer.Option(
        None,
        "--epsilon",
        help="With --dp: target ε of the worst training patient after this run, everything on "
        "record for them composed (σ is calibrated from it; checked again on --resume).",
    ),
    noise_multiplier: float = typer.Option(
        None,
        "--noise-multiplier",
        help="With --dp: σ instead of --epsilon. With --dp-scheme noise-only: the σ of its noise.",
    ),
    noise_for_epsilon: float = typer.Option(
        None,
        "--noise-for-epsilon",
        help="With --dp-scheme noise-only: add the noise σ·C that `--dp --epsilon E` would "
        "calibrate for this data and run length (empty ledger); the run itself has ε = ∞.",
    ),
    delta: float = typer.Option(
        None,
        "--delta",
        help="With --dp (or --noise-for-epsilon): δ, at most the site's min(1e-5, "
        "1/(10·patients)) (a larger one is refused). (default: the site's)",
    ),
    clip: float = typer.Option(
        None,
        "--clip",
        help="With --dp or --dp-scheme clip-only/noise-only: per-patient clip norm C (noise-only "
        "does not clip, its noise std is σ·C). (default: 1.0)",
    ),
    patients_per_step: int = typer.Option(
        None,
        "--patients-per-step",
        help="With --dp or --dp-scheme clip-only/noise-only: expected patients per D step "
        "(q = this / patients). (default: 64)",
    ),
    d_steps_per_g: int = typer.Option(
        None,
        "--d-steps-per-g",
        help="With --dp or --dp-scheme clip-only/noise-only: D steps per G step. (default: 1)",
    ),
    ada_p: float = typer.Option(
        None,
        "--ada-p",
        help="With --dp or --dp-scheme clip-only/noise-only: fixed augmentation probability "
        "(adaptive ADA reads private data). (default: 0)",
    ),
    dp_trainable_d: str = typer.Option(
        None,
        "--dp-trainable-d",
        help="With --dp: which part of D is trained and privatised: all; head (only the "
        "projection head: the label mapping and the epilogue's output layer, about 4 % of D at "
        "the cpu preset); or top:K (the 4x4 epilogue with the label mapping, plus the K-1 "
        "lowest-resolution blocks). The rest stays frozen, outside the noise, and G then trains "
        "its mapping network only (a fully trained G collapses against a partly frozen D). "
        "Useful with --init-from a public checkpoint. (default: all)",
    ),
    dp_augment_views: int = typer.Option(
        None,
        "--dp-augment-views",
        help="With --dp: augmented views of each image averaged inside each patient's gradient "
        "row before clipping (no privacy cost, K times the D work; needs --ada-p > 0). "
        "(default: 1)",
    ),
    privacy_home: Path = privacy_home_option(),
    privacy_unit: str = privacy_unit_option(),
    max_epsilon: float = typer.Option(
        None,
        "--max-epsilon",
        help="With --dp: refuse to start (or resume) if the worst training patient would pass "
        "this ε, everything on record for them composed.",
    ),
    classifier: Path = typer.Option(
        None,
        "--classifier",
        help="With --model spinegan: the frozen classifier of the clinical loss (a file or folder "
        "from `fedspine classifier train`). (default on --resume: the run's)",
    ),
    clinical_weight: float = typer.Option(
        None,
        "--clinical-weight",
        help="With --model spinegan: λ of the clinical loss. (default: 0.1, as in the paper)",
    ),
    clinical_input: str = typer.Option(
        None,
        "--clinical-input",
        help="With --model spinegan: default (the classifier's own [0, 1] resized input) or paper "
        "(the original code's raw [-1, 1] values and centre crop). (default: default)",
    ),
    classifier_public: bool = typer.Option(
        False,
        "--classifier-public",
        help="With --model spinegan: declare that the classifier was trained on public data only "
        "(recorded in privacy.json).",
    ),
    not_private: bool = typer.Option(
        False,
        "--not-private",
        help="With --model spinegan --dp: train although the classifier is not private; the run "
        "is marked not private.",
    ),
    public_data: str = typer.Option(
        None,
        "--public-data",
        help="Declare the training data public, and say why (e.g. 'fedspine phantom, seed "
        "1000'); only such a run may start another one with --init-from. Not with --dp.",
    ),
    init_from: Path = typer.Option(
        None,
        "--init-from",
        help="Start G, G_ema and D from a run (or snapshot) trained with --public-data: costs "
        "no ε; its SHA-256 is recorded in config.toml, the generator and privacy.json. D is "
        "built as the checkpoint's (without minibatch-std when it was pretrained --for-dp).",
    ),
    for_dp: bool = typer.Option(
        False,
        "--for-dp",
        help="Pretraining for DP fine-tuning: build D as a DP run does (no minibatch-std), so "
        "a --dp run can start from this one.",
    ),
) -> None:
    """Train a conditional StyleGAN2-ADA on the train split of a prepared dataset.

    With --dp the discriminator is trained with patient-level DP-SGD; its steps are written
    into the site's privacy ledger (--privacy-home) before they run, so a crash can only
    over-count, and RUN/privacy.json says what the worst training patient has spent (see
    `fedspine privacy report`). Without --dp the run is marked not private.

    --dp-scheme clip-only|noise-only|paper (without --dp) trains one arm of the paper's DP
    ablation instead: DP-SGD without its noise, DP-SGD's noise without its clipping, or the
    paper's own noise-then-clip scheme at batch 1. None of them is private: RUN/privacy.json says
    so, no privacy ledger is written, and RUN/ablation.json records the scheme and its ε (∞, or
    the paper scheme's ε under standard accounting).

    --model spinegan adds λ·BCE(C(G(z, c)), c) of a frozen classifier C to every generator step.
    Under --dp that is private only if C is: a DP-trained classifier (its metadata says so) or
    --classifier-public; --not-private trains anyway and marks the run not private.
    """
    if model is not None and model not in MODELS:
        _fail(f"--model {model}: choose one of {', '.join(MODELS)}")
    dp = dp or dp_scheme == "dpsgd"
    if clinical_input is not None and clinical_input not in CLINICAL_INPUTS:
        _fail(f"--clinical-input {clinical_input}: choose one of {', '.join(CLINICAL_INPUTS)}")
    if clinical_weight is not None and not clinical_weight >= 0:
        _fail(f"--clinical-weight {clinical_weight}: λ must be >= 0")
    spinegan_flags = {
        "--classifier": classifier is not None,
        "--clinical-weight": clinical_weight is not None,
        "--clinical-input": clinical_input is not None,
        "--classifier-public": classifier_public,
        "--not-private": not_private,
    }
    if model == "cgan" and any(spinegan_flags.values()):
        given = ", ".join(flag for flag, on in spinegan_flags.items() if on)
        _fail(f"{given}: only with --model spinegan")
    if not_private and not dp:
        _fail("--not-private only applies with --dp (a run without --dp is already not private)")
    if not_private and classifier_public:
        _fail("choose one of --classifier-public and --not-private")
    clinical_options = {
        "classifier": classifier,
        "weight": clinical_weight,
        "mapping": clinical_input,
        "classifier_public": classifier_public,
        "not_private": not_private,
    }
    if preset is not None and preset not in PRESET_NAMES:
        _fail(f"--preset {preset}: choose one of {', '.join(PRESET_NAMES)}")
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device {device}: choose auto, cpu or cuda")
    if precision is not None and precision not in MIXED_PRECISION:
        _fail(f"--precision {precision}: choose one of {', '.join(MIXED_PRECISION)}")
    dp_options, ablation = _privacy_options(
        dp,
        dp_scheme,
        {
            "--epsilon": epsilon,
            "--noise-multiplier": noise_multiplier,
            "--noise-for-epsilon": noise_for_epsilon,
            "--delta": delta,
            "--clip": clip,
            "--patients-per-step": patients_per_step,
            "--d-steps-per-g": d_steps_per_g,
            "--ada-p": ada_p,
            "--dp-trainable-d": dp_trainable_d,
            "--dp-augment-views": dp_augment_views,
            "--privacy-home": privacy_home,
            "--privacy-unit": privacy_unit,
            "--max-epsilon": max_epsilon,
        },
    )
    if ablation is not None:
        if model == "spinegan":
            _fail(f"--dp-scheme {ablation.scheme}: the DP ablation arms train --model cgan only")
        if ablation.scheme == "paper" and batch is not None and batch != 1:
            _fail(f"--batch {batch}: the paper scheme trains at batch 1 (as the paper did)")
    from fedspine.training.run import (
        ClinicalRequest,
        DPRequest,
        TrainInterrupted,
        TrainRequest,
        TrainRunError,
        train,
    )

    try:
        request = TrainRequest(
            prepared=prepared,
            out=out,
            preset=preset,
            kimg=kimg,
            resolution=resolution,
            snapshot_kimg=snapshot_kimg,
            seed=seed,
            resume=resume,
            batch=batch,
            device=device,
            precision=precision,
            model=model,
            dp=DPRequest(**dp_options) if dp_options is not None else None,
            clinical=ClinicalRequest(**clinical_options)
            if any(clinical_options.values())
            else None,
            ablation=ablation,
            public_data=public_data,
            init_from=init_from,
            for_dp=for_dp,
        )
        train(request, ConsoleReporter())
    except TrainRunError as err:
        _fail(str(err))
    except TrainInterrupted as stop:
        msg = (
            f"interrupted; last snapshot: {stop.last_snapshot} (continue with --resume)"
            if stop.last_snapshot
            else "interrupted before the first snapshot; nothing to resume from"
        )
        typer.echo(msg, err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def generate_command(
    run: Path = typer.Argument(..., help="Run folder of `fedspine train` (or its generator.pt)."),
    out: Path = typer.Option(..., "--out", help="Folder to create for the synthetic dataset."),
    per_class: int = typer.Option(100, "--per-class", help="Images per class."),
    truncation: float = typer.Option(
        1.0, "--truncation", help="Truncation psi (1 = none; lower = typical but less diverse)."
    ),
    fmt: str = typer.Option(
        "png", "--format", help="png (8-bit) or dicom (Secondary Capture, marked synthetic)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed of the latents and noise."),
    batch: int = typer.Option(32, "--batch", help="Images per generator call."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Write a synthetic dataset (folder layout: images + labels.csv) from a trained generator."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from fedspine.training.checkpoint import CheckpointError
    from fedspine.training.gan_trainer import resolve_device
    from fedspine.training.generate import (
        GenerationError,
        generate_dataset,
        generator_path,
        load_generator,
    )

    if fmt not in ("png", "dicom"):
        _fail(f"--format {fmt}: choose png or dicom")
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device {device}: choose auto, cpu or cuda")
    try:
        dev = resolve_device(device)
        _, meta = load_generator(generator_path(run), device="cpu")
        total = per_class * len(meta["class_names"])
        columns = (
            TextColumn("generate"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=_console()) as progress:
            task = progress.add_task("generate", total=total)
            written = generate_dataset(
                run,
                out,
                per_class=per_class,
                truncation=truncation,
                fmt=fmt,
                seed=seed,
                batch=batch,
                device=dev,
                progress=lambda n: progress.advance(task, n),
            )
    except KeyboardInterrupt:
        typer.echo(f"interrupted; nothing was written to {out}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (GenerationError, CheckpointError, RuntimeError) as err:
        _fail(str(err))
    typer.echo(f"wrote {total} synthetic images ({fmt}) to {written}")


_DP_FLAGS = ("--clip", "--patients-per-step", "--d-steps-per-g", "--ada-p")
_DP_DEFAULTS = {"--clip": 1.0, "--patients-per-step": 64, "--d-steps-per-g": 1, "--ada-p": 0.0}


def _privacy_options(dp: bool, scheme: str | None, flags: dict):
    """(DP options for RunPrivacy, AblationOptions) from the flags; at most one is not None.

    --dp is differential privacy and nothing else; the ablation schemes are not private, so
    they are refused with --dp, and flags that only make sense for a DP budget (--epsilon,
    --privacy-home, --privacy-unit, --max-epsilon) are refused with them.
    """
    from fedspine.training.dp_ablation import ABLATION_SCHEMES, SCHEMES

    if scheme is not None and scheme not in SCHEMES:
        _fail(f"--dp-scheme {scheme}: choose one of {', '.join(SCHEMES)}")
    given = {flag: value for flag, value in flags.items() if value is not None}
    value = {flag: given.get(flag, default) for flag, default in _DP_DEFAULTS.items()}
    if scheme in ABLATION_SCHEMES:
        if dp:
            _fail(
                f"--dp-scheme {scheme} is a non-private ablation; --dp asks for differential "
                "privacy: drop --dp (the run is marked not private)"
            )
        return None, _ablation_options(scheme, given, value)
    if dp or scheme == "dpsgd":
        if given.get("--noise-for-epsilon") is not None:
            _fail("--noise-for-epsilon only applies with --dp-scheme noise-only")
        if ("--epsilon" in given) == ("--noise-multiplier" in given):
            _fail("--dp needs exactly one of --epsilon and --noise-multiplier")
        _check_dp_fine_tuning(given, value)
        return {
            "target_epsilon": given.get("--epsilon"),
            "noise_multiplier": given.get("--noise-multiplier"),
            "delta": given.get("--delta"),
            "max_grad_norm": value["--clip"],
            "expected_patients_per_step": value["--patients-per-step"],
            "d_steps_per_g": value["--d-steps-per-g"],
            "ada_p": value["--ada-p"],
            "trainable_d": given.get("--dp-trainable-d", "all"),
            "augment_views": given.get("--dp-augment-views", 1),
            "privacy_home": given.get("--privacy-home"),
            "privacy_unit": given.get("--privacy-unit"),
            "max_epsilon": given.get("--max-epsilon"),
        }, None
    if given:
        _fail(f"{', '.join(given)}: need --dp (or --dp-scheme, for the DP ablation)")
    return None, None


def _check_dp_fine_tuning(given: dict, value: dict) -> None:
    """--dp-trainable-d and --dp-augment-views, refused before any data is read."""
    from fedspine.dp_options import MAX_AUGMENT_VIEWS, trainable_d_problem

    problem = trainable_d_problem(given.get("--dp-trainable-d", "all"))
    if problem:
        _fail(f"--dp-trainable-d: {problem}")
    views = given.get("--dp-augment-views", 1)
    if not 1 <= views <= MAX_AUGMENT_VIEWS:
        _fail(f"--dp-augment-views {views}: choose 1 to {MAX_AUGMENT_VIEWS}")
    if views > 1 and not value["--ada-p"] > 0:
        _fail(
            f"--dp-augment-views {views} averages augmented views, but no augmentation is on: "
            "give --ada-p > 0 (or drop --dp-augment-views)"
        )


def _ablation_options(scheme: str, given: dict, value: dict):
    from fedspine.training.dp_ablation import AblationError, AblationOptions

    budget_only = [
        f for f in ("--epsilon", "--privacy-home", "--privacy-unit", "--max-epsilon") if f in given
    ]
    if budget_only:
        _fail(
            f"{', '.join(budget_only)}: not with --dp-scheme {scheme}, a non-private ablation "
            "(no ε budget, no ledger)"
        )
    allowed = {
        "clip-only": set(_DP_FLAGS),
        "noise-only": {*_DP_FLAGS, "--noise-multiplier", "--noise-for-epsilon", "--delta"},
        "paper": set(),
    }[scheme]
    extra = [flag for flag in given if flag not in allowed]
    if extra:
        fixed = (
            " (its noise std 0.02, clip 1.5 and batch 1 are the paper's)"
            if scheme == "paper"
            else ""
        )
        _fail(f"{', '.join(extra)}: not with --dp-scheme {scheme}{fixed}")
    if scheme == "noise-only" and ("--noise-multiplier" in given) == (
        "--noise-for-epsilon" in given
    ):
        _fail(
            "--dp-scheme noise-only needs exactly one of --noise-multiplier and --noise-for-epsilon"
        )
    if "--delta" in given and "--noise-for-epsilon" not in given:
        _fail("--delta: with --dp-scheme noise-only only together with --noise-for-epsilon")
    try:
        if scheme == "paper":
            return AblationOptions(scheme)
        return AblationOptions(
            scheme,
            noise_multiplier=given.get("--noise-multiplier"),
            noise_for_epsilon=given.get("--noise-for-epsilon"),
            delta=given.get("--delta"),
            max_grad_norm=float(value["--clip"]),
            expected_patients_per_step=int(value["--patients-per-step"]),
            d_steps_per_g=int(value["--d-steps-per-g"]),
            ada_p=float(value["--ada-p"]),
        )
    except AblationError as err:
        _fail(str(err))


class ConsoleReporter:
    """The run's lines on stdout and a rich progress bar on stderr."""

    def __init__(self) -> None:
        self.progress: Any = None
        self.task: Any = None

    def message(self, text: str) -> None:
        typer.echo(text)

    def start(self, total_kimg: float, done_kimg: float, ada_p: float, private: bool) -> None:
        self.progress = _progress_bar()
        self.progress.start()
        self.task = self.progress.add_task(
            "train",
            total=total_kimg,
            completed=done_kimg,
            loss_g=float("nan"),
            d=_d_loss_text(None, private),
            p=ada_p,
            spk=float("nan"),
        )

    def step(self, kimg: float) -> None:
        self.progress.update(self.task, completed=kimg)

    def tick(self, record: dict[str, Any], private: bool) -> None:
        self.progress.update(
            self.task,
            loss_g=record["loss_g"],
            d=_d_loss_text(record.get("loss_d"), private),
            p=record["ada_p"],
            spk=record["sec_per_kimg"] or float("nan"),
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _d_loss_text(loss_d: float | None, private: bool) -> str:
    """D's loss for the progress bar; under DP it is computed on private images, so never shown."""
    if private:
        return "private"
    return "-" if loss_d is None else f"{loss_d:.3f}"


def _progress_bar():
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("train"),
        BarColumn(),
        TextColumn("{task.completed:.2f}/{task.total:g} kimg"),
        TextColumn("{task.fields[spk]:.1f} s/kimg"),
        TextColumn("G {task.fields[loss_g]:.3f} D {task.fields[d]}"),
        TextColumn("p {task.fields[p]:.3f}"),
        TimeRemainingColumn(),
        console=_console(),
    )


def _console():
    from rich.console import Console

    return Console(stderr=True)


def pretrain_command(
    out: Path = typer.Option(..., "--out", help="Folder for the public corpus and its run."),
    images: int = typer.Option(2000, "--images", min=16, help="Phantom images to make."),
    seed: int = typer.Option(1000, "--seed", help="Seed of the public corpus (not a site's)."),
    prevalence: float = typer.Option(
        0.5, "--prevalence", help="Share of abnormal patients in the public corpus."
    ),
    size: int = typer.Option(
        256, "--size", min=64, help="Side of the phantom DICOMs in pixels (before ingestion)."
    ),
    resolution: int = typer.Option(32, "--resolution", help="Training resolution in pixels."),
    preset: str = typer.Option("cpu", "--preset", help="Training preset (see `train`)."),
    kimg: float = typer.Option(None, "--kimg", help="Thousands of images to train on."),
    for_dp: bool = typer.Option(
        True, "--for-dp/--not-for-dp", help="Build D as a DP run does, so --dp runs can use it."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Train a public checkpoint on fedspine's phantom simulator, for `train --init-from`.

    Makes a phantom population of its own seed, imaging chain and prevalence (no patient is in
    it), ingests it and trains on it with the data declared public. Starting a private run from
    it (`fedspine train --init-from OUT/run`, with or without --dp) costs no ε, and the run
    records the checkpoint's SHA-256. Run it again to continue training.
    """
    from fedspine.experiments.pretrain import PretrainConfig, pretrain  # lazy: torch
    from fedspine.training.run import TrainInterrupted, TrainRunError  # lazy: as above

    config = PretrainConfig(
        images=images,
        seed=seed,
        prevalence=prevalence,
        size=size,
        resolution=resolution,
        preset=preset,
        kimg=kimg,
        for_dp=for_dp,
        device=device,
    )
    try:
        result = pretrain(
            out, config, stage=lambda m: typer.echo(f"==> {m}"), reporter=ConsoleReporter()
        )
    except (TrainRunError, ValueError, OSError) as err:
        _fail(str(err))
    except TrainInterrupted:
        _fail(f"interrupted; run `fedspine pretrain --out {out}` again to continue")
    typer.echo(
        f"public checkpoint: {result.out} (start a run from it with --init-from {result.out})"
    )


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
