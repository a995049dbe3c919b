"""The coordinator's run folder: its file names, the round log, the status file and the round
checkpoints' names, read and written without the training stack (so `fedspine server status`
and the deployment helpers stay light).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedspine import __version__
from fedspine.federated.federation_config import FederationConfig
from fedspine.fileio import FEDERATION_ROUNDS, FEDERATION_STATUS, write_json_atomic

ROUNDS_DIR = "rounds"
CLASSIFIER_PREFIX = "classifier_round_"
ROUNDS_LOG = FEDERATION_ROUNDS
STATUS_FILE = FEDERATION_STATUS


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


def known_site_names(out: Path) -> dict[int, str]:
    """Node id to site name, from earlier rounds, to name sites that fail without replying."""
    names: dict[int, str] = {}
    for record in read_rounds(out):
        for site in record["sites"]:
            names[int(site["node_id"])] = str(site["site"])
    return names


def append_round(out: Path, record: RoundRecord) -> None:
    with open(out / ROUNDS_LOG, "a") as fh:
        fh.write(json.dumps(asdict(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_status(
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
        "updated": now(),
        "fedspine_version": __version__,
    }
    if config.model == "spinegan":
        status["model"] = "spinegan"
        status["classifier_rounds"] = config.classifier.rounds
        status["classifier_completed_rounds"] = (
            config.classifier.rounds if classifier_done is None else classifier_done
        )
    write_json_atomic(out / STATUS_FILE, status)
    return status


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
