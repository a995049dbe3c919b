"""The coordinator's round loop: FedAvg of G, D and G_ema over the sites, checkpointed per round.

Flower's `Strategy.start` keeps everything in memory and cannot resume, so the loop here uses
the FedAvg strategy's node sampling (`configure_train`) round by round, folds each reply into a
running example-weighted mean as it arrives (`weights.RunningFedAvg`: one reply in memory, not
all of them), writes a checkpoint after each completed round, and continues from the last one
after a restart. A site that fails, times out or sends an invalid reply costs its contribution to
that round only, as long as `min_sites` replied.

A SpineGAN federation (``model = "spinegan"``) has two phases, each resumable at its next round:
the clinical classifier's rounds (``train.classifier`` messages, see :mod:`classifier_phase`),
then the GAN rounds, each carrying the averaged classifier frozen beside the GAN's weights.
rounds.jsonl records every round with its phase and where its time went (``timing``).
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedspine import __version__
from fedspine.federated.classifier_phase import ClassifierPhaseConfig
from fedspine.privacy.accounting import REPORT_ACCOUNTANT

if TYPE_CHECKING:
    from fedspine.federated.weights import RunningFedAvg

MODELS = ("cgan", "spinegan")
ROUNDS_DIR = "rounds"
CLASSIFIER_PREFIX = "classifier_round_"
ROUNDS_LOG = "rounds.jsonl"
STATUS_FILE = "federation.json"
REPLY_POLL_SECONDS = 1.0


class FederationError(Exception):
    """The federated run cannot go on (too few sites replied, bad config); says why."""


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
    model: str = "cgan"
    classifier: ClassifierPhaseConfig = field(default_factory=ClassifierPhaseConfig)
    """SpineGAN only: the classifier phase that runs before the GAN rounds."""

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
            **_dp_fields(str(rc.get("dp", "") or "")),
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> FederationConfig:
        """Read the ``[federation]``, ``[training]``, ``[privacy]`` and ``[classifier]`` tables."""
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
        known = {f for f in cls.__dataclass_fields__} - {"classifier"}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise FederationError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
        try:
            classifier = ClassifierPhaseConfig.from_dict(
                data.get("classifier", {}), where=f"{path} [classifier]"
            )
        except (TypeError, ValueError) as err:
            raise FederationError(str(err)) from None
        config = cls(**merged, classifier=classifier)
        out = Path(config.output_dir)
        if not out.is_absolute():
            config.output_dir = str((path.parent / out).resolve())
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
    }


@dataclass
class RoundRecord:
    round: int
    sites: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    seconds: float
    finished: str
    phase: str = "gan"
    timing: dict[str, float] = field(default_factory=dict)
    """Server-side seconds: ``exchange`` (messages out until the last reply), ``aggregate``
    (FedAvg) and ``checkpoint`` (writing the round's checkpoint); and the Unix times the
    messages went out (``sent_at``) and the last reply came in (``replied_at``)."""


def initial_weights(config: FederationConfig) -> tuple[dict, dict]:
    """Fresh global weights from the seed, and the TrainConfig dict every site will use."""
    from fedspine.federated.weights import trainer_weights
    from fedspine.training.config import preset_config
    from fedspine.training.gan_trainer import GanTrainer

    train_config = preset_config(config.preset, config.resolution, len(config.class_names))
    train_config.seed = config.seed
    train_config.device = "cpu"
    if config.dp:
        from fedspine.training.dp import DPConfig
        from fedspine.training.dp_trainer import dp_train_config

        # Every site builds the same DP network (no minibatch-std, fixed augmentation p).
        request = DPConfig(noise_multiplier=1.0, ada_p=config.dp_ada_p)
        train_config = dp_train_config(train_config, request)
    trainer = GanTrainer(train_config, config.prior(), device="cpu")
    return trainer_weights(trainer), train_config.to_dict()


def run_federation(grid, config: FederationConfig, log=print) -> dict[str, Any]:
    """Run (or resume) the federated rounds over ``grid``; returns the final status.

    A SpineGAN federation first runs its classifier rounds (:mod:`classifier_phase`), then the
    GAN rounds with the averaged classifier, frozen, sent along with every round.
    """
    from flwr.serverapp.strategy import FedAvg

    config.validate()
    out = Path(config.output_dir)
    (out / ROUNDS_DIR).mkdir(parents=True, exist_ok=True)
    _write_json(out / "federation_config.json", asdict(config))
    gan_checkpoint = latest_round_checkpoint(out) if config.resume else None
    _check_resumable(gan_checkpoint, config)

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=config.min_sites,
        min_available_nodes=config.min_sites,
        weighted_by_key="num-examples",
    )
    rounds = _Rounds(grid, strategy, config, out, _known_site_names(out), log)
    clinical = _classifier_phase(rounds) if config.model == "spinegan" else None
    return _gan_phase(rounds, gan_checkpoint, clinical)


@dataclass
class _Rounds:
    """What every round of one run shares, and the exchange of one round."""

    grid: Any
    strategy: Any
    config: FederationConfig
    out: Path
    names: dict[int, str]
    log: Callable[[str], Any]

    def _exchange(
        self, messages: list, expected: dict[str, Any], average: RunningFedAvg
    ) -> tuple[list[dict], list[dict]]:
        """Push the round's messages, then fold each reply into ``average`` as it arrives.

        Flower's ``send_and_receive`` would hold every reply (a whole model each) until the last
        one came; here a reply is checked, added to the running weighted sum and dropped.
        """
        ids = set(self.grid.push_messages(messages))
        # Message ids are set when pushed; a reply made by the SuperLink (a node that stopped
        # sending heartbeats) comes from the SuperLink itself, so map replies by what they answer.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        sites: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        deadline = time.time() + self.config.round_timeout
        while ids:
            for reply in self.grid.pull_messages(ids):
                ids.discard(reply.metadata.reply_to_message_id)
                entry, failure = _take_reply(reply, sent_to, self.names, expected, average)
                if entry is not None:
                    sites.append(entry)
                else:
                    failures.append(failure)
            # A grid that delivers synchronously (the in-process one) has every reply there
            # will be after one pull; the rest are silent sites, as if the timeout had passed.
            if not ids or time.time() >= deadline or getattr(self.grid, "synchronous", False):
                break
            time.sleep(min(REPLY_POLL_SECONDS, max(0.0, deadline - time.time())))
        for node in sorted({sent_to[i] for i in ids if i in sent_to}):
            site = self.names.get(node, f"node {node}")
            failures.append(
                {"node_id": node, "site": site, "reason": "no reply within the round timeout"}
            )
        return sites, failures

    def _wait_for_sites(self, phase: str, server_round: int, t0: float) -> None:
        """Fail the round, and the run, when fewer than ``min_sites`` sites connect in time,
        naming the sites seen in earlier rounds that are missing now."""
        config = self.config
        nodes = wait_for_sites(self.grid, config.min_sites, config.site_wait)
        if len(nodes) >= config.min_sites:
            return
        missing = sorted(name for node, name in self.names.items() if node not in nodes)
        label = (
            f"classifier round {server_round}" if phase == "classifier" else f"round {server_round}"
        )
        reason = (
            f"{label}: {len(nodes)} site(s) connected after waiting {config.site_wait:g} s, "
            f"min_sites is {config.min_sites}"
            + (f"; missing since earlier rounds: {', '.join(missing)}" if missing else "")
            + ". Start the missing SuperNodes (or lower min_sites) and run again to resume"
        )
        self.log(reason)
        failure = {"node_id": None, "site": "(not connected)", "reason": reason}
        _append_round(
            self.out,
            RoundRecord(server_round, [], [failure], time.perf_counter() - t0, _now(), phase),
        )
        if phase == "gan":
            _status(self.out, config, "failed", server_round - 1, reason=reason)
        else:
            done = server_round - 1
            _status(self.out, config, "failed", 0, reason, phase=phase, classifier_done=done)
        raise FederationError(reason)

    def train(
        self,
        phase: str,
        server_round: int,
        weights,
        record: dict[str, Any],
        extra: dict | None = None,
        message_type: str = "train",
    ) -> tuple[dict, RoundRecord]:
        """Send one round's train messages, collect the replies, FedAvg them.

        Fails the run (after logging the round) where fewer than ``min_sites`` replied.
        """
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        t0 = time.perf_counter()
        config = self.config
        self._wait_for_sites(phase, server_round, t0)
        sampled = self.strategy.configure_train(
            server_round, ArrayRecord(weights), ConfigRecord(record), self.grid
        )
        # FedAvg picks the sites; the message is ours, so it can name a custom train action
        # and carry more records (the frozen classifier) than the weights being averaged.
        content = RecordDict(
            {"arrays": ArrayRecord(weights), "config": ConfigRecord(record), **(extra or {})}
        )
        # The round's deadline travels with its messages: a site that receives one after it
        # refuses it rather than spend ε on a round whose result would be discarded.
        messages = [
            Message(
                content,
                dst_node_id=m.metadata.dst_node_id,
                message_type=message_type,
                group_id=f"{phase}-round-{server_round}",
                ttl=config.round_timeout,
            )
            for m in sampled
        ]
        from fedspine.federated.weights import RunningFedAvg

        t_send, sent_at = time.perf_counter(), time.time()
        expected = {"weights": weights, "federation": config.name, "round": server_round}
        average = RunningFedAvg()
        sites, failures = self._exchange(messages, expected, average)
        t_replies, replied_at = time.perf_counter(), time.time()
        label = (
            f"classifier round {server_round}" if phase == "classifier" else f"round {server_round}"
        )
        for failure in failures:
            self.log(f"{label}: site {failure['site']} failed: {failure['reason']}")
        if len(sites) < config.min_sites:
            reason = _too_few(label, sites, failures, config)
            seconds = time.perf_counter() - t0
            _append_round(
                self.out, RoundRecord(server_round, sites, failures, seconds, _now(), phase)
            )
            if phase == "gan":
                _status(self.out, config, "failed", server_round - 1, reason=reason)
            else:
                done = server_round - 1
                _status(self.out, config, "failed", 0, reason, phase=phase, classifier_done=done)
            raise FederationError(reason)
        new_weights = average.result()
        timing = {
            "exchange": t_replies - t_send,
            "aggregate": time.perf_counter() - t_replies,
            "sent_at": sent_at,
            "replied_at": replied_at,
        }
        seconds = time.perf_counter() - t0
        return new_weights, RoundRecord(
            server_round, sites, failures, seconds, _now(), phase, timing
        )


def _gan_phase(
    rounds: _Rounds, last: Path | None, clinical: tuple[dict, dict] | None
) -> dict[str, Any]:
    """The GAN rounds: FedAvg of G, D and G_ema; ``clinical`` is (classifier spec, weights)."""
    from flwr.app import ArrayRecord

    from fedspine.federated.site import RoundConfig
    from fedspine.training.checkpoint import load_checkpoint

    config, out, log = rounds.config, rounds.out, rounds.log
    start_round = 1
    if last is not None:
        data = load_checkpoint(last, kind="trainer")
        weights, train_config = data["weights"], data["train_config"]
        start_round = int(data["round"]) + 1
        log(f"resuming {config.name} after round {start_round - 1} from {last}")
    else:
        weights, train_config = initial_weights(config)
    _status(out, config, "running", start_round - 1)
    spec, extra = None, {}
    if clinical is not None:
        spec, classifier_weights = clinical
        extra = {"classifier": ArrayRecord(classifier_weights)}
        if last is not None and data.get("classifier_sha256") != spec["sha256"]:
            raise FederationError(
                f"{last}: the GAN rounds so far were trained with another classifier than "
                f"{out / 'classifier.pt'}; use another output_dir or start with --fresh"
            )

    for server_round in range(start_round, config.rounds + 1):
        rc = RoundConfig(
            federation=config.name,
            server_round=server_round,
            local_kimg=config.local_kimg,
            train_config=train_config,
            label_prior=config.prior(),
            class_names=config.class_names,
            fedspine_version=__version__,
            total_rounds=config.rounds,
            dp=config.dp_request(),
            model=config.model,
            clinical=spec,
        )
        weights, record = rounds.train("gan", server_round, weights, rc.to_record(), extra)
        t_save = time.perf_counter()
        _save_round(out, server_round, weights, train_config, config, spec)
        record.timing["checkpoint"] = time.perf_counter() - t_save
        _append_round(out, record)
        _write_privacy(out, config)
        _status(out, config, "running", server_round)
        log(
            f"round {server_round}/{config.rounds}: {len(record.sites)} site(s) replied, "
            f"{len(record.failures)} failed, {record.seconds:.1f} s"
        )
    _save_final_generator(out, weights, train_config, config, spec)
    return _status(out, config, "completed", config.rounds)


def _classifier_phase(rounds: _Rounds) -> tuple[dict, dict]:
    """The classifier rounds (resumed after the last one checkpointed); writes classifier.pt
    and returns what every GAN round sends: the classifier's spec and its frozen weights."""
    from fedspine.federated.classifier_phase import (
        FINAL_FILE,
        MESSAGE_TYPE,
        ClassifierRoundConfig,
        classifier_outputs,
        clinical_spec,
        initial_classifier,
        save_final_classifier,
    )
    from fedspine.training.checkpoint import load_checkpoint, save_checkpoint

    config, out, log = rounds.config, rounds.out, rounds.log
    phase = config.classifier
    last = latest_classifier_checkpoint(out) if config.resume else None
    if last is not None:
        data = load_checkpoint(last, kind="trainer")
        weights, model_config, done = data["classifier"], data["model"], int(data["round"])
        if done < phase.rounds:
            log(f"resuming {config.name}'s classifier after round {done} from {last}")
    else:
        weights, model_config = initial_classifier(
            phase, config.class_names, config.resolution, config.seed
        )
        done = 0
    task, _ = classifier_outputs(config.class_names)
    for server_round in range(done + 1, phase.rounds + 1):
        _status(out, config, "running", 0, phase="classifier", classifier_done=server_round - 1)
        rc = ClassifierRoundConfig(
            federation=config.name,
            server_round=server_round,
            total_rounds=phase.rounds,
            local_steps=phase.local_steps,
            batch=phase.batch,
            lr=phase.lr,
            augment=phase.augment,
            seed=config.seed,
            model=model_config,
            task=task,
            class_names=config.class_names,
            fedspine_version=__version__,
            dp=config.classifier_dp_request(),
        )
        weights, record = rounds.train(
            "classifier", server_round, weights, rc.to_record(), message_type=MESSAGE_TYPE
        )
        t_save = time.perf_counter()
        save_checkpoint(
            out / ROUNDS_DIR / f"{CLASSIFIER_PREFIX}{server_round:04d}.pt",
            "trainer",
            {
                "phase": "classifier",
                "round": server_round,
                "classifier": {k: v.detach().cpu() for k, v in weights.items()},
                "model": model_config,
                "federation": asdict(config),
            },
        )
        record.timing["checkpoint"] = time.perf_counter() - t_save
        _append_round(out, record)
        _write_privacy(out, config)
        log(
            f"classifier round {server_round}/{phase.rounds}: {len(record.sites)} site(s) "
            f"replied, {len(record.failures)} failed, {record.seconds:.1f} s"
        )
    save_final_classifier(
        out / FINAL_FILE, model_config, weights, config.class_names, _classifier_meta(out, config)
    )
    _status(out, config, "running", 0, phase="gan", classifier_done=phase.rounds)
    return clinical_spec(phase, model_config, config.class_names, weights), weights


def _check_resumable(last: Path | None, config: FederationConfig) -> None:
    """A resumed run keeps its model: GAN rounds of a cgan run do not become SpineGAN's."""
    from fedspine.training.checkpoint import load_checkpoint

    if last is None:
        return
    saved = load_checkpoint(last, kind="trainer").get("model", "cgan")
    if saved != config.model:
        raise FederationError(
            f"{last.parent.parent}: its GAN rounds were trained as {saved}, the federation now "
            f"asks for {config.model}; use another output_dir or start with --fresh"
        )


def _classifier_meta(out: Path, config: FederationConfig) -> dict[str, Any]:
    """What classifier.pt says about its training: rounds, sites and, under DP, each site's ε
    for the classifier phase alone (C depends on a site's data through those steps only)."""
    phase_records = [r for r in read_rounds(out) if r.get("phase") == "classifier"]
    sites = sorted({s["site"] for r in phase_records for s in r["sites"]})
    meta: dict[str, Any] = {
        "federated": {
            "federation": config.name,
            "rounds": config.classifier.rounds,
            "sites": sites,
            "settings": asdict(config.classifier),
        }
    }
    if config.dp:
        per_site: dict[str, dict[str, float]] = {}
        for record in phase_records:
            for site in record["sites"]:
                privacy = site.get("privacy") or {}
                phase = (privacy.get("phases") or {}).get("classifier")
                if phase is not None:
                    per_site[site["site"]] = {
                        "epsilon": float(phase["epsilon"]),
                        "delta": float(privacy["delta"]),
                        "ledger_epsilon": float(privacy["epsilon"]),
                    }
        if per_site:
            meta["dp"] = {
                "epsilon": max(s["epsilon"] for s in per_site.values()),
                "delta": max(s["delta"] for s in per_site.values()),
                "accountant": REPORT_ACCOUNTANT,
                "unit": "patient",
                "sites": per_site,
                "note": "federated DP-SGD at each site; ε per site is its classifier phase alone",
            }
    return meta


def latest_classifier_checkpoint(out: Path) -> Path | None:
    candidates = sorted((out / ROUNDS_DIR).glob(f"{CLASSIFIER_PREFIX}*.pt"))
    return candidates[-1] if candidates else None


def latest_round_checkpoint(out: Path) -> Path | None:
    candidates = sorted((out / ROUNDS_DIR).glob("round_*.pt"))
    return candidates[-1] if candidates else None


def read_rounds(out: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(out) / ROUNDS_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_status(out: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(out) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _known_site_names(out: Path) -> dict[int, str]:
    """Node id to site name, from earlier rounds, to name sites that fail without replying."""
    names: dict[int, str] = {}
    for record in read_rounds(out):
        for site in record["sites"]:
            names[int(site["node_id"])] = str(site["site"])
    return names


def wait_for_sites(grid, needed: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The connected node ids once ``needed`` are connected, or what is there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() >= deadline:
            return nodes
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def _take_reply(
    reply, sent_to: dict[str, int], names: dict[int, str], expected: dict[str, Any], average
) -> tuple[dict | None, dict | None]:
    """One reply: checked (:func:`reply_problem`), folded into ``average`` and described as a
    site entry, or described as a failure. A bad reply fails its site, not the run, and never
    reaches the average. ``names`` learns each replying site's name."""
    node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
    if reply.has_error():
        site = names.get(node, f"node {node}")
        return None, {"node_id": node, "site": site, "reason": reply.error.reason}
    problem, weights, privacy = reply_problem(reply, expected)
    if problem is None:
        problem = average.problem(weights)
    if problem is not None:
        site = names.get(node, f"node {node}")
        return None, {"node_id": node, "site": site, "reason": f"invalid reply: {problem}"}
    metrics = dict(reply.content["metrics"])
    average.add(weights, float(metrics["num-examples"]))
    site_name = str(reply.content["site"]["site-name"])
    names[node] = site_name
    entry = {"node_id": node, "site": site_name, **{k: _plain(v) for k, v in metrics.items()}}
    if privacy is not None:
        entry["privacy"] = privacy
    return entry, None


def reply_problem(reply, expected: dict[str, Any]) -> tuple[str | None, dict | None, Any]:
    """Why a site's reply cannot be aggregated, or None: the records it must hold, the round and
    federation it answers, and weights with the sent keys, shapes and dtypes, all finite.

    Returns ``(problem, weights, privacy)``: what was decoded on the way (the reply's state dict
    and privacy summary), so that the caller never decodes a whole model twice.
    """
    import math

    import torch

    content = reply.content
    for name in ("arrays", "metrics", "site"):
        if name not in content:
            return f"no {name!r} record", None, None
    site = content["site"]
    if "site-name" not in site:
        return "no site name", None, None
    if str(site.get("federation", "")) != expected["federation"]:
        return (
            f"answers federation {site.get('federation')!r}, not {expected['federation']!r}",
            None,
            None,
        )
    if int(site.get("round", -1)) != int(expected["round"]):
        return f"answers round {site.get('round')}, not {expected['round']}", None, None
    privacy = None
    if "privacy" in site:
        try:
            privacy = json.loads(str(site["privacy"]))
        except ValueError:
            return "unreadable privacy summary", None, None
    examples = content["metrics"].get("num-examples")
    if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
        return f"num-examples {examples!r} is not a positive count", None, None
    try:
        weights = content["arrays"].to_torch_state_dict()
    except Exception as err:
        return f"unreadable weights ({type(err).__name__})", None, None
    sent = expected["weights"]
    if set(weights) != set(sent):
        missing, extra = sorted(set(sent) - set(weights)), sorted(set(weights) - set(sent))
        return f"weight keys differ (missing {missing[:3]}, unexpected {extra[:3]})", None, None
    for key, tensor in weights.items():
        want = sent[key]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            problem = (
                f"{key}: {tuple(tensor.shape)} {tensor.dtype}, sent {tuple(want.shape)} "
                f"{want.dtype}"
            )
            return problem, None, None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"{key} holds NaN or infinite values", None, None
    return None, weights, privacy


def _too_few(label: str, sites, failures, config: FederationConfig) -> str:
    reasons = "; ".join(f"{f['site']}: {f['reason']}" for f in failures) or "none"
    return (
        f"{label}: only {len(sites)} site(s) replied, fewer than min_sites="
        f"{config.min_sites}; failures: {reasons}. The last completed round is kept; "
        "run again to resume."
    )


def _save_round(
    out: Path,
    server_round: int,
    weights,
    train_config: dict,
    config: FederationConfig,
    spec: dict | None,
) -> None:
    from fedspine.training.checkpoint import save_checkpoint

    save_checkpoint(
        out / ROUNDS_DIR / f"round_{server_round:04d}.pt",
        "trainer",
        {
            "round": server_round,
            "weights": {k: v.detach().cpu() for k, v in weights.items()},
            "train_config": train_config,
            "federation": asdict(config),
            "model": config.model,
            "classifier_sha256": spec["sha256"] if spec else None,
        },
    )


def _save_final_generator(
    out: Path, weights, train_config: dict, config: FederationConfig, spec: dict | None
) -> None:
    from fedspine.federated.weights import split_weights
    from fedspine.models import Generator, NetworkConfig
    from fedspine.training.generate import save_generator

    G_ema = Generator(NetworkConfig(**train_config["network"]))
    G_ema.load_state_dict(split_weights(weights, "G_ema"))
    save_generator(
        out / "generator.pt",
        G_ema,
        train_config["network"],
        config.class_names,
        training={
            "federation": config.name,
            "rounds": config.rounds,
            "local_kimg": config.local_kimg,
            "preset": config.preset,
            "seed": config.seed,
            "model": config.model,
            **(
                {
                    "clinical": {
                        "classifier": "classifier.pt",
                        "classifier_sha256_weights": spec["sha256"],
                        "weight": spec["weight"],
                        "mapping": spec["mapping"],
                    }
                }
                if spec
                else {}
            ),
        },
    )


def _write_privacy(out: Path, config: FederationConfig) -> None:
    """RUN/privacy.json from the sites' own reports: the latest per site, ε per round and
    phase, and each phase's ε alone (classifier and GAN) as the sites computed it."""
    from fedspine.privacy.report import site_entry, write_privacy_summary

    spinegan = config.model == "spinegan"
    if not config.dp:
        components = {"discriminator": "trained without differential privacy"}
        if spinegan:
            components["clinical_classifier"] = (
                "federated (FedAvg) across the sites, trained without differential privacy"
            )
        write_privacy_summary(
            out,
            {},
            components,
            not_private_reasons=["the federation ran without differential privacy"],
        )
        return
    latest: dict[str, dict] = {}
    per_round: dict[str, list[dict]] = {}
    for record in read_rounds(out):
        phase = record.get("phase", "gan")
        for site in record["sites"]:
            if "privacy" in site:
                latest[site["site"]] = site["privacy"]
                per_round.setdefault(site["site"], []).append(
                    {
                        "phase": phase,
                        "round": record["round"],
                        "epsilon": site["privacy"]["epsilon"],
                    }
                )
    sites = {}
    for name, p in latest.items():
        entry = site_entry(
            p["epsilon"],
            p["delta"],
            p["mechanisms"],
            unit=str(p.get("unit", "patient")),
            patients=int(p.get("patients", 0)),
            epsilon_per_round=per_round[name],
        )
        entry["phases"] = p.get("phases", {})
        entry["cap"] = p.get("cap")
        sites[name] = entry
    components = {
        "discriminator": "DP-SGD at each site, patient-level Poisson sampling and clipping",
        "aggregation": "FedAvg of weights: post-processing",
        "label_prior": "public: "
        + ("uniform" if config.label_prior is None else str(config.label_prior)),
        "ada_p": f"fixed at {config.dp_ada_p}",
        "clinical_classifier": "none (conditional GAN)",
        "site ledgers": "kept in each site's privacy home, steps written before they run; ε "
        "here is what each site reported for its worst patient",
        "dataset sizes": "treated as public (as in Opacus): q = patients per step / patients",
    }
    if spinegan:
        components["clinical_classifier"] = (
            f"federated first ({config.classifier.rounds} FedAvg rounds), DP-SGD at each site "
            "(patient-level sampling and clipping), its steps composed into each site's ledger "
            "and into ε above; frozen during the GAN rounds (classifier.pt)"
        )
    units = sorted({entry["unit"] for entry in sites.values()}) or ["patient"]
    write_privacy_summary(
        out,
        sites,
        components=components,
        accountant=REPORT_ACCOUNTANT,
        unit=" / ".join(units),
        run_id=config.name,
    )


def _append_round(out: Path, record: RoundRecord) -> None:
    with open(out / ROUNDS_LOG, "a") as fh:
        fh.write(json.dumps(asdict(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _status(
    out: Path,
    config: FederationConfig,
    state: str,
    completed: int,
    reason: str = "",
    phase: str = "gan",
    classifier_done: int | None = None,
) -> dict:
    """Write federation.json; ``completed`` counts GAN rounds, ``classifier_done`` the
    classifier rounds of a SpineGAN run (all of them once the GAN phase runs)."""
    status = {
        "federation": config.name,
        "state": state,
        "phase": phase,
        "completed_rounds": completed,
        "rounds": config.rounds,
        "reason": reason,
        "updated": _now(),
        "fedspine_version": __version__,
    }
    if config.model == "spinegan":
        status["model"] = "spinegan"
        status["classifier_rounds"] = config.classifier.rounds
        status["classifier_completed_rounds"] = (
            config.classifier.rounds if classifier_done is None else classifier_done
        )
    _write_json(out / STATUS_FILE, status)
    return status


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _plain(value):
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, float | int | str | bool):
        return value
    return float(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
