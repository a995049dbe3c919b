"""`fedspine train` and `fedspine generate`: single-site GAN training and synthetic datasets.

The commands only wire files, devices and progress around the library: training itself is
`fedspine.training.GanTrainer` (the same object the federated client drives) and generation is
`fedspine.training.generate.generate_dataset`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from fedspine.cli.common import privacy_home_option, privacy_unit_option

MODELS = ("cgan", "spinegan")
CLINICAL_INPUTS = ("default", "paper")
PRESET_NAMES = ("paper", "auto", "cpu")
# fedspine.training.precision.MIXED_PRECISION, spelled out so that --help does not import torch.
MIXED_PRECISION = ("auto", "bf16", "fp16", "off")
LATEST_FILE = "latest.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
EXIT_INTERRUPTED = 130
_CLINICAL_FLAGS = {
    "classifier": "--classifier",
    "weight": "--clinical-weight",
    "mapping": "--clinical-input",
    "classifier_public": "--classifier-public",
    "not_private": "--not-private",
}


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.command("train")(train_command)
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
    try:
        _train(
            prepared,
            out,
            preset,
            kimg,
            resolution,
            snapshot_kimg,
            seed,
            resume,
            batch,
            device,
            dp_options,
            model,
            clinical_options,
            ablation,
            precision,
        )
    except _CliError as err:
        _fail(str(err))


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


class _CliError(Exception):
    """A one-line reason to stop."""


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
        return {
            "target_epsilon": given.get("--epsilon"),
            "noise_multiplier": given.get("--noise-multiplier"),
            "delta": given.get("--delta"),
            "max_grad_norm": value["--clip"],
            "expected_patients_per_step": value["--patients-per-step"],
            "d_steps_per_g": value["--d-steps-per-g"],
            "ada_p": value["--ada-p"],
            "privacy_home": given.get("--privacy-home"),
            "privacy_unit": given.get("--privacy-unit"),
            "max_epsilon": given.get("--max-epsilon"),
        }, None
    if given:
        _fail(f"{', '.join(given)}: need --dp (or --dp-scheme, for the DP ablation)")
    return None, None


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


def _train(
    prepared,
    out,
    preset,
    kimg,
    resolution,
    snapshot_kimg,
    seed,
    resume,
    batch,
    device,
    dp_options,
    model=None,
    clinical_options=None,
    ablation=None,
    precision=None,
) -> None:
    import dataclasses

    from fedspine.data.prepared import PreparedDatasetError, load_prepared
    from fedspine.training.batches import BatchSampler, training_data
    from fedspine.training.checkpoint import CheckpointError, load_checkpoint
    from fedspine.training.config import TrainConfig, preset_config, write_config_toml
    from fedspine.training.gan_trainer import GanTrainer, configure_cpu, resolve_device
    from fedspine.training.precision import resolve_precision

    try:
        dataset = load_prepared(prepared)
    except PreparedDatasetError as err:
        raise _CliError(str(err)) from None
    train = dataset.select("train", labelled=True)
    if len(train) == 0:
        raise _CliError(f"{prepared}: the train split holds no labelled image; nothing to train on")
    try:
        dev = resolve_device(device)
    except RuntimeError as err:
        raise _CliError(str(err)) from None

    state = None
    if resume:
        latest = out / LATEST_FILE
        if not latest.is_file():
            raise _CliError(f"{out}: no {LATEST_FILE}; not a run folder with a snapshot to resume")
        pointer = json.loads(latest.read_text())
        snapshot = out / pointer["snapshot"]
        try:
            ckpt = load_checkpoint(snapshot, kind="trainer", map_location="cpu")
        except CheckpointError as err:
            raise _CliError(str(err)) from None
        state = ckpt["trainer"]
        config = TrainConfig.from_dict(state["config"])
        given = {
            "--preset": (preset, config.preset),
            "--resolution": (resolution, config.resolution),
            "--seed": (seed, config.seed),
            "--batch": (batch, config.batch),
            "--precision": (precision, config.mixed_precision),
        }
        for flag, (value, saved) in given.items():
            if value is not None and value != saved:
                raise _CliError(
                    f"{flag} {value} conflicts with the run's {saved}; omit it when resuming"
                )
        if ckpt["dataset"]["content_hash"] != dataset.content_hash:
            raise _CliError(
                f"{prepared}: not the dataset this run was trained on (content hash differs); "
                "resume with the original prepared dataset"
            )
        if kimg is not None:
            config.total_kimg = kimg
        if snapshot_kimg is not None:
            config.snapshot_kimg = snapshot_kimg
        last_snapshot_nimg = int(state["counters"]["cur_nimg"])
    else:
        if out.exists() and any(out.iterdir()):
            raise _CliError(
                f"{out} already holds files; pass --resume to continue it or choose another --out"
            )
        name = preset or ("auto" if dev.type == "cuda" else "cpu")
        res = resolution
        if res is None and name == "auto":
            res = dataset.resolution
        try:
            config = preset_config(name, res, dataset.num_classes)
        except ValueError as err:
            raise _CliError(f"--preset {name}: {err}") from None
        if kimg is not None:
            config.total_kimg = kimg
        if snapshot_kimg is not None:
            config.snapshot_kimg = snapshot_kimg
        if seed is not None:
            config.seed = seed
        if precision is not None:
            config.mixed_precision = precision
        if batch is not None:
            if batch < 1:
                raise _CliError("--batch must be at least 1")
            config.batch = batch
            config.network = dataclasses.replace(
                config.network, mbstd_group=min(config.network.mbstd_group, batch)
            )
        last_snapshot_nimg = 0
    config.device = device
    try:
        resolve_precision(config.mixed_precision, dev)  # refuse before any data is loaded
    except ValueError as err:
        raise _CliError(f"--precision {config.mixed_precision}: {err}") from None
    if config.tick_kimg > config.snapshot_kimg:
        config.tick_kimg = config.snapshot_kimg
    if state is not None:
        from fedspine.training.dp_ablation import saved_scheme

        was = saved_scheme(state)
        now = "dpsgd" if dp_options is not None else (ablation.scheme if ablation else None)
        if was != now:
            raise _CliError(
                f"resume with the same --dp / --dp-scheme setting the run was started with "
                f"(it was trained with {_scheme_flags(was)}, this call asks for "
                f"{_scheme_flags(now)})"
            )
    saved_model = None if state is None else ("spinegan" if "clinical" in state else "cgan")
    if model is None:
        model = saved_model or "cgan"
    elif saved_model is not None and model != saved_model:
        raise _CliError(f"--model {model} conflicts with the run's {saved_model}; omit it")
    if model == "cgan" and clinical_options and any(clinical_options.values()):
        given = ", ".join(_CLINICAL_FLAGS[k] for k, v in clinical_options.items() if v)
        raise _CliError(f"{given}: only with --model spinegan (this run is cgan)")
    clinical = clinical_status = None
    if model == "spinegan":
        clinical, clinical_status = _clinical_setup(
            clinical_options or {}, state, list(dataset.class_names), dp_options is not None
        )
    privacy = None
    if dp_options is not None:
        from fedspine.privacy.home import PrivacyHomeError
        from fedspine.privacy.ledger import LedgerError

        try:
            if clinical is not None:
                from fedspine.training.clinical import ClinicalRunPrivacy

                privacy = ClinicalRunPrivacy(
                    prepared, dataset, train, out, dp_options, clinical, clinical_status
                )
            else:
                from fedspine.training.dp_run import RunPrivacy

                privacy = RunPrivacy(prepared, dataset, train, out, dp_options)
        except (ValueError, LedgerError, PrivacyHomeError) as err:
            raise _CliError(str(err)) from None
        config = privacy.adjust_config(config)
    ablation_run = None
    if ablation is not None:
        from fedspine.training.dp_ablation import AblationRun

        ablation_run = AblationRun(ablation, dataset, train, out)
        config = ablation_run.adjust_config(config)

    data = training_data(train, config.resolution)
    if data.resized_from is not None:
        typer.echo(
            f"resized the training images once at load: {data.resized_from} px -> "
            f"{config.resolution} px"
        )
    if dev.type == "cpu":
        configure_cpu()
    if privacy is not None:
        from fedspine.privacy.ledger import LedgerError

        try:
            trainer = privacy.make_trainer(config, data, dev, state)
        except (ValueError, LedgerError) as err:
            raise _CliError(str(err)) from None
    elif ablation_run is not None:
        try:
            trainer = ablation_run.make_trainer(config, data, dev, state)
        except ValueError as err:
            raise _CliError(str(err)) from None
    elif clinical is not None:
        from fedspine.training.clinical import ClinicalLossError, SpineGanTrainer

        try:
            trainer = SpineGanTrainer(config, data.label_prior(), clinical, device=dev)
        except ClinicalLossError as err:
            raise _CliError(str(err)) from None
    else:
        trainer = GanTrainer(config, data.label_prior(), device=dev)
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except ValueError as err:
            raise _CliError(str(err)) from None
        typer.echo(f"resumed {out} at {trainer.cur_nimg / 1000:.3f} kimg")
    typer.echo(f"precision: {trainer.precision.name} ({trainer.precision.how})")
    timed = trainer.modconv_choice.seconds
    if timed:
        path = "fused" if trainer.modconv_choice.fused else "non-fused"
        typer.echo(
            f"modulated convolutions: {path} (G forward + backward timed at "
            f"{timed['fused'] * 1000:.1f} ms fused, {timed['non_fused'] * 1000:.1f} ms non-fused)"
        )

    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    (out / "snapshots").mkdir(exist_ok=True)
    dataset_info = {
        "path": str(Path(prepared).resolve()),
        "content_hash": dataset.content_hash,
        "class_names": list(data.class_names),
        "train_images": len(data),
        "prepared_resolution": dataset.resolution,
    }
    if privacy is None:
        # The empirical class frequencies are private data; a DP run uses the uniform prior.
        dataset_info["label_prior"] = [float(p) for p in data.label_prior()]
    scheme = "dpsgd" if privacy is not None else (ablation.scheme if ablation else "none")
    run_config = {
        "fedspine_version": _version(),
        "model": model,
        "dp_scheme": scheme,
        "device_used": str(dev),
        "modconv_path": trainer.modconv_choice.to_dict(),
        "precision": trainer.precision.to_dict(),
        "dataset": dataset_info,
        "train": config.to_dict(),
    }
    training_meta: dict = {"model": model, "dp_scheme": scheme}
    if ablation is not None:
        run_config["dp_ablation"] = {
            k: v for k, v in dataclasses.asdict(ablation).items() if v is not None
        }
        run_config["dp_ablation"]["private"] = False
    if clinical is not None:
        run_config["clinical"] = {
            "classifier": clinical.path,
            "classifier_sha256": clinical.sha256,
            "weight": clinical.weight,
            "input_mapping": clinical.mapping,
            "task": clinical.task,
            "output_names": list(clinical.output_names),
            "classifier_privacy": clinical_status.component,
        }
        training_meta["clinical"] = {
            "classifier_sha256": clinical.sha256,
            "weight": clinical.weight,
            "input_mapping": clinical.mapping,
            # Lets an evaluation refuse to judge TRTS with this very classifier.
            "classifier_recipe": clinical.meta.get("recipe"),
        }
    write_config_toml(out / CONFIG_FILE, run_config)
    if ablation_run is not None:
        ablation_run.start()
    run = _Run(out, trainer, dataset_info, last_snapshot_nimg, training_meta)
    if state is None and privacy is None:
        run.save_reals(data)  # a DP run folder holds nothing drawn from private images

    target_nimg = int(round(config.total_kimg * 1000))
    remaining_kimg = max(target_nimg - trainer.cur_nimg, 0) / 1000
    if privacy is not None:
        batches = privacy.batches(data, dev)
    elif ablation_run is not None:
        batches = ablation_run.batches(data, dev, trainer.np_rng)
    else:
        batches = BatchSampler(data, config.batch, trainer.np_rng, device=dev)
    try:
        with _progress_bar() as progress:
            task = progress.add_task(
                "train",
                total=config.total_kimg,
                completed=trainer.cur_nimg / 1000,
                loss_g=float("nan"),
                d=_d_loss_text(None, privacy is not None),
                p=trainer.ada_p,
                spk=float("nan"),
            )

            def on_step(t: GanTrainer, m) -> None:
                progress.update(task, completed=t.cur_nimg / 1000)

            def on_tick(t: GanTrainer, record: dict) -> None:
                run.record_tick(record, final=t.cur_nimg >= target_nimg)
                progress.update(
                    task,
                    loss_g=record["loss_g"],
                    d=_d_loss_text(record.get("loss_d"), privacy is not None),
                    p=record["ada_p"],
                    spk=record["sec_per_kimg"] or float("nan"),
                )

            trainer.run(remaining_kimg, batches, on_tick=on_tick, on_step=on_step)
    except KeyboardInterrupt:
        if privacy is not None:
            privacy.finish(trainer)
        if ablation_run is not None:
            ablation_run.finish(trainer)
        where = run.last_snapshot
        msg = (
            f"interrupted; last snapshot: {where} (continue with --resume)"
            if where
            else "interrupted before the first snapshot; nothing to resume from"
        )
        typer.echo(msg, err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if run.last_snapshot_nimg != trainer.cur_nimg:
        run.snapshot()
    run.save_generator()
    typer.echo(f"trained to {trainer.cur_nimg / 1000:.3f} kimg; generator: {out / 'generator.pt'}")
    if privacy is not None:
        spent = privacy.finish(trainer)
        typer.echo(
            f"privacy: ε = {spent:.3f} at δ = {privacy.delta:.2g} for the worst of the "
            f"{privacy.num_patients} training {privacy.unit}s, everything on record composed "
            f"(privacy home {privacy.home}); report: fedspine privacy report {out}"
        )
        if clinical_status is not None and clinical_status.not_private_reason:
            typer.echo(f"the run is marked not private: {clinical_status.not_private_reason}")
    elif ablation_run is not None:
        summary = ablation_run.finish(trainer)
        typer.echo(
            f"NOT PRIVATE (DP ablation {ablation.scheme}): {summary['epsilon_text']}; "
            f"see {out / 'ablation.json'} and `fedspine privacy report {out}`"
        )
    else:
        from fedspine.privacy.report import write_privacy_summary

        components = {"discriminator": "trained without differential privacy"}
        if clinical_status is not None:
            components["clinical_classifier"] = clinical_status.component
        write_privacy_summary(
            out,
            {},
            components,
            not_private_reasons=["trained without differential privacy (no --dp)"],
        )


class _Run:
    """The run folder: metrics log, snapshots with their pointer, sample grids, generator."""

    def __init__(
        self,
        out: Path,
        trainer,
        dataset_info: dict,
        last_snapshot_nimg: int,
        training_meta: dict | None = None,
    ) -> None:
        import torch

        self.out = out
        self.trainer = trainer
        self.dataset_info = dataset_info
        self.training_meta = dict(training_meta or {})
        self.last_snapshot_nimg = last_snapshot_nimg
        latest = out / LATEST_FILE
        self.last_snapshot = (
            out / json.loads(latest.read_text())["snapshot"] if latest.is_file() else None
        )
        self._drop_metrics_after(trainer.cur_nimg)
        net = trainer.config.network
        grid_gen = torch.Generator().manual_seed(trainer.config.seed + 12345)
        self.grid_latents = torch.randn([8, net.z_dim], generator=grid_gen)

    def _drop_metrics_after(self, nimg: int) -> None:
        """Ticks logged after the snapshot a run resumes from are about to be redone."""
        path = self.out / METRICS_FILE
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line)["cur_nimg"] <= nimg]
        if len(keep) != len(lines):
            _atomic_write(path, "".join(f"{line}\n" for line in keep))

    def record_tick(self, record: dict, final: bool) -> None:
        with open(self.out / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        snap_nimg = int(round(self.trainer.config.snapshot_kimg * 1000))
        cur = self.trainer.cur_nimg
        if final or cur // snap_nimg > self.last_snapshot_nimg // snap_nimg:
            self.snapshot()

    def snapshot(self) -> None:
        from fedspine.training.checkpoint import save_checkpoint

        t = self.trainer
        kimg = _kimg_tag(t.cur_nimg)
        path = self.out / "snapshots" / f"snapshot_{kimg}.pt"
        save_checkpoint(path, "trainer", {"trainer": t.state_dict(), "dataset": self.dataset_info})
        _atomic_write(
            self.out / LATEST_FILE,
            json.dumps(
                {
                    "snapshot": str(path.relative_to(self.out)),
                    "cur_nimg": t.cur_nimg,
                    "kimg": t.cur_nimg / 1000,
                }
            )
            + "\n",
        )
        self.last_snapshot = path
        self.last_snapshot_nimg = t.cur_nimg
        self.save_fakes(self.out / "samples" / f"fakes_{kimg}.png")

    def save_fakes(self, path: Path) -> None:
        import torch

        from fedspine.training.generate import class_grid

        # The grid must not move any RNG the training draws from, or resume would diverge.
        with torch.random.fork_rng(devices=[]):
            grid = class_grid(
                self.trainer.G_ema, self.dataset_info["class_names"], self.grid_latents
            )
        _save_png_atomic(grid, path)

    def save_reals(self, data) -> None:
        import numpy as np

        from fedspine.training.generate import image_grid

        rng = np.random.default_rng(0)
        rows = []
        for k in range(data.num_classes):
            idx = np.flatnonzero(data.labels.numpy() == k)
            pick = rng.choice(idx, size=min(8, len(idx)), replace=False) if len(idx) else idx
            imgs = (
                data.images[pick, 0].numpy()
                if len(pick)
                else np.zeros((1, data.resolution, data.resolution), np.uint8)
            )
            rows.append(imgs)
        _save_png_atomic(image_grid(rows, data.class_names), self.out / "samples" / "reals.png")

    def save_generator(self) -> None:
        from fedspine.training.generate import save_generator

        t = self.trainer
        save_generator(
            self.out / "generator.pt",
            t.G_ema,
            t.config.to_dict()["network"],
            self.dataset_info["class_names"],
            training={
                "cur_nimg": t.cur_nimg,
                "kimg": t.cur_nimg / 1000,
                "preset": t.config.preset,
                "seed": t.config.seed,
                **self.training_meta,
            },
        )


def _clinical_setup(options: dict, state: dict | None, class_names: list[str], dp: bool):
    """SpineGAN's frozen classifier and what the run may say about its privacy.

    On resume the classifier, λ and mapping default to the run's; given ones must agree.
    """
    from fedspine.models.classifier import ClassifierCheckpointError
    from fedspine.training.clinical import (
        DEFAULT_WEIGHT,
        ClinicalLoss,
        ClinicalLossError,
        ClinicalPrivacy,
        ClinicalPrivacyError,
        clinical_privacy,
    )

    saved = (state or {}).get("clinical") or {}
    path = options.get("classifier") or saved.get("classifier_path")
    if path is None:
        raise _CliError(
            "--model spinegan needs --classifier CLS (a classifier file or folder from "
            "`fedspine classifier train`)"
        )
    weight = options.get("weight")
    mapping = options.get("mapping")
    for flag, given, key in (
        ("--clinical-weight", weight, "weight"),
        ("--clinical-input", mapping, "mapping"),
    ):
        if saved and given is not None and given != saved[key]:
            raise _CliError(f"{flag} {given} conflicts with the run's {saved[key]}; omit it")
    weight = weight if weight is not None else saved.get("weight", DEFAULT_WEIGHT)
    mapping = mapping or saved.get("mapping", "default")
    try:
        clinical = ClinicalLoss.from_file(path, class_names, weight=weight, mapping=mapping)
        public = bool(options.get("classifier_public"))
        if dp:
            status = clinical_privacy(
                clinical.meta,
                public,
                bool(options.get("not_private")),
                where=f"the classifier {path}",
            )
        else:
            try:
                status = clinical_privacy(clinical.meta, public, False)
            except ClinicalPrivacyError:
                status = ClinicalPrivacy(
                    "none", "neither DP-trained (per its metadata) nor declared public"
                )
    except (ClinicalLossError, ClassifierCheckpointError) as err:
        raise _CliError(str(err)) from None
    return clinical, status


def _scheme_flags(scheme: str | None) -> str:
    if scheme is None:
        return "no --dp"
    return "--dp" if scheme == "dpsgd" else f"--dp-scheme {scheme}"


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


def _kimg_tag(nimg: int) -> str:
    return f"{nimg / 1000:09.3f}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_png_atomic(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _version() -> str:
    from fedspine import __version__

    return __version__


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
