"""The coordinator's side of the DP mean-embedding route (issue 15, item 4): one Flower round.

``route = "dp-mean-embedding"`` in federation.toml replaces the GAN rounds: the server sends
every site one ``train.embedding`` message (:mod:`embedding_site`; with ``features`` naming
``public``, the initial checkpoint's discriminator goes along as the feature network), checks
each reply as it would a model (the records it must hold, the federation and round, arrays of
exactly the requested shapes, finite, metadata of the requested feature map and classes, ε
within the request), writes each site's release to ``releases/SITE.npz``, sums them and fits the
federation's conditional generator to the pooled means
(:func:`~fedspine.training.mean_embedding_fit.fit_generator`, no further privacy cost). The
generator lands where the GAN route puts its own (``generator.pt``), so ``fedspine generate``,
``evaluate`` and ``release`` take it alike.

What the server learns: each site's noisy sums and counts (each site adds the full noise its own
ε requires; no secure aggregation is built, so the server sees every release). The pooled
generator is then (max over sites ε, δ)-DP for a patient held by one site. Rerunning the
federation fits again from the releases on disk: nothing is asked of the sites twice.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedspine import __version__
from fedspine.federated.embedding_site import (
    EMBEDDING_ACTION,
    FEATURE_NETWORK,
    EmbeddingRoundConfig,
    describe_network,
)
from fedspine.federated.federation_config import (
    EMBEDDING_ROUTE,
    FRESH_START,
    FederationConfig,
    FederationError,
)
from fedspine.federated.run_folder import RoundRecord, append_round, now, read_rounds, write_status
from fedspine.federated.weights import read_weight_records, weight_records
from fedspine.fileio import RUN_GENERATOR, write_bytes_atomic
from fedspine.privacy.report import site_entry, write_privacy_summary
from fedspine.training.mean_embedding import (
    FORMAT,
    METADATA_KEYS,
    EmbeddingRelease,
    read_release,
    write_release,
)
from fedspine.training.mean_embedding_features import (
    FeatureMapError,
    NetworkFeatures,
    build_feature_map,
)
from fedspine.training.mean_embedding_fit import EmbeddingFitError, FitRequest, fit_generator
from fedspine.training.public_init import (
    PublicInitError,
    load_public_init,
    pretraining_component,
)

ROUTE = EMBEDDING_ROUTE
PHASE = "embedding"
RELEASES_DIR = "releases"
FIT_DIR = "fit"
MAX_METADATA = 1_000_000
"""Characters of a reply's release metadata the server reads (the ledger rows included)."""


def public_network(config: FederationConfig) -> NetworkFeatures | None:
    """The initial checkpoint's discriminator when the route's features use it."""
    if not config.embedding.uses_public:
        return None
    try:
        return NetworkFeatures.from_checkpoint(str(config.initial_checkpoint))
    except FeatureMapError as err:
        raise FederationError(f"initial_checkpoint as the feature network: {err}") from None


def request_for(
    config: FederationConfig, network: NetworkFeatures | None = None
) -> EmbeddingRoundConfig:
    """The one round's request: the route's public feature map and the target ε (``network``:
    :func:`public_network`, for a map that uses it)."""
    e = config.embedding
    return EmbeddingRoundConfig(
        federation=config.name,
        server_round=1,
        fedspine_version=__version__,
        epsilon=float(config.dp_epsilon),
        clip=float(e.clip),
        dim=int(e.dim),
        seed=int(e.seed),
        bandwidths=tuple(float(b) for b in e.bandwidths),
        feature_resolution=int(e.feature_resolution),
        class_names=tuple(config.class_names),
        features=e.features,
        feature_network=describe_network(network) if network is not None else "",
    )


def run_embedding_route(rounds) -> dict[str, Any]:
    """The release round (skipped when an earlier run of this federation completed it), then
    the fit; returns the final status. ``rounds`` is the federation's round machinery."""
    config, out, log = rounds.config, Path(rounds.config.output_dir), rounds.log
    releases = sorted((out / RELEASES_DIR).glob("*.npz"))
    done = [r for r in read_rounds(out) if r.get("phase") == PHASE and r.get("sites")]
    if not (done and len(releases) >= config.min_sites):
        write_status(out, config, "running", 0, phase=PHASE)
        network = public_network(config)
        releases = _release_round(rounds, request_for(config, network), network)
    else:
        log(f"{config.name}: the sites' releases are on disk already; fitting the generator")
    _fit(out, config, releases, log)
    _write_privacy(out, config, [read_release(p) for p in releases])
    return write_status(out, config, "completed", 1, phase=PHASE)


def _release_round(rounds, rc: EmbeddingRoundConfig, network: NetworkFeatures | None) -> list[Path]:
    config, out, log = rounds.config, Path(rounds.config.output_dir), rounds.log
    t0 = time.perf_counter()
    rounds._wait_for_sites(PHASE, 1, t0)
    nodes = sorted(rounds.grid.get_node_ids())
    records: dict[str, Any] = {"config": ConfigRecord(rc.to_record())}
    if network is not None:
        records.update(weight_records(network.D.state_dict(), FEATURE_NETWORK))
    messages = [
        Message(
            RecordDict(records),
            dst_node_id=node,
            message_type=f"train.{EMBEDDING_ACTION}",
            group_id=f"{PHASE}-round-1",
            ttl=config.round_timeout,
        )
        for node in nodes
    ]
    expected = _expected(rc, network)
    received: list[EmbeddingRelease] = []

    def take(reply, sent_to: dict[str, int]) -> tuple[dict | None, dict | None]:
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        site = rounds.names.get(node, f"node {node}")
        if reply.has_error():
            return None, {"node_id": node, "site": site, "reason": reply.error.reason}
        problem, release = release_problem(reply, expected)
        if problem is None and release.site in {r.site for r in received}:
            problem = f"a second reply from site {release.site}"
        if problem is not None:
            return None, {"node_id": node, "site": site, "reason": f"invalid reply: {problem}"}
        rounds.names[node] = release.site
        received.append(release)
        meta = release.metadata
        entry = {
            "node_id": node,
            "site": release.site,
            "patients": int(meta["patients"]),
            "epsilon": float(meta["epsilon"]),
            "privacy": {
                "epsilon": float(meta["epsilon"]),
                "delta": float(meta["delta"]),
                "unit": str(meta["unit"]),
                "patients": int(meta["patients"]),
                "mechanisms": meta["mechanisms"],
            },
        }
        return entry, None

    sites, failures = rounds._exchange(messages, take)
    for failure in failures:
        log(f"embedding round: site {failure['site']} failed: {failure['reason']}")
    seconds = time.perf_counter() - t0
    append_round(out, RoundRecord(1, sites, failures, seconds, now(), PHASE))
    if len(sites) < config.min_sites:
        reasons = "; ".join(f"{f['site']}: {f['reason']}" for f in failures) or "none"
        reason = (
            f"embedding round: only {len(sites)} site(s) released, fewer than min_sites="
            f"{config.min_sites}; failures: {reasons}"
        )
        write_status(out, config, "failed", 0, reason, phase=PHASE)
        raise FederationError(reason)
    paths = []
    for release in received:
        path = out / RELEASES_DIR / f"{_safe(release.site)}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_release(path, release)
        paths.append(path)
    log(f"embedding round: {len(sites)} site(s) released, {len(failures)} failed, {seconds:.1f} s")
    return sorted(paths)


def _expected(rc: EmbeddingRoundConfig, network: NetworkFeatures | None = None) -> dict[str, Any]:
    feature_map = build_feature_map(
        rc.features,
        dim=rc.dim,
        seed=rc.seed,
        bandwidths=rc.bandwidths,
        resolution=rc.feature_resolution,
        public=network,
    )
    # As the site's metadata arrives: through JSON (tuples become lists).
    description = json.loads(json.dumps(feature_map.describe()))
    return {
        "federation": rc.federation,
        "round": rc.server_round,
        "epsilon": rc.epsilon,
        "clip": rc.clip,
        "class_names": list(rc.class_names),
        "feature_map": description,
        "dim": description["dim"],
    }


def release_problem(reply, expected: dict[str, Any]) -> tuple[str | None, EmbeddingRelease | None]:
    """Why a site's release reply cannot be pooled, or None and the release it holds."""
    content = reply.content
    for name in ("arrays", "metrics", "site"):
        if name not in content:
            return f"no {name!r} record", None
    site = content["site"]
    if str(site.get("federation", "")) != expected["federation"]:
        return f"answers federation {str(site.get('federation'))[:80]!r}", None
    answered = site.get("round")
    if isinstance(answered, bool) or answered != expected["round"]:
        return f"answers round {str(answered)[:40]!r}, not {expected['round']}", None
    k, d = len(expected["class_names"]), int(expected["dim"])
    try:
        arrays = read_weight_records(content, "arrays", max_tensors=2, max_bytes=8 * k * (d + 1))
    except ValueError as err:
        return f"unreadable arrays: {err}", None
    shapes = {"sums": (k, d), "counts": (k,)}
    if set(arrays) != set(shapes):
        return f"arrays {sorted(arrays)[:4]}, expected {sorted(shapes)}", None
    for name, shape in shapes.items():
        a = arrays[name]
        if tuple(a.shape) != shape or not a.is_floating_point():
            return f"{name}: {tuple(a.shape)} {a.dtype}, expected {shape} float", None
        if not bool(a.isfinite().all()):
            return f"{name} holds NaN or infinite values", None
    text = site.get("release")
    if not isinstance(text, str) or len(text) > MAX_METADATA:
        return "no release metadata, or too long", None
    try:
        meta = json.loads(text)
    except ValueError:
        return "unreadable release metadata", None
    if not isinstance(meta, dict) or set(meta) - METADATA_KEYS or meta.get("format") != FORMAT:
        return "release metadata of another format", None
    if meta.get("class_names") != expected["class_names"]:
        return "released for other classes", None
    if meta.get("feature_map") != expected["feature_map"]:
        return "released with another feature map than the one requested", None
    eps, clip = meta.get("epsilon"), meta.get("clip_norm")
    if not _number(eps) or eps <= 0 or eps > expected["epsilon"] * (1 + 1e-6):
        return f"ε {str(eps)[:20]} is not within the requested {expected['epsilon']:g}", None
    if not _number(clip) or not math.isclose(clip, expected["clip"], rel_tol=1e-9):
        return "released with another clip norm than the one requested", None
    for key in ("delta", "patients", "count_scale", "sensitivity", "noise_multiplier"):
        if not _number(meta.get(key)) or meta[key] <= 0:
            return f"release metadata {key} is not a positive number", None
    if not isinstance(meta.get("mechanisms"), list) or not isinstance(meta.get("site"), str):
        return "release metadata lacks its mechanisms or site name", None
    name = meta["site"]
    if not name or len(name) > 100 or name != str(site.get("site-name", "")):
        return "the release names another site than the reply", None
    release = EmbeddingRelease(
        sums=arrays["sums"].double().numpy(),
        counts=arrays["counts"].double().numpy(),
        metadata=meta,
    )
    return None, release


def _fit(out: Path, config: FederationConfig, releases: list[Path], log) -> None:
    e = config.embedding
    fit = out / FIT_DIR
    shutil.rmtree(fit, ignore_errors=True)  # a fit is cheap to redo; a half one is not kept
    steps = int(e.fit_steps)
    log(f"fitting the generator to {len(releases)} site release(s): {steps} steps")
    every = max(1, steps // 10)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == steps:
            log(f"fit step {step}/{steps}: batch embedding loss {loss:.4f}")

    try:
        fit_generator(
            FitRequest(
                releases=releases,
                out=fit,
                steps=steps,
                batch_per_class=int(e.fit_batch_per_class),
                lr=float(e.fit_lr),
                preset=config.preset,
                resolution=config.resolution,
                init_from=config.initial_checkpoint,
                feature_networks=[config.initial_checkpoint] if config.initial_checkpoint else [],
                feature_network_hint=(
                    "set initial_checkpoint in federation.toml back to that checkpoint: the "
                    f"sites' releases in {RELEASES_DIR}/ were computed with it, and new releases "
                    "would spend every site's ε again"
                ),
                seed=config.seed,
            ),
            progress=progress,
        )
    except EmbeddingFitError as err:
        write_status(out, config, "failed", 0, str(err), phase=PHASE)
        raise FederationError(f"fitting the generator: {err}") from None
    write_bytes_atomic(out / RUN_GENERATOR, (fit / RUN_GENERATOR).read_bytes())


def _write_privacy(out: Path, config: FederationConfig, releases: list[EmbeddingRelease]) -> None:
    sites = {}
    for r in releases:
        m = r.metadata
        sites[r.site] = site_entry(
            float(m["epsilon"]),
            float(m["delta"]),
            m["mechanisms"],
            unit=str(m.get("unit", "patient")),
            patients=int(m["patients"]),
            epsilon_per_round=[{"phase": PHASE, "round": 1, "epsilon": float(m["epsilon"])}],
        )
    features = {
        "rff": "random-Fourier-feature",
        "public": "public-discriminator-feature",
        "rff+public": "random-Fourier-feature and public-discriminator-feature",
    }[config.embedding.features]
    components = {
        "route": ROUTE,
        "release": f"each site's per-class sums of per-patient mean {features} embeddings "
        "(each patient's row bounded), Gaussian noise added once at the site",
        "aggregation": "the server sums the sites' releases (no secure aggregation: it sees "
        "each site's release, so every site adds the full noise of its own ε)",
        "generator": "fitted to the pooled means on the server: post-processing",
        "pretraining": pretraining_component(_pretraining(config), FRESH_START),
        "site ledgers": "kept in each site's privacy home; ε here is what each site reported",
        "dataset sizes": "treated as public (as in Opacus)",
    }
    if config.embedding.uses_public:
        components["feature network"] = (
            "the public checkpoint's D, sent by the server; a site refuses one declared trained "
            "on its own dataset, so a refusal tells a server that already holds that exact "
            "dataset (to hash it) that the site holds it too: one bit outside the mechanism, "
            "assumed to leak"
        )
    write_privacy_summary(out, sites, components)


def _pretraining(config: FederationConfig) -> dict[str, Any] | None:
    """The initial checkpoint's record (its SHA-256, why its data is public, ε 0), as the GAN
    route's summary gives it; None for fresh weights."""
    if not config.initial_checkpoint:
        return None
    try:
        return load_public_init(str(config.initial_checkpoint), "").record()
    except PublicInitError as err:
        raise FederationError(f"initial_checkpoint: {err}") from None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "site"


__all__ = ["ROUTE", "release_problem", "request_for", "run_embedding_route"]
