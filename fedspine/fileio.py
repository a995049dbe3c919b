"""Writing outputs so that nothing is ever half-written: stage beside the target, then rename."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


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
