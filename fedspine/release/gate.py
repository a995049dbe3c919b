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
5. ``RUN/generator.pt`` is the generator ``privacy.json`` covers: its SHA-256 equals
   ``privacy.json``'s ``generator_sha256`` (a DP run writes the generator before its privacy
   summary, so the summary binds it; a missing or null hash is refused), and its ``training``
   metadata does not name a ``dp_scheme`` other than ``dpsgd`` (the ablation schemes are not
   private);
6. the audit data covers the run, found without any fingerprint of the data: for every audit
   set the patients of its ``train`` split are named by their keyed hashes under each privacy
   home given (``privacy_homes``, CLI ``--privacy-home``, default the one
   :func:`~fedspine.privacy.home.resolve_home` finds), and a site is covered when that home's
   ledger holds records of this run (``privacy.json``'s ``run_id`` or a run id of the site's
   mechanism rows) whose cohort shares patients with it. A home is matched to a site by its
   records' mechanisms (run, round, σ, q, clip, unit, label as ``privacy.json`` lists them);
   a single-site run takes any matching record. A home without ``ledger.json`` is skipped and
   never created. No audit set covering any site is a refusal (the memorisation gate would
   compare against unrelated images); some sites uncovered is a warning;
7. the memorisation gate passes;
8. no file of the release contains the content hash of an audit set (nor of the parts of a
   merged one): a release carries no fingerprint of the private data.

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

What a release holds (built in a hidden staging folder beside ``out``, renamed when complete);
everything in it is the DP generator, what was generated from it, or public settings::

    synthetic/                 images/*.png, labels.csv, classes.txt, generation.json
    generator.pt               the run's G_ema checkpoint, byte for byte
    privacy_report.json        per site (ε, δ, σ, q, steps, clip, unit, accountant), what was
                               private, and which gates passed (names, rules, settings)
    steward.pub                the steward's public key (OpenSSH line)
    manifest.json              SHA-256 of every other file, the configuration, each site's (ε, δ)
    manifest.sig               base64 Ed25519 signature of manifest.json's bytes

``generation.json`` keeps the generator's own SHA-256 but drops every key naming a hash from
the copied ``training`` metadata. The sites' (ε, δ) are the privacy of ``generator.pt`` and of
the synthetic images (post-processing of it) and of nothing else. Dataset sizes are treated as
public (a site's sampling rate q is its batch over its patient count).

The steward's audit folder (``steward_audit_dir``, CLI ``--audit-dir``) is required: a release
is not attempted without one (there is no default; the folder must be chosen as private). The
memorisation and membership audits are computed on real images and are not covered by the DP
guarantee, so their figures never enter the release: ``memorisation.json`` (the gate's
distances, threshold and counts, the audit sets' names, content hashes and sizes, the coverage
found), ``membership.json`` (a synthetic-only membership inference attack, reported, not gated)
and ``closest_pairs.png`` (real training images) are written there, created 0700, replacing
those of an earlier release into the same folder. The release only says that the gates passed.
Machine paths are not recorded in the release: the manifest names the run folder only.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import re
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
from fedspine.privacy.home import LEDGER_FILE, PrivacyHomeError, resolve_home
from fedspine.privacy.ledger import LedgerError
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

RELEASE_FORMAT = "fedspine-release/2"
PRIVACY_FILE = "privacy.json"
PRIVACY_FORMAT = "fedspine-privacy/1"
EPSILON_RTOL = 0.01
GENERATOR_FILE = "generator.pt"
SYNTHETIC_DIR = "synthetic"
PRIVACY_REPORT_FILE = "privacy_report.json"
MEMORISATION_FILE = "memorisation.json"
"""In the steward's audit folder, never in the release (so are the two below)."""
MEMBERSHIP_FILE = "membership.json"
CLOSEST_PAIRS_FILE = "closest_pairs.png"
DP_SCHEME = "dpsgd"
MEMORISATION_RULE = (
    "threshold = percentile-th percentile of held-out real images' distances to their closest "
    "training image; flagged = synthetic images whose distance to their closest training image "
    "is <= threshold; expected = ((m-1)q+1)/(m+1) for m held-out images, q = percentile/100; "
    "refused when the flagged share > max_ratio*expected + z*sqrt(expected*(1-expected)/n) "
    "for n synthetic images"
)
DATASET_SIZES_PUBLIC = (
    "dataset sizes are treated as public: each site's sampling rate q is its expected batch "
    "over its number of privacy units, so q and the step counts reveal them"
)
AUDITS_WITH_STEWARD = (
    "the memorisation and membership audits were computed on the real training and held-out "
    "images, outside the DP guarantee: their figures stay with the data steward, and this "
    "release says only which gates passed"
)
HELDOUT_SPLITS = ("val", "test")
MECHANISM_KEYS = ("label", "kind", "noise_multiplier", "sample_rate", "steps", "clip_norm")
_HASH_KEY = re.compile(r"hash|sha\d|md5", re.IGNORECASE)
_FINGERPRINT_HEX = 16
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
            "rule": MEMORISATION_RULE,
        }


@dataclass
class ReleaseResult:
    """What :func:`make_release` wrote and the numbers behind the decision.

    ``memorisation`` and ``membership`` are the steward's (computed on real images); they are
    written to ``steward_audit``, never into the release.
    """

    out: Path
    files: int
    fingerprint: str
    sites: dict[str, dict[str, float]]
    memorisation: GateDecision
    membership: dict
    steward_audit: Path
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
    privacy_homes: Sequence[str | os.PathLike] = (),
    log: Callable[[str], None] | None = None,
    advance: Callable[[int, int], None] | None = None,
) -> ReleaseResult:
    """Check, generate, audit, sign and publish a release at ``out``, or refuse.

    ``signing_key`` is an Ed25519 private key or the path of one. ``steward_audit_dir`` is the
    steward's private folder for the audits' figures (required). ``privacy_homes`` are the
    sites' privacy homes whose ledgers show which audit set each site trained on (empty: the
    one :func:`~fedspine.privacy.home.resolve_home` finds). ``log`` receives one line per
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
    steward = _steward_folder(steward_audit_dir, out)
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
    say(f"checking {GENERATOR_FILE} is the generator {PRIVACY_FILE} covers")
    generator_sha256 = check_generator_binding(run, privacy, meta)
    resolution = int(meta["network"]["resolution"])
    homes = [resolve_home(h) for h in privacy_homes] or [resolve_home(None)]
    say(f"loading {len(audit_data)} audit dataset(s)")
    audit = _load_audit_data(audit_data, resolution, privacy, homes, gate)
    warnings = [*checked.warnings, *audit["warnings"]]

    created = _missing_ancestors(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        # Generate from, and ship, a copy whose hash is checked again: the bytes released are
        # the bytes privacy.json covers, whatever happens to RUN/generator.pt meanwhile.
        staged_generator = stage / GENERATOR_FILE
        shutil.copyfile(gen_path, staged_generator)
        if sha256_file(staged_generator) != generator_sha256:
            raise ReleaseError(f"{run.name}/{GENERATOR_FILE} changed while it was being released")
        total = per_class * len(meta["class_names"])
        say(f"generating {total} synthetic images")
        synthetic_dir = stage / SYNTHETIC_DIR
        _write_synthetic(
            staged_generator,
            synthetic_dir,
            per_class=per_class,
            truncation=truncation,
            seed=seed,
            batch=batch,
            device=device,
            progress=(lambda n: advance(n, total)) if advance else None,
        )
        _clean_generation_json(synthetic_dir / "generation.json", run, generator_sha256)
        synthetic = read_folder_images(synthetic_dir)

        say(f"memorisation audit (figures go to the steward's folder {steward})")
        decision, mem = memorisation_gate(synthetic, audit["train"], audit["heldout"], gate)
        _make_private_folder(steward)
        _write_closest_pairs(steward, synthetic, audit["train"], mem)
        _write_json(
            steward / MEMORISATION_FILE,
            {
                **mem.summary(),
                "release": out.name,
                "run": run.name,
                "generator_sha256": generator_sha256,
                "gate": decision.summary(),
                "audit_data": audit["described"],
                "coverage": audit["coverage"],
                "coverage_detail": audit["detail"],
                "closest_pairs": CLOSEST_PAIRS_FILE,
                "private": "computed on real images: keep it with the steward, never publish",
            },
        )
        if not decision.passed:
            raise ReleaseRefused(decision.reason())

        say("membership inference audit")
        from fedspine.audit.membership import membership_audit

        membership = membership_audit(synthetic, audit["train"], audit["heldout"]).summary()
        _write_json(
            steward / MEMBERSHIP_FILE,
            {**membership, "release": out.name, "generator_sha256": generator_sha256},
        )
        say("writing and signing the release")
        config = {
            "max_epsilon": max_epsilon,
            "per_class": per_class,
            "seed": seed,
            "truncation": truncation,
            "format": "png",
            "memorisation_gate": asdict(gate),
        }
        gates = _gates(max_epsilon, gate, audit["coverage"])
        _write_json(
            stage / PRIVACY_REPORT_FILE,
            {
                "format": "fedspine-release-privacy/2",
                "privacy": _public_privacy(privacy, sites, checked.accountant),
                "release_decision": {
                    "released": True,
                    "max_epsilon": max_epsilon,
                    "max_site_epsilon": max(s["epsilon"] for s in sites.values()),
                    "sites": sites,
                    "gates": gates,
                    "checks": [g["name"] for g in gates],
                    "audit_coverage": audit["coverage"],
                    "audits": AUDITS_WITH_STEWARD,
                    "warnings": warnings,
                },
            },
        )
        (stage / PUBLIC_KEY_FILE).write_bytes(public_key_line(key.public_key()))
        manifest = {
            "format": RELEASE_FORMAT,
            "fedspine_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "run": {"name": run.name, "generator_sha256": generator_sha256},
            "configuration": config,
            "privacy": {
                "guarantee": (
                    "each site's (epsilon, delta) below is the differential privacy of "
                    f"{GENERATOR_FILE} and of the synthetic images generated from it "
                    f"({SYNTHETIC_DIR}/, post-processing) for that site's patients; nothing "
                    "else in this release is computed from private data"
                ),
                "covers": [GENERATOR_FILE, f"{SYNTHETIC_DIR}/"],
                "accountant": checked.accountant,
                "delta": privacy.get("delta"),
                "unit": privacy.get("unit"),
                "sites": sites,
                "dataset_sizes": DATASET_SIZES_PUBLIC,
            },
            "audits": {
                "held_by": "the data steward (not part of this release)",
                "statement": AUDITS_WITH_STEWARD,
                "gates_passed": [g["name"] for g in gates],
            },
            "signing_key": fingerprint(key),
            "files": _file_list(stage),
        }
        manifest_bytes = _json_bytes(manifest)
        (stage / MANIFEST_FILE).write_bytes(manifest_bytes)
        _refuse_fingerprints(stage, audit["fingerprints"])
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
    say(f"release written to {out}; the audits' figures are in {steward} (keep them private)")
    return ReleaseResult(
        out=out,
        files=len(manifest["files"]),
        fingerprint=fingerprint(key),
        sites=sites,
        memorisation=decision,
        membership=membership,
        steward_audit=steward,
        warnings=warnings,
    )


def check_privacy(run: str | os.PathLike, max_epsilon: float) -> PrivacyCheck:
    """The run's privacy summary, if it passes every ledger gate; else :class:`ReleaseRefused`.

    Each site's ε is recomputed from its listed mechanisms with the stated accountant: a stated
    ε below the recomputed one (by more than 1 %) is refused, and the cap applies to the larger
    of the two. All ledger, privacy and cap failures are reported together, joined by "; ".
    """
    from fedspine.privacy.accounting import ACCOUNTANTS, default_delta

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
        patients = site.get("patients")
        if not (isinstance(patients, int) and not isinstance(patients, bool) and patients > 0):
            problems.append(f"site {name} does not state its number of privacy units")
        elif delta > default_delta(patients):
            problems.append(
                f"site {name} states delta {delta:g}, above min(1e-5, 1/(10*{patients} units)) = "
                f"{default_delta(patients):.3g}: a guarantee that may fail outright for a "
                "patient is not released"
            )
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


def check_generator_binding(run: str | os.PathLike, privacy: dict, meta: dict) -> str:
    """SHA-256 of ``RUN/generator.pt`` if it is the generator ``privacy`` covers; else
    :class:`ReleaseRefused`.

    A DP run writes generator.pt before privacy.json, which records the generator's SHA-256:
    any other G_ema put in its place afterwards (another run's, a non-private one) differs.
    ``meta`` is the checkpoint's metadata (:func:`check_generator_checkpoint`); a ``training``
    ``dp_scheme`` other than ``dpsgd`` under a privacy record that says private is refused too.
    """
    run = Path(run)
    path = run / GENERATOR_FILE
    name = f"{run.name}/{GENERATOR_FILE}"
    if not path.is_file():
        raise ReleaseError(f"{path}: no generator; the run has not finished")
    actual = sha256_file(path)
    stated = privacy.get("generator_sha256")
    if not isinstance(stated, str) or stated.lower() != actual:
        recorded = (
            f"generator_sha256 {stated[:12]}"
            if isinstance(stated, str) and stated
            else "no generator_sha256"
        )
        raise ReleaseRefused(
            f"{name} (sha256 {actual[:12]}) is not the generator {PRIVACY_FILE} covers "
            f"({PRIVACY_FILE} records {recorded}); only the generator its privacy ledger was "
            "written for can be released"
        )
    training = meta.get("training")
    scheme = training.get("dp_scheme") if isinstance(training, dict) else None
    if scheme is not None and scheme != DP_SCHEME and privacy.get("private") is True:
        raise ReleaseRefused(
            f"{name} says it was trained with dp_scheme {scheme!r}, not {DP_SCHEME!r}, while "
            f"{PRIVACY_FILE} says the run was private; it is not the generator that privacy "
            "record covers"
        )
    return actual


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
    paths: Sequence[str | os.PathLike],
    resolution: int,
    privacy: dict,
    homes: Sequence[Path],
    gate: MemorisationGate,
) -> dict:
    """Train and held-out images of every audit set at ``resolution``, and run coverage.

    Coverage comes from the sites' privacy ledgers (module docstring, gate 6), never from a
    fingerprint of the data. ``described``, ``detail`` and ``fingerprints`` are the steward's:
    they name the audit sets' content hashes and sizes and never enter the release.
    """
    import torch

    from fedspine.data.prepared import PreparedDatasetError, load_prepared
    from fedspine.training.batches import resize_uint8

    sites = privacy["sites"]
    ledgers = _open_ledgers(homes)
    run_ids = _run_ids(privacy)
    signatures = {
        name: {_signature(m) for m in site.get("mechanisms") or [] if isinstance(m, dict)}
        for name, site in sites.items()
    }
    coverage = {name: False for name in sites}
    train, heldout, described, detail = [], [], [], []
    fingerprints: dict[str, str] = {}
    for p in paths:
        try:
            data = load_prepared(p)
        except PreparedDatasetError as err:
            raise ReleaseError(str(err)) from None
        name = Path(p).name
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
                "name": name,
                "content_hash": data.content_hash,
                "n_train": len(parts[0]),
                "n_heldout": len(parts[1]),
            }
        )
        for digest in [data.content_hash, *(data.manifest.get("parts") or {}).values()]:
            if isinstance(digest, str) and digest:
                fingerprints[digest] = name
        train_ids = data.select("train").privacy_ids
        for home, privacy_home, ledger in ledgers:
            try:
                keys = privacy_home.keys_of(train_ids)
                records = [r for r in ledger.records(patients=keys) if r["run_id"] in run_ids]
                cohorts = {r["cohort"]: set(ledger.cohort(r)) for r in records}
            except (PrivacyHomeError, LedgerError) as err:
                raise ReleaseError(f"privacy home {home}: {err}") from None
            if not records:
                continue
            matched = _sites_of(records, signatures)
            for site in matched:
                coverage[site] = True
            trained = set().union(*cohorts.values()) & set(keys)
            detail.append(
                {
                    "audit_data": name,
                    "privacy_home": str(home),
                    "sites": matched,
                    "records_of_the_run": len(records),
                    "train_patients": len(keys),
                    "train_patients_in_the_run": len(trained),
                }
            )
    if not any(coverage.values()):
        raise ReleaseRefused(_uncovered_reason(privacy, homes, ledgers, run_ids))
    warnings = [
        f"site {name}: no --audit-data set holds its training patients under the given "
        "--privacy-home(s); the memorisation and membership audits do not cover it"
        for name, covered in coverage.items()
        if not covered
    ]
    return {
        "train": np.concatenate(train),
        "heldout": np.concatenate(heldout),
        "described": described,
        "coverage": coverage,
        "detail": detail,
        "fingerprints": fingerprints,
        "warnings": warnings,
    }


def _open_ledgers(homes: Sequence[Path]) -> list[tuple[Path, Any, Any]]:
    """(path, PrivacyHome, ledger) of every home that holds a ledger; the others are skipped,
    never created (a release must not start a ledger or a site key)."""
    from fedspine.privacy.home import PrivacyHome

    found, seen = [], set()
    for home in homes:
        home = Path(home)
        if home in seen or not home.joinpath(LEDGER_FILE).is_file():
            continue
        seen.add(home)
        try:
            privacy_home = PrivacyHome(home)
            found.append((home, privacy_home, privacy_home.ledger()))
        except (PrivacyHomeError, LedgerError) as err:
            raise ReleaseError(f"privacy home {home}: {err}") from None
    return found


def _run_ids(privacy: dict) -> set[str]:
    """The run's id and every run id of the sites' mechanism rows."""
    ids = {privacy.get("run_id")}
    for site in privacy["sites"].values():
        ids.update(m.get("run_id") for m in site.get("mechanisms") or [] if isinstance(m, dict))
    return {i for i in ids if isinstance(i, str) and i}


def _signature(row: dict) -> tuple:
    """What a ledger record and its row in privacy.json share (steps change as it settles)."""

    def num(value: Any) -> float | None:
        return float(value) if _is_number(value) else None

    return (
        row.get("run_id"),
        row.get("round"),
        row.get("label"),
        row.get("unit"),
        num(row.get("noise_multiplier")),
        num(row.get("sample_rate")),
        num(row.get("clip_norm")),
    )


def _sites_of(records: list[dict], signatures: dict[str, set]) -> list[str]:
    """The sites whose mechanism rows list one of ``records``; for a single-site run, that
    site whenever a record of the run matched."""
    found = {_signature(r) for r in records}
    matched = sorted(name for name, rows in signatures.items() if rows & found)
    if not matched and len(signatures) == 1:
        matched = list(signatures)
    return matched


def _uncovered_reason(privacy: dict, homes: Sequence[Path], ledgers: list, run_ids: set) -> str:
    ask = (
        "pass the prepared datasets the run was trained on (--audit-data) and each site's "
        "privacy home (--privacy-home)"
    )
    if not ledgers:
        where = ", ".join(str(h) for h in homes)
        return (
            "memorisation audit: cannot tell which --audit-data set is a site's training data: "
            f"no privacy ledger in {where}; {ask}"
        )
    runs = ", ".join(sorted(run_ids)) or "(privacy.json names no run id)"
    where = ", ".join(str(h) for h, _, _ in ledgers)
    return (
        "memorisation audit: no --audit-data set is the training data of any site: the "
        f"ledgers in {where} record run {runs} on none of the audit sets' train patients "
        f"(or on none of privacy.json's sites); {ask}"
    )


def _clean_generation_json(generation_json: Path, run: Path, generator_sha256: str) -> None:
    """generation.json names the run and generator by absolute path and copies the generator's
    ``training`` metadata: keep names only, and drop every key naming a hash except the
    generator's own SHA-256 (which must be the one released)."""
    if not generation_json.is_file():
        return
    info = json.loads(generation_json.read_text())
    stated = info.get("generator_sha256", generator_sha256)
    if stated != generator_sha256:
        raise ReleaseError(
            f"generation.json names generator {str(stated)[:12]}, not the released "
            f"{generator_sha256[:12]}"
        )
    info = _without_hashes(info)
    info["generator_sha256"] = generator_sha256
    info["run"] = run.name
    info["generator"] = GENERATOR_FILE
    generation_json.write_text(json.dumps(info, indent=2) + "\n")


def _without_hashes(obj: Any) -> Any:
    """``obj`` without any dict key that names a hash (hash, sha1/sha256, md5), recursively."""
    if isinstance(obj, dict):
        return {k: _without_hashes(v) for k, v in obj.items() if not _HASH_KEY.search(str(k))}
    if isinstance(obj, list):
        return [_without_hashes(v) for v in obj]
    return obj


def _public_privacy(privacy: dict, sites: dict[str, dict[str, float]], accountant: str) -> dict:
    """The DP outputs of privacy.json: per site (ε, δ, σ, q, steps, clip, unit, accountant),
    what was private and the generator it covers; no patient counts, no per-round detail."""
    public_sites = {}
    for name, site in privacy["sites"].items():
        public_sites[name] = {
            "epsilon": float(site["epsilon"]),
            "epsilon_released": sites[name]["epsilon"],
            "delta": sites[name]["delta"],
            "unit": site.get("unit", privacy.get("unit")),
            "accountant": accountant,
            "mechanisms": [
                {k: m[k] for k in MECHANISM_KEYS if k in m}
                for m in site["mechanisms"]
                if isinstance(m, dict)
            ],
        }
    return {
        "format": privacy.get("format"),
        "private": privacy.get("private"),
        "not_private_reasons": list(privacy.get("not_private_reasons") or []),
        "accountant": accountant,
        "delta": privacy.get("delta"),
        "unit": privacy.get("unit"),
        "generator_sha256": privacy.get("generator_sha256"),
        "sites": public_sites,
        "components": dict(privacy.get("components") or {}),
        "prng": privacy.get("prng"),
        "dataset_sizes": DATASET_SIZES_PUBLIC,
    }


def _gates(max_epsilon: float, gate: MemorisationGate, coverage: dict[str, bool]) -> list[dict]:
    """The gates a released bundle passed: names, rules and settings, no statistic of the data."""
    covered = sorted(name for name, ok in coverage.items() if ok)
    return [
        {
            "name": "complete privacy ledger for every site",
            "passed": True,
            "rule": "privacy.json lists every site with ledger_complete true, a numeric epsilon, "
            "a delta in (0, 1) and its mechanisms",
        },
        {
            "name": "every component private",
            "passed": True,
            "rule": "privacy.json says private: true and lists no reason it is not",
        },
        {
            "name": f"every site's epsilon <= {max_epsilon:g}",
            "passed": True,
            "rule": "the larger of the stated epsilon and the one recomputed from the site's "
            "mechanisms is at most the cap; a stated epsilon more than 1 % below the "
            "recomputed one is refused",
        },
        {
            "name": "generator checkpoint holds G_ema only (no D, no optimizer)",
            "passed": True,
            "rule": "every tensor lies under G_ema and its names are exactly a Generator's",
        },
        {
            "name": "generator is the one privacy.json covers",
            "passed": True,
            "rule": "SHA-256 of generator.pt equals privacy.json's generator_sha256, and its "
            f"training metadata names no dp_scheme other than {DP_SCHEME}",
        },
        {
            "name": "audit data covers the run",
            "passed": True,
            "rule": "a site is covered when its privacy ledger records this run on patients of "
            "an audit set's train split (keyed patient hashes, no data fingerprint); at least "
            "one site must be",
            "sites_covered": covered,
        },
        {
            "name": "memorisation gate passed",
            "passed": True,
            "rule": MEMORISATION_RULE,
            "settings": asdict(gate),
        },
        {
            "name": "no fingerprint of the private data",
            "passed": True,
            "rule": "no file of the release contains the content hash of an audit set",
        },
    ]


def _refuse_fingerprints(root: Path, fingerprints: dict[str, str]) -> None:
    """ReleaseRefused if any file under ``root`` holds a prepared dataset's content hash (its
    first 16 hex digits, in either case)."""
    needles = {
        digest[:_FINGERPRINT_HEX].lower().encode(): name
        for digest, name in fingerprints.items()
        if len(digest) >= _FINGERPRINT_HEX
    }
    if not needles:
        return
    overlap = _FINGERPRINT_HEX - 1
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        tail = b""
        with open(path, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                text = tail + block.lower()
                for needle, name in needles.items():
                    if needle in text:
                        raise ReleaseRefused(
                            f"{path.relative_to(root).as_posix()} holds the content hash of "
                            f"audit set {name}; a release carries no fingerprint of the private "
                            "data (re-save the generator without it)"
                        )
                tail = text[-overlap:]


def _steward_folder(steward_audit_dir: str | os.PathLike | None, out: Path) -> Path:
    """The steward's private audit folder: required, and outside the release."""
    if steward_audit_dir is None or not str(steward_audit_dir):
        raise ReleaseError(
            "give the steward's private audit folder (--audit-dir; steward_audit_dir): the "
            "memorisation and membership audits are computed on real images, so their figures "
            "are written there and never into the release"
        )
    folder = Path(steward_audit_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ReleaseError(f"--audit-dir {folder} is a file, not a folder")
    inside = folder.resolve()
    if inside == out.resolve() or inside.is_relative_to(out.resolve()):
        raise ReleaseError(
            f"--audit-dir {folder} lies inside the release {out}; keep the audits outside it"
        )
    return folder


def _make_private_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise ReleaseError(f"--audit-dir {folder}: cannot create it ({err})") from None


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
