"""The classifier phase of a federated SpineGAN run: the clinical classifier, federated first.

SpineGAN adds λ·BCE(C(G(z, c)), c) of a frozen abnormality classifier C to every generator step
(DESIGN.md decision 5). C sees real images, so in a DP federation it must be private as well:
the server trains it first, across the same sites, the way it trains the GAN. Each classifier
round is a ``train.classifier`` message (Flower's custom train action) carrying the global C;
each site runs ``local_steps`` optimizer steps on its own training split (DP-SGD with
patient-level sampling where the federation is DP, each round's steps composed into the site's
own ledger beside the GAN's), the server averages the replies (FedAvg) and checkpoints every
round. The averaged C is then written as ``classifier.pt`` (a fedspine classifier file) and
sent, frozen, with every GAN round.

C is always the GroupNorm variant of the network: it holds no BatchNorm statistics, so it can be
DP-trained and there are no running statistics of differing sites to average.

A site's ε target for this phase is the ledger's total after the phase (the smaller of the
federation's ``classifier.dp_epsilon`` and the site's cap), planned once on the site's first
classifier round for all rounds announced; the GAN phase then plans its σ against everything
the ledger holds, classifier steps included, up to the federation's ``dp_epsilon``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedspine.federated.site_config import (
    RoundConfig,
    SiteConfig,
    SiteRefusal,
    check_dp_wanted,
    check_version,
    load_site_data,
    site_seed,
    site_state_file,
)
from fedspine.fileio import CLASSIFIER_WEIGHTS, SITE_CLASSIFIER_STATE

CLASSIFIER_ACTION = "classifier"
MESSAGE_TYPE = f"train.{CLASSIFIER_ACTION}"
FINAL_FILE = CLASSIFIER_WEIGHTS
SITE_STATE_FILE = SITE_CLASSIFIER_STATE
ARCHS = ("small", "densenet121")


@dataclass
class ClassifierPhaseConfig:
    """The ``[classifier]`` table of federation.toml: how the clinical classifier is federated.

    ``local_steps`` optimizer steps per site and round (batches of ``batch`` images without DP;
    DP-SGD steps of ``dp_patients_per_step`` expected patients with DP). ``input_size`` None
    means the federation's resolution. ``dp_epsilon`` is the ε each site's ledger may reach by
    the end of this phase (it must stay below the federation's ``dp_epsilon``, which bounds
    both phases together).
    """

    rounds: int = 3
    local_steps: int = 50
    batch: int = 32
    lr: float = 1e-3
    arch: str = "small"
    input_size: int | None = None
    augment: bool = True
    clinical_weight: float = 0.1
    mapping: str = "default"
    dp_epsilon: float | None = None
    dp_patients_per_step: int = 32
    dp_clip: float = 1.0

    def validate(self, dp: bool, gan_epsilon: float | None) -> list[str]:
        """Problems with these settings (empty when fine)."""
        from fedspine.training.clinical import MAPPINGS  # lazy: torch

        problems = []
        if self.rounds < 1 or self.local_steps < 1:
            problems.append("classifier.rounds and classifier.local_steps must be at least 1")
        if self.batch < 2:
            problems.append("classifier.batch must be at least 2")
        if not self.lr > 0:
            problems.append("classifier.lr must be positive")
        if self.arch not in ARCHS:
            problems.append(f"classifier.arch must be one of {ARCHS}, not {self.arch!r}")
        if self.input_size is not None and self.input_size < 8:
            problems.append("classifier.input_size must be at least 8 pixels")
        if not self.clinical_weight >= 0:
            problems.append("classifier.clinical_weight (λ) must be >= 0")
        if self.mapping not in MAPPINGS:
            problems.append(f"classifier.mapping must be one of {MAPPINGS}")
        if self.dp_patients_per_step < 1 or not self.dp_clip > 0:
            problems.append("classifier.dp_patients_per_step >= 1 and dp_clip > 0 are needed")
        if dp and self.dp_epsilon is None:
            problems.append(
                "a DP SpineGAN federation needs classifier.dp_epsilon (the ε each site may "
                "spend on the classifier phase), as its classifier sees real images"
            )
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            problems.append("classifier.dp_epsilon must be positive")
        if dp and None not in (self.dp_epsilon, gan_epsilon) and self.dp_epsilon >= gan_epsilon:
            problems.append(
                f"classifier.dp_epsilon ({self.dp_epsilon}) must be below the federation's "
                f"dp epsilon ({gan_epsilon}), which bounds both phases together"
            )
        return problems

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], where: str = "[classifier]"
    ) -> ClassifierPhaseConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class ClassifierRoundConfig:
    """The server's settings for one classifier round, as the message's ConfigRecord."""

    federation: str
    server_round: int
    total_rounds: int
    local_steps: int
    batch: int
    lr: float
    augment: bool
    seed: int
    model: dict
    task: str
    class_names: list[str]
    fedspine_version: str
    dp: dict | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "phase": "classifier",
            "federation": self.federation,
            "server-round": int(self.server_round),
            "total-rounds": int(self.total_rounds),
            "local-steps": int(self.local_steps),
            "batch": int(self.batch),
            "lr": float(self.lr),
            "augment": bool(self.augment),
            "seed": int(self.seed),
            "model": json.dumps(self.model, sort_keys=True),
            "task": self.task,
            "class-names": json.dumps(list(self.class_names)),
            "fedspine-version": self.fedspine_version,
            "dp": json.dumps(self.dp) if self.dp else "",
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ClassifierRoundConfig:
        try:
            return cls(
                federation=str(record["federation"]),
                server_round=int(record["server-round"]),
                total_rounds=int(record["total-rounds"]),
                local_steps=int(record["local-steps"]),
                batch=int(record["batch"]),
                lr=float(record["lr"]),
                augment=bool(record["augment"]),
                seed=int(record["seed"]),
                model=json.loads(str(record["model"])),
                task=str(record["task"]),
                class_names=list(json.loads(str(record["class-names"]))),
                fedspine_version=str(record["fedspine-version"]),
                dp=json.loads(str(record["dp"])) if record.get("dp") else None,
            )
        except KeyError as err:
            raise SiteRefusal(
                f"the classifier message lacks {err}; is the server a fedspine server?"
            ) from None


def classifier_outputs(class_names: list[str]) -> tuple[str, list[str]]:
    """(task, output names): binary with one output for two classes, else one per class."""
    if len(class_names) == 2:
        return "binary", [str(class_names[1])]
    return "multiclass", [str(n) for n in class_names]


def initial_classifier(
    phase: ClassifierPhaseConfig, class_names: list[str], resolution: int, seed: int
) -> tuple[dict, dict]:
    """Fresh global classifier weights from the seed, and its ClassifierConfig as a dict."""
    import torch  # lazy: the coordinator imports this module for its config types

    from fedspine.models.classifier import ClassifierConfig, build_classifier  # lazy: torch

    _, outputs = classifier_outputs(class_names)
    cfg = ClassifierConfig(
        arch=phase.arch,
        num_outputs=len(outputs),
        input_size=int(phase.input_size or resolution),
        norm="group",
    )
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        model = build_classifier(cfg)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, asdict(cfg)


def clinical_spec(
    phase: ClassifierPhaseConfig, model_config: dict, class_names: list[str], weights: Mapping
) -> dict[str, Any]:
    """What a GAN round tells the sites about the frozen classifier (its weights go beside)."""
    from fedspine.training.clinical import weights_sha256  # lazy: torch

    task, outputs = classifier_outputs(class_names)
    model = _build(model_config, weights)
    return {
        "config": dict(model_config),
        "meta": {"task": task, "class_names": list(class_names), "output_names": outputs},
        "sha256": weights_sha256(model),
        "weight": float(phase.clinical_weight),
        "mapping": phase.mapping,
    }


def save_final_classifier(
    path: Path, model_config: dict, weights: Mapping, class_names: list[str], meta: dict[str, Any]
):
    """The federation's classifier as a fedspine classifier file (usable by every command)."""
    from fedspine.models.classifier import ClassifierConfig, save_classifier  # lazy: torch

    task, outputs = classifier_outputs(class_names)
    full = {"task": task, "class_names": list(class_names), "output_names": outputs, **meta}
    return save_classifier(
        path, _build(model_config, weights), ClassifierConfig.from_dict(model_config), full
    )


def train_classifier_round(
    site: SiteConfig, rc: ClassifierRoundConfig, weights: Mapping
) -> tuple[dict, dict[str, float], dict[str, str]]:
    """One classifier round at a site: ``local_steps`` steps from the global weights.

    Returns the new weights, the metrics (``num-examples`` weights FedAvg) and the site's name
    and privacy summary. Under DP nothing computed on real images leaves the site except the
    privatised weights (no validation AUC is reported).
    """
    from fedspine.training.checkpoint import load_checkpoint, save_checkpoint  # lazy: torch
    from fedspine.training.gan_trainer import configure_cpu  # lazy: torch

    check_version(rc.fedspine_version)
    dataset = load_site_data(site, rc.class_names)
    train = dataset.select("train")
    task, outputs = classifier_outputs(rc.class_names)
    if rc.task != task:
        raise SiteRefusal(
            f"site {site.site_name}: the server asks for a {rc.task} classifier of "
            f"{rc.class_names}; fedspine trains a {task} one"
        )
    check_dp_wanted(site, rc.dp)
    configure_cpu(site.threads)
    model = _build(rc.model, weights, strict_error=SiteRefusal)
    if int(model.classifier_config.num_outputs) != len(outputs):
        raise SiteRefusal(
            f"site {site.site_name}: the classifier has {model.classifier_config.num_outputs} "
            f"outputs, the {task} task of {rc.class_names} needs {len(outputs)}"
        )
    seed = site_seed(rc.seed * 1000 + rc.server_round, site.site_name)
    state_file = site_state_file(site, rc.federation, SITE_STATE_FILE)
    state = load_checkpoint(state_file, kind="trainer") if state_file.is_file() else None

    start = time.perf_counter()
    extra = {"site-name": site.site_name, "federation": rc.federation, "round": rc.server_round}
    if rc.dp:
        from fedspine.federated.site_privacy import ClassifierSitePrivacy  # lazy: it imports torch
        from fedspine.training.classifier_dp import (  # lazy: torch
            ClassifierDPConfig,
            train_classifier_dp_steps,
        )

        privacy = ClassifierSitePrivacy(site, rc, dataset, train)
        sigma = privacy.plan(state)
        dp = ClassifierDPConfig(
            noise_multiplier=sigma,
            clip=float(rc.dp["clip"]),
            patients_per_step=privacy.patients_per_step,
            lr=rc.lr,
        )
        result = train_classifier_dp_steps(
            model,
            dataset,
            task,
            dp,
            rc.local_steps,
            seed=seed,
            augment=rc.augment,
            reservation=privacy.reservation,
        )
        # The DP step's mean loss is computed on real images without noise: it stays here.
        metrics = {"mean-loss": float("nan"), "val-auc": float("nan")}
        saved_dp = {"noise_multiplier": privacy.sigma, "sample_rate": privacy.q}
        steps = int(result["steps"])
    else:
        val_auc = _val_auc(model, dataset, task)
        result = _train_steps(model, train, task, rc, seed)
        metrics = {"mean-loss": result["mean_loss"], "val-auc": val_auc}
        metrics.update({"epsilon": -1.0, "delta": 0.0})
        saved_dp = None
        steps = int(result["steps"])
    seconds = time.perf_counter() - start
    save_checkpoint(state_file, "trainer", {"round": rc.server_round, "dp": saved_dp})
    if rc.dp:
        # Settled only once the round's state is saved: a crash before counts it in full.
        metrics.update(privacy.record_round(result))
        extra["privacy"] = privacy.summary_json()
    metrics.update(
        {"num-examples": int((train.labels >= 0).sum()), "steps": steps, "seconds": seconds}
    )
    new = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return new, metrics, extra


def received_clinical_loss(site: SiteConfig, rc: RoundConfig, weights: Mapping | None, dp: bool):
    """The frozen ClinicalLoss of a SpineGAN round, from the classifier the message carries.

    The weights must hash to what the server announced. Under DP the site refuses a classifier
    it helped train without DP in this federation: the generator would not be private.
    """
    from fedspine.models.classifier import ClassifierConfig  # lazy: torch
    from fedspine.training.checkpoint import load_checkpoint  # lazy: torch
    from fedspine.training.clinical import (  # lazy: torch
        ClinicalLoss,
        ClinicalLossError,
        weights_sha256,
    )

    spec = rc.clinical
    if spec is None or weights is None:
        raise SiteRefusal(
            f"site {site.site_name}: a SpineGAN round must bring the federation's classifier "
            "(config and weights); the message has none"
        )
    model = _build(spec["config"], weights, strict_error=SiteRefusal)
    sha = weights_sha256(model)
    if sha != spec["sha256"]:
        raise SiteRefusal(
            f"site {site.site_name}: the classifier received hashes to {sha[:12]}…, the server "
            f"announced {str(spec['sha256'])[:12]}…; the weights were altered on the way"
        )
    if dp:
        state_file = site_state_file(site, rc.federation, SITE_STATE_FILE)
        if state_file.is_file() and load_checkpoint(state_file, kind="trainer")["dp"] is None:
            raise SiteRefusal(
                f"site {site.site_name} trained this federation's classifier without "
                "differential privacy, so a DP generator trained through it would not be "
                "private; run the whole federation (both phases) with DP under a new name"
            )
    try:
        return ClinicalLoss(
            model,
            ClassifierConfig.from_dict(spec["config"]),
            spec["meta"],
            rc.class_names,
            weight=float(spec["weight"]),
            mapping=str(spec["mapping"]),
            sha256=sha,
        )
    except ClinicalLossError as err:
        raise SiteRefusal(f"site {site.site_name}: {err}") from None


def _build(model_config: Mapping, weights: Mapping, strict_error=ValueError):
    """The classifier of ``model_config`` holding ``weights`` (never from a file path)."""
    from fedspine.models.classifier import ClassifierConfig, build_classifier  # lazy: torch

    cfg = ClassifierConfig.from_dict(dict(model_config))
    cfg.weights_path = None
    model = build_classifier(cfg)
    try:
        model.load_state_dict(dict(weights), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise strict_error(f"the classifier weights do not fit its config ({first})") from None
    return model.eval()


def _train_steps(model, train, task: str, rc: ClassifierRoundConfig, seed: int) -> dict:
    """Non-private local training: Adam, BCE weighted by the site's class balance."""
    import numpy as np  # lazy: with the training stack
    import torch  # lazy: the coordinator imports this module for its config types

    from fedspine.training.classifier_trainer import (  # lazy: torch
        augment_batch,
        load_images,
        targets,
    )

    y, idx, _ = targets(train, task)
    if len(idx) < 2:
        raise SiteRefusal(f"the site has {len(idx)} labelled training image(s); 2 are needed")
    x = load_images(train, idx, int(model.classifier_config.input_size))
    t = torch.from_numpy(y)
    pos = y.sum(axis=0)
    pos_weight = np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0)
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(pos_weight).float())
    optimizer = torch.optim.Adam(model.parameters(), lr=rc.lr)
    gen = torch.Generator().manual_seed(seed)
    batch = min(rc.batch, len(idx))
    order, cursor, losses = torch.randperm(len(idx), generator=gen), 0, []
    model.train()
    for _ in range(rc.local_steps):
        if cursor + batch > len(idx):
            order, cursor = torch.randperm(len(idx), generator=gen), 0
        rows = order[cursor : cursor + batch]
        cursor += batch
        xb = x[rows].float().div_(255.0)
        if rc.augment:
            xb = augment_batch(xb, generator=gen)
        loss = criterion(model(xb).float(), t[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return {"steps": rc.local_steps, "mean_loss": float(np.mean(losses))}


def _val_auc(model, dataset, task: str) -> float:
    """Mean AUC of the received (global) classifier on the site's val split; NaN if undefined.

    Only without DP: an AUC on real images is a release the DP ledger does not count.
    """
    import numpy as np  # lazy: with the training stack

    from fedspine.models.classifier import predict_proba  # lazy: torch
    from fedspine.training.classifier_trainer import (  # lazy: torch
        auc_per_output,
        load_images,
        targets,
    )

    val = dataset.select("val")
    y, idx, _ = targets(val, task)
    if len(idx) < 2:
        return float("nan")
    probs = predict_proba(model, load_images(val, idx, int(model.classifier_config.input_size)))
    aucs = [a for a in auc_per_output(y, probs) if a is not None]
    return float(np.mean(aucs)) if aucs else float("nan")
