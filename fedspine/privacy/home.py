"""A site's privacy home: the one place that holds its privacy ledger and its patient key.

The ledger must follow patients, not folders: a re-ingest with another seed, resolution, fit or
split, a merge, or a copy of the prepared folder holds the same people and must hit the same
spend. So the home lives outside every prepared folder (``--privacy-home``, else the
``FEDSPINE_PRIVACY_HOME`` environment variable, else ``~/.local/share/fedspine/privacy``, or
``$XDG_DATA_HOME/fedspine/privacy``), and the ledger names patients by keyed hashes:
HMAC-SHA256 of the patient identifier under a per-site secret key (``site.key``, 0600, made on
first use). The identifier is what ingest recorded as the privacy unit (the folder layout's
``patient_id``, VinDr's ``study_id``, or the image's path for ``--privacy-unit image``), so it
survives every re-preparation of the same source. Without the key the ledger identifies no one;
two sources that reuse the same identifier for different people share a budget, which can only
over-count.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fedspine.fileio import PRIVACY_LEDGER, PRIVACY_SITE_KEY, write_text_atomic
from fedspine.privacy.ledger import PrivacyLedger

ENV_VAR = "FEDSPINE_PRIVACY_HOME"
KEY_FILE = PRIVACY_SITE_KEY
LEDGER_FILE = PRIVACY_LEDGER
INIT_LOCK = ".home.lock"
KEY_BYTES = 32
PATIENT_KEY_HEX = 32
"""Hex digits kept of each patient's HMAC: 128 bits, collisions only ever over-count."""
_DOMAIN = b"fedspine-privacy-unit\x00"


class PrivacyHomeError(RuntimeError):
    """The privacy home cannot be used; the message names the path and what to do."""


def default_home() -> Path:
    """Where a site's privacy home is when neither the option nor the variable says."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fedspine" / "privacy"


def resolve_home(path: str | os.PathLike | None = None) -> Path:
    """The option if given, else ``$FEDSPINE_PRIVACY_HOME``, else :func:`default_home`."""
    if path is not None and str(path):
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else default_home()


class PrivacyHome:
    """The folder with ``ledger.json`` and ``site.key``; both made on first use."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = resolve_home(path)
        if self.path.exists() and not self.path.is_dir():
            raise PrivacyHomeError(
                f"privacy home {self.path} is a file, not a folder; pass --privacy-home DIR "
                f"(or set {ENV_VAR}) to the site's privacy folder"
            )
        self._key: bytes | None = None

    @property
    def ledger_path(self) -> Path:
        return self.path / LEDGER_FILE

    @property
    def key_path(self) -> Path:
        return self.path / KEY_FILE

    def ledger(self) -> PrivacyLedger:
        """The site's :class:`~fedspine.privacy.ledger.PrivacyLedger` (created if absent)."""
        self._site_key()  # makes (or checks) the key and the ledger together
        return PrivacyLedger.open(self.ledger_path, create=False)

    def patient_keys(self, identifiers: Iterable[str]) -> list[str]:
        """The keyed hash of each distinct identifier, sorted (the ledger's names for them)."""
        key = self._site_key()
        unique = sorted({str(i) for i in identifiers})
        return sorted(
            hmac.new(key, _DOMAIN + i.encode("utf-8"), hashlib.sha256).hexdigest()[:PATIENT_KEY_HEX]
            for i in unique
        )

    def keys_of(self, patient_ids: np.ndarray | Iterable[str]) -> list[str]:
        """:meth:`patient_keys` of an array of per-image patient identifiers."""
        return self.patient_keys(np.asarray(list(patient_ids)).astype(str).tolist())

    def _site_key(self) -> bytes:
        """The key, made with an empty ledger on first use. Under a lock, so two processes
        starting at once agree; and the pair is checked, so neither file can be lost silently:
        a key without its ledger, or a ledger with records without its key, is an error."""
        if self._key is None:
            self._ensure_folder()
            with _locked(self.path / INIT_LOCK):
                if self.key_path.exists():
                    if not self.ledger_path.exists():
                        raise PrivacyHomeError(
                            f"{self.ledger_path} is missing beside {self.key_path}: the budget "
                            "already spent would be forgotten. Restore the ledger from a "
                            "backup; only if this site never trained with DP, delete the key"
                        )
                    self._key = _read_key(self.key_path)
                else:
                    ledger = PrivacyLedger.open(self.ledger_path, create=True)
                    if ledger.records():
                        raise PrivacyHomeError(
                            f"{self.key_path} is missing but {self.ledger_path} holds records: "
                            "they name patients under that key, so a new one would forget the "
                            "budget already spent. Restore the key from a backup"
                        )
                    self._key = _create_key(self.key_path)
        return self._key

    def _ensure_folder(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as error:
            raise PrivacyHomeError(
                f"privacy home {self.path}: cannot create it ({error}); pass --privacy-home DIR "
                f"(or set {ENV_VAR}) to a folder the site's process can write"
            ) from error

    def __repr__(self) -> str:
        return f"PrivacyHome({str(self.path)!r})"


def _read_key(path: Path) -> bytes:
    text = path.read_text(encoding="ascii").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise PrivacyHomeError(
            f"{path}: not a fedspine site key ({KEY_BYTES} bytes in hex). It names every patient "
            "in the ledger beside it: restore it from a backup; a new key would forget the "
            "budget already spent"
        )
    return key


def _create_key(path: Path) -> bytes:
    """Write a new key whole (0600 before any byte, fsynced) and rename it into place; the
    caller holds the lock."""
    key = secrets.token_bytes(KEY_BYTES)
    write_text_atomic(path, key.hex() + "\n", durable=True, mode=0o600)
    return key


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
