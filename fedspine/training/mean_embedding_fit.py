"""Fit fedspine's conditional StyleGAN2 generator to released DP mean embeddings (issue 15).

Post-processing only: the input is one or more sites' releases
(:mod:`fedspine.training.mean_embedding`), summed first (that is how a server pools sites); no
private data is read and no ε is spent. Per class k, the generator's mean embedding over a batch
of its images is pulled towards the released mean μ_k = S_k / max(count_k, 1) by Adam on

    L = Σ_k ‖ mean_b φ(G(z_b, k)) − μ_k ‖²,

a squared MMD to the released kernel mean embedding (up to a term that does not depend on G).
Classes whose released count is below one patient are skipped. The run folder is a normal one:
``generator.pt`` (G_ema, :func:`fedspine.training.generate.save_generator`), ``config.toml``,
``metrics.jsonl``, ``samples.png`` and ``privacy.json`` listing each site's release mechanism,
so ``fedspine generate``, ``evaluate``, ``privacy report`` and ``release`` read it unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedspine import __version__
from fedspine.fileio import (
    RUN_CONFIG,
    RUN_CONFIG_TOML,
    RUN_GENERATOR,
    RUN_METRICS,
    RUN_SAMPLES,
    publish_folder,
    save_png_atomic,
    write_json_atomic,
)
from fedspine.models import Generator, NetworkConfig
from fedspine.privacy.engine import new_run_id
from fedspine.privacy.report import site_entry, write_privacy_summary
from fedspine.training.config import G_TRAINABLE, preset_config, write_config_toml
from fedspine.training.gan_trainer import trained_g_parameters
from fedspine.training.generate import class_grid, save_generator
from fedspine.training.mean_embedding import (
    EmbeddingReleaseError,
    PooledEmbedding,
    combine_releases,
    read_release,
)
from fedspine.training.mean_embedding_features import (
    MISSING_NETWORK_HINT,
    FeatureMapError,
    feature_map_from_description,
)

ROUTE = "dp-mean-embedding"


class EmbeddingFitError(ValueError):
    """The fit cannot start; the message is a one-line reason."""


@dataclass
class FitRequest:
    """What to fit: release files, the run folder to write, and the generator's settings."""

    releases: Sequence[str | os.PathLike]
    out: str | os.PathLike
    steps: int = 1000
    batch_per_class: int = 32
    lr: float = 0.0025
    preset: str = "cpu"
    resolution: int | None = None
    init_from: str | os.PathLike | None = None
    network: dict[str, Any] | None = None
    """Network settings instead of the preset's (a library caller's, e.g. a test's tiny net)."""
    feature_networks: Sequence[str | os.PathLike] = ()
    feature_network_hint: str = MISSING_NETWORK_HINT
    """How this caller's user supplies a release's feature network when none matches."""
    ema_steps: float = 50.0
    """Half-life of G_ema, in steps."""
    seed: int = 0
    device: str = "cpu"
    probe_per_class: int = 64
    """Fixed latents per class on which the embedding distance is reported (start and end)."""
    g_trainable: str | None = None
    """What of G the fit moves: "all", or "mapping" (the label embedding and mapping network;
    the synthesis network keeps the public checkpoint's weights, and with them its spines).
    None: "mapping" from a public checkpoint (fitting all of G towards the released means
    turned the checkpoint's spines into textured noise), else "all"."""
    log_every: int = 25


@dataclass
class FitResult:
    out: Path
    generator: Path
    epsilon: dict[str, float]
    distance_start: float
    distance_end: float
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)


def fit_generator(
    request: FitRequest, progress: Callable[[int, float], None] | None = None
) -> FitResult:
    """Fit G to the pooled releases and write the run folder ``request.out`` (whole, at the end).

    ``progress(step, loss)`` is called after every step.
    """
    out = Path(request.out)
    if out.exists() and any(out.iterdir()):
        raise EmbeddingFitError(f"{out} already holds files; choose another --out")
    if request.steps < 1 or request.batch_per_class < 1:
        raise EmbeddingFitError("--steps and --batch must be at least 1")
    request = replace(request, g_trainable=default_g_trainable(request))
    if request.g_trainable not in G_TRAINABLE:
        raise EmbeddingFitError(
            f"--g-trainable {request.g_trainable!r}: one of {', '.join(G_TRAINABLE)}"
        )
    if request.g_trainable != "all" and request.init_from is None:
        raise EmbeddingFitError(
            "--g-trainable mapping needs --init-from: a fresh synthesis network left untrained "
            "draws noise"
        )
    try:
        pooled = combine_releases([read_release(p) for p in request.releases])
        feature_map = feature_map_from_description(
            pooled.feature_map, request.feature_networks, request.feature_network_hint
        )
    except (EmbeddingReleaseError, FeatureMapError) as err:
        raise EmbeddingFitError(str(err)) from None
    num_classes = len(pooled.class_names)
    network, start, init_record = _network(request, num_classes)
    active = pooled.counts >= 1.0
    if not bool(active.any()):
        raise EmbeddingFitError("every class's released count is below one patient")
    torch.manual_seed(request.seed)  # before G is built: its fresh weights and the fit's noise
    G = Generator(NetworkConfig(**network))
    if start is not None:
        G.load_state_dict(start)
    G_ema, log, start_distance, end_distance = fit_to_means(
        G, feature_map, pooled.means(), active, request, progress
    )
    epsilons = _write_run(out, request, pooled, network, G_ema, init_record, log)
    return FitResult(
        out=out,
        generator=out / RUN_GENERATOR,
        epsilon=epsilons,
        distance_start=start_distance,
        distance_end=end_distance,
        steps=request.steps,
    )


def default_g_trainable(request: FitRequest) -> str:
    """``request.g_trainable``, or when None the default: "mapping" from a public checkpoint,
    else "all" (one rule for :func:`fit_generator` and a caller of :func:`fit_to_means`)."""
    if request.g_trainable is not None:
        return request.g_trainable
    return "all" if request.init_from is None else "mapping"


def fit_to_means(
    G: Generator,
    feature_map: Callable[[torch.Tensor], torch.Tensor],
    means: np.ndarray,
    active: np.ndarray,
    request: FitRequest,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Generator, list[dict[str, Any]], float, float]:
    """The fit itself: Adam on ``request.g_trainable`` of G towards the per-class ``means``
    [K, D] of ``feature_map`` (classes where ``active`` is False skipped), G_ema tracked.

    Returns (G_ema, the log, the probe distance at the start, G_ema's at the end). The caller
    seeds torch's global generator (the synthesis noise draws from it). Split from
    :func:`fit_generator` so that a benchmark can fit to targets that are not a release file
    (benchmarks/embedding_ablation.py) with exactly this loop."""
    num_classes = int(means.shape[0])
    device = torch.device(request.device)
    G = G.train().to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    trained = trained_g_parameters(G, default_g_trainable(request))
    G.requires_grad_(False)  # the frozen part needs no weight gradients
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=request.lr, betas=(0.0, 0.99), eps=1e-8)
    targets = torch.from_numpy(np.asarray(means)).to(device, torch.float32)
    active_t = torch.from_numpy(np.asarray(active, dtype=bool)).to(device)
    labels = torch.arange(num_classes, device=device).repeat_interleave(request.batch_per_class)
    onehot = F.one_hot(labels, num_classes).to(torch.float32)
    rng = torch.Generator(device="cpu").manual_seed(request.seed)
    probe_labels = torch.arange(num_classes, device=device).repeat_interleave(
        max(int(request.probe_per_class), 1)
    )
    probe_onehot = F.one_hot(probe_labels, num_classes).to(torch.float32)
    probe = torch.randn([len(probe_labels), G.z_dim], generator=rng).to(device)
    beta = 0.5 ** (1.0 / max(request.ema_steps, 1e-8))

    def distance(net: Generator) -> float:
        with torch.no_grad():
            return float(
                _loss(
                    net, feature_map, probe, probe_onehot, targets, active_t, num_classes, "const"
                )
            )

    start_distance = distance(G)
    log: list[dict[str, Any]] = [{"step": 0, "distance": start_distance}]
    for step in range(1, request.steps + 1):
        z = torch.randn([len(labels), G.z_dim], generator=rng).to(device)
        loss = _loss(G, feature_map, z, onehot, targets, active_t, num_classes, "random", True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - beta)
            for b_ema, b in zip(G_ema.buffers(), G.buffers(), strict=True):
                b_ema.copy_(b)
        if progress is not None:
            progress(step, float(loss.detach()))
        if step % request.log_every == 0 or step == request.steps:
            log.append({"step": step, "loss": float(loss.detach())})
    end_distance = distance(G_ema)
    log.append({"step": request.steps, "distance": end_distance, "network": "G_ema"})
    return G_ema, log, start_distance, end_distance


def _loss(
    G: Generator,
    feature_map,
    z: torch.Tensor,
    onehot: torch.Tensor,
    targets: torch.Tensor,
    active: torch.Tensor,
    num_classes: int,
    noise_mode: str,
    update_w_avg: bool = False,
) -> torch.Tensor:
    ws = G.mapping(z, onehot, update_w_avg=update_w_avg)
    images = G.synthesis(ws, noise_mode=noise_mode)
    feats = feature_map(images.float())
    means = feats.view(num_classes, -1, feats.shape[1]).mean(dim=1)
    per_class = ((means - targets) ** 2).sum(dim=1)
    return (per_class * active).sum()


def _network(
    request: FitRequest, num_classes: int
) -> tuple[dict[str, Any], dict | None, dict | None]:
    """The generator's network settings, and G's starting weights from a public checkpoint."""
    if request.init_from is None and request.network is not None:
        network = dict(request.network)
        if int(network["c_dim"]) != num_classes:
            raise EmbeddingFitError(
                f"the network has {network['c_dim']} classes, not {num_classes}"
            )
        return network, None, None
    if request.init_from is None:
        try:
            config = preset_config(request.preset, request.resolution, num_classes)
        except ValueError as err:
            raise EmbeddingFitError(f"--preset {request.preset}: {err}") from None
        return config.to_dict()["network"], None, None
    from fedspine.training.public_init import (  # lazy: the checkpoint machinery
        PublicInitError,
        load_public_init,
    )

    try:
        public = load_public_init(request.init_from, "")
    except PublicInitError as err:
        raise EmbeddingFitError(str(err)) from None
    network = dict(public.network)
    if int(network["c_dim"]) != num_classes:
        raise EmbeddingFitError(
            f"{public.path}: its generator has {network['c_dim']} classes, the releases "
            f"{num_classes}"
        )
    if request.resolution is not None and int(network["resolution"]) != request.resolution:
        raise EmbeddingFitError(
            f"--resolution {request.resolution}: the public checkpoint is "
            f"{network['resolution']} px"
        )
    return network, public.weights["G_ema"], public.record()


def _write_run(
    out: Path,
    request: FitRequest,
    pooled: PooledEmbedding,
    network: dict[str, Any],
    G_ema: Generator,
    init_record: dict | None,
    log: list[dict[str, Any]],
) -> dict[str, float]:
    """Stage the run folder, then publish it whole; returns ε per site."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        training = {
            "model": "cgan",  # no classifier in the loss (an evaluation's TRTS may judge it)
            "route": ROUTE,
            "steps": request.steps,
            "preset": request.preset if request.init_from is None else "public checkpoint",
            "seed": request.seed,
        }
        if init_record is not None:
            training["init_from"] = {
                "checkpoint_sha256": init_record["checkpoint_sha256"],
                "declared_public": init_record["declared_public"],
            }
        save_generator(
            staged / RUN_GENERATOR, G_ema, network, pooled.class_names, training=training
        )
        releases = [
            {
                "site": r.site,
                "file": r.path.name if r.path else None,
                "epsilon": r.metadata["epsilon"],
                "delta": r.metadata["delta"],
                "noise_multiplier": r.metadata["noise_multiplier"],
                "sensitivity": r.metadata["sensitivity"],
            }
            for r in pooled.releases
        ]
        run_config = {
            "fedspine_version": __version__,
            "model": "cgan",
            "route": ROUTE,
            "releases": releases,
            "feature_map": pooled.feature_map,
            "fit": {
                "steps": request.steps,
                "batch_per_class": request.batch_per_class,
                "lr": request.lr,
                "ema_steps": request.ema_steps,
                "seed": request.seed,
                "preset": request.preset,
                "g_trainable": request.g_trainable,
            },
            "network": network,
        }
        if init_record is not None:
            run_config["init_from"] = init_record
        write_config_toml(staged / RUN_CONFIG_TOML, _toml_safe(run_config))
        write_json_atomic(staged / RUN_CONFIG, run_config)
        (staged / RUN_METRICS).write_text("".join(json.dumps(r) + "\n" for r in log))
        grid_latents = torch.randn([8, G_ema.z_dim], generator=torch.Generator().manual_seed(1))
        save_png_atomic(
            class_grid(G_ema.cpu(), pooled.class_names, grid_latents), staged / RUN_SAMPLES
        )
        sites = {}
        units = set()
        for r in pooled.releases:
            m = r.metadata
            units.add(str(m["unit"]))
            sites[r.site] = site_entry(
                float(m["epsilon"]),
                float(m["delta"]),
                m["mechanisms"],
                unit=str(m["unit"]),
                patients=int(m["patients"]),
            )
        components = {
            "embedding release": "each site: per-class sums of per-patient mean features (each "
            "patient's images averaged, then clipped), and class counts, with Gaussian noise "
            "added once (one mechanism, q = 1, one step)",
            "feature map": "public: fixed before any private data was seen "
            "(random Fourier features from a public seed, or a network trained on data "
            "declared public)",
            "generator": "fitted to the released embeddings only (post-processing; costs no ε)",
            "pooling": "the sites' noisy releases are summed; each site added the full noise "
            "its own ε requires (no secure aggregation)",
            "pretraining": (
                f"G starts from public checkpoint sha256:{init_record['checkpoint_sha256']} "
                f"(its data declared public: {init_record['declared_public']}); costs no ε"
                if init_record
                else "none"
            ),
            "dataset sizes": "treated as public (as in Opacus): patients per site",
        }
        write_privacy_summary(
            staged,
            sites,
            components,
            accountant=str(pooled.releases[0].metadata["accountant"]),
            unit="/".join(sorted(units)),
            run_id=new_run_id("embedding-fit"),
        )
        if out.exists():
            out.rmdir()  # empty (checked at the start)
        publish_folder(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return {name: float(s["epsilon"]) for name, s in sites.items()}


def _toml_safe(value: Any) -> Any:
    """Lists of dicts are not written by the config's TOML writer: key them by position."""
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {str(i): _toml_safe(v) for i, v in enumerate(value)}
    return value


def release_means(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """The pooled per-class means of release files (for inspection)."""
    return combine_releases([read_release(p) for p in paths]).means()
