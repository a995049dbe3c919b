"""Public feature maps for the DP mean-embedding route (DP-MERF / DP-MEPF ideas, issue 15).

A feature map turns an image into a vector of norm at most 1. It must be *public*: fixed before
any private data is seen, and rebuildable by anyone from its description, so that a site's
noisy mean embedding means the same thing to the server that fits a generator to it. Two kinds:

- :class:`RandomFourierFeatures` (DP-MERF): ``φ(x) = [cos(Ωx), sin(Ωx)] / √m`` on the image's
  pixels in [-1, 1], resized (area) to ``resolution`` px, so ``‖φ(x)‖ = 1`` exactly. The columns
  of Ω are drawn from N(0, I/ℓ²) by numpy's PCG64 from the public ``seed``, so ⟨φ(x), φ(y)⟩
  estimates the Gaussian kernel exp(-‖x-y‖²/(2ℓ²)). **Bandwidth**: ℓ = s·√d for d pixels, i.e.
  ``s`` is a root-mean-square per-pixel distance (images in [-1, 1]); it is never estimated from
  private data (a median heuristic on the site's images would be an uncounted release). The
  default uses four scales, s = 0.1, 0.25, 0.5 and 1, a quarter of the frequencies each, chosen
  a priori for radiographs scaled to [-1, 1] and checked on phantom (public) images only: two
  phantom images sit at a per-pixel RMS distance of 0.13 to 0.47 (5th to 95th percentile,
  median 0.29), where the small scales keep the classes' mean embeddings furthest apart relative
  to their norm; but a freshly initialised generator sits at about 1.2 from the data, where only
  the large scales have a gradient (measured: 60 Adam steps cut the embedding distance by 4 %
  with scales 0.1 and 0.25, by 78 % with 0.25 and 0.5, and by 92 % with 0.5 and 1).
  **Dimension**: the noise on a class mean grows like σΔ√dim / patients while the distance
  between class means barely moves with dim (measured on a 157-patient phantom site at
  ε = 10: class-mean distance ≈ 0.1, noise ≈ 0.08 to 0.13 at dim 100, 0.34 to 0.57 at dim
  2000), so at hospital sizes the default is small (256); pooled sites afford more.
- :class:`NetworkFeatures` (DP-MEPF): activations of the discriminator of a checkpoint trained
  on data declared public (``fedspine train --public-data``; refused otherwise, through
  :func:`fedspine.training.public_init.load_public_init`): each residual block's output averaged
  over space, and the last block's 4×4 map, each part normalised to unit norm and the whole
  scaled to norm 1. The minibatch-std epilogue is never used (it would mix images).

Maps combine (``"rff+PATH"``): each part has norm 1, the concatenation is scaled by 1/√parts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedspine.models import Discriminator, NetworkConfig
from fedspine.training.checkpoint import state_sha256

RFF = "rff"
NETWORK = "network"
PUBLIC = "public"
"""In a spec, the public network handed to :func:`build_feature_map` by its caller."""
SOURCE_KEYS = ("checkpoint", "checkpoint_sha256", "declared_public", "dataset_content_hash")
DEFAULT_DIM = 256
DEFAULT_SEED = 0
DEFAULT_BANDWIDTHS = (0.1, 0.25, 0.5, 1.0)
DEFAULT_FEATURE_RESOLUTION = 32


class FeatureMapError(ValueError):
    """A feature map that cannot be built or does not match its description."""


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, R, R] or [N, 1, R, R] images -> float32 [N, 1, R, R] in [-1, 1] (as training)."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.ndim == 3:
        x = x[:, None]
    return x.to(torch.float32) / 127.5 - 1.0


class RandomFourierFeatures:
    """Random Fourier features of pixels: a fixed, public map given (seed, dim, bandwidths)."""

    kind = RFF

    def __init__(
        self,
        dim: int = DEFAULT_DIM,
        seed: int = DEFAULT_SEED,
        bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
        resolution: int = DEFAULT_FEATURE_RESOLUTION,
    ) -> None:
        scales = [float(s) for s in bandwidths]
        if not scales or any(not (math.isfinite(s) and s > 0) for s in scales):
            raise FeatureMapError(f"bandwidths must be positive numbers, got {bandwidths}")
        per = int(dim) // (2 * len(scales))
        if per < 1:
            raise FeatureMapError(
                f"--dim {dim}: needs at least 2 features per bandwidth ({len(scales)} bandwidths)"
            )
        if int(resolution) < 4:
            raise FeatureMapError(f"feature resolution must be at least 4, got {resolution}")
        if not 0 <= int(seed) < 2**63:
            raise FeatureMapError(f"--seed {seed}: the feature map's seed is 0 to 2**63 - 1")
        self.seed, self.bandwidths, self.resolution = int(seed), tuple(scales), int(resolution)
        self.frequencies = per * len(scales)
        self.dim = 2 * self.frequencies
        pixels = self.resolution**2
        rng = np.random.default_rng(self.seed)
        blocks = [
            rng.standard_normal((pixels, per)) / (s * math.sqrt(pixels)) for s in self.bandwidths
        ]
        self.omega = torch.from_numpy(np.concatenate(blocks, axis=1).astype(np.float32))
        self.sha256 = hashlib.sha256(self.omega.numpy().tobytes()).hexdigest()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, 1, R, R] in [-1, 1] -> [N, dim], each row of norm 1 (differentiable)."""
        flat = resize(x, self.resolution).flatten(1)
        proj = flat @ self.omega.to(flat.device, flat.dtype)
        return torch.cat([proj.cos(), proj.sin()], dim=1) / math.sqrt(self.frequencies)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": RFF,
            "dim": self.dim,
            "seed": self.seed,
            "bandwidths": list(self.bandwidths),
            "bandwidth_rule": "ell = s * sqrt(pixels), images in [-1, 1]; chosen a priori",
            "resolution": self.resolution,
            "rng": "numpy PCG64 standard_normal, float64 then float32",
            "omega_sha256": self.sha256,
        }


class NetworkFeatures:
    """Features of a public checkpoint's discriminator (its data declared public).

    Built from the checkpoint on this machine's disk (:meth:`from_checkpoint`: the declaration
    and the dataset checked), or from settings and weights received with their description
    (a federation's site: :mod:`fedspine.federated.embedding_site` checks what it received).
    ``weights_sha256`` hashes the weights actually used, so a release says exactly which
    network made its features whoever supplied it."""

    kind = NETWORK

    def __init__(
        self, network: dict[str, Any], weights: Mapping[str, torch.Tensor], source: dict[str, str]
    ) -> None:
        try:
            config = NetworkConfig(**network)
        except (TypeError, ValueError) as err:
            raise FeatureMapError(f"the feature network's settings: {err}") from None
        self.D = Discriminator(config)
        try:
            self.D.load_state_dict(weights)
        except (RuntimeError, KeyError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise FeatureMapError(
                f"the feature network's weights do not fit its settings: {first[:200]}"
            ) from None
        self.D.eval().requires_grad_(False)
        self.network = dict(network)
        self.source = {k: str(source.get(k, "")) for k in SOURCE_KEYS}
        self.weights_sha256 = state_sha256(self.D.state_dict())
        self.resolution = int(config.resolution)
        with torch.no_grad():
            probe = torch.zeros(1, self.D.img_channels, self.resolution, self.resolution)
            self.dim = int(self._raw(probe).shape[1])

    @classmethod
    def from_checkpoint(
        cls,
        source: str | Path,
        dataset_content_hash: str = "",
        patient_ids: Sequence[str] | None = None,
    ) -> NetworkFeatures:
        """The D of a run folder or snapshot trained with ``--public-data``; refused when it was
        not, or when it was trained on the dataset whose hash is ``dataset_content_hash`` or on
        any of ``patient_ids``."""
        from fedspine.training.public_init import (  # lazy: loads the checkpoint machinery
            PublicInitError,
            load_public_init,
        )

        try:
            public = load_public_init(source, dataset_content_hash, patient_ids)
        except PublicInitError as err:
            raise FeatureMapError(str(err)) from None
        record = public.record()
        return cls(public.network, public.weights["D"], {k: record[k] for k in SOURCE_KEYS})

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        D = self.D
        h = D.from_rgb(x)
        parts = []
        for block in D.blocks:
            h = block(h)
            parts.append(_unit(h.mean(dim=(2, 3))))
        parts.append(_unit(h.flatten(1)))
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.D.to(x.device)
        return self._raw(resize(x, self.resolution))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": NETWORK,
            "dim": self.dim,
            "checkpoint": self.source["checkpoint"],
            "checkpoint_sha256": self.source["checkpoint_sha256"],
            "declared_public": self.source["declared_public"],
            "weights_sha256": self.weights_sha256,
            "layers": "discriminator blocks: spatial means, and the last block's map; "
            "each part of unit norm",
        }


class CombinedFeatures:
    """Several maps side by side, scaled so every row has norm at most 1."""

    def __init__(self, maps: Sequence[Any]) -> None:
        if not maps:
            raise FeatureMapError("no feature map given")
        self.maps = list(maps)
        self.dim = sum(m.dim for m in self.maps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.maps) == 1:
            return self.maps[0](x)
        return torch.cat([m(x) for m in self.maps], dim=1) / math.sqrt(len(self.maps))

    def describe(self) -> dict[str, Any]:
        return {"parts": [m.describe() for m in self.maps], "dim": self.dim}


def build_feature_map(
    spec: str = RFF,
    *,
    dim: int = DEFAULT_DIM,
    seed: int = DEFAULT_SEED,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    resolution: int = DEFAULT_FEATURE_RESOLUTION,
    dataset_content_hash: str = "",
    public: NetworkFeatures | None = None,
    patient_ids: Sequence[str] | None = None,
) -> CombinedFeatures:
    """``spec``: ``rff``, a public run folder or snapshot, or several joined by ``+``;
    ``public`` stands for the network given as ``public`` (already checked by the caller)."""
    maps: list[Any] = []
    for part in [p.strip() for p in str(spec).split("+") if p.strip()]:
        if part == RFF:
            maps.append(RandomFourierFeatures(dim, seed, bandwidths, resolution))
        elif part == PUBLIC:
            if public is None:
                raise FeatureMapError("the feature map names the public network, none was given")
            maps.append(public)
        else:
            maps.append(NetworkFeatures.from_checkpoint(part, dataset_content_hash, patient_ids))
    return CombinedFeatures(maps)


MISSING_NETWORK_HINT = "pass that checkpoint (its run folder or snapshot) with --feature-network"
"""How a command-line user supplies a missing feature network; other callers name their own."""


def feature_map_from_description(
    description: dict[str, Any],
    networks: Sequence[str | Path] = (),
    missing_hint: str = MISSING_NETWORK_HINT,
) -> CombinedFeatures:
    """Rebuild the map a release describes; network parts need their checkpoint (``networks``),
    matched by SHA-256. Refused when anything rebuilt differs from the description;
    ``missing_hint`` ends the message when no given network matches."""
    maps: list[Any] = []
    for part in description.get("parts", []):
        if part.get("kind") == RFF:
            rff = RandomFourierFeatures(
                int(part["dim"]), int(part["seed"]), part["bandwidths"], int(part["resolution"])
            )
            if rff.sha256 != part.get("omega_sha256"):
                raise FeatureMapError(
                    "the random Fourier features rebuilt here differ from the release's "
                    "(another numpy version?); fit where the map rebuilds identically"
                )
            maps.append(rff)
        elif part.get("kind") == NETWORK:
            want = part.get("checkpoint_sha256")
            found = None
            for source in networks:
                candidate = NetworkFeatures.from_checkpoint(source)
                if candidate.source["checkpoint_sha256"] == want:
                    found = candidate
                    break
            if found is None:
                raise FeatureMapError(
                    f"the release uses the features of public checkpoint sha256:{want}; "
                    + missing_hint
                )
            used = part.get("weights_sha256")
            if used is not None and used != found.weights_sha256:
                raise FeatureMapError(
                    f"the release's features came from other weights (sha256:{used}) than the "
                    f"discriminator of checkpoint sha256:{want}"
                )
            maps.append(found)
        else:
            raise FeatureMapError(f"unknown feature map kind {part.get('kind')!r}")
    combined = CombinedFeatures(maps)
    if combined.dim != int(description.get("dim", -1)):
        raise FeatureMapError("the rebuilt feature map's dimension differs from the release's")
    return combined


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Area down-sampling (bilinear up) to ``resolution`` px, differentiable."""
    if x.shape[-1] == resolution:
        return x
    if x.shape[-1] > resolution:
        return F.interpolate(x, size=(resolution, resolution), mode="area")
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
