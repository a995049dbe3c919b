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

Utility is stated, not gated (:mod:`.utility`): with ``evaluation`` (CLI ``--evaluation``, a
``fedspine evaluate`` folder) the TSTR verdict is logged and returned, and the privacy report
records only its coarse category and the generator it judged; an evaluation that did not judge
this generator (its synthetic set's ``generation.json`` names another SHA-256, or none) or a
folder that is not an evaluation is refused, before anything is generated or written. Without
one the report says utility was not evaluated.

The gates live beside this module: 1 to 5 in :mod:`.checks`, 6 in :mod:`.coverage`, 7 in
:mod:`.memorisation_gate` (its rule is in that module's docstring), 8 and what a release holds
(the files, the manifest, the privacy report) in :mod:`.bundle`. This module runs them in order,
generates, writes the steward's audits and signs; it re-exports their public names.

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
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from fedspine.audit.membership import membership_audit
from fedspine.evaluation.memorisation import closest_pairs_png
from fedspine.fileio import (
    STEWARD_CLOSEST_PAIRS,
    STEWARD_MEMBERSHIP,
    STEWARD_MEMORISATION,
    SYNTHETIC_GENERATION,
    SYNTHETIC_LABELS,
    file_sha256,
)
from fedspine.privacy.home import resolve_home
from fedspine.privacy.signing import (
    MANIFEST_FILE,
    PUBLIC_KEY_FILE,
    SIGNATURE_FILE,
    SigningError,
    encode_signature,
    fingerprint,
    load_private_key,
    public_key_line,
)
from fedspine.release.bundle import (
    AUDITS_WITH_STEWARD,
    DATASET_SIZES_PUBLIC,
    MECHANISM_KEYS,
    PRIVACY_REPORT_FILE,
    RELEASE_FORMAT,
    SYNTHETIC_DIR,
    clean_generation_json,
    file_list,
    json_bytes,
    privacy_report,
    refuse_fingerprints,
    release_gates,
    release_manifest,
    write_json,
)
from fedspine.release.checks import (
    DP_SCHEME,
    EPSILON_RTOL,
    GENERATOR_FILE,
    GENERATOR_KEYS,
    PRIVACY_FILE,
    PRIVACY_FORMAT,
    PrivacyCheck,
    check_generator_binding,
    check_generator_checkpoint,
    check_privacy,
)
from fedspine.release.coverage import HELDOUT_SPLITS, load_audit_data
from fedspine.release.errors import ReleaseError, ReleaseRefused
from fedspine.release.memorisation_gate import (
    MEMORISATION_RULE,
    GateDecision,
    MemorisationGate,
    memorisation_gate,
)
from fedspine.release.utility import ReleaseUtility, read_utility
from fedspine.training.generate import generate_dataset

__all__ = [
    "AUDITS_WITH_STEWARD",
    "CLOSEST_PAIRS_FILE",
    "DATASET_SIZES_PUBLIC",
    "DP_SCHEME",
    "EPSILON_RTOL",
    "GENERATOR_FILE",
    "GENERATOR_KEYS",
    "HELDOUT_SPLITS",
    "MECHANISM_KEYS",
    "MEMBERSHIP_FILE",
    "MEMORISATION_FILE",
    "MEMORISATION_RULE",
    "PRIVACY_FILE",
    "PRIVACY_FORMAT",
    "PRIVACY_REPORT_FILE",
    "RELEASE_FORMAT",
    "SYNTHETIC_DIR",
    "GateDecision",
    "MemorisationGate",
    "PrivacyCheck",
    "ReleaseError",
    "ReleaseRefused",
    "ReleaseResult",
    "ReleaseUtility",
    "check_generator_binding",
    "check_generator_checkpoint",
    "check_privacy",
    "make_release",
    "memorisation_gate",
    "read_folder_images",
]

MEMORISATION_FILE = STEWARD_MEMORISATION
"""In the steward's audit folder, never in the release (so are the two below)."""
MEMBERSHIP_FILE = STEWARD_MEMBERSHIP
CLOSEST_PAIRS_FILE = STEWARD_CLOSEST_PAIRS


@dataclass
class ReleaseResult:
    """What :func:`make_release` wrote and the numbers behind the decision.

    ``memorisation`` and ``membership`` are the steward's (computed on real images); they are
    written to ``steward_audit``, never into the release. ``utility`` is the TSTR verdict of
    the evaluation given (its figures are the steward's too), or says it was not evaluated.
    """

    out: Path
    files: int
    fingerprint: str
    sites: dict[str, dict[str, float]]
    memorisation: GateDecision
    membership: dict
    steward_audit: Path
    warnings: list[str] = field(default_factory=list)
    utility: ReleaseUtility = field(default_factory=ReleaseUtility)


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
    evaluation: str | os.PathLike | None = None,
) -> ReleaseResult:
    """Check, generate, audit, sign and publish a release at ``out``, or refuse.

    ``signing_key`` is an Ed25519 private key or the path of one. ``steward_audit_dir`` is the
    steward's private folder for the audits' figures (required). ``privacy_homes`` are the
    sites' privacy homes whose ledgers show which audit set each site trained on (empty: the
    one :func:`~fedspine.privacy.home.resolve_home` finds). ``evaluation`` is a ``fedspine
    evaluate`` folder of a synthetic set of this generator (None: utility not evaluated; see
    :mod:`.utility`). ``log`` receives one line per
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
    if evaluation is None:
        utility = ReleaseUtility()
    else:
        say(f"checking the evaluation {Path(evaluation).name} judged this generator")
        utility = read_utility(evaluation, generator_sha256)
    resolution = int(meta["network"]["resolution"])
    homes = [resolve_home(h) for h in privacy_homes] or [resolve_home(None)]
    say(f"loading {len(audit_data)} audit dataset(s)")
    audit = load_audit_data(audit_data, resolution, privacy, homes, gate)
    warnings = [*checked.warnings, *audit["warnings"]]

    created = _missing_ancestors(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        # Generate from, and ship, a copy whose hash is checked again: the bytes released are
        # the bytes privacy.json covers, whatever happens to RUN/generator.pt meanwhile.
        staged_generator = stage / GENERATOR_FILE
        shutil.copyfile(gen_path, staged_generator)
        if file_sha256(staged_generator) != generator_sha256:
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
        clean_generation_json(synthetic_dir / SYNTHETIC_GENERATION, run, generator_sha256)
        synthetic = read_folder_images(synthetic_dir)

        say(f"memorisation audit (figures go to the steward's folder {steward})")
        decision, mem = memorisation_gate(synthetic, audit["train"], audit["heldout"], gate)
        _make_private_folder(steward)
        _write_closest_pairs(steward, synthetic, audit["train"], mem)
        write_json(
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
        membership = membership_audit(synthetic, audit["train"], audit["heldout"]).summary()
        write_json(
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
        gates = release_gates(max_epsilon, gate, audit["coverage"])
        write_json(
            stage / PRIVACY_REPORT_FILE,
            privacy_report(checked, max_epsilon, gates, audit["coverage"], warnings, utility),
        )
        (stage / PUBLIC_KEY_FILE).write_bytes(public_key_line(key.public_key()))
        manifest = release_manifest(
            run_name=run.name,
            generator_sha256=generator_sha256,
            configuration=config,
            checked=checked,
            gates=gates,
            signing_key=fingerprint(key),
            files=file_list(stage),
            utility=utility,
        )
        manifest_bytes = json_bytes(manifest)
        (stage / MANIFEST_FILE).write_bytes(manifest_bytes)
        refuse_fingerprints(stage, audit["fingerprints"])
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
        utility=utility,
    )


def read_folder_images(folder: str | os.PathLike) -> np.ndarray:
    """uint8 [N, R, R] images of a folder layout, in labels.csv order."""
    folder = Path(folder)
    with open(folder / SYNTHETIC_LABELS, newline="") as fh:
        files = [row["file"] for row in csv.DictReader(fh)]
    if not files:
        raise ReleaseError(f"{folder / SYNTHETIC_LABELS}: no images listed")
    return np.stack([np.asarray(Image.open(folder / f).convert("L")) for f in files])


def _write_synthetic(gen_path: Path, out: Path, **kwargs) -> Path:
    """Generate the synthetic set (the one hook tests replace with a copying 'generator')."""
    return generate_dataset(gen_path, out, **kwargs)


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
    closest_pairs_png(
        folder / CLOSEST_PAIRS_FILE,
        synthetic,
        train,
        mem.syn_to_train_index,
        k=min(8, len(synthetic)),
        dist=mem.syn_to_train,
    )


def _missing_ancestors(folder: Path) -> list[Path]:
    """Folders that ``mkdir(parents=True)`` would create, deepest first."""
    missing = []
    folder = folder.absolute()
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing
