"""Is a received Flower app bundle (FAB) the fedspine app this site has installed? (issue 13, item 2)

A FAB is a zip of the app's files. The site reads it as data only (never extracts or imports it)
and compares its identity with the bundle shipped in the installed fedspine
(``fedspine/federated/bundle``), built into a FAB by Flower's own builder so that both sides
apply the same file filters:

- every file's SHA-256, by path (the set of paths must match too: an extra module is foreign);
- ``pyproject.toml`` by its parsed content, since Flower re-serialises it when it builds a FAB
  (comments dropped), so the app's components, name, version and defaults all count;
- the app's name and version, which the refusal reason names.

Flower's own ``.info/CONTENT`` manifest is left out: it only restates the file hashes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tomllib
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

FAB_MANIFEST = ".info/CONTENT"
PYPROJECT = "pyproject.toml"
# A genuine bundle is a few kB; Flower caps a FAB at 10 MB. Refuse anything that would make the
# check itself expensive (a zip bomb) before reading it.
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_TOTAL_BYTES = 16 * 1024 * 1024


class ForeignBundle(Exception):
    """The received app bundle is not the fedspine app installed at this site."""


@dataclass(frozen=True)
class BundleIdentity:
    """What a FAB is: its app id and version, and the content digest of its files."""

    app_id: str
    version: str
    files: dict[str, str]

    @property
    def digest(self) -> str:
        lines = "".join(f"{path}\t{sha}\n" for path, sha in sorted(self.files.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

    def describe(self) -> str:
        return f"{self.app_id} {self.version} (content {self.digest[:12]})"


def installed_bundle_dir() -> Path:
    """The app bundle shipped with this fedspine (what `fedspine server run` submits)."""
    return Path(str(resources.files("fedspine.federated") / "bundle"))


def installed_identity(bundle: Path | None = None) -> BundleIdentity:
    """The identity of the installed bundle, as Flower's builder (that of `flwr run`) packs it."""
    # flwr's CLI modules pull in typer and rich: only the worker and tests need them.
    from flwr.cli.build import build_fab_from_disk

    return fab_identity(build_fab_from_disk(bundle or installed_bundle_dir()))


def fab_identity(fab: bytes) -> BundleIdentity:
    """Read a FAB's identity from its bytes, as data: nothing in it is extracted or run."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except (zipfile.BadZipFile, ValueError) as err:
        raise ForeignBundle(f"the app bundle is not a readable FAB ({err})") from None
    files: dict[str, str] = {}
    pyproject: dict | None = None
    total = 0
    with archive:
        for info in archive.infolist():
            name = info.filename
            if name == FAB_MANIFEST:
                continue
            total += info.file_size
            if info.file_size > MAX_FILE_BYTES or total > MAX_TOTAL_BYTES:
                raise ForeignBundle(f"the app bundle is too large to be fedspine's ({name})")
            try:
                data = archive.read(info)
            except (zipfile.BadZipFile, OSError, ValueError, RuntimeError) as err:
                raise ForeignBundle(
                    f"the app bundle has an unreadable file {name} ({err})"
                ) from None
            if name == PYPROJECT:
                pyproject = _parse_pyproject(data)
                data = json.dumps(pyproject, sort_keys=True, separators=(",", ":")).encode()
            files[name] = hashlib.sha256(data).hexdigest()
    if pyproject is None:
        raise ForeignBundle("the app bundle has no pyproject.toml")
    project = pyproject.get("project", {})
    publisher = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("publisher", "?")
    return BundleIdentity(
        app_id=f"{publisher}/{project.get('name', '?')}",
        version=str(project.get("version", "?")),
        files=files,
    )


def check_fab(fab: bytes, expected: BundleIdentity) -> BundleIdentity:
    """Return the FAB's identity if it is the installed bundle; raise :class:`ForeignBundle`
    with the differences otherwise."""
    received = fab_identity(fab)
    if received.digest == expected.digest:
        return received
    changed = sorted(
        p
        for p in expected.files.keys() & received.files.keys()
        if expected.files[p] != received.files[p]
    )
    extra = sorted(received.files.keys() - expected.files.keys())
    missing = sorted(expected.files.keys() - received.files.keys())
    parts = []
    if received.version != expected.version or received.app_id != expected.app_id:
        parts.append(f"app {received.app_id} {received.version}")
    for label, paths in (("changed", changed), ("extra", extra), ("missing", missing)):
        if paths:
            parts.append(f"{label}: {', '.join(paths[:8])}" + (" …" if len(paths) > 8 else ""))
    raise ForeignBundle(
        f"app bundle {received.describe()} is not the fedspine app installed at this site "
        f"({expected.describe()}); " + "; ".join(parts)
    )


def _parse_pyproject(data: bytes) -> dict:
    try:
        config = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ForeignBundle(f"the app bundle's pyproject.toml does not parse ({err})") from None
    # Flower drops this table when it builds a FAB; it names SuperLinks, not app content.
    config.get("tool", {}).get("flwr", {}).pop("federations", None)
    return config
