"""What a release holds, and the records in it: the privacy report, the manifest, the cleaned
``generation.json``; and the last check before signing, that no file carries a fingerprint of the
private data.

What a release holds (built in a hidden staging folder beside ``out``, renamed when complete);
everything in it is the DP generator, what was generated from it, or public settings::

    synthetic/                 images/*.png, labels.csv, classes.txt, generation.json
    generator.pt               the run's G_ema checkpoint, byte for byte
    privacy_report.json        per site (ε, δ, σ, q, steps, clip, unit, accountant), what was
                               private, which gates passed (names, rules, settings), and the
                               utility: not evaluated, or only TSTR's coarse verdict category
    steward.pub                the steward's public key (OpenSSH line)
    manifest.json              SHA-256 of every other file, the configuration, each site's (ε, δ)
    manifest.sig               base64 Ed25519 signature of manifest.json's bytes

``generation.json`` keeps the generator's own SHA-256 but drops every key naming a hash from
the copied ``training`` metadata. The sites' (ε, δ) are the privacy of ``generator.pt`` and of
the synthetic images (post-processing of it) and of nothing else. Dataset sizes are treated as
public (a site's sampling rate q is its batch over its patient count). The utility category
(:mod:`.utility`) is computed on the steward's real test images, outside the DP guarantee, and
the report says so; the evaluation's figures stay with the steward.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedspine import __version__
from fedspine.fileio import (
    PRIVACY_REPORT,
    RELEASE_SYNTHETIC_DIR,
    file_sha256,
    json_text,
)
from fedspine.privacy.signing import UNSIGNED_FILES
from fedspine.release.checks import DP_SCHEME, GENERATOR_FILE, PrivacyCheck
from fedspine.release.errors import ReleaseError, ReleaseRefused
from fedspine.release.memorisation_gate import MEMORISATION_RULE, MemorisationGate
from fedspine.release.utility import UTILITY_OUTSIDE_DP, ReleaseUtility

RELEASE_FORMAT = "fedspine-release/2"
SYNTHETIC_DIR = RELEASE_SYNTHETIC_DIR
PRIVACY_REPORT_FILE = PRIVACY_REPORT
DATASET_SIZES_PUBLIC = (
    "dataset sizes are treated as public: each site's sampling rate q is its expected batch "
    "over its number of privacy units, so q and the step counts reveal them"
)
AUDITS_WITH_STEWARD = (
    "the memorisation and membership audits were computed on the real training and held-out "
    "images, outside the DP guarantee: their figures stay with the data steward, and this "
    "release says only which gates passed"
)
MECHANISM_KEYS = ("label", "kind", "noise_multiplier", "sample_rate", "steps", "clip_norm")
_HASH_KEY = re.compile(r"hash|sha\d|md5", re.IGNORECASE)
_FINGERPRINT_HEX = 16


def privacy_report(
    checked: PrivacyCheck,
    max_epsilon: float,
    gates: list[dict],
    coverage: dict[str, bool],
    warnings: list[str],
    utility: ReleaseUtility | None = None,
) -> dict:
    """``privacy_report.json``: the run's public privacy record, the release decision and the
    utility (``utility`` None: not evaluated; else its category and generator only)."""
    sites = checked.sites
    utility = utility or ReleaseUtility()
    outside = [AUDITS_WITH_STEWARD, *([UTILITY_OUTSIDE_DP] if utility.evaluated else [])]
    return {
        "format": "fedspine-release-privacy/2",
        "privacy": public_privacy(checked.privacy, sites, checked.accountant),
        "utility": utility.report_entry(),
        "release_decision": {
            "released": True,
            "max_epsilon": max_epsilon,
            "max_site_epsilon": max(s["epsilon"] for s in sites.values()),
            "sites": sites,
            "gates": gates,
            "checks": [g["name"] for g in gates],
            "audit_coverage": coverage,
            "audits": AUDITS_WITH_STEWARD,
            "outside_dp_guarantee": outside,
            "warnings": warnings,
        },
    }


def release_manifest(
    *,
    run_name: str,
    generator_sha256: str,
    configuration: dict,
    checked: PrivacyCheck,
    gates: list[dict],
    signing_key: str,
    files: list[dict],
    utility: ReleaseUtility | None = None,
) -> dict:
    """``manifest.json``: what the release is, what its (ε, δ) covers, and every file's hash.

    ``signing_key`` is the key's fingerprint; ``files`` is :func:`file_list` of the staged
    release; ``utility`` (None: not evaluated) says whether the privacy report holds a utility
    category, the one thing in it computed on private data outside the gates.
    """
    privacy = checked.privacy
    evaluated = utility is not None and utility.evaluated
    rest = (
        f"nothing else in this release is computed from private data but the utility category "
        f"of {PRIVACY_REPORT_FILE} ({UTILITY_OUTSIDE_DP})"
        if evaluated
        else "nothing else in this release is computed from private data"
    )
    return {
        "format": RELEASE_FORMAT,
        "fedspine_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run": {"name": run_name, "generator_sha256": generator_sha256},
        "configuration": configuration,
        "privacy": {
            "guarantee": (
                "each site's (epsilon, delta) below is the differential privacy of "
                f"{GENERATOR_FILE} and of the synthetic images generated from it "
                f"({SYNTHETIC_DIR}/, post-processing) for that site's patients; {rest}"
            ),
            "covers": [GENERATOR_FILE, f"{SYNTHETIC_DIR}/"],
            "accountant": checked.accountant,
            "delta": privacy.get("delta"),
            "unit": privacy.get("unit"),
            "sites": checked.sites,
            "dataset_sizes": DATASET_SIZES_PUBLIC,
        },
        "audits": {
            "held_by": "the data steward (not part of this release)",
            "statement": AUDITS_WITH_STEWARD,
            "gates_passed": [g["name"] for g in gates],
        },
        "signing_key": signing_key,
        "files": files,
    }


def json_bytes(obj: Any) -> bytes:
    """A release's JSON: sorted keys, finite numbers only (the manifest is signed as these bytes)."""
    return json_text(obj, sort_keys=True, strict=True).encode()


def write_json(path: Path, obj: Any) -> None:
    """Write :func:`json_bytes` of ``obj`` at ``path`` (inside a staged folder, or the steward's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json_bytes(obj))


def clean_generation_json(generation_json: Path, run: Path, generator_sha256: str) -> None:
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
    generation_json.write_text(json_text(info))


def _without_hashes(obj: Any) -> Any:
    """``obj`` without any dict key that names a hash (hash, sha1/sha256, md5), recursively."""
    if isinstance(obj, dict):
        return {k: _without_hashes(v) for k, v in obj.items() if not _HASH_KEY.search(str(k))}
    if isinstance(obj, list):
        return [_without_hashes(v) for v in obj]
    return obj


def public_privacy(privacy: dict, sites: dict[str, dict[str, float]], accountant: str) -> dict:
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


def release_gates(
    max_epsilon: float, gate: MemorisationGate, coverage: dict[str, bool]
) -> list[dict]:
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


def refuse_fingerprints(root: Path, fingerprints: dict[str, str]) -> None:
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


def file_list(root: Path) -> list[dict]:
    """Path, SHA-256 and size of every file under ``root`` the manifest signs, by path."""
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in UNSIGNED_FILES:
            files.append({"path": rel, "sha256": file_sha256(path), "bytes": path.stat().st_size})
    return sorted(files, key=lambda f: f["path"])
