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
        # mkstemp makes the staging file 0600; without a ``mode`` the result gets what a plain
        # write would (0666 less the umask), so switching a writer to this changes no permission.
        os.fchmod(fd, _default_mode() if mode is None else mode)
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


def _default_mode() -> int:
    """0666 less the process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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


# A TRTR cache folder (``evaluate(..., trtr_cache=DIR)``): its record is EVAL_TRTR.
EVAL_TRTR_SCORES = "p_test.npy"

# An evaluation folder, continued: the settings and the per-class image grid.
EVAL_CONFIG = "config.json"
EVAL_SAMPLES = "samples.png"

# A prepared dataset folder (``fedspine ingest``).
PREPARED_IMAGES = "images.npy"
PREPARED_INDEX = "index.csv"
PREPARED_REJECTED = "rejected.csv"
PREPARED_MANIFEST = "manifest.json"
PREPARED_LEDGER_V1 = "privacy_ledger.json"  # a version-1 ledger, read once to import it

# A folder source (images with ``labels.csv``; ``fedspine generate`` writes this layout too).
FOLDER_LABELS = "labels.csv"
FOLDER_CLASSES = "classes.txt"

# A phantom site (``fedspine phantom``).
PHANTOM_SITE = "phantom_site.json"

# A site's privacy home: the ledger is PRIVACY_LEDGER, beside the key that names its patients.
PRIVACY_SITE_KEY = "site.key"

# A signed release (``fedspine release``): also RUN_GENERATOR and PRIVACY_REPORT.
RELEASE_SYNTHETIC_DIR = "synthetic"
RELEASE_MANIFEST = "manifest.json"
RELEASE_SIGNATURE = "manifest.sig"
RELEASE_PUBLIC_KEY = "steward.pub"

# The steward's private audit folder of a release (``--audit-dir``), never published.
STEWARD_MEMORISATION = "memorisation.json"
STEWARD_MEMBERSHIP = "membership.json"
STEWARD_CLOSEST_PAIRS = "closest_pairs.png"

# A training run folder, continued: the settings as TOML (``training.config.read_config_toml``).
RUN_CONFIG_TOML = "config.toml"

# A demo folder (``fedspine demo``): also EVAL_REPORT_HTML, the one page with every result.
DEMO_CONFIG = "demo_config.json"
DEMO_SUMMARY = "demo_summary.json"

# A site's local state of one federation (beside RUN_TRAINER_STATE): the classifier phase's.
SITE_CLASSIFIER_STATE = "classifier_state.pt"

# A site's work folder (``fedspine client``) and the coordinator's (``fedspine server``).
SITE_LAST_ROUND = "last_round.json"  # in the site's state folder: its view of its last round
SERVER_SITES = "sites.json"  # registered sites: node id, name, key fingerprint
