"""A site's side of the DP mean-embedding route: one release, through the site's own ledger.

The server asks once (Flower's custom action ``train.embedding``) for the site's per-class sums
of per-patient mean random-Fourier-feature embeddings at a target ε; the site checks the request
against its own limits, makes the release with :func:`~fedspine.training.mean_embedding.
release_embedding` (planned, reserved and settled in its privacy home, capped by its own
``max-epsilon``), keeps the file in its state folder as its record of what left, and replies
with the noisy sums and counts and the release's metadata. Nothing else computed on its images
leaves: the sums carry Gaussian noise, and the patient count is treated as public (as in Opacus).

The site adds the full noise its own ε requires (no secure aggregation): the server sees each
site's release, so a 1/K share of the noise would not protect a site from the server.

With ``features`` naming ``public`` (DP-MEPF), the server also sends the discriminator of its
public checkpoint (``feature-network`` records) and what it claims of it. Whatever network the
server picks, the release stays DP: the site bounds each patient's mean embedding itself (a
non-finite one counts as zero), so the sensitivity does not depend on the network. The site
still bounds the network's size, refuses weights that do not hash to what the request says or
that the server says were trained on this very dataset, and its ledger records the hash of the
weights it used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from fedspine.dp_options import FEDERATED_FEATURES, names_public
from fedspine.federated.site_config import (
    SiteConfig,
    SiteRefusal,
    check_version,
    load_site_data,
    site_state_file,
)
from fedspine.federated.weights import read_weight_records
from fedspine.privacy.engine import PrivacyError
from fedspine.training.mean_embedding import EmbeddingReleaseError, release_embedding
from fedspine.training.mean_embedding_features import (
    SOURCE_KEYS,
    FeatureMapError,
    NetworkFeatures,
)

EMBEDDING_ACTION = "embedding"
"""Flower custom action: messages of type ``train.embedding``."""
MAX_DIM = 8192
"""Largest feature dimension a site computes for a server (memory and file size stay small)."""
MAX_BANDWIDTHS = 16
FEATURE_NETWORK = "feature-network"
"""Records of the public discriminator the server sends with a ``public`` feature map."""
MAX_FEATURE_NETWORK_BYTES = 256 * 2**20
MAX_FEATURE_NETWORK_TENSORS = 2000
MAX_DESCRIPTION_CHARS = 20_000
NETWORK_BOUNDS = {
    "resolution": 256,
    "img_channels": 4,
    "c_dim": 64,
    "z_dim": 2048,
    "w_dim": 2048,
    "mapping_layers": 16,
    "channel_base": 65536,
    "channel_max": 1024,
    "mbstd_group": 64,
    "mbstd_channels": 16,
}
"""The largest discriminator settings a site builds for a server's feature network."""


@dataclass(frozen=True)
class EmbeddingRoundConfig:
    """What the server asks of a site's one release, from the message's ConfigRecord."""

    federation: str
    server_round: int
    fedspine_version: str
    epsilon: float
    clip: float
    dim: int
    seed: int
    bandwidths: tuple[float, ...]
    feature_resolution: int
    class_names: tuple[str, ...]
    features: str = "rff"
    feature_network: str = ""
    """JSON: the public network's settings and what the server claims of its checkpoint."""

    def to_record(self) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "server-round": self.server_round,
            "fedspine-version": self.fedspine_version,
            "epsilon": self.epsilon,
            "clip": self.clip,
            "dim": self.dim,
            "seed": self.seed,
            "bandwidths": list(self.bandwidths),
            "feature-resolution": self.feature_resolution,
            "class-names": list(self.class_names),
            "features": self.features,
            "feature-network": self.feature_network,
        }

    @property
    def uses_network(self) -> bool:
        return names_public(self.features)

    @classmethod
    def from_record(cls, record) -> EmbeddingRoundConfig:
        """Parse and bound what the server sent; anything out of shape is a refusal."""
        try:
            rc = cls(
                federation=str(record["federation"]),
                server_round=_int(record["server-round"], "server-round"),
                fedspine_version=str(record["fedspine-version"]),
                epsilon=_positive(record["epsilon"], "epsilon"),
                clip=_positive(record["clip"], "clip"),
                dim=_int(record["dim"], "dim"),
                seed=_int(record["seed"], "seed"),
                bandwidths=tuple(_positive(b, "bandwidths") for b in list(record["bandwidths"])),
                feature_resolution=_int(record["feature-resolution"], "feature-resolution"),
                class_names=tuple(str(c) for c in list(record["class-names"])),
                features=str(record["features"]),
                feature_network=str(record["feature-network"]),
            )
        except KeyError as err:
            raise SiteRefusal(f"the embedding request lacks {err}") from None
        except (TypeError, ValueError) as err:
            raise SiteRefusal(f"the embedding request is malformed: {err}") from None
        if not 0 <= rc.seed < 2**63:
            raise SiteRefusal(f"seed {rc.seed}: the feature map's seed is 0 to 2**63 - 1")
        if not 1 <= rc.dim <= MAX_DIM:
            raise SiteRefusal(f"dim {rc.dim}: a site computes 1 to {MAX_DIM} features")
        if not 1 <= len(rc.bandwidths) <= MAX_BANDWIDTHS:
            raise SiteRefusal(f"{len(rc.bandwidths)} bandwidths: 1 to {MAX_BANDWIDTHS} allowed")
        if not 4 <= rc.feature_resolution <= 256:
            raise SiteRefusal(f"feature-resolution {rc.feature_resolution}: 4 to 256 px allowed")
        if len(rc.federation) > 200 or not rc.class_names or len(rc.class_names) > 64:
            raise SiteRefusal("the embedding request names no classes, too many, or a long name")
        if rc.features not in FEDERATED_FEATURES:
            raise SiteRefusal(
                f"features {rc.features[:40]!r}: one of {', '.join(FEDERATED_FEATURES)}"
            )
        if len(rc.feature_network) > MAX_DESCRIPTION_CHARS:
            raise SiteRefusal("the feature network's description is too long")
        if bool(rc.feature_network) != rc.uses_network:
            raise SiteRefusal("the feature network is described exactly when features use it")
        return rc


def describe_network(features: NetworkFeatures) -> str:
    """The server's description of the public network it sends (``feature-network``)."""
    return json.dumps(
        {"network": features.network, "weights_sha256": features.weights_sha256, **features.source},
        allow_nan=False,
    )


def received_network(
    site: SiteConfig, rc: EmbeddingRoundConfig, content: Mapping[str, Any], content_hash: str
) -> NetworkFeatures:
    """The public discriminator the server sent, checked before any private image meets it."""
    try:
        claim = json.loads(rc.feature_network)
    except ValueError:
        raise SiteRefusal("the feature network's description is not JSON") from None
    keys = {"network", "weights_sha256", *SOURCE_KEYS}
    if not isinstance(claim, dict) or set(claim) != keys:
        raise SiteRefusal(f"the feature network's description must hold exactly {sorted(keys)}")
    network = claim["network"]
    if not isinstance(network, dict):
        raise SiteRefusal("the feature network's settings are not a table")
    for name, bound in NETWORK_BOUNDS.items():
        value = network.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise SiteRefusal(f"the feature network's {name} is not a whole number")
        if value is not None and not 0 <= value <= bound:
            raise SiteRefusal(f"the feature network's {name} {value} exceeds this site's {bound}")
    if int(network.get("resolution") or 0) > site.max_resolution:
        raise SiteRefusal(
            f"the feature network works at {network.get('resolution')} px; this site computes at "
            f"most {site.max_resolution} px (`fedspine client start --max-resolution`)"
        )
    if str(claim["dataset_content_hash"]) == content_hash:
        raise SiteRefusal(
            "the feature network was trained on this site's very dataset; its data is this "
            "site's private data, whatever it was declared"
        )
    try:
        weights = read_weight_records(
            content,
            FEATURE_NETWORK,
            max_tensors=MAX_FEATURE_NETWORK_TENSORS,
            max_bytes=MAX_FEATURE_NETWORK_BYTES,
        )
    except ValueError as err:
        raise SiteRefusal(f"the feature network's weights cannot be read: {err}") from None
    if not all(bool(t.isfinite().all()) for t in weights.values() if t.is_floating_point()):
        raise SiteRefusal("the feature network's weights hold NaN or infinite values")
    try:
        features = NetworkFeatures(network, weights, {k: str(claim[k]) for k in SOURCE_KEYS})
    except FeatureMapError as err:
        raise SiteRefusal(str(err)) from None
    # The hash of the weights as the site will use them (what its ledger records): other
    # values, or values changed when loaded (other dtypes), are refused alike.
    if features.weights_sha256 != claim["weights_sha256"]:
        raise SiteRefusal(
            "the feature network's weights, as loaded, do not hash to what the request says "
            "(other values, or changed when loaded by other dtypes)"
        )
    return features


def release_round(
    site: SiteConfig, rc: EmbeddingRoundConfig, content: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, str]]:
    """Make the site's one release; returns (sums and counts, metrics, the site record).

    ``content``: the request message's records (the feature network's weights travel there)."""
    check_version(rc.fedspine_version)
    if site.max_epsilon is None:
        raise SiteRefusal(
            f"site {site.site_name} has no ε cap (max-epsilon); set one in its site.toml before "
            "it releases anything through the DP mean-embedding route"
        )
    dataset = load_site_data(site, list(rc.class_names))
    if rc.feature_resolution > dataset.resolution:
        raise SiteRefusal(
            f"feature-resolution {rc.feature_resolution} exceeds the site's data "
            f"({dataset.resolution} px)"
        )
    public = None
    if rc.uses_network:
        public = received_network(site, rc, content or {}, dataset.content_hash)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    path = site_state_file(site, rc.federation, f"embedding-release-{stamp}.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        release = release_embedding(
            site.data_path,
            path,
            epsilon=rc.epsilon,
            clip_norm=rc.clip,
            dim=rc.dim,
            seed=rc.seed,
            bandwidths=rc.bandwidths,
            feature_resolution=rc.feature_resolution,
            privacy_home=site.privacy_home,
            privacy_unit=site.privacy_unit,
            max_epsilon=site.max_epsilon,
            site=site.site_name,
            features=rc.features,
            public=public,
        )
    except (EmbeddingReleaseError, FeatureMapError, PrivacyError) as err:
        raise SiteRefusal(f"site {site.site_name}: {err}") from None
    arrays = {
        "sums": torch.from_numpy(release.sums.astype("float64")),
        "counts": torch.from_numpy(release.counts.astype("float64")),
    }
    metrics = {"num-examples": int(release.metadata["patients"])}
    extra = {
        "site-name": site.site_name,
        "federation": rc.federation,
        "round": rc.server_round,
        "release": json.dumps(release.metadata, allow_nan=False),
    }
    return arrays, metrics, extra


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {str(value)[:40]!r}")
    return int(value)


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {str(value)[:40]!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value}")
    return float(value)
