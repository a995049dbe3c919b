"""One GAN training run, as a library call: ``train(TrainRequest) -> RunResult``.

The CLI, ``reproduce``, benchmarks and tests all train through :func:`train`; the command line
only parses flags into a :class:`TrainRequest`, makes this one call and prints. What the run
says goes to a :class:`RunReporter` (the CLI's draws a progress bar; the default is silent).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedspine import __version__
from fedspine.fileio import (
    RUN_ABLATION,
    RUN_CONFIG_TOML,
    RUN_GENERATOR,
    RUN_LATEST,
)

MODELS = ("cgan", "spinegan")
CLINICAL_INPUTS = ("default", "paper")
PRESET_NAMES = ("paper", "auto", "cpu")
CLINICAL_FLAGS = {
    "classifier": "--classifier",
    "weight": "--clinical-weight",
    "mapping": "--clinical-input",
    "classifier_public": "--classifier-public",
    "not_private": "--not-private",
}


class TrainRunError(Exception):
    """The run cannot start or continue; the message is a one-line reason."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the privacy ledger recorded every step that ran."""

    def __init__(self, last_snapshot: Path | None) -> None:
        super().__init__()
        self.last_snapshot = last_snapshot


@dataclass
class DPRequest:
    """Patient-level DP-SGD on D: exactly one of ``target_epsilon`` and ``noise_multiplier``."""

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    expected_patients_per_step: int = 64
    d_steps_per_g: int = 1
    ada_p: float = 0.0
    trainable_d: str = "all"
    """"all"; "head": train (and privatise) only D's projection head (the label mapping and the
    epilogue's output layer); or "top:K": only D's K lowest-resolution stages."""
    augment_views: int = 1
    """Augmented views per image averaged inside each patient's row (needs ada_p > 0)."""
    privacy_home: str | os.PathLike | None = None
    privacy_unit: str | None = None
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise TrainRunError("--dp needs exactly one of --epsilon and --noise-multiplier")

    def as_options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ClinicalRequest:
    """SpineGAN's clinical loss: the frozen classifier and how its privacy is declared."""

    classifier: str | os.PathLike | None = None
    weight: float | None = None
    mapping: str | None = None
    classifier_public: bool = False
    not_private: bool = False

    def as_options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainRequest:
    """Everything one run needs; None means the preset's value (or, on resume, the run's)."""

    prepared: str | os.PathLike
    out: str | os.PathLike
    preset: str | None = None
    kimg: float | None = None
    resolution: int | None = None
    snapshot_kimg: float | None = None
    seed: int | None = None
    resume: bool = False
    batch: int | None = None
    device: str = "auto"
    precision: str | None = None
    model: str | None = None
    dp: DPRequest | None = None
    clinical: ClinicalRequest | None = None
    ablation: Any = None  # fedspine.training.dp_ablation.AblationOptions
    public_data: str | None = None
    """A declaration that the training data is public (why); such a run may start others."""
    init_from: str | os.PathLike | None = None
    """A run folder or snapshot trained with ``public_data``: G, G_ema and D start from it."""
    for_dp: bool = False
    """Build the networks a DP run uses (no minibatch-std), to pretrain for DP fine-tuning."""


@dataclass
class RunResult:
    """What a finished run produced: its folder, length, generator and (DP) ε at δ."""

    out: Path
    cur_nimg: int
    generator: Path
    epsilon: float | None = None
    delta: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RunReporter:
    """Where a run's messages and progress go; this base class stays silent."""

    def message(self, text: str) -> None:
        """A line for the user (resumed, precision, trained to, ε spent)."""

    def start(self, total_kimg: float, done_kimg: float, ada_p: float, private: bool) -> None:
        """Training begins at ``done_kimg`` of ``total_kimg``."""

    def step(self, kimg: float) -> None:
        """After every optimizer step."""

    def tick(self, record: dict[str, Any], private: bool) -> None:
        """After every tick, with the record written to metrics.jsonl."""

    def stop(self) -> None:
        """Training ended (finished, failed or interrupted)."""


def train(request: TrainRequest, reporter: RunReporter | None = None) -> RunResult:
    """Train (or continue, ``request.resume``) one GAN run into ``request.out``.

    Everything a run writes happens here: resume checks, preset and overrides, the trainer for
    the variant asked (cGAN, SpineGAN, DP, an ablation scheme), ``config.toml``, snapshots and
    ``latest.json``, ``metrics.jsonl``, sample grids, ``generator.pt`` and the privacy summary,
    with the privacy ledger settled on every exit. Raises :class:`TrainRunError` with a one-line
    reason, or :class:`TrainInterrupted` on Ctrl-C after recording what ran.
    """
    report = reporter or RunReporter()
    if request.model is not None and request.model not in MODELS:
        raise TrainRunError(f"--model {request.model}: choose one of {', '.join(MODELS)}")
    prepared, out = Path(request.prepared), Path(request.out)
    preset, kimg, resolution = request.preset, request.kimg, request.resolution
    snapshot_kimg, seed, resume, batch = (
        request.snapshot_kimg,
        request.seed,
        request.resume,
        request.batch,
    )
    device, precision, model, ablation = (
        request.device,
        request.precision,
        request.model,
        request.ablation,
    )
    dp_options = request.dp.as_options() if request.dp is not None else None
    if request.public_data is not None and (dp_options is not None or ablation is not None):
        raise TrainRunError("--public-data: data declared public needs no DP; drop --dp")
    if request.public_data is not None and not request.public_data.strip():
        raise TrainRunError("--public-data needs a reason (where the data comes from)")
    if resume and (request.init_from is not None or request.public_data is not None):
        raise TrainRunError(
            "--init-from and --public-data are set when a run starts; omit them when resuming"
        )
    clinical_options = request.clinical.as_options() if request.clinical is not None else None
    # The training stack loads on the first run, not on import: the CLI imports this module's
    # request types to draw --help, which must not import torch.
    from fedspine.data.prepared import (  # lazy: see above
        PreparedDatasetError,
        load_prepared,
        unit_plural,
    )
    from fedspine.training.batches import BatchSampler, training_data  # lazy: torch
    from fedspine.training.checkpoint import CheckpointError, load_checkpoint  # lazy: torch
    from fedspine.training.config import TrainConfig, preset_config, write_config_toml  # lazy
    from fedspine.training.gan_trainer import GanTrainer, configure_cpu, resolve_device  # lazy
    from fedspine.training.precision import resolve_precision  # lazy: torch
    from fedspine.training.run_folder import RunFolder  # lazy: torch

    try:
        dataset = load_prepared(prepared)
    except PreparedDatasetError as err:
        raise TrainRunError(str(err)) from None
    train = dataset.select("train", labelled=True)
    if len(train) == 0:
        raise TrainRunError(
            f"{prepared}: the train split holds no labelled image; nothing to train on"
        )
    try:
        dev = resolve_device(device)
    except RuntimeError as err:
        raise TrainRunError(str(err)) from None

    state = None
    if resume:
        latest = out / RUN_LATEST
        if not latest.is_file():
            raise TrainRunError(
                f"{out}: no {RUN_LATEST}; not a run folder with a snapshot to resume"
            )
        pointer = json.loads(latest.read_text())
        snapshot = out / pointer["snapshot"]
        try:
            ckpt = load_checkpoint(snapshot, kind="trainer", map_location="cpu")
        except CheckpointError as err:
            raise TrainRunError(str(err)) from None
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
                raise TrainRunError(
                    f"{flag} {value} conflicts with the run's {saved}; omit it when resuming"
                )
        if ckpt["dataset"]["content_hash"] != dataset.content_hash:
            raise TrainRunError(
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
            raise TrainRunError(
                f"{out} already holds files; pass --resume to continue it or choose another --out"
            )
        name = preset or ("auto" if dev.type == "cuda" else "cpu")
        res = resolution
        if res is None and name == "auto":
            res = dataset.resolution
        try:
            config = preset_config(name, res, dataset.num_classes)
        except ValueError as err:
            raise TrainRunError(f"--preset {name}: {err}") from None
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
                raise TrainRunError("--batch must be at least 1")
            config.batch = batch
            config.network = dataclasses.replace(
                config.network, mbstd_group=min(config.network.mbstd_group, batch)
            )
        if request.for_dp:
            if dp_options is not None:
                raise TrainRunError("--for-dp is for a non-DP pretraining run; a --dp run has it")
            config.network = dataclasses.replace(config.network, mbstd_group=0)
        last_snapshot_nimg = 0
    config.device = device
    try:
        resolve_precision(config.mixed_precision, dev)  # refuse before any data is loaded
    except ValueError as err:
        raise TrainRunError(f"--precision {config.mixed_precision}: {err}") from None
    if config.tick_kimg > config.snapshot_kimg:
        config.tick_kimg = config.snapshot_kimg
    if state is not None:
        from fedspine.training.dp_ablation import saved_scheme  # lazy: torch

        was = saved_scheme(state)
        now = "dpsgd" if dp_options is not None else (ablation.scheme if ablation else None)
        if was != now:
            raise TrainRunError(
                f"resume with the same --dp / --dp-scheme setting the run was started with "
                f"(it was trained with {_scheme_flags(was)}, this call asks for "
                f"{_scheme_flags(now)})"
            )
    saved_model = None if state is None else ("spinegan" if "clinical" in state else "cgan")
    if model is None:
        model = saved_model or "cgan"
    elif saved_model is not None and model != saved_model:
        raise TrainRunError(f"--model {model} conflicts with the run's {saved_model}; omit it")
    if model == "cgan" and clinical_options and any(clinical_options.values()):
        given = ", ".join(CLINICAL_FLAGS[k] for k, v in clinical_options.items() if v)
        raise TrainRunError(f"{given}: only with --model spinegan (this run is cgan)")
    clinical = clinical_status = None
    if model == "spinegan":
        clinical, clinical_status = _clinical_setup(
            clinical_options or {}, state, list(dataset.class_names), dp_options is not None
        )
    privacy = None
    if dp_options is not None:
        from fedspine.privacy.home import PrivacyHomeError  # lazy: only DP runs
        from fedspine.privacy.ledger import LedgerError  # lazy: only DP runs
        from fedspine.training.dp_run import RunPrivacy  # lazy: torch

        try:
            privacy = RunPrivacy(
                prepared, dataset, train, out, dp_options, clinical, clinical_status
            )
        except (ValueError, LedgerError, PrivacyHomeError) as err:
            raise TrainRunError(str(err)) from None
        config = privacy.adjust_config(config)
    ablation_run = None
    if ablation is not None:
        from fedspine.training.ablation_run import AblationRun  # lazy: torch

        ablation_run = AblationRun(ablation, dataset, train, out)
        config = ablation_run.adjust_config(config)
    if state is not None:
        saved_g = state["config"].get("g_trainable", "all")
        if saved_g != config.g_trainable:
            raise TrainRunError(
                f"{out}: this run trained {saved_g} of G, and this fedspine trains "
                f"{config.g_trainable} of G for these settings (a DP run with part of D frozen "
                "trains G's mapping only); its optimizer state cannot carry over: start a new run"
            )

    public_init = None
    if request.init_from is not None:
        from fedspine.training.public_init import PublicInitError, load_public_init  # lazy: torch

        try:
            public_init = load_public_init(
                request.init_from, dataset.content_hash, dataset.patient_ids.tolist()
            )
            config.network = public_init.minibatch_std_of(config.network)
            public_init.check_network(config.to_dict()["network"])
        except PublicInitError as err:
            raise TrainRunError(str(err)) from None
        if privacy is not None:
            privacy.pretraining = public_init.record()

    data = training_data(train, config.resolution)
    if data.resized_from is not None:
        report.message(
            f"resized the training images once at load: {data.resized_from} px -> "
            f"{config.resolution} px"
        )
    if dev.type == "cpu":
        configure_cpu()
    if privacy is not None:
        from fedspine.privacy.ledger import LedgerError  # lazy: only DP runs

        try:
            trainer = privacy.make_trainer(config, data, dev, state)
        except (ValueError, LedgerError) as err:
            raise TrainRunError(str(err)) from None
    elif ablation_run is not None:
        try:
            trainer = ablation_run.make_trainer(config, data, dev, state)
        except ValueError as err:
            raise TrainRunError(str(err)) from None
    else:
        from fedspine.training.clinical import ClinicalLossError  # lazy: torch
        from fedspine.training.factory import TrainerSpec, build_trainer  # lazy: torch

        try:
            trainer = build_trainer(TrainerSpec(clinical=clinical), config, data.label_prior(), dev)
        except ClinicalLossError as err:
            raise TrainRunError(str(err)) from None
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except ValueError as err:
            raise TrainRunError(str(err)) from None
        report.message(f"resumed {out} at {trainer.cur_nimg / 1000:.3f} kimg")
    if public_init is not None:
        public_init.apply(trainer)
        report.message(
            f"started from public checkpoint {public_init.path} (sha256 "
            f"{public_init.sha256[:16]}…, data declared public: {public_init.declaration})"
        )
    if privacy is not None:
        report.message(
            f"DP: {privacy.trainable_text()}; {privacy.dp.augment_views} augmented view(s) per "
            f"image, {privacy.dp.d_steps_per_g} D step(s) per G step"
        )
        if privacy.dp.trainable_d != "all" and public_init is None and state is None:
            report.message(
                f"warning: --dp-trainable-d {privacy.dp.trainable_d} without --init-from: the "
                "frozen part of D keeps its random initial weights, which is legal but nearly "
                "useless; start from a public checkpoint (`fedspine pretrain`, then "
                "--init-from) to fine-tune a few parameters under DP"
            )
    report.message(f"precision: {trainer.precision.name} ({trainer.precision.how})")
    timed = trainer.modconv_choice.seconds
    if timed:
        path = "fused" if trainer.modconv_choice.fused else "non-fused"
        report.message(
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
    if request.public_data is not None:
        dataset_info["public"] = request.public_data.strip()
    elif state is not None and ckpt.get("dataset", {}).get("public"):
        dataset_info["public"] = ckpt["dataset"]["public"]
    if privacy is None:
        # The empirical class frequencies are private data; a DP run uses the uniform prior.
        dataset_info["label_prior"] = [float(p) for p in data.label_prior()]
    scheme = "dpsgd" if privacy is not None else (ablation.scheme if ablation else "none")
    run_config = {
        "fedspine_version": __version__,
        "model": model,
        "dp_scheme": scheme,
        "device_used": str(dev),
        "modconv_path": trainer.modconv_choice.to_dict(),
        "precision": trainer.precision.to_dict(),
        "dataset": dataset_info,
        "train": config.to_dict(),
    }
    if privacy is not None:
        run_config["dp"] = privacy.settings()
    training_meta: dict = {"model": model, "dp_scheme": scheme}
    if public_init is not None:
        run_config["init_from"] = public_init.record()
        training_meta["init_from"] = {
            "checkpoint_sha256": public_init.sha256,
            "declared_public": public_init.declaration,
        }
    if dataset_info.get("public"):
        run_config["public_data"] = dataset_info["public"]
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
    write_config_toml(out / RUN_CONFIG_TOML, run_config)
    if ablation_run is not None:
        ablation_run.start()
    snapshot_dataset = dataset_info
    if dataset_info.get("public"):
        from fedspine.training.public_init import PATIENT_DIGESTS, patient_digests

        # What a later run started from this one checks its own patients against.
        digests = patient_digests(dataset.patient_ids.tolist())
        snapshot_dataset = {**dataset_info, PATIENT_DIGESTS: digests}
    run = RunFolder(out, trainer, snapshot_dataset, last_snapshot_nimg, training_meta)
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
    private = privacy is not None
    try:
        report.start(config.total_kimg, trainer.cur_nimg / 1000, trainer.ada_p, private)

        def on_step(t: GanTrainer, m) -> None:
            report.step(t.cur_nimg / 1000)

        def on_tick(t: GanTrainer, record: dict) -> None:
            run.record_tick(record, final=t.cur_nimg >= target_nimg)
            report.tick(record, private)

        try:
            trainer.run(remaining_kimg, batches, on_tick=on_tick, on_step=on_step)
        finally:
            report.stop()
    except KeyboardInterrupt:
        if privacy is not None:
            privacy.finish(trainer)
        if ablation_run is not None:
            ablation_run.finish(trainer)
        raise TrainInterrupted(run.last_snapshot) from None
    if run.last_snapshot_nimg != trainer.cur_nimg:
        run.snapshot()
    run.save_generator()
    report.message(
        f"trained to {trainer.cur_nimg / 1000:.3f} kimg; generator: {out / RUN_GENERATOR}"
    )
    result = RunResult(out=out, cur_nimg=trainer.cur_nimg, generator=out / RUN_GENERATOR)
    if privacy is not None:
        spent = privacy.finish(trainer)
        result.epsilon, result.delta = spent, privacy.delta
        report.message(
            f"privacy: ε = {spent:.3f} at δ = {privacy.delta:.2g} for the worst of the "
            f"{privacy.num_patients} training {unit_plural(privacy.unit)}, everything on record composed "
            f"(privacy home {privacy.home}); report: fedspine privacy report {out}"
        )
        if clinical_status is not None and clinical_status.not_private_reason:
            report.message(f"the run is marked not private: {clinical_status.not_private_reason}")
    elif ablation_run is not None:
        summary = ablation_run.finish(trainer)
        report.message(
            f"NOT PRIVATE (DP ablation {ablation.scheme}): {summary['epsilon_text']}; "
            f"see {out / RUN_ABLATION} and `fedspine privacy report {out}`"
        )
    else:
        from fedspine.privacy.report import write_privacy_summary  # lazy: see train()

        components = {"discriminator": "trained without differential privacy"}
        if clinical_status is not None:
            components["clinical_classifier"] = clinical_status.component
        if public_init is not None:
            components["pretraining"] = public_init.component()
        reason = "trained without differential privacy (no --dp)"
        if dataset_info.get("public"):
            components["data"] = f"declared public by the operator: {dataset_info['public']}"
            reason = (
                "trained without differential privacy on data declared public "
                f"({dataset_info['public']}): release it only if that declaration holds"
            )
        write_privacy_summary(out, {}, components, not_private_reasons=[reason])
    return result


def _clinical_setup(options: dict, state: dict | None, class_names: list[str], dp: bool):
    """SpineGAN's frozen classifier and what the run may say about its privacy.

    On resume the classifier, λ and mapping default to the run's; given ones must agree.
    """
    from fedspine.models.classifier import ClassifierCheckpointError  # lazy: torch
    from fedspine.training.clinical import (  # lazy: torch
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
        raise TrainRunError(
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
            raise TrainRunError(f"{flag} {given} conflicts with the run's {saved[key]}; omit it")
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
        raise TrainRunError(str(err)) from None
    return clinical, status


def _scheme_flags(scheme: str | None) -> str:
    if scheme is None:
        return "no --dp"
    return "--dp" if scheme == "dpsgd" else f"--dp-scheme {scheme}"
