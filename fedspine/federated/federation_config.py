"""The coordinator's settings for one federated run (server/federation.toml), and how they
travel to the ServerApp as Flower run config.

Kept apart from the round loop so that `fedspine server` can read and check a config without
importing the training stack.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedspine import __version__
from fedspine.dp_options import (
    FEDERATED_FEATURES,
    MAX_AUGMENT_VIEWS,
    names_public,
    trainable_d_problem,
)
from fedspine.federated.classifier_phase import ClassifierPhaseConfig

MODELS = ("cgan", "spinegan")
GAN_ROUTE = "gan"
EMBEDDING_ROUTE = "dp-mean-embedding"
FRESH_START = "none: round 1 started from fresh weights"
"""The privacy summary's pretraining line of a federation without ``initial_checkpoint``."""
ROUTES = (GAN_ROUTE, EMBEDDING_ROUTE)


class FederationError(Exception):
    """The federated run cannot go on (too few sites replied, bad config); says why."""


@dataclass
class EmbeddingRouteConfig:
    """``[embedding]``: the public feature map of the DP mean-embedding route and the fit.

    ``features``: ``rff``, random Fourier features of the pixels (``dim`` features at
    ``feature_resolution`` px, one bandwidth per group, drawn from ``seed``: public, the same at
    every site); ``public``, the features of the discriminator of the federation's
    ``initial_checkpoint`` (DP-MEPF; the server sends its weights with the request); or
    ``rff+public``, both (the route that measured best). Each patient's mean embedding is
    clipped to ``clip``; then ``fit_steps`` steps of the generator's fit."""

    features: str = "rff"
    clip: float = 1.0
    dim: int = 256
    seed: int = 0
    bandwidths: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    feature_resolution: int = 32
    fit_steps: int = 1000
    fit_batch_per_class: int = 32
    fit_lr: float = 0.0025

    @property
    def uses_public(self) -> bool:
        """Whether the features include the initial checkpoint's discriminator."""
        return names_public(self.features)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "[embedding]") -> EmbeddingRouteConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise FederationError(f"{where}: unknown setting(s) {unknown}")
        return cls(**data)

    def problems(self, resolution: int) -> list[str]:
        out = []
        if self.features not in FEDERATED_FEATURES:
            out.append(f"[embedding] features must be one of {FEDERATED_FEATURES}")
        if not self.clip > 0 or not 1 <= self.dim <= 8192 or not self.bandwidths:
            out.append("[embedding] clip must be > 0, dim 1 to 8192, bandwidths not empty")
        if any(not float(b) > 0 for b in self.bandwidths):
            out.append("[embedding] bandwidths must be positive")
        if not 0 <= self.seed < 2**63:
            out.append(f"[embedding] seed {self.seed} must lie between 0 and 2**63 - 1")
        if not 4 <= self.feature_resolution <= resolution:
            out.append(
                f"[embedding] feature_resolution {self.feature_resolution} must lie between 4 "
                f"and the federation's resolution ({resolution})"
            )
        if self.fit_steps < 1 or self.fit_batch_per_class < 1 or not self.fit_lr > 0:
            out.append("[embedding] fit_steps, fit_batch_per_class and fit_lr must be positive")
        return out


@dataclass
class FederationConfig:
    """The coordinator's settings for one federated run (server/federation.toml)."""

    name: str = "fedspine-federation"
    output_dir: str = "federation-output"
    rounds: int = 3
    local_kimg: float = 1.0
    min_sites: int = 2
    round_timeout: float = 1800.0
    site_wait: float = 600.0
    """Seconds a round waits for ``min_sites`` connected sites before it fails (Flower's FedAvg
    would wait for ever)."""
    preset: str = "cpu"
    resolution: int = 32
    class_names: list[str] = field(default_factory=lambda: ["normal", "abnormal"])
    label_prior: list[float] | None = None
    seed: int = 0
    resume: bool = True
    dp: bool = False
    dp_epsilon: float | None = None
    dp_patients_per_step: int = 64
    dp_clip: float = 1.0
    dp_d_steps_per_g: int = 1
    dp_ada_p: float = 0.0
    dp_trainable_d: str = "all"
    """"all"; "head": the sites train (and privatise) only D's projection head (the label
    mapping and the epilogue's output layer); or "top:K": only D's K lowest-resolution stages."""
    dp_augment_views: int = 1
    """Augmented views per image averaged inside each patient's row (needs dp_ada_p > 0)."""
    model: str = "cgan"
    classifier: ClassifierPhaseConfig = field(default_factory=ClassifierPhaseConfig)
    """SpineGAN only: the classifier phase that runs before the GAN rounds."""
    initial_checkpoint: str | None = None
    """A run (or snapshot) trained with ``train --public-data`` (e.g. ``fedspine pretrain``):
    round 1 starts from its G, G_ema and D instead of fresh weights. Costs no site any ε."""

    route: str = GAN_ROUTE
    """``gan``: FedAvg rounds of the GAN; ``dp-mean-embedding``: one round in which every site
    releases its DP mean embedding once, then the server fits G to their sum (no GAN rounds)."""
    embedding: EmbeddingRouteConfig = field(default_factory=EmbeddingRouteConfig)

    def dp_request(self) -> dict | None:
        """What the server asks of the sites' DP; each site still applies its own cap."""
        if not self.dp:
            return None
        return {
            "epsilon": self.dp_epsilon,
            "patients-per-step": int(self.dp_patients_per_step),
            "clip": float(self.dp_clip),
            "d-steps-per-g": int(self.dp_d_steps_per_g),
            "ada-p": float(self.dp_ada_p),
            "trainable-d": str(self.dp_trainable_d),
            "augment-views": int(self.dp_augment_views),
        }

    def validate(self) -> None:
        if self.rounds < 1:
            raise FederationError("rounds must be at least 1")
        if self.min_sites < 1:
            raise FederationError("min_sites must be at least 1")
        if self.local_kimg <= 0:
            raise FederationError("local_kimg must be positive")
        if self.site_wait <= 0 or self.round_timeout <= 0:
            raise FederationError("site_wait and round_timeout must be positive (seconds)")
        if len(self.class_names) < 1:
            raise FederationError("class_names must name at least one class")
        if self.label_prior is not None and len(self.label_prior) != len(self.class_names):
            raise FederationError("label_prior needs one weight per class")
        if self.model not in MODELS:
            raise FederationError(f"model must be one of {MODELS}, not {self.model!r}")
        if self.dp:
            problem = dp_fine_tuning_problem(
                self.dp_trainable_d, self.dp_augment_views, self.dp_ada_p
            )
            if problem:
                raise FederationError(f"[privacy] {problem}")
        if self.route not in ROUTES:
            raise FederationError(f"route must be one of {ROUTES}, not {self.route!r}")
        if self.route == EMBEDDING_ROUTE:
            if not self.dp or self.dp_epsilon is None:
                raise FederationError(
                    "route dp-mean-embedding releases only under DP: set [privacy] enabled = "
                    "true and epsilon"
                )
            if self.model != "cgan":
                raise FederationError("route dp-mean-embedding fits a cGAN generator: model cgan")
            problems = self.embedding.problems(self.resolution)
            if self.embedding.uses_public and not self.initial_checkpoint:
                problems.append(
                    f"[embedding] features {self.embedding.features!r} use the public "
                    "checkpoint's discriminator: set initial_checkpoint"
                )
            if problems:
                raise FederationError("; ".join(problems))
        if self.model == "spinegan":
            if len(self.class_names) < 2:
                raise FederationError("SpineGAN's classifier needs at least two classes")
            problems = self.classifier.validate(self.dp, self.dp_epsilon)
            if problems:
                raise FederationError("; ".join(problems))

    def classifier_dp_request(self) -> dict | None:
        """The classifier phase's DP request; each site still applies its own cap."""
        if not self.dp:
            return None
        return {
            "epsilon": self.classifier.dp_epsilon,
            "patients-per-step": int(self.classifier.dp_patients_per_step),
            "clip": float(self.classifier.dp_clip),
        }

    def prior(self) -> list[float]:
        """The public prior of fake labels: uniform unless the coordinator states one."""
        if self.label_prior is None:
            return [1.0 / len(self.class_names)] * len(self.class_names)
        total = float(sum(self.label_prior))
        return [float(p) / total for p in self.label_prior]

    def to_run_config(self) -> dict[str, Any]:
        """Flat keys for `flwr run --run-config` (lists travel as JSON strings)."""
        return {
            "name": self.name,
            "output-dir": str(Path(self.output_dir).resolve()),
            "rounds": int(self.rounds),
            "local-kimg": float(self.local_kimg),
            "min-sites": int(self.min_sites),
            "round-timeout": float(self.round_timeout),
            "site-wait": float(self.site_wait),
            "preset": self.preset,
            "resolution": int(self.resolution),
            "class-names": json.dumps(list(self.class_names)),
            "label-prior": json.dumps(self.label_prior) if self.label_prior is not None else "",
            "seed": int(self.seed),
            "resume": bool(self.resume),
            "fedspine-version": __version__,
            "dp": json.dumps(self.dp_request()) if self.dp else "",
            "model": self.model,
            "classifier": json.dumps(asdict(self.classifier)) if self.model == "spinegan" else "",
            "initial-checkpoint": self.initial_checkpoint or "",
            "route": self.route,
            "embedding": json.dumps(asdict(self.embedding)) if self.route != GAN_ROUTE else "",
        }

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> FederationConfig:
        if str(rc.get("fedspine-version", __version__)) != __version__:
            raise FederationError(
                f"the run was submitted with fedspine {rc['fedspine-version']}, but the ServerApp "
                f"has fedspine {__version__}"
            )
        prior = str(rc.get("label-prior", "") or "")
        classifier = str(rc.get("classifier", "") or "")
        embedding = str(rc.get("embedding", "") or "")
        return cls(
            name=str(rc["name"]),
            output_dir=str(rc["output-dir"]),
            rounds=int(rc["rounds"]),
            local_kimg=float(rc["local-kimg"]),
            min_sites=int(rc["min-sites"]),
            round_timeout=float(rc["round-timeout"]),
            site_wait=float(rc.get("site-wait", 600.0)),
            preset=str(rc["preset"]),
            resolution=int(rc["resolution"]),
            class_names=list(json.loads(str(rc["class-names"]))),
            label_prior=json.loads(prior) if prior else None,
            seed=int(rc["seed"]),
            resume=bool(rc.get("resume", True)),
            model=str(rc.get("model", "cgan") or "cgan"),
            classifier=(
                ClassifierPhaseConfig.from_dict(json.loads(classifier))
                if classifier
                else ClassifierPhaseConfig()
            ),
            initial_checkpoint=str(rc.get("initial-checkpoint", "") or "") or None,
            route=str(rc.get("route", GAN_ROUTE) or GAN_ROUTE),
            embedding=(
                EmbeddingRouteConfig.from_dict(json.loads(embedding))
                if embedding
                else EmbeddingRouteConfig()
            ),
            **_dp_fields(str(rc.get("dp", "") or "")),
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> FederationConfig:
        """Read the ``[federation]``, ``[training]``, ``[privacy]``, ``[classifier]`` and
        ``[embedding]`` tables."""
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise FederationError(f"{path}: cannot read the federation config ({err})") from None
        privacy = {
            ("dp" if k == "enabled" else f"dp_{k}"): v for k, v in data.get("privacy", {}).items()
        }
        merged = {**data.get("federation", {}), **data.get("training", {}), **privacy}
        known = {f for f in cls.__dataclass_fields__} - {"classifier", "embedding"}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise FederationError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
        try:
            classifier = ClassifierPhaseConfig.from_dict(
                data.get("classifier", {}), where=f"{path} [classifier]"
            )
        except (TypeError, ValueError) as err:
            raise FederationError(str(err)) from None
        try:
            embedding = EmbeddingRouteConfig.from_dict(
                data.get("embedding", {}), where=f"{path} [embedding]"
            )
        except TypeError as err:
            raise FederationError(f"{path} [embedding]: {err}") from None
        config = cls(**merged, classifier=classifier, embedding=embedding)
        out = Path(config.output_dir)
        if not out.is_absolute():
            config.output_dir = str((path.parent / out).resolve())
        if config.initial_checkpoint:
            init = Path(config.initial_checkpoint)
            if not init.is_absolute():
                init = path.parent / init
            if not init.exists():
                raise FederationError(f"{path}: initial_checkpoint {init} does not exist")
            config.initial_checkpoint = str(init.resolve())
        config.validate()
        return config


def _dp_fields(text: str) -> dict[str, Any]:
    if not text:
        return {}
    request = json.loads(text)
    return {
        "dp": True,
        "dp_epsilon": request.get("epsilon"),
        "dp_patients_per_step": int(request["patients-per-step"]),
        "dp_clip": float(request["clip"]),
        "dp_d_steps_per_g": int(request["d-steps-per-g"]),
        "dp_ada_p": float(request["ada-p"]),
        "dp_trainable_d": str(request.get("trainable-d", "all")),
        "dp_augment_views": int(request.get("augment-views", 1)),
    }


def dp_fine_tuning_problem(trainable_d: object, augment_views: object, ada_p: object) -> str:
    """Why a request's ``trainable_d`` / ``augment_views`` cannot be trained, or "" when they
    can, for the server's own config (torch-free). Each site checks what it is asked again
    (``site_privacy.SitePrivacy``), K against its network included. The forms are
    ``fedspine.dp_options``', the same parser ``DPConfig`` uses."""
    problem = trainable_d_problem(trainable_d)
    if problem:
        return problem
    views = augment_views
    if not isinstance(views, int) or isinstance(views, bool):
        return f"augment_views must be a whole number, not {str(views)[:40]!r}"
    if not 1 <= views <= MAX_AUGMENT_VIEWS:
        return f"augment_views must be from 1 to {MAX_AUGMENT_VIEWS}, not {views}"
    if views > 1 and not (isinstance(ada_p, int | float) and float(ada_p) > 0):
        return f"augment_views {views} needs augmentation: ada_p > 0"
    return ""
