"""Checkpoints that hold tensors and plain metadata only, written atomically, loaded safely.

A checkpoint may come from another site or a download: it is loaded with
``torch.load(weights_only=True)`` only, which refuses anything but tensors and plain Python
types, so a crafted file cannot run code. Writes go to a temporary file in the target folder and
are renamed into place, so an interrupted save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedspine import __version__

FORMAT_VERSION = 1
KINDS = ("trainer", "generator")


class CheckpointError(Exception):
    """A checkpoint is missing, unsafe, of the wrong kind or of an unknown format."""


def save_checkpoint(path: str | os.PathLike, kind: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors and plain types) with a fedspine header, atomically."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "fedspine_checkpoint": kind,
        "format_version": FORMAT_VERSION,
        "fedspine_version": __version__,
        **payload,
    }
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike, kind: str | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; check its header and (optionally) its kind."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain Python types, "
            f"which could run code when unpickled ({reason}). "
            "Only load checkpoints written by fedspine."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(data, dict) or data.get("fedspine_checkpoint") not in KINDS:
        raise CheckpointError(f"{path}: not a fedspine checkpoint (no fedspine header)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is not the supported format {FORMAT_VERSION}; "
            "use the fedspine version that wrote it"
        )
    if kind is not None and data["fedspine_checkpoint"] != kind:
        raise CheckpointError(
            f"{path}: a {data['fedspine_checkpoint']} checkpoint, but a {kind} checkpoint is needed"
        )
    return data


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, shapes, dtypes and values (weights held in memory)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
