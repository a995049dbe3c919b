"""The coordinator's round loop: FedAvg of G, D and G_ema over the sites, checkpointed per round.

Flower's `Strategy.start` keeps everything in memory and cannot resume, so the loop here uses
the FedAvg strategy's own pieces (`configure_train`, `aggregate_train`) round by round, writes a
checkpoint after each completed round, and continues from the last one after a restart. A site
that fails or times out costs its contribution to that round only, as long as `min_sites` replied.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedspine import __version__

ROUNDS_DIR = "rounds"
ROUNDS_LOG = "rounds.jsonl"
STATUS_FILE = "federation.json"


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
        if len(self.class_names) < 1:
            raise FederationError("class_names must name at least one class")
        if self.label_prior is not None and len(self.label_prior) != len(self.class_names):
            raise FederationError("label_prior needs one weight per class")

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
            "preset": self.preset,
            "resolution": int(self.resolution),
            "class-names": json.dumps(list(self.class_names)),
            "label-prior": json.dumps(self.label_prior) if self.label_prior is not None else "",
            "seed": int(self.seed),
            "resume": bool(self.resume),
            "fedspine-version": __version__,
            "dp": json.dumps(self.dp_request()) if self.dp else "",
        }

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> FederationConfig:
        if str(rc.get("fedspine-version", __version__)) != __version__:
            raise FederationError(
                f"the run was submitted with fedspine {rc['fedspine-version']}, but the ServerApp "
                f"has fedspine {__version__}"
            )
        prior = str(rc.get("label-prior", "") or "")
        return cls(
            name=str(rc["name"]),
            output_dir=str(rc["output-dir"]),
            rounds=int(rc["rounds"]),
            local_kimg=float(rc["local-kimg"]),
            min_sites=int(rc["min-sites"]),
            round_timeout=float(rc["round-timeout"]),
            preset=str(rc["preset"]),
            resolution=int(rc["resolution"]),
            class_names=list(json.loads(str(rc["class-names"]))),
            label_prior=json.loads(prior) if prior else None,
            seed=int(rc["seed"]),
            resume=bool(rc.get("resume", True)),
            **_dp_fields(str(rc.get("dp", "") or "")),
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> FederationConfig:
        """Read ``[federation]`` and ``[training]`` tables of a federation.toml."""
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
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise FederationError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
        config = cls(**merged)
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
    """Run (or resume) the federated rounds over ``grid``; returns the final status."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from fedspine.federated.site import RoundConfig
    from fedspine.training.checkpoint import load_checkpoint

    config.validate()
    out = Path(config.output_dir)
    (out / ROUNDS_DIR).mkdir(parents=True, exist_ok=True)
    _write_json(out / "federation_config.json", asdict(config))

    start_round = 1
    last = latest_round_checkpoint(out) if config.resume else None
    if last is not None:
        data = load_checkpoint(last, kind="trainer")
        weights, train_config = data["weights"], data["train_config"]
        start_round = int(data["round"]) + 1
        log(f"resuming {config.name} after round {start_round - 1} from {last}")
    else:
        weights, train_config = initial_weights(config)
    _status(out, config, "running", start_round - 1)

    names = _known_site_names(out)
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=config.min_sites,
        min_available_nodes=config.min_sites,
        weighted_by_key="num-examples",
    )
    for server_round in range(start_round, config.rounds + 1):
        t0 = time.perf_counter()
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
        )
        messages = list(
            strategy.configure_train(
                server_round, ArrayRecord(weights), ConfigRecord(rc.to_record()), grid
            )
        )
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
        # Message ids are set when pushed; a reply made by the SuperLink (a node that stopped
        # sending heartbeats) comes from the SuperLink itself, so map replies by what they answer.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        sites, failures = _sort_replies(replies, sent_to, names)
        for failure in failures:
            log(f"round {server_round}: site {failure['site']} failed: {failure['reason']}")
        if len(sites) < config.min_sites:
            _append_round(
                out, RoundRecord(server_round, sites, failures, time.perf_counter() - t0, _now())
            )
            _status(
                out,
                config,
                "failed",
                server_round - 1,
                reason=_too_few(server_round, sites, failures, config),
            )
            raise FederationError(_too_few(server_round, sites, failures, config))
        arrays, _ = strategy.aggregate_train(
            server_round, [r for r in replies if not r.has_error()]
        )
        weights = arrays.to_torch_state_dict()
        _save_round(out, server_round, weights, train_config, config)
        record = RoundRecord(server_round, sites, failures, time.perf_counter() - t0, _now())
        _append_round(out, record)
        _write_privacy(out, config)
        _status(out, config, "running", server_round)
        log(
            f"round {server_round}/{config.rounds}: {len(sites)} site(s) replied, "
            f"{len(failures)} failed, {record.seconds:.1f} s"
        )
    _save_final_generator(out, weights, train_config, config)
    return _status(out, config, "completed", config.rounds)


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


def _sort_replies(
    replies, sent_to: dict[str, int], names: dict[int, str]
) -> tuple[list[dict], list[dict]]:
    """Successful replies and failures of one round; ``names`` learns each replying site's name."""
    sites: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    answered = set()
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        answered.add(node)
        if reply.has_error():
            site = names.get(node, f"node {node}")
            failures.append({"node_id": node, "site": site, "reason": reply.error.reason})
            continue
        metrics = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
        site_name = (
            str(reply.content["site"]["site-name"]) if "site" in reply.content else str(node)
        )
        names[node] = site_name
        entry = {"node_id": node, "site": site_name, **{k: _plain(v) for k, v in metrics.items()}}
        if "site" in reply.content and "privacy" in reply.content["site"]:
            entry["privacy"] = json.loads(str(reply.content["site"]["privacy"]))
        sites.append(entry)
    for node in sorted(set(sent_to.values()) - answered):
        site = names.get(node, f"node {node}")
        failures.append(
            {"node_id": node, "site": site, "reason": "no reply within the round timeout"}
        )
    return sites, failures


def _too_few(server_round: int, sites, failures, config: FederationConfig) -> str:
    reasons = "; ".join(f"{f['site']}: {f['reason']}" for f in failures) or "none"
    return (
        f"round {server_round}: only {len(sites)} site(s) replied, fewer than min_sites="
        f"{config.min_sites}; failures: {reasons}. The last completed round is kept; "
        "run again to resume."
    )


def _save_round(
    out: Path, server_round: int, weights, train_config: dict, config: FederationConfig
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
        },
    )


def _save_final_generator(out: Path, weights, train_config: dict, config: FederationConfig) -> None:
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
        },
    )


def _write_privacy(out: Path, config: FederationConfig) -> None:
    """RUN/privacy.json from the sites' own reports: the latest per site, ε per round."""
    from fedspine.privacy.report import site_entry, write_privacy_summary

    if not config.dp:
        write_privacy_summary(
            out,
            {},
            {"discriminator": "trained without differential privacy"},
            not_private_reasons=["the federation ran without differential privacy"],
        )
        return
    latest: dict[str, dict] = {}
    per_round: dict[str, list[dict]] = {}
    for record in read_rounds(out):
        for site in record["sites"]:
            if "privacy" in site:
                latest[site["site"]] = site["privacy"]
                per_round.setdefault(site["site"], []).append(
                    {"round": record["round"], "epsilon": site["privacy"]["epsilon"]}
                )
    sites = {
        name: site_entry(
            p["epsilon"],
            p["delta"],
            p["dataset_hash"],
            p["mechanisms"],
            epsilon_per_round=per_round[name],
        )
        for name, p in latest.items()
    }
    write_privacy_summary(
        out,
        sites,
        components={
            "discriminator": "DP-SGD at each site, patient-level Poisson sampling and clipping",
            "aggregation": "FedAvg of weights: post-processing",
            "label_prior": "public: "
            + ("uniform" if config.label_prior is None else str(config.label_prior)),
            "ada_p": f"fixed at {config.dp_ada_p}",
            "clinical_classifier": "none (conditional GAN)",
            "site ledgers": "kept at each site; ε here is what each site reported",
        },
        accountant="prv",
    )


def _append_round(out: Path, record: RoundRecord) -> None:
    with open(out / ROUNDS_LOG, "a") as fh:
        fh.write(json.dumps(asdict(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _status(
    out: Path, config: FederationConfig, state: str, completed: int, reason: str = ""
) -> dict:
    status = {
        "federation": config.name,
        "state": state,
        "completed_rounds": completed,
        "rounds": config.rounds,
        "reason": reason,
        "updated": _now(),
        "fedspine_version": __version__,
    }
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
