"""The gated, signed synthetic-data release: what a data steward hands to the world.

``make_release`` refuses, with a one-line reason and nothing written at ``out``, unless

1. the run has a complete privacy ledger (``RUN/privacy.json`` with a known accountant and at
   least one site, every site's ``ledger_complete`` true, its ε a number, its δ in (0, 1) and
   its mechanisms listed);
2. every part of the run was private (``private`` true, no ``not_private_reasons``);
3. every site's ε is at most ``max_epsilon``. ε is recomputed from the site's mechanisms with
   the stated accountant; a stated ε more than 1 % below the recomputed one is refused, and the
   cap applies to the larger of the two;
4. ``RUN/generator.pt`` holds G_ema only (DESIGN decision 6: never release D): every tensor
   lies under ``G_ema`` and its names are exactly a Generator's; a trainer checkpoint, a D, an
   optimizer or any stray tensor is refused;
5. the audit data covers the run: at least one ``--audit-data`` set has the content hash of a
   site's training set (otherwise the memorisation gate would compare against unrelated images);
6. the memorisation gate passes.

The memorisation gate (``memorisation_gate``). The synthetic set is generated first, in the
staging folder, and compared in raw pixels (at the generator's resolution) with the audit
data's labelled ``train`` split (what the generator saw) and its labelled ``val`` + ``test``
splits (held out). The threshold t is the ``percentile``-th percentile (default 1st, linear
interpolation) of the held-out images' distances to their nearest training image: how close
two distinct real images of this distribution naturally come. A synthetic image is *flagged*
when its distance to its nearest training image is <= t. For m held-out images the share
flagged among draws that behave like unseen real images is expected to be
``e = ((m - 1) q + 1) / (m + 1)`` (q = percentile / 100; the expected CDF value of the
interpolated order statistic, about q for large m). With n synthetic images the release is
refused when the flagged share exceeds ``max_ratio * e + z * sqrt(e (1 - e) / n)``
(defaults: max_ratio 2, z 3 binomial standard errors). At least ``min_heldout`` (20) held-out
images are required. A generator that copies training images puts them at distance 0 and is
refused; one whose images are no closer to training images than unseen real ones passes.
Pixel distances favour blurry, mean-like images (the mean lies closer to every image than two
images lie to each other), so a collapsed generator can be refused without copying anyone;
the steward's closest-pairs figure shows which case it is.

What a release holds (built in a hidden staging folder beside ``out``, renamed when complete)::

    synthetic/                 images/*.png, labels.csv, classes.txt, generation.json
    generator.pt               the run's G_ema checkpoint, byte for byte
    privacy_report.json        the run's privacy.json and the release decision
    audit/memorisation.json    the gate's numbers and rule
    audit/membership.json      a synthetic-only membership inference attack (reported, not gated)
    steward.pub                the steward's public key (OpenSSH line)
    manifest.json              SHA-256 of every other file, the configuration, each site's (ε, δ)
    manifest.sig               base64 Ed25519 signature of manifest.json's bytes

No real image leaves in a release: the closest-pairs figure of the memorisation audit shows
training images, so it is written only to ``steward_audit_dir`` (for the steward's eyes), never
into the release. The audit numbers are computed on real data and are not covered by the DP
guarantee; they are summaries only (no per-image values). Machine paths are not recorded: the
manifest names the run folder and the audit sets by their folder names and hashes.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedspine import __version__
from fedspine.privacy.signing import (
    MANIFEST_FILE,
    PUBLIC_KEY_FILE,
    SIGNATURE_FILE,
    UNSIGNED_FILES,
    SigningError,
    encode_signature,
    fingerprint,
    load_private_key,
    public_key_line,
    sha256_file,
)

RELEASE_FORMAT = "fedspine-release/1"
PRIVACY_FILE = "privacy.json"
PRIVACY_FORMAT = "fedspine-privacy/1"
EPSILON_RTOL = 0.01
GENERATOR_FILE = "generator.pt"
SYNTHETIC_DIR = "synthetic"
PRIVACY_REPORT_FILE = "privacy_report.json"
MEMORISATION_FILE = "audit/memorisation.json"
MEMBERSHIP_FILE = "audit/membership.json"
CLOSEST_PAIRS_FILE = "closest_pairs.png"
HELDOUT_SPLITS = ("val", "test")
GENERATOR_KEYS = frozenset(
    {"fedspine_checkpoint", "format_version", "fedspine_version", "network", "class_names"}
    | {"G_ema", "training"}
)


class ReleaseError(Exception):
    """A release cannot be attempted: bad arguments, missing inputs, an existing ``out``."""


class ReleaseRefused(ReleaseError):
    """A privacy gate said no; ``reason`` is one line naming what failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class MemorisationGate:
    """The memorisation gate's settings (see the module docstring for the rule)."""

    percentile: float = 1.0
    max_ratio: float = 2.0
    z: float = 3.0
    min_heldout: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.percentile < 100:
            raise ValueError(f"percentile must lie in (0, 100), got {self.percentile}")
        if self.max_ratio < 1 or self.z < 0 or self.min_heldout < 2:
            raise ValueError("need max_ratio >= 1, z >= 0 and min_heldout >= 2")


@dataclass
class GateDecision:
    """The memorisation gate's numbers; ``passed`` is the verdict."""

    passed: bool
    threshold: float
    flagged: int
    n_synthetic: int
    n_train: int
    n_heldout: int
    share_flagged: float
    expected_share: float
    allowed_share: float
    gate: MemorisationGate

    def reason(self) -> str:
        return (
            f"memorisation audit: {self.share_flagged:.1%} of synthetic images "
            f"({self.flagged} of {self.n_synthetic}) lie closer to a training image than "
            f"{100 - self.gate.percentile:g} % of held-out real images do "
            f"(allowed {self.allowed_share:.1%}, expected by chance {self.expected_share:.1%})"
        )

    def summary(self) -> dict:
        return {
            "passed": self.passed,
            "threshold": self.threshold,
            "flagged": self.flagged,
            "n_synthetic": self.n_synthetic,
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "share_flagged": self.share_flagged,
            "expected_share": self.expected_share,
            "allowed_share": self.allowed_share,
            "settings": asdict(self.gate),
            "rule": (
                "threshold = percentile-th percentile of held-out images' nearest-training "
                "distances; flagged = synthetic images with nearest-training distance <= "
                "threshold; expected = ((m-1)q+1)/(m+1) for m held-out images, q = percentile/100; "
                "refused when flagged share > max_ratio*expected + z*sqrt(expected*(1-expected)/n)"
            ),
        }


@dataclass
class ReleaseResult:
    """What :func:`make_release` wrote and the numbers behind the decision."""

    out: Path
    files: int
    fingerprint: str
    sites: dict[str, dict[str, float]]
    memorisation: GateDecision
    membership: dict
    warnings: list[str] = field(default_factory=list)


@dataclass
class PrivacyCheck:
    """A run's privacy summary that passed the ledger gates, and each site's (ε, δ)."""

    privacy: dict
    sites: dict[str, dict[str, float]]
    accountant: str
    warnings: list[str]


def make_release(
    run: str | os.PathLike,
    out: str | os.PathLike,
    max_epsilon: float,
    per_class: int,
    audit_data: Sequence[str | os.PathLike],
    signing_key: Ed25519PrivateKey | str | os.PathLike,
    seed: int = 0,
    truncation: float = 1.0,
    gate: MemorisationGate | None = None,
    device: str = "cpu",
    batch: int = 32,
    steward_audit_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    advance: Callable[[int, int], None] | None = None,
) -> ReleaseResult:
    """Check, generate, audit, sign and publish a release at ``out``, or refuse.

    ``signing_key`` is an Ed25519 private key or the path of one. ``log`` receives one line per
    stage; ``advance(n, total)`` the number of images generated since its last call. Raises
    :class:`ReleaseRefused` when a gate fails and :class:`ReleaseError` when the inputs are
    unusable; either way nothing exists at ``out`` afterwards and no staging folder remains.
    """
    gate = gate or MemorisationGate()
    say = log or (lambda _msg: None)
    run, out = Path(run), Path(out)
    if not (math.isfinite(max_epsilon) and max_epsilon > 0):
        raise ReleaseError(f"--max-epsilon must be a positive number, got {max_epsilon}")
    if per_class < 1:
        raise ReleaseError(f"--per-class must be at least 1, got {per_class}")
    if not audit_data:
        raise ReleaseError("give at least one --audit-data prepared dataset (the training data)")
    if out.exists() or out.is_symlink():
        raise ReleaseError(f"{out} already exists; choose another --out")
    try:
        key = (
            signing_key
            if isinstance(signing_key, Ed25519PrivateKey)
            else load_private_key(signing_key)
        )
    except SigningError as err:
        raise ReleaseError(str(err)) from None

    say(f"checking the privacy ledger of {run.name}")
    checked = check_privacy(run, max_epsilon)
    privacy, sites = checked.privacy, checked.sites
    gen_path = run / GENERATOR_FILE
    say(f"checking {GENERATOR_FILE} holds G_ema only")
    meta = check_generator_checkpoint(gen_path)
    resolution = int(meta["network"]["resolution"])
    say(f"loading {len(audit_data)} audit dataset(s)")
    audit = _load_audit_data(audit_data, resolution, privacy["sites"], gate)
    warnings = [*checked.warnings, *audit["warnings"]]

    created = _missing_ancestors(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        total = per_class * len(meta["class_names"])
        say(f"generating {total} synthetic images")
        synthetic_dir = stage / SYNTHETIC_DIR
        _write_synthetic(
            gen_path,
            synthetic_dir,
            per_class=per_class,
            truncation=truncation,
            seed=seed,
            batch=batch,
            device=device,
            progress=(lambda n: advance(n, total)) if advance else None,
        )
        _strip_machine_paths(synthetic_dir / "generation.json", run)
        synthetic = read_folder_images(synthetic_dir)

        say("memorisation audit")
        decision, mem = memorisation_gate(synthetic, audit["train"], audit["heldout"], gate)
        if steward_audit_dir is not None:
            _write_closest_pairs(Path(steward_audit_dir), synthetic, audit["train"], mem)
        if not decision.passed:
            raise ReleaseRefused(decision.reason())

        say("membership inference audit")
        from fedspine.privacy.membership import membership_audit

        membership = membership_audit(synthetic, audit["train"], audit["heldout"]).summary()
        say("writing and signing the release")
        shutil.copyfile(gen_path, stage / GENERATOR_FILE)
        config = {
            "max_epsilon": max_epsilon,
            "per_class": per_class,
            "seed": seed,
            "truncation": truncation,
            "format": "png",
            "memorisation_gate": asdict(gate),
        }
        mem_summary = {
            **mem.summary(),
            "gate": decision.summary(),
            "audit_data": audit["described"],
            "coverage": audit["coverage"],
            "closest_pairs": (
                "withheld from the release: it shows real training images "
                "(written only to the steward's audit folder when asked for)"
            ),
        }
        _write_json(stage / MEMORISATION_FILE, mem_summary)
        _write_json(stage / MEMBERSHIP_FILE, membership)
        _write_json(
            stage / PRIVACY_REPORT_FILE,
            {
                "format": "fedspine-release-privacy/1",
                "privacy": privacy,
                "release_decision": {
                    "released": True,
                    "max_epsilon": max_epsilon,
                    "max_site_epsilon": max(s["epsilon"] for s in sites.values()),
                    "sites": sites,
                    "checks": [
                        "complete privacy ledger for every site",
                        "every component private",
                        f"every site's epsilon <= {max_epsilon:g}",
                        "generator checkpoint holds G_ema only (no D, no optimizer)",
                        "memorisation gate passed",
                    ],
                    "memorisation": decision.summary(),
                    "membership_inference": {
                        "nearest_auc": membership["nearest"]["auc"],
                        "nearest_tpr_at_1pct_fpr": membership["nearest"]["tpr_at_1pct_fpr"],
                    },
                    "audit_coverage": audit["coverage"],
                    "warnings": warnings,
                },
            },
        )
        (stage / PUBLIC_KEY_FILE).write_bytes(public_key_line(key.public_key()))
        manifest = {
            "format": RELEASE_FORMAT,
            "fedspine_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "run": {"name": run.name, "generator_sha256": sha256_file(gen_path)},
            "configuration": config,
            "privacy": {
                "accountant": checked.accountant,
                "delta": privacy.get("delta"),
                "unit": privacy.get("unit"),
                "sites": sites,
            },
            "audit_data": audit["described"],
            "signing_key": fingerprint(key),
            "files": _file_list(stage),
        }
        manifest_bytes = _json_bytes(manifest)
        (stage / MANIFEST_FILE).write_bytes(manifest_bytes)
        (stage / SIGNATURE_FILE).write_bytes(encode_signature(key.sign(manifest_bytes)))
        if out.exists() or out.is_symlink():
            raise ReleaseError(f"{out} appeared while the release was being built; not replaced")
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:
            with suppress(OSError):
                folder.rmdir()
        raise
    say(f"release written to {out}")
    return ReleaseResult(
        out=out,
        files=len(manifest["files"]),
        fingerprint=fingerprint(key),
        sites=sites,
        memorisation=decision,
        membership=membership,
        warnings=warnings,
    )


def check_privacy(run: str | os.PathLike, max_epsilon: float) -> PrivacyCheck:
    """The run's privacy summary, if it passes every ledger gate; else :class:`ReleaseRefused`.

    Each site's ε is recomputed from its listed mechanisms with the stated accountant: a stated
    ε below the recomputed one (by more than 1 %) is refused, and the cap applies to the larger
    of the two. All ledger, privacy and cap failures are reported together, joined by "; ".
    """
    from fedspine.privacy.accounting import ACCOUNTANTS

    run = Path(run)
    if not run.is_dir():
        raise ReleaseError(f"{run}: no such run folder")
    path = run / PRIVACY_FILE
    no_ledger = f"{run.name} has no complete privacy ledger"
    if not path.is_file():
        raise ReleaseRefused(
            f"{no_ledger}: no {PRIVACY_FILE} (only a run trained with DP can be released)"
        )
    try:
        privacy = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ReleaseRefused(f"{no_ledger}: {PRIVACY_FILE} is not valid JSON ({err})") from None
    if not isinstance(privacy, dict) or privacy.get("format") != PRIVACY_FORMAT:
        raise ReleaseRefused(f"{no_ledger}: {PRIVACY_FILE} is not in format {PRIVACY_FORMAT}")
    sites = privacy.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise ReleaseRefused(f"{no_ledger}: {PRIVACY_FILE} lists no site")
    accountant = privacy.get("accountant")
    if accountant not in ACCOUNTANTS:
        raise ReleaseRefused(
            f"{no_ledger}: unknown accountant {accountant!r} (expected one of {ACCOUNTANTS})"
        )

    problems: list[str] = []
    incomplete = [
        name
        for name, site in sites.items()
        if not isinstance(site, dict)
        or site.get("ledger_complete") is not True
        or not _is_number(site.get("epsilon"))
        or not _is_delta(site.get("delta", privacy.get("delta")))
        or not isinstance(site.get("mechanisms"), list)
    ]
    if incomplete:
        problems.append(f"{no_ledger}: incomplete ledger for site(s) {', '.join(incomplete)}")
    reasons = [str(r) for r in privacy.get("not_private_reasons") or []]
    if privacy.get("private") is not True or reasons:
        problems.append(
            "parts of the run were not private: "
            + ("; ".join(reasons) if reasons else f"{PRIVACY_FILE} does not say private: true")
        )
    epsilons: dict[str, dict[str, float]] = {}
    warnings: list[str] = []
    for name, site in sites.items():
        if name in incomplete:
            continue
        stated = float(site["epsilon"])
        delta = float(site.get("delta", privacy.get("delta")))
        recomputed, problem = _recompute_epsilon(site["mechanisms"], delta, accountant)
        if problem:
            warnings.append(f"site {name}: {problem}; the stated epsilon is used as it is")
        elif stated < recomputed * (1 - EPSILON_RTOL):
            problems.append(
                f"site {name} states epsilon {stated:.4g}, but its mechanisms compose to "
                f"{recomputed:.4g} ({accountant}, delta {delta:g})"
            )
        spent = max(stated, recomputed or 0.0)
        if spent > max_epsilon:
            problems.append(
                f"site {name} spent epsilon {spent:.4g}, over the cap --max-epsilon {max_epsilon:g}"
            )
        epsilons[name] = {"epsilon": spent, "delta": delta}
        if recomputed is not None:
            epsilons[name]["epsilon_recomputed"] = recomputed
    if problems:
        raise ReleaseRefused("; ".join(problems))
    return PrivacyCheck(privacy=privacy, sites=epsilons, accountant=accountant, warnings=warnings)


def check_generator_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata if it holds G_ema and nothing else; else ReleaseRefused.

    Only G_ema may leave (DESIGN decision 6): D is a membership oracle, and optimizer state
    carries gradient statistics of real data.
    """
    import torch

    from fedspine.models import Generator, NetworkConfig
    from fedspine.training.checkpoint import CheckpointError, load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise ReleaseError(f"{path}: no generator; the run has not finished")
    try:
        data = load_checkpoint(path)
    except CheckpointError as err:
        raise ReleaseRefused(str(err)) from None
    name = f"{path.parent.name}/{path.name}"
    if data["fedspine_checkpoint"] != "generator":
        raise ReleaseRefused(
            f"{name} is a {data['fedspine_checkpoint']} checkpoint (it holds D and optimizer "
            "state); only a generator checkpoint (G_ema) can be released"
        )
    extra = sorted(set(data) - GENERATOR_KEYS)
    if extra:
        raise ReleaseRefused(
            f"{name} holds {', '.join(map(repr, extra))} besides G_ema; never release D, "
            "optimizer or other training state (re-save it with save_generator)"
        )
    stray = [p for p in _tensor_paths(data) if not p.startswith("G_ema.")]
    if stray:
        raise ReleaseRefused(
            f"{name} holds tensors outside G_ema ({', '.join(stray[:5])}); never release D, "
            "optimizer or other training state"
        )
    try:
        expected = set(Generator(NetworkConfig(**data["network"])).state_dict())
    except (TypeError, ValueError) as err:
        raise ReleaseRefused(f"{name}: unusable network settings ({err})") from None
    g_ema = data.get("G_ema")
    if not isinstance(g_ema, dict) or not all(isinstance(v, torch.Tensor) for v in g_ema.values()):
        raise ReleaseRefused(f"{name}: G_ema is not a state dict of tensors")
    unexpected = sorted(set(g_ema) - expected)
    missing = sorted(expected - set(g_ema))
    if unexpected or missing:
        raise ReleaseRefused(
            f"{name}: G_ema is not exactly a Generator's weights "
            f"(unexpected {unexpected[:5]}, missing {missing[:5]}); refusing to release it"
        )
    if not isinstance(data.get("class_names"), list) or not data["class_names"]:
        raise ReleaseRefused(f"{name}: no class names")
    return {k: v for k, v in data.items() if k != "G_ema"}


def memorisation_gate(
    synthetic: np.ndarray,
    train: np.ndarray,
    heldout: np.ndarray,
    gate: MemorisationGate | None = None,
) -> tuple[GateDecision, Any]:
    """Apply the memorisation rule (module docstring) in raw pixels.

    Returns the decision and the :class:`~fedspine.evaluation.memorisation.MemorisationResult`
    it was computed from. Images are uint8 or float [0, 1], all of one size.
    """
    from fedspine.evaluation.memorisation import memorisation_audit

    gate = gate or MemorisationGate()
    if len(heldout) < gate.min_heldout:
        raise ReleaseRefused(
            f"memorisation audit: {len(heldout)} held-out (val/test) images in --audit-data; "
            f"the calibration needs at least {gate.min_heldout}"
        )
    if len(train) == 0 or len(synthetic) == 0:
        raise ReleaseRefused("memorisation audit: no training or no synthetic images to compare")
    result = memorisation_audit(synthetic, train, heldout, extractor="pixels")
    threshold = float(np.percentile(result.heldout_to_train, gate.percentile))
    flagged = int(np.sum(result.syn_to_train <= threshold))
    n, m, q = len(synthetic), len(heldout), gate.percentile / 100.0
    expected = ((m - 1) * q + 1) / (m + 1)
    allowed = gate.max_ratio * expected + gate.z * math.sqrt(expected * (1 - expected) / n)
    share = flagged / n
    decision = GateDecision(
        passed=share <= allowed,
        threshold=threshold,
        flagged=flagged,
        n_synthetic=n,
        n_train=int(len(train)),
        n_heldout=m,
        share_flagged=share,
        expected_share=expected,
        allowed_share=allowed,
        gate=gate,
    )
    return decision, result


def read_folder_images(folder: str | os.PathLike) -> np.ndarray:
    """uint8 [N, R, R] images of a folder layout, in labels.csv order."""
    from PIL import Image

    folder = Path(folder)
    with open(folder / "labels.csv", newline="") as fh:
        files = [row["file"] for row in csv.DictReader(fh)]
    if not files:
        raise ReleaseError(f"{folder / 'labels.csv'}: no images listed")
    return np.stack([np.asarray(Image.open(folder / f).convert("L")) for f in files])


def _write_synthetic(gen_path: Path, out: Path, **kwargs) -> Path:
    """Generate the synthetic set (the one hook tests replace with a copying 'generator')."""
    from fedspine.training.generate import generate_dataset

    return generate_dataset(gen_path, out, **kwargs)


def _load_audit_data(
    paths: Sequence[str | os.PathLike], resolution: int, sites: dict, gate: MemorisationGate
) -> dict:
    """Train and held-out images of every audit set at ``resolution``, and run coverage."""
    import torch

    from fedspine.data.prepared import PreparedDatasetError, load_prepared
    from fedspine.training.batches import resize_uint8

    train, heldout, described = [], [], []
    for p in paths:
        try:
            data = load_prepared(p)
        except PreparedDatasetError as err:
            raise ReleaseError(str(err)) from None
        parts = []
        for split in ("train", HELDOUT_SPLITS):
            imgs = torch.from_numpy(np.ascontiguousarray(data.select(split).images))[:, None]
            if imgs.shape[-1] != resolution:
                imgs = resize_uint8(imgs, resolution)
            parts.append(imgs[:, 0].numpy())
        train.append(parts[0])
        heldout.append(parts[1])
        described.append(
            {
                "name": Path(p).name,
                "content_hash": data.content_hash,
                "n_train": len(parts[0]),
                "n_heldout": len(parts[1]),
            }
        )
    hashes = {d["content_hash"] for d in described}
    coverage = {name: (s.get("dataset_hash") in hashes) for name, s in sites.items()}
    if not any(coverage.values()):
        raise ReleaseRefused(
            "memorisation audit: no --audit-data set is the training data of any site "
            "(content hashes differ from privacy.json's dataset_hash); pass the prepared "
            "datasets the run was trained on"
        )
    warnings = [
        f"site {name}'s training data was not in --audit-data; the memorisation and membership "
        "audits do not cover it"
        for name, covered in coverage.items()
        if not covered
    ]
    return {
        "train": np.concatenate(train),
        "heldout": np.concatenate(heldout),
        "described": described,
        "coverage": coverage,
        "warnings": warnings,
    }


def _strip_machine_paths(generation_json: Path, run: Path) -> None:
    """generation.json names the run and generator by absolute path; keep names only."""
    if not generation_json.is_file():
        return
    info = json.loads(generation_json.read_text())
    info["run"] = run.name
    info["generator"] = GENERATOR_FILE
    generation_json.write_text(json.dumps(info, indent=2) + "\n")


def _write_closest_pairs(folder: Path, synthetic: np.ndarray, train: np.ndarray, mem) -> None:
    from fedspine.evaluation.memorisation import closest_pairs_png

    closest_pairs_png(
        folder / CLOSEST_PAIRS_FILE,
        synthetic,
        train,
        mem.syn_to_train_index,
        k=min(8, len(synthetic)),
        dist=mem.syn_to_train,
    )


def _tensor_paths(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every tensor inside nested dicts / lists of a checkpoint."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [prefix.rstrip(".")]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _tensor_paths(v, f"{prefix}{k}.")]
    if isinstance(obj, list | tuple):
        return [p for i, v in enumerate(obj) for p in _tensor_paths(v, f"{prefix}{i}.")]
    return []


def _file_list(root: Path) -> list[dict]:
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in UNSIGNED_FILES:
            files.append({"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size})
    return sorted(files, key=lambda f: f["path"])


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_json_bytes(obj))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _recompute_epsilon(
    mechanisms: list, delta: float, accountant: str
) -> tuple[float | None, str | None]:
    """(ε of the listed mechanisms composed, None) or (None, why it could not be computed)."""
    from fedspine.privacy.accounting import Mechanism, PrivacyAccountingError, epsilon

    try:
        parsed = [
            Mechanism(
                noise_multiplier=m["noise_multiplier"],
                sample_rate=m["sample_rate"],
                steps=m["steps"],
                label=str(m.get("label", "")),
                kind=m.get("kind", "dp-sgd-poisson"),
            )
            for m in mechanisms
        ]
    except (KeyError, TypeError, ValueError) as err:
        return None, f"unreadable mechanism record ({err})"
    try:
        return epsilon(parsed, delta, accountant=accountant), None
    except PrivacyAccountingError as err:
        return None, f"epsilon could not be recomputed ({err})"


def _is_delta(value: Any) -> bool:
    return _is_number(value) and 0 < value < 1


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _missing_ancestors(folder: Path) -> list[Path]:
    """Folders that ``mkdir(parents=True)`` would create, deepest first."""
    missing = []
    folder = folder.absolute()
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing
