"""Every file name fedspine writes, and the only way it writes them: whole or not at all.

One module owns both so that a reader and a writer can never disagree on a name, and so that no
output is ever half-written: each write stages a temporary file beside the target (same folder,
so the rename cannot cross file systems) and renames it into place. Readers therefore see the old
file or the new one, never a mix, and a crash leaves at most a hidden ``.NAME.*`` staging file.

This module sits below every layer (it imports nothing from fedspine), so data, training,
privacy, evaluation, release, federation and the CLI all share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# A training run folder (``fedspine train --out RUN``).
RUN_GENERATOR = "generator.pt"
RUN_TRAINER_STATE = "trainer.pt"
RUN_LATEST = "latest.json"
RUN_METRICS = "metrics.jsonl"
RUN_CONFIG = "config.json"
RUN_ABLATION = "ablation.json"
RUN_TRAINING_PLOT = "training.png"
RUN_SAMPLES = "samples.png"
RUN_REALS = "reals.png"

# Privacy: the run's summary, the site's ledger and the release's report.
PRIVACY_SUMMARY = "privacy.json"
PRIVACY_LEDGER = "ledger.json"
PRIVACY_REPORT = "privacy_report.json"
PRIVACY_REPORT_PLOT = "privacy_report.png"

# A generated synthetic dataset (``fedspine generate``).
SYNTHETIC_GENERATION = "generation.json"
SYNTHETIC_LABELS = "labels.csv"
SYNTHETIC_MANIFEST = "manifest.json"

# A classifier folder (``fedspine classifier train``).
CLASSIFIER_WEIGHTS = "classifier.pt"

# An evaluation folder (``fedspine evaluate``).
EVAL_REPORT_JSON = "report.json"
EVAL_REPORT_MD = "report.md"
EVAL_REPORT_HTML = "report.html"
EVAL_TRTR = "trtr.json"
EVAL_MEMORISATION = "memorisation.json"
EVAL_MEMBERSHIP = "membership.json"
EVAL_CANARY_AUDIT = "canary_audit.json"
EVAL_CLOSEST_PAIRS = "closest_pairs.png"
EVAL_ROC = "roc.png"
EVAL_DOMAIN_EXTRACTOR = "domain_extractor.pt"

# A reproduction folder (``fedspine reproduce``).
REPRODUCE_JSON = "reproduce.json"
REPRODUCE_MD = "reproduce.md"
REPRODUCE_PLAN = "reproduce_plan.json"
REPRODUCE_ARM = "arm.json"

# A federation folder (``fedspine server``/``client``).
FEDERATION_STATUS = "federation.json"
FEDERATION_CONFIG = "federation_config.json"
FEDERATION_ROUNDS = "rounds.jsonl"


def json_text(obj: Any, *, sort_keys: bool = False, strict: bool = False) -> str:
    """JSON as fedspine writes it: indented, newline-terminated; ``strict`` refuses NaN/inf."""
    return json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=not strict) + "\n"


def write_atomic(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], None],
    *,
    durable: bool = False,
    mode: int | None = None,
) -> Path:
    """Write ``path`` through ``write(handle)`` on a staged file, then rename it into place.

    ``durable`` fsyncs before the rename (ledgers, checkpoints: what a crash must not lose);
    ``mode`` sets permissions before any byte is written (0o600 for keys and trainer state).
    A failure removes the staged file and leaves the target as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, **options: Any) -> Path:
    """Write ``data`` to ``path`` whole or not at all (see :func:`write_atomic`)."""
    return write_atomic(path, lambda handle: handle.write(data), **options)


def write_text_atomic(path: str | os.PathLike, text: str, **options: Any) -> Path:
    """Write UTF-8 ``text`` to ``path`` whole or not at all (see :func:`write_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"), **options)


def write_json_atomic(
    path: str | os.PathLike,
    obj: Any,
    *,
    sort_keys: bool = False,
    strict: bool = False,
    **options: Any,
) -> Path:
    """Write ``obj`` as indented JSON whole or not at all; ``strict`` refuses NaN and inf."""
    return write_text_atomic(path, json_text(obj, sort_keys=sort_keys, strict=strict), **options)


def save_png_atomic(image: Any, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG whole or not at all."""
    return write_atomic(path, lambda handle: image.save(handle, format="PNG"))


def publish_folder(staged: Path, out: Path) -> None:
    """Move a completely written ``staged`` folder to ``out``, replacing any folder there.

    Both renames happen within one parent folder, so readers see the old folder or the new one,
    never a mix; the replaced folder is removed afterwards.
    """
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(staged, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, out)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
