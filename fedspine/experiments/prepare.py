"""The prepared data every arm trains on, and the context the arms run in.

ROOT is ingested twice (abnormality, lesion type) into ``OUT/data``; a prepared folder already
there is reused, so a rerun does not decode the DICOMs again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedspine.data.ingest import IngestConfig, ingest
from fedspine.data.prepared import PreparedDataset, load_prepared, write_prepared
from fedspine.data.sources import SourceLayoutError
from fedspine.experiments.budgets import ReproduceError
from fedspine.experiments.plan import DATA_DIR, ReproducePlan
from fedspine.fileio import PREPARED_MANIFEST

Stage = Callable[[str], None]


@dataclass
class RunContext:
    """A reproduction in progress: its plan, where progress lines go, and its prepared data.

    ``data`` maps a label schema to its prepared folder; ``data_info`` describes each schema
    (counts, rejections, dropped classes) or says why it has no data (``not_run``).
    """

    plan: ReproducePlan
    stage: Stage
    data: dict[str, Path] = field(default_factory=dict)
    data_info: dict[str, dict[str, Any]] = field(default_factory=dict)


def prepare_data(ctx: RunContext) -> None:
    """Ingest ROOT twice (abnormality, lesion) unless the prepared folder is already there."""
    plan, b = ctx.plan, ctx.plan.budget
    needed = ["abnormality"]
    if any(a.data == "lesion" and not a.not_run for a in plan.arms):
        needed.append("lesion")
    for schema in needed:
        target = plan.out / DATA_DIR / schema
        if (target / PREPARED_MANIFEST).is_file():
            ctx.stage(f"data/{schema}: prepared earlier, reused")
        else:
            ctx.stage(f"data/{schema}: ingesting {plan.root} at {b.resolution} px")
            t0 = time.perf_counter()
            try:
                ingest(
                    plan.root,
                    target,
                    IngestConfig(
                        resolution=b.resolution,
                        labels=schema,
                        label_rule="correct",
                        seed=b.seed,
                        workers=b.ingest_workers,
                    ),
                )
            except SourceLayoutError as err:
                if schema == "abnormality":
                    raise ReproduceError(f"ingest of {plan.root}: {err}") from None
                ctx.data_info[schema] = {"not_run": f"not run: lesion ingest failed: {err}"}
                ctx.stage(f"data/{schema}: {err}")
                continue
            ctx.stage(f"data/{schema}: done in {time.perf_counter() - t0:.0f} s")
        prepared = load_prepared(target)
        manifest = prepared.manifest
        if schema == "lesion" and manifest.get("layout") != "vindr":
            ctx.data_info[schema] = {
                "not_run": "not run: the lesion task needs VinDr-layout annotations"
            }
            continue
        ctx.data[schema] = target
        ctx.data_info[schema] = {
            "path": str(target),
            "ingested": str(target),
            "images": len(prepared),
            "rejected": manifest.get("num_rejected", 0),
            "patients": manifest.get("num_patients"),
            "layout": manifest.get("layout"),
            "class_names": list(prepared.class_names),
            "counts": manifest.get("counts", {}),
            "content_hash": prepared.content_hash,
        }
        if schema == "lesion":
            _lesion_classes(ctx, prepared)


def _lesion_classes(ctx: RunContext, prepared: PreparedDataset) -> None:
    """Keep the lesion classes the classifiers can learn and select: each needs train and val
    images. VinDr-SpineXR has all 8; a small phantom site lacks some, and the arm then runs on
    the classes it has (rows of the others become not eligible) and says which it dropped."""
    train = prepared.select("train").labels
    val = prepared.select("val").labels
    dropped = {}
    for k, name in enumerate(prepared.class_names):
        n_train, n_val = int((train == k).sum()), int((val == k).sum())
        if n_train == 0 or n_val == 0:
            dropped[name] = f"{n_train} train / {n_val} val images"
    info = ctx.data_info["lesion"]
    info["classes_dropped"] = dropped
    kept = [k for k, name in enumerate(prepared.class_names) if name not in dropped]
    if not dropped:
        return
    if len(kept) < 2:
        ctx.data.pop("lesion")
        info["not_run"] = (
            "not run: fewer than two lesion classes have both train and val images "
            f"(missing: {', '.join(dropped)})"
        )
        return
    target = ctx.plan.out / DATA_DIR / "lesion_classes_present"
    if not (target / PREPARED_MANIFEST).is_file():
        ctx.stage(
            f"data/lesion: {len(kept)} of {len(prepared.class_names)} classes have train and "
            f"val images; dropping {', '.join(dropped)}"
        )
        remap = np.full(len(prepared.class_names), -1, dtype=np.int64)
        remap[kept] = np.arange(len(kept))
        labels = np.where(prepared.labels >= 0, remap[np.maximum(prepared.labels, 0)], -1)
        manifest = {
            **prepared.manifest,
            "derived_from": str(prepared.root),
            "classes_dropped": dropped,
        }
        for key in ("class_names", "content_hash", "num_images", "resolution", "finding_names"):
            manifest.pop(key, None)
        write_prepared(
            target,
            images=np.asarray(prepared.images),
            files=prepared.files,
            patient_ids=list(prepared.patient_ids),
            splits=list(prepared.splits),
            labels=labels,
            findings=prepared.findings,
            finding_names=prepared.finding_names,
            class_names=[prepared.class_names[k] for k in kept],
            rejected=[],
            manifest=manifest,
        )
    subset = load_prepared(target)
    ctx.data["lesion"] = target
    info.update(
        {
            "path": str(target),
            "class_names": list(subset.class_names),
            "content_hash": subset.content_hash,
            "derived_from": str(prepared.root),
        }
    )
