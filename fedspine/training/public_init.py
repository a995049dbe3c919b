"""Starting a run from a checkpoint trained on data declared public (issue 15, item 1).

At a few hundred patients, DP-SGD from scratch leaves no signal (../shared/reference/
dp_utility.md); starting G, G_ema and D from a public checkpoint is what makes DP fine-tuning
useful. Public is a declaration, made where the data is known: a run trained with
``fedspine train --public-data REASON`` records it in every snapshot, and only such a run may
initialise another one. Its weights then cost no ε: they depend on no private patient. The run
that starts from it records which checkpoint (by SHA-256) and why it is public, in its
config.toml, its generator's metadata and its privacy summary (and so in the privacy report and
a release). A checkpoint trained on the very dataset the new run trains on is refused, and so is
one trained on any of its patients (a re-ingest at another resolution, another labelling, a pool
holding the site): their data is this run's private data, whatever it was declared. A public run
records digests of its patients' identifiers for that check (:func:`patient_digests`); a
checkpoint without them cannot be checked and is refused alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedspine.fileio import RUN_LATEST, file_sha256
from fedspine.training.checkpoint import CheckpointError, load_checkpoint

NETWORKS = ("G", "G_ema", "D")
PATIENT_DIGESTS = "patient_digests"
"""Key of a public run's snapshot dataset record: digests of its patients' identifiers."""
PATIENT_DIGEST_HEX = 16
"""Hex digits kept of each SHA-256: 64 bits, no chance collision among millions of patients."""


class PublicInitError(ValueError):
    """The checkpoint cannot start this run; says why and what to do."""


@dataclass(frozen=True)
class PublicInit:
    """A public checkpoint, read and checked, ready to initialise a trainer's networks."""

    path: Path
    sha256: str
    declaration: str
    dataset_content_hash: str
    network: dict[str, Any]
    weights: dict[str, dict]

    def record(self) -> dict[str, Any]:
        """What the run's config, generator metadata and privacy summary say about it."""
        return {
            "checkpoint": self.path.name,
            "checkpoint_sha256": self.sha256,
            "declared_public": self.declaration,
            "dataset_content_hash": self.dataset_content_hash,
            "epsilon": 0.0,
        }

    def component(self) -> str:
        """One line for the privacy summary's "what was private and what public"."""
        return pretraining_component(self.record())

    def check_network(self, network: dict[str, Any]) -> None:
        """Refuse a run whose network settings differ from the checkpoint's (before anything,
        a privacy reservation included, is made)."""
        mine, theirs = _comparable(network), _comparable(self.network)
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            hint = (
                " A DP run's D has no minibatch-std: pretrain with --for-dp."
                if "mbstd_group" in diff
                else " Pretrain with the same preset and resolution."
            )
            raise PublicInitError(
                f"{self.path}: its networks differ from this run's in {diff}.{hint}"
            )

    def minibatch_std_of(self, network: Any) -> Any:
        """``network`` (a NetworkConfig) with the checkpoint's minibatch-std when it has none.

        A checkpoint pretrained for DP (``--for-dp``) has no minibatch-std layer in D; a
        non-DP run fine-tuning it builds D the same way (a DP run's D has none anyway)."""
        if int(self.network.get("mbstd_group", 1)) == 0 and network.mbstd_group != 0:
            return replace(network, mbstd_group=0)
        return network

    def apply(self, trainer: Any) -> None:
        """Load the checkpoint's G, G_ema and D into ``trainer`` (optimizers, counters, ADA and
        RNGs stay the new run's own)."""
        self.check_network(trainer.config.to_dict()["network"])
        for name in NETWORKS:
            getattr(trainer, name).load_state_dict(self.weights[name])


def pretraining_component(record: dict[str, Any] | None, none: str = "none") -> str:
    """The privacy summary's "pretraining" line for a :meth:`PublicInit.record` (``none`` when
    the networks started from fresh weights); one wording for runs, DP runs and federations."""
    if not record:
        return none
    return (
        f"G, G_ema and D start from public checkpoint sha256:{record['checkpoint_sha256']} "
        f"(its data declared public: {record['declared_public']}); costs no ε"
    )


def patient_digests(patient_ids: Iterable[str]) -> list[str]:
    """Digests of patient identifiers, sorted: of each whole identifier and, for one pooled
    under a prefix (``site_1/ID``, :func:`fedspine.data.prepared.merge_prepared`), of the part
    after the last ``/`` too, so a site's patients are found in a pool of sites and back.
    Only public runs record them (the data of their patients is public)."""
    out = set()
    for pid in patient_ids:
        text = str(pid)
        for part in {text, text.rsplit("/", 1)[-1]}:
            digest = hashlib.sha256(b"fedspine-patient\0" + part.encode("utf-8")).hexdigest()
            out.add(digest[:PATIENT_DIGEST_HEX])
    return sorted(out)


def load_public_init(
    source: str | Path,
    dataset_content_hash: str,
    patient_ids: Iterable[str] | None = None,
) -> PublicInit:
    """Read ``source`` (a run folder, its latest snapshot taken, or a snapshot file) and check
    that it was trained on data declared public, not on the dataset of this run and, where
    ``patient_ids`` (this run's patients) are given, on none of its patients."""
    path = _snapshot_of(Path(source))
    try:
        data = load_checkpoint(path, kind="trainer", map_location="cpu")
    except CheckpointError as err:
        raise PublicInitError(str(err)) from None
    dataset = data.get("dataset") or {}
    declaration = dataset.get("public")
    if not declaration:
        raise PublicInitError(
            f"{path}: not trained on data declared public. Only a run trained with "
            "`fedspine train --public-data REASON` (for example on `fedspine phantom` images) "
            "may start another one without spending ε"
        )
    if dataset.get("content_hash") == dataset_content_hash:
        raise PublicInitError(
            f"{path}: trained on this very dataset; its data is this run's private data, "
            "whatever it was declared"
        )
    recorded = dataset.get(PATIENT_DIGESTS)
    if not isinstance(recorded, list):
        raise PublicInitError(
            f"{path}: its run did not record its patients (made before fedspine did), so "
            "nothing shows that none of them is among this run's; pretrain it again with this "
            "fedspine (`fedspine pretrain`, or `fedspine train --public-data`)"
        )
    if patient_ids is not None:
        shared = set(patient_digests(patient_ids)) & {str(d) for d in recorded}
        if shared:
            raise PublicInitError(
                f"{path}: trained on data of {len(shared)} patient identifier(s) of this run's "
                "dataset (the same patients, ingested or pooled another way); their data is "
                "this run's private data, whatever it was declared. Start from a checkpoint "
                "trained on other patients"
            )
    state = data["trainer"]
    return PublicInit(
        path=path,
        sha256=file_sha256(path),
        declaration=str(declaration),
        dataset_content_hash=str(dataset.get("content_hash")),
        network=dict(state["config"]["network"]),
        weights={name: state[name] for name in NETWORKS},
    )


def _snapshot_of(source: Path) -> Path:
    if source.is_dir():
        latest = source / RUN_LATEST
        if not latest.is_file():
            raise PublicInitError(f"{source}: no {RUN_LATEST}; not a training run folder")
        return source / json.loads(latest.read_text())["snapshot"]
    if not source.is_file():
        raise PublicInitError(f"{source}: no such run folder or checkpoint")
    return source


def _comparable(network: dict[str, Any]) -> dict[str, Any]:
    """Network settings that decide the weights' shapes and meaning (not how G computes)."""
    return {k: v for k, v in network.items() if k != "fused_modconv"}
