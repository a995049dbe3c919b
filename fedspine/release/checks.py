"""Gates 1 to 5 of a release (listed in :mod:`fedspine.release.gate`): the run's privacy summary
and its generator checkpoint, checked before anything is generated.

``privacy.json`` must show a complete ledger for every site, a run private throughout and each
site's ε within the cap, recomputed from the mechanisms it lists; ``generator.pt`` must hold
G_ema and nothing else, and be the very generator ``privacy.json`` was written for.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedspine.fileio import PRIVACY_SUMMARY, RUN_GENERATOR, file_sha256
from fedspine.models import Generator, NetworkConfig
from fedspine.privacy.accounting import (
    ACCOUNTANTS,
    Mechanism,
    PrivacyAccountingError,
    default_delta,
    epsilon,
)
from fedspine.release.errors import ReleaseError, ReleaseRefused
from fedspine.training.checkpoint import CheckpointError, load_checkpoint

PRIVACY_FILE = PRIVACY_SUMMARY
PRIVACY_FORMAT = "fedspine-privacy/1"
EPSILON_RTOL = 0.01
GENERATOR_FILE = RUN_GENERATOR
DP_SCHEME = "dpsgd"
GENERATOR_KEYS = frozenset(
    {"fedspine_checkpoint", "format_version", "fedspine_version", "network", "class_names"}
    | {"G_ema", "training"}
)


@dataclass
class PrivacyCheck:
    """A run's privacy summary that passed the ledger gates, and each site's (ε, δ)."""

    privacy: dict
    sites: dict[str, dict[str, float]]
    accountant: str
    warnings: list[str]


def check_privacy(run: str | os.PathLike, max_epsilon: float) -> PrivacyCheck:
    """The run's privacy summary, if it passes every ledger gate; else :class:`ReleaseRefused`.

    Each site's ε is recomputed from its listed mechanisms with the stated accountant: a stated
    ε below the recomputed one (by more than 1 %) is refused, and the cap applies to the larger
    of the two. All ledger, privacy and cap failures are reported together, joined by "; ".
    """
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
        or not is_number(site.get("epsilon"))
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
    actual = file_sha256(path)
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


def is_number(value: Any) -> bool:
    """A real number: not a bool, not NaN (infinities pass; the gates compare them)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _recompute_epsilon(
    mechanisms: list, delta: float, accountant: str
) -> tuple[float | None, str | None]:
    """(ε of the listed mechanisms composed, None) or (None, why it could not be computed)."""
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
    return is_number(value) and 0 < value < 1


def _tensor_paths(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every tensor inside nested dicts / lists of a checkpoint."""
    if isinstance(obj, torch.Tensor):
        return [prefix.rstrip(".")]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _tensor_paths(v, f"{prefix}{k}.")]
    if isinstance(obj, list | tuple):
        return [p for i, v in enumerate(obj) for p in _tensor_paths(v, f"{prefix}{i}.")]
    return []
