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

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedspine import __version__
from fedspine.federated.classifier_phase import (
    FINAL_FILE,
    MESSAGE_TYPE,
    ClassifierRoundConfig,
    classifier_outputs,
    clinical_spec,
    initial_classifier,
    save_final_classifier,
)
from fedspine.federated.embedding_route import ROUTE as EMBEDDING_ROUTE
from fedspine.federated.embedding_route import run_embedding_route
from fedspine.federated.federation_config import FRESH_START, FederationConfig, FederationError
from fedspine.federated.replies import take_reply
from fedspine.federated.run_folder import (
    CLASSIFIER_PREFIX,
    ROUNDS_DIR,
    RoundRecord,
    append_round,
    known_site_names,
    latest_classifier_checkpoint,
    latest_round_checkpoint,
    now,
    read_rounds,
    read_status,
    write_status,
)
from fedspine.federated.site_config import RoundConfig
from fedspine.federated.weights import (
    RunningFedAvg,
    split_weights,
    trainer_weights,
    weight_records,
)
from fedspine.fileio import CLASSIFIER_WEIGHTS, FEDERATION_CONFIG, RUN_GENERATOR, write_json_atomic
from fedspine.models import Generator, NetworkConfig
from fedspine.privacy.accounting import REPORT_ACCOUNTANT
from fedspine.privacy.report import site_entry, write_privacy_summary
from fedspine.training.checkpoint import load_checkpoint, save_checkpoint
from fedspine.training.config import preset_config
from fedspine.training.dp import DPConfig
from fedspine.training.dp_trainer import dp_train_config
from fedspine.training.gan_trainer import GanTrainer
from fedspine.training.generate import save_generator
from fedspine.training.public_init import (
    PublicInitError,
    load_public_init,
    pretraining_component,
)

__all__ = [
    "FederationConfig",
    "FederationError",
    "initial_weights",
    "read_rounds",
    "read_status",
    "run_federation",
    "wait_for_sites",
]

REPLY_POLL_SECONDS = 1.0


def initial_weights(config: FederationConfig) -> tuple[dict, dict, dict | None]:
    """Round 1's global weights, the TrainConfig dict every site will use, and the record of
    the public checkpoint they came from (None: fresh weights from the seed)."""
    train_config = preset_config(config.preset, config.resolution, len(config.class_names))
    train_config.seed = config.seed
    train_config.device = "cpu"
    if config.dp:
        # Every site builds the same DP network (no minibatch-std, fixed augmentation p).
        request = DPConfig(noise_multiplier=1.0, ada_p=config.dp_ada_p)
        train_config = dp_train_config(train_config, request)
    init = None
    if config.initial_checkpoint:
        # The server holds no site's data: only the declaration can be checked here.
        try:
            init = load_public_init(config.initial_checkpoint, dataset_content_hash="")
        except PublicInitError as err:
            raise FederationError(f"initial_checkpoint: {err}") from None
        train_config.network = init.minibatch_std_of(train_config.network)
    trainer = GanTrainer(train_config, config.prior(), device="cpu")
    pretraining = None
    if init is not None:
        try:
            init.apply(trainer)
        except PublicInitError as err:
            raise FederationError(f"initial_checkpoint: {err}") from None
        pretraining = init.record()
    return trainer_weights(trainer), train_config.to_dict(), pretraining


def run_federation(grid, config: FederationConfig, log=print) -> dict[str, Any]:
    """Run (or resume) the federated rounds over ``grid``; returns the final status.

    A SpineGAN federation first runs its classifier rounds (:mod:`classifier_phase`), then the
    GAN rounds with the averaged classifier, frozen, sent along with every round.
    """
    config.validate()
    out = Path(config.output_dir)
    (out / ROUNDS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / FEDERATION_CONFIG, asdict(config))
    gan_checkpoint = latest_round_checkpoint(out) if config.resume else None
    _check_resumable(gan_checkpoint, config)

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=config.min_sites,
        min_available_nodes=config.min_sites,
        weighted_by_key="num-examples",
    )
    rounds = _Rounds(grid, strategy, config, out, known_site_names(out), log)
    if config.route == EMBEDDING_ROUTE:
        return run_embedding_route(rounds)
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
        self, messages: list, take: Callable[[Any, dict[str, int]], tuple]
    ) -> tuple[list[dict], list[dict]]:
        """Push the round's messages, then hand each reply to ``take`` as it arrives.

        ``take(reply, sent_to)`` returns (site entry, None) or (None, failure). Flower's
        ``send_and_receive`` would hold every reply (a whole model each) until the last one
        came; here a reply is checked, folded in (a running weighted sum) and dropped.
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
                entry, failure = take(reply, sent_to)
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
        append_round(
            self.out,
            RoundRecord(server_round, [], [failure], time.perf_counter() - t0, now(), phase),
        )
        if phase == "gan":
            write_status(self.out, config, "failed", server_round - 1, reason=reason)
        else:
            done = server_round - 1
            write_status(self.out, config, "failed", 0, reason, phase=phase, classifier_done=done)
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

        t0 = time.perf_counter()
        config = self.config
        self._wait_for_sites(phase, server_round, t0)
        # The weights travel packed (one Array and its layout: a handful of Flower objects,
        # not one per tensor), the same content for every site.
        packed = weight_records(weights)
        sampled = self.strategy.configure_train(
            server_round, packed["arrays"], ConfigRecord(record), self.grid
        )
        # FedAvg picks the sites; the message is ours, so it can name a custom train action
        # and carry more records (the frozen classifier) than the weights being averaged.
        content = RecordDict({**packed, "config": ConfigRecord(record), **(extra or {})})
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

        t_send, sent_at = time.perf_counter(), time.time()
        expected = {"weights": weights, "federation": config.name, "round": server_round}
        average = RunningFedAvg()
        sites, failures = self._exchange(
            messages,
            lambda reply, sent_to: take_reply(reply, sent_to, self.names, expected, average),
        )
        t_replies, replied_at = time.perf_counter(), time.time()
        label = (
            f"classifier round {server_round}" if phase == "classifier" else f"round {server_round}"
        )
        for failure in failures:
            self.log(f"{label}: site {failure['site']} failed: {failure['reason']}")
        if len(sites) < config.min_sites:
            reason = _too_few(label, sites, failures, config)
            seconds = time.perf_counter() - t0
            append_round(
                self.out, RoundRecord(server_round, sites, failures, seconds, now(), phase)
            )
            if phase == "gan":
                write_status(self.out, config, "failed", server_round - 1, reason=reason)
            else:
                done = server_round - 1
                write_status(
                    self.out, config, "failed", 0, reason, phase=phase, classifier_done=done
                )
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
            server_round, sites, failures, seconds, now(), phase, timing
        )


def _gan_phase(
    rounds: _Rounds, last: Path | None, clinical: tuple[dict, dict] | None
) -> dict[str, Any]:
    """The GAN rounds: FedAvg of G, D and G_ema; ``clinical`` is (classifier spec, weights)."""
    config, out, log = rounds.config, rounds.out, rounds.log
    start_round = 1
    if last is not None:
        data = load_checkpoint(last, kind="trainer")
        weights, train_config = data["weights"], data["train_config"]
        pretraining = data.get("pretraining")
        start_round = int(data["round"]) + 1
        log(f"resuming {config.name} after round {start_round - 1} from {last}")
    else:
        weights, train_config, pretraining = initial_weights(config)
    write_status(out, config, "running", start_round - 1)
    spec, extra = None, {}
    if clinical is not None:
        spec, classifier_weights = clinical
        extra = weight_records(classifier_weights, "classifier")
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
            pretraining=pretraining,
        )
        weights, record = rounds.train("gan", server_round, weights, rc.to_record(), extra)
        t_save = time.perf_counter()
        _save_round(out, server_round, weights, train_config, config, spec, pretraining)
        record.timing["checkpoint"] = time.perf_counter() - t_save
        append_round(out, record)
        _write_privacy(out, config, pretraining)
        write_status(out, config, "running", server_round)
        log(
            f"round {server_round}/{config.rounds}: {len(record.sites)} site(s) replied, "
            f"{len(record.failures)} failed, {record.seconds:.1f} s"
        )
    _save_final_generator(out, weights, train_config, config, spec)
    return write_status(out, config, "completed", config.rounds)


def _classifier_phase(rounds: _Rounds) -> tuple[dict, dict]:
    """The classifier rounds (resumed after the last one checkpointed); writes classifier.pt
    and returns what every GAN round sends: the classifier's spec and its frozen weights."""
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
        write_status(
            out, config, "running", 0, phase="classifier", classifier_done=server_round - 1
        )
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
        append_round(out, record)
        _write_privacy(out, config)
        log(
            f"classifier round {server_round}/{phase.rounds}: {len(record.sites)} site(s) "
            f"replied, {len(record.failures)} failed, {record.seconds:.1f} s"
        )
    save_final_classifier(
        out / FINAL_FILE, model_config, weights, config.class_names, _classifier_meta(out, config)
    )
    write_status(out, config, "running", 0, phase="gan", classifier_done=phase.rounds)
    return clinical_spec(phase, model_config, config.class_names, weights), weights


def _check_resumable(last: Path | None, config: FederationConfig) -> None:
    """A resumed run keeps its model: GAN rounds of a cgan run do not become SpineGAN's."""
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


def wait_for_sites(grid, needed: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The connected node ids once ``needed`` are connected, or what is there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() >= deadline:
            return nodes
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


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
    pretraining: dict | None = None,
) -> None:
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
            "pretraining": pretraining,
        },
    )


def _save_final_generator(
    out: Path, weights, train_config: dict, config: FederationConfig, spec: dict | None
) -> None:

    G_ema = Generator(NetworkConfig(**train_config["network"]))
    G_ema.load_state_dict(split_weights(weights, "G_ema"))
    save_generator(
        out / RUN_GENERATOR,
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
                        "classifier": CLASSIFIER_WEIGHTS,
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


def _write_privacy(out: Path, config: FederationConfig, pretraining: dict | None = None) -> None:
    """RUN/privacy.json from the sites' own reports: the latest per site, ε per round and
    phase, and each phase's ε alone (classifier and GAN) as the sites computed it."""
    spinegan = config.model == "spinegan"
    if not config.dp:
        components = {
            "discriminator": "trained without differential privacy",
            "pretraining": pretraining_component(pretraining, FRESH_START),
        }
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
        "pretraining": pretraining_component(pretraining, FRESH_START),
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
