"""Ed25519 keys for the data steward, and verification of a signed release.

A release folder carries ``manifest.json`` (the SHA-256 of every other file), ``manifest.sig``
and ``steward.pub``. ``manifest.sig`` is the base64 (standard alphabet, padded) encoding of the
64-byte Ed25519 signature over the exact bytes of ``manifest.json``, followed by a newline.
Keys are files: the private key is PEM PKCS#8 (unencrypted, mode 0600); the public key is one
OpenSSH line (``ssh-ed25519 AAAA… comment``), and PEM public keys are read as well. A key's
fingerprint is OpenSSH's (``SHA256:`` + unpadded base64 of the SHA-256 of the key blob), so
``ssh-keygen -lf steward.key.pub`` prints the same one.

Checking a release against the ``steward.pub`` it ships proves only that the files are intact:
whoever altered them could have replaced the key too. Origin needs the steward's key obtained
some other way (``verify_release(..., public_key=...)``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedspine.fileio import (
    RELEASE_MANIFEST,
    RELEASE_PUBLIC_KEY,
    RELEASE_SIGNATURE,
    file_sha256,
)

MANIFEST_FILE = RELEASE_MANIFEST
SIGNATURE_FILE = RELEASE_SIGNATURE
PUBLIC_KEY_FILE = RELEASE_PUBLIC_KEY
KEY_COMMENT = "fedspine-steward"
UNSIGNED_FILES = (MANIFEST_FILE, SIGNATURE_FILE)


class SigningError(Exception):
    """A key file is missing, unreadable, of the wrong type, or would be overwritten."""


@dataclass
class VerifyResult:
    """The outcome of :func:`verify_release`; ``problems`` name the file each one is about."""

    ok: bool
    problems: list[str]
    files: int = 0
    fingerprint: str | None = None
    key_source: str = ""
    notes: list[str] = field(default_factory=list)


def make_signing_key(path: str | os.PathLike) -> tuple[Path, Path]:
    """Create an Ed25519 key pair at ``path`` (private, 0600) and ``path.pub`` (OpenSSH line).

    Never overwrites: an existing private or public key file is an error, since replacing a
    steward's key would orphan every release signed with it.
    """
    private_path = Path(path)
    public_path = public_key_path(private_path)
    for existing in (private_path, public_path):
        if existing.exists() or existing.is_symlink():
            raise SigningError(
                f"{existing} already exists; a signing key is never overwritten "
                "(choose another --out, or remove the old key yourself if it is truly unused)"
            )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        public_path.write_bytes(public_key_line(key.public_key()))
    except BaseException:
        private_path.unlink(missing_ok=True)
        public_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def public_key_path(private_path: str | os.PathLike) -> Path:
    """Where :func:`make_signing_key` puts the public half: the private path plus ``.pub``."""
    private_path = Path(private_path)
    return private_path.with_name(private_path.name + ".pub")


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file (PKCS#8, unencrypted)."""
    path = Path(path)
    if not path.is_file():
        raise SigningError(
            f"{path}: no such signing key (create one with `fedspine release keygen --out {path}`)"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: a {type(key).__name__}, but release keys are Ed25519")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """The Ed25519 public key in a file: an OpenSSH line or PEM SubjectPublicKeyInfo."""
    path = Path(path)
    if not path.is_file():
        raise SigningError(f"{path}: no such public key file")
    return _parse_public_key(path.read_bytes(), str(path))


def public_key_line(key: Ed25519PublicKey) -> bytes:
    """The OpenSSH one-line form of ``key``, with the fedspine comment and a newline."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" {KEY_COMMENT}\n".encode()


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """OpenSSH's SHA256 fingerprint of the (public half of the) key."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def sign(data: bytes, key: Ed25519PrivateKey | str | os.PathLike) -> bytes:
    """The raw 64-byte Ed25519 signature of ``data``."""
    if not isinstance(key, Ed25519PrivateKey):
        key = load_private_key(key)
    return key.sign(data)


def encode_signature(signature: bytes) -> bytes:
    """The ``manifest.sig`` file content for a raw signature."""
    return base64.b64encode(signature) + b"\n"


sha256_file = file_sha256
"""Hex SHA-256 of a file's bytes (one implementation, in fedspine.fileio)."""


def verify_release(
    release_dir: str | os.PathLike,
    public_key: Ed25519PublicKey | str | os.PathLike | None = None,
) -> VerifyResult:
    """Check a release: its signature, and every file against the signed manifest.

    Each problem names its file: MISSING (listed, not on disk), ADDED (on disk, not listed;
    manifest.json and manifest.sig excepted), ALTERED (SHA-256 differs), plus a signature that
    does not verify. Without ``public_key`` the release's own steward.pub is used and a note says
    that this proves integrity, not origin.
    """
    root = Path(release_dir)
    problems: list[str] = []
    notes: list[str] = []
    if not root.is_dir():
        return VerifyResult(False, [f"{root}: no such release folder"])
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        return VerifyResult(False, [f"MISSING: {MANIFEST_FILE} (every release has one)"])
    manifest_bytes = manifest_path.read_bytes()

    key, key_name, key_source, key_problem = _verification_key(root, public_key)
    if key_source == "release":
        notes.append(
            f"checked with the key shipped inside the release ({PUBLIC_KEY_FILE}): this proves "
            "the files are intact, not who made them; pass the steward's public key to check origin"
        )
    if key_problem:
        problems.append(key_problem)
    signature = _read_signature(root / SIGNATURE_FILE, problems)
    if key is not None and signature is not None:
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            problems.append(f"{SIGNATURE_FILE}: signature does not verify with {key_name}")

    listed = _listed_files(manifest_bytes, problems)
    on_disk, links = _files_on_disk(root)
    problems += [f"LINK: {rel} (a release holds plain files only)" for rel in links]
    for rel in sorted(set(listed) - on_disk):
        problems.append(f"MISSING: {rel} (listed in {MANIFEST_FILE}, not on disk)")
    for rel in sorted(on_disk - set(listed) - set(UNSIGNED_FILES)):
        problems.append(f"ADDED: {rel} (on disk, not in {MANIFEST_FILE})")
    for rel in sorted(set(listed) & on_disk):
        if sha256_file(root / rel) != listed[rel]:
            problems.append(f"ALTERED: {rel} (SHA-256 differs from {MANIFEST_FILE})")
    return VerifyResult(
        ok=not problems,
        problems=problems,
        files=len(listed),
        fingerprint=fingerprint(key) if key is not None else None,
        key_source=key_source,
        notes=notes,
    )


def _verification_key(
    root: Path, public_key: Ed25519PublicKey | str | os.PathLike | None
) -> tuple[Ed25519PublicKey | None, str, str, str | None]:
    """(key, how to name it, where it came from, problem or None)."""
    if isinstance(public_key, Ed25519PublicKey):
        return public_key, f"key {fingerprint(public_key)}", "given", None
    if public_key is not None:
        try:
            key = load_public_key(public_key)
        except SigningError as err:
            return None, str(public_key), "given", str(err)
        return key, f"{public_key} ({fingerprint(key)})", "given", None
    shipped = root / PUBLIC_KEY_FILE
    if not shipped.is_file():
        return (
            None,
            PUBLIC_KEY_FILE,
            "release",
            (
                f"MISSING: {PUBLIC_KEY_FILE} (no key shipped in the release; pass the steward's "
                "public key)"
            ),
        )
    try:
        key = _parse_public_key(shipped.read_bytes(), PUBLIC_KEY_FILE)
    except SigningError as err:
        return None, PUBLIC_KEY_FILE, "release", str(err)
    return key, f"{PUBLIC_KEY_FILE} ({fingerprint(key)})", "release", None


def _parse_public_key(data: bytes, name: str) -> Ed25519PublicKey:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, IndexError) as err:
        raise SigningError(f"{name}: not an OpenSSH or PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{name}: a {type(key).__name__}, but release keys are Ed25519")
    return key


def _read_signature(path: Path, problems: list[str]) -> bytes | None:
    if not path.is_file():
        problems.append(f"MISSING: {SIGNATURE_FILE} (the release is not signed)")
        return None
    try:
        signature = base64.b64decode(path.read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError):
        problems.append(f"ALTERED: {SIGNATURE_FILE} (not base64)")
        return None
    if len(signature) != 64:
        problems.append(f"ALTERED: {SIGNATURE_FILE} ({len(signature)} bytes, Ed25519 has 64)")
        return None
    return signature


def _listed_files(manifest_bytes: bytes, problems: list[str]) -> dict[str, str]:
    """``{relative path: sha256}`` from the manifest; unsafe or malformed entries are problems."""
    try:
        entries = json.loads(manifest_bytes)["files"]
        listed = {str(e["path"]): str(e["sha256"]) for e in entries}
    except (ValueError, KeyError, TypeError):
        problems.append(f"ALTERED: {MANIFEST_FILE} (not a fedspine release manifest)")
        return {}
    safe = {}
    for rel, digest in listed.items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
            problems.append(f"ALTERED: {MANIFEST_FILE} (lists an unsafe path {rel!r})")
        else:
            safe[rel] = digest
    return safe


def _files_on_disk(root: Path) -> tuple[set[str], list[str]]:
    """Relative POSIX paths of the regular files under ``root``, and of any symbolic links."""
    files: set[str] = set()
    links: list[str] = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        base = Path(folder)
        for name in sorted(dirs):
            if (base / name).is_symlink():
                links.append((base / name).relative_to(root).as_posix())
        for name in names:
            path = base / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                links.append(rel)
            else:
                files.add(rel)
    return files, sorted(links)
