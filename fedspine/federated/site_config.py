"""A site's own facts and the checks it applies to every request, before any training code.

The site's facts (data path, name, ε cap, privacy home, local state folder) come from its node
config, set by the site admin with `fedspine client start`; nothing the server sends can change
them. This module is the lowest of the site's modules (site > classifier_phase > site_privacy >
site_config, enforced in .importlinter) and imports no training code.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspine import __version__
from fedspine.data.prepared import PreparedDatasetError, load_prepared
from fedspine.fileio import RUN_TRAINER_STATE


class SiteRefusal(Exception):
    """The site declines the round (version mismatch, wrong data, privacy cap); says why."""


# What a site trains per round unless its admin sets more: the server cannot raise them.
DEFAULT_MAX_LOCAL_KIMG = 50.0
DEFAULT_MAX_RESOLUTION = 256
MAX_DECLARATION = 500
"""Characters of a server's "why this checkpoint is public" a site keeps in its ledger."""
PRETRAINING_FIELDS = frozenset(
    {"checkpoint", "checkpoint_sha256", "declared_public", "dataset_content_hash", "epsilon"}
)
"""What a server's pretraining record may hold: the fields of ``PublicInit.record()``."""


@dataclass(frozen=True)
class SiteConfig:
    """A site's node config: what only the site decides."""

    data_path: Path
    site_name: str
    state_dir: Path
    max_epsilon: float | None = None
    privacy_home: Path | None = None
    privacy_unit: str | None = None
    threads: int | None = None
    max_local_kimg: float = DEFAULT_MAX_LOCAL_KIMG
    max_resolution: int = DEFAULT_MAX_RESOLUTION

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        missing = [k for k in ("data-path", "site-name") if k not in node_config]
        if missing:
            raise SiteRefusal(
                f"the SuperNode's node config lacks {missing}; start it with `fedspine client start`"
            )
        data_path = Path(str(node_config["data-path"]))
        state_dir = Path(str(node_config.get("state-dir") or data_path.parent / ".fedspine-site"))
        cap = node_config.get("max-epsilon")
        home = node_config.get("privacy-home")
        unit = node_config.get("privacy-unit")
        return cls(
            data_path=data_path,
            site_name=str(node_config["site-name"]),
            state_dir=state_dir,
            max_epsilon=float(cap) if cap not in (None, "", -1, -1.0) else None,
            privacy_home=Path(str(home)) if home else None,
            privacy_unit=str(unit) if unit else None,
            threads=int(node_config["threads"]) if node_config.get("threads") else None,
            max_local_kimg=float(node_config.get("max-local-kimg") or DEFAULT_MAX_LOCAL_KIMG),
            max_resolution=int(node_config.get("max-resolution") or DEFAULT_MAX_RESOLUTION),
        )


@dataclass(frozen=True)
class RoundConfig:
    """The server's settings for one round, as sent in the train message's ConfigRecord."""

    federation: str
    server_round: int
    local_kimg: float
    train_config: dict
    label_prior: list[float]
    class_names: list[str]
    fedspine_version: str
    total_rounds: int = 1
    dp: dict | None = None
    model: str = "cgan"
    clinical: dict | None = None
    """SpineGAN only: the frozen classifier's config, metadata, sha256, λ and mapping (its
    weights travel beside the GAN's, packed as the message's ``classifier`` record)."""
    pretraining: dict | None = None
    """The public checkpoint round 1 started from, as the server declares it (its SHA-256 and
    why its data is public); a site records it beside its DP steps. Initial weights the site
    did not compute cost it no ε, whoever chose them."""

    def to_record(self) -> dict[str, Any]:
        return {
            "total-rounds": int(self.total_rounds),
            "dp": json.dumps(self.dp) if self.dp else "",
            "model": self.model,
            "clinical": json.dumps(self.clinical, sort_keys=True) if self.clinical else "",
            "federation": self.federation,
            "server-round": self.server_round,
            "local-kimg": float(self.local_kimg),
            "train-config": json.dumps(self.train_config, sort_keys=True),
            "label-prior": json.dumps([float(p) for p in self.label_prior]),
            "class-names": json.dumps(list(self.class_names)),
            "fedspine-version": self.fedspine_version,
            "pretraining": json.dumps(self.pretraining, sort_keys=True) if self.pretraining else "",
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundConfig:
        try:
            return cls(
                federation=str(record["federation"]),
                server_round=int(record["server-round"]),
                local_kimg=float(record["local-kimg"]),
                train_config=json.loads(str(record["train-config"])),
                label_prior=[float(p) for p in json.loads(str(record["label-prior"]))],
                class_names=list(json.loads(str(record["class-names"]))),
                fedspine_version=str(record["fedspine-version"]),
                total_rounds=int(record.get("total-rounds", 1)),
                dp=json.loads(str(record["dp"])) if record.get("dp") else None,
                model=str(record.get("model", "cgan")),
                clinical=json.loads(str(record["clinical"])) if record.get("clinical") else None,
                pretraining=declared_pretraining(record.get("pretraining")),
            )
        except KeyError as err:
            raise SiteRefusal(
                f"the train message lacks {err}; is the server a fedspine server?"
            ) from None


def declared_pretraining(text: Any) -> dict[str, Any] | None:
    """The server's declaration of the public checkpoint round 1 started from, as the site will
    write it into its own ledger: the fields of ``PublicInit.record()`` with their types and
    bounded lengths (a SHA-256, a short reason, ε 0), or refused. A server may not put anything
    else, or anything large, into a site's ledger."""
    if not text:
        return None
    try:
        value = json.loads(str(text))
    except ValueError:
        value = None

    def short(key: str, limit: int) -> bool:
        item = value.get(key)
        return isinstance(item, str) and 0 < len(item) <= limit

    sha = value.get("checkpoint_sha256") if isinstance(value, dict) else None
    ok = (
        isinstance(value, dict)
        and set(value) <= PRETRAINING_FIELDS
        and isinstance(sha, str)
        and len(sha) == 64
        and all(c in "0123456789abcdef" for c in sha)
        and short("declared_public", MAX_DECLARATION)
        and all(short(k, 200) for k in ("checkpoint", "dataset_content_hash") if k in value)
        and value.get("epsilon", 0.0) == 0.0
    )
    if not ok:
        raise SiteRefusal(
            "the server's pretraining record is not a public checkpoint's SHA-256 and a short "
            "declaration; refused"
        )
    return value


def check_round_limits(site: SiteConfig, rc: RoundConfig) -> None:
    """Refuse a round asking for more local work or a bigger network than the site allows.

    The server chooses the work; only the site bounds it (compute, wall time and, under DP, the
    steps its ledger must hold), so the bounds come from the node config.
    """
    if not 0 < rc.local_kimg <= site.max_local_kimg:
        raise SiteRefusal(
            f"the server asks for {rc.local_kimg:g} kimg this round; this site trains at most "
            f"{site.max_local_kimg:g} (`fedspine client start --max-local-kimg`)"
        )
    network = rc.train_config.get("network") or {}
    resolution = int(network.get("resolution") or rc.train_config.get("resolution") or 0)
    if resolution > site.max_resolution:
        raise SiteRefusal(
            f"the server asks for a {resolution} px network; this site trains at most "
            f"{site.max_resolution} px (`fedspine client start --max-resolution`)"
        )


def check_not_stale(created_at: float, ttl: float | None, now: float | None = None) -> None:
    """Refuse a round's message that arrives after its deadline (``created_at + ttl``).

    The server has given up on that round by then; training it would spend privacy budget on
    weights that are thrown away.
    """
    if ttl is None or ttl <= 0:
        return
    now = time.time() if now is None else now
    age = now - created_at
    if age > ttl:
        raise SiteRefusal(
            f"the round's message expired: sent {age:.0f} s ago with a deadline of {ttl:.0f} s; "
            "not trained (the server has moved on)"
        )


def check_version(server_version: str) -> None:
    if server_version != __version__:
        raise SiteRefusal(
            f"the server runs fedspine {server_version} but this site has fedspine {__version__}; "
            "install the same version at the server and every site"
        )


def load_site_data(site: SiteConfig, class_names: list[str]):
    """The site's prepared dataset, refused where it is missing or of another label schema."""
    try:
        dataset = load_prepared(site.data_path)
    except PreparedDatasetError as err:
        raise SiteRefusal(f"site {site.site_name}: {err}") from None
    if list(dataset.class_names) != list(class_names):
        raise SiteRefusal(
            f"site {site.site_name}: its data has classes {dataset.class_names}, the federation "
            f"trains {class_names}; ingest with the federation's label schema"
        )
    return dataset


def check_dp_wanted(site: SiteConfig, dp: dict | None) -> None:
    """A site with an ε cap trains only with DP, whatever the server asks."""
    if site.max_epsilon is not None and not dp:
        raise SiteRefusal(
            f"site {site.site_name} trains only with differential privacy (its ε cap is "
            f"{site.max_epsilon}); the federation was submitted without DP"
        )


def site_seed(seed: int, site_name: str) -> int:
    """A per-site seed, so sites do not draw the same latents and batches."""
    digest = hashlib.sha256(f"{seed}:{site_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def site_state_file(site: SiteConfig, federation: str, name: str = RUN_TRAINER_STATE) -> Path:
    """The site's local state of one federation (``trainer.pt``; ``classifier.pt``)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in federation)
    return site.state_dir / safe / name
