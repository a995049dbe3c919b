"""The public checkpoint of a reproduction (``fedspine reproduce --public-run RUN``, issue 15).

The public arms (the checkpoint's own generator, DP-SGD from it with few privatised D
parameters, the DP mean-embedding route fitted from it) start from a run trained on data
declared public, for example by ``fedspine pretrain``. It is read and checked by the training
library's public-init loader (:func:`fedspine.training.public_init.load_public_init`) twice:
when the plan is made (declared public, a finished run; before anything is written) and once
the data is prepared (not trained on this very dataset, the same file as planned, networks of
this budget's resolution and classes), before any arm trains. Its SHA-256 and declaration go
into the plan file and ``reproduce.json``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedspine.experiments.budgets import ReproduceBudget, ReproduceError
from fedspine.fileio import RUN_GENERATOR, RUN_LATEST
from fedspine.training.public_init import PublicInitError, load_public_init

PRETRAIN_RUN_DIR = "run"
"""`fedspine pretrain OUT` trains in OUT/run; ``--public-run OUT`` is taken to mean it."""


@dataclass(frozen=True)
class PublicRun:
    """A public run folder as checked: its latest snapshot, hash, declaration and network."""

    path: Path
    checkpoint: str
    """The snapshot, relative to ``path``."""
    sha256: str
    declaration: str
    dataset_content_hash: str
    resolution: int
    classes: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "epsilon": 0.0}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> PublicRun:
        return cls(
            path=Path(values["path"]),
            checkpoint=values["checkpoint"],
            sha256=values["sha256"],
            declaration=values["declaration"],
            dataset_content_hash=values.get("dataset_content_hash", ""),
            resolution=int(values["resolution"]),
            classes=int(values["classes"]),
        )

    @property
    def short(self) -> str:
        """``sha256:0123456789ab`` for the plan and the table."""
        return f"sha256:{self.sha256[:12]}"


def read_public_run(path: str | os.PathLike) -> PublicRun:
    """Check ``path`` (a run folder trained with ``--public-data``, or `fedspine pretrain`'s
    OUT) and describe it; :class:`ReproduceError` when it is not a finished public run."""
    run = Path(path).resolve()  # the arms' commands name it from OUT, not from here
    if not (run / RUN_LATEST).is_file() and (run / PRETRAIN_RUN_DIR / RUN_LATEST).is_file():
        run = run / PRETRAIN_RUN_DIR
    try:
        public = load_public_init(run, "")
    except PublicInitError as err:
        raise ReproduceError(f"--public-run: {err}") from None
    if not (run / RUN_GENERATOR).is_file():
        raise ReproduceError(
            f"--public-run {run}: no {RUN_GENERATOR}; the public run has not finished (rerun "
            "its training to the end)"
        )
    return PublicRun(
        path=run,
        checkpoint=public.path.relative_to(run).as_posix(),
        sha256=public.sha256,
        declaration=public.declaration,
        dataset_content_hash=public.dataset_content_hash,
        resolution=int(public.network["resolution"]),
        classes=int(public.network["c_dim"]),
    )


def check_public_run(
    public: PublicRun,
    budget: ReproduceBudget,
    content_hash: str,
    num_classes: int,
    patient_ids: Sequence[str] | None = None,
) -> None:
    """Before any arm trains: the checkpoint was not trained on this very dataset or on any of
    its ``patient_ids`` (the loader's own refusals), is the file the plan recorded, and fits this
    budget's networks."""
    try:
        again = load_public_init(public.path / public.checkpoint, content_hash, patient_ids)
    except PublicInitError as err:
        raise ReproduceError(f"--public-run: {err}") from None
    if again.sha256 != public.sha256:
        raise ReproduceError(
            f"--public-run {public.path}: {public.checkpoint} changed since the plan was made "
            f"(sha256 {again.sha256[:12]}, planned {public.sha256[:12]}); rerun"
        )
    if public.resolution != budget.resolution:
        raise ReproduceError(
            f"--public-run {public.path}: trained at {public.resolution} px, the {budget.name} "
            f"budget trains at {budget.resolution} px; pretrain at {budget.resolution} px"
        )
    if public.classes != num_classes:
        raise ReproduceError(
            f"--public-run {public.path}: its networks have {public.classes} classes, the "
            f"abnormality task {num_classes}"
        )
