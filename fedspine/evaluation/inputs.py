"""The inputs of an evaluation: the real datasets, the synthetic set, and the refusals.

Every check runs before any work and names the input and what to do: a missing split, another
class order or resolution, or a test split holding patients the synthetic set's generator
trained on (which would flatter every synthetic number).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedspine.data.ingest import IngestConfig, ingest
from fedspine.data.prepared import (
    MANIFEST_FILE,
    PreparedDataset,
    PreparedDatasetError,
    load_prepared,
)
from fedspine.evaluation.config import EvaluateConfig, EvaluateError
from fedspine.fileio import (
    FOLDER_CLASSES,
    RUN_CONFIG_TOML,
    SYNTHETIC_GENERATION,
    SYNTHETIC_LABELS,
)
from fedspine.training.config import read_config_toml


def load_synthetic(
    path: str | os.PathLike, real: PreparedDataset, work: str | os.PathLike, cfg: EvaluateConfig
) -> tuple[PreparedDataset, dict[str, Any]]:
    """The synthetic images as a prepared dataset, and where they came from.

    A folder with manifest.json is read as it is; a folder with labels.csv (``fedspine
    generate``'s layout) is ingested into ``work`` at the real data's resolution, with no
    val/test carving (synthetic images have no patients to protect). The class order must equal
    the real data's, or the labels would mean other classes.
    """

    path, work = Path(path), Path(work)
    check_synthetic_source(path, real)
    if (path / MANIFEST_FILE).is_file():
        data = load_prepared(path)
        info: dict[str, Any] = {"kind": "prepared dataset", "rejected": None}
    else:
        summary = ingest(
            path,
            work,
            IngestConfig(
                layout="folder",
                resolution=real.resolution,
                val_fraction=0.0,
                test_fraction=0.0,
                seed=cfg.seed,
            ),
        )
        data = load_prepared(work)
        info = {"kind": "generated folder", "rejected": summary.num_rejected}
    if list(data.class_names) != list(real.class_names):
        raise EvaluateError(
            f"{path}: synthetic class order {list(data.class_names)} differs from the real "
            f"data's {list(real.class_names)}; generate from a model trained on this schema "
            "(or fix classes.txt) so that label k means the same class in both"
        )
    generation = path / SYNTHETIC_GENERATION
    info.update(
        {
            "path": str(path),
            "content_hash": data.content_hash,
            "images": len(data),
            "resolution": data.resolution,
            "class_counts": data.class_counts(),
            "generation": json.loads(generation.read_text()) if generation.is_file() else None,
        }
    )
    return data, info


def load_real(path: Path, option: str) -> PreparedDataset:

    try:
        return load_prepared(path)
    except PreparedDatasetError as err:
        raise EvaluateError(f"{option} {err}") from None


def same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_real(
    real: PreparedDataset,
    train_path: Path,
    test_source: PreparedDataset,
    test_path: Path,
    real_train: PreparedDataset,
    real_val: PreparedDataset,
    test_rows: PreparedDataset,
) -> None:
    if len(real_train) == 0:
        raise EvaluateError(f"{train_path}: no rows in the 'train' split; nothing to train TRTR on")
    if len(real_val) == 0:
        raise EvaluateError(
            f"{train_path}: no rows in the 'val' split; every arm selects its epoch on it. "
            "Ingest with a validation fraction above 0"
        )
    if len(test_rows) == 0:
        raise EvaluateError(
            f"{test_path}: no rows in the 'test' split; ingest the test data with a test split"
        )
    if list(test_source.class_names) != list(real.class_names):
        raise EvaluateError(
            f"{test_path}: classes {list(test_source.class_names)} differ from the training "
            f"data's {list(real.class_names)}; test on data of the same label schema"
        )
    if test_source.resolution != real.resolution:
        raise EvaluateError(
            f"{test_path}: resolution {test_source.resolution} px differs from the training "
            f"data's {real.resolution} px; ingest both at one --resolution"
        )


def check_synthetic_source(path: Path, real: PreparedDataset) -> None:
    """Fail before any work on a missing folder or a generated folder with another class order."""
    if not path.is_dir():
        raise EvaluateError(
            f"{path}: no such folder; pass a prepared dataset or a folder written by "
            "`fedspine generate`"
        )
    if (path / MANIFEST_FILE).is_file():
        try:
            declared = list(json.loads((path / MANIFEST_FILE).read_text())["class_names"])
        except (ValueError, KeyError, TypeError):
            raise EvaluateError(
                f"{path / MANIFEST_FILE}: unreadable or without class_names; not a prepared "
                "dataset written by fedspine"
            ) from None
        if declared != list(real.class_names):
            raise EvaluateError(
                f"{path}: synthetic class order {declared} differs from the real data's "
                f"{list(real.class_names)}; generate from a model trained on this schema so that "
                "label k means the same class in both"
            )
        return
    if not (path / SYNTHETIC_LABELS).is_file():
        raise EvaluateError(
            f"{path}: neither a prepared dataset (manifest.json) nor a generated folder "
            "(labels.csv + classes.txt)"
        )
    classes_txt = path / FOLDER_CLASSES
    if classes_txt.is_file():
        declared = [c.strip() for c in classes_txt.read_text().splitlines() if c.strip()]
        if declared != list(real.class_names):
            raise EvaluateError(
                f"{classes_txt}: synthetic class order {declared} differs from the real data's "
                f"{list(real.class_names)}; generate from a model trained on this schema so that "
                "label k means the same class in both"
            )


def check_synthetic_rows(
    syn_rows: PreparedDataset, path: Path, task: str, real: PreparedDataset
) -> None:
    if len(syn_rows) == 0:
        raise EvaluateError(f"{path}: no synthetic images in its 'train' or 'val' rows")
    if task == "multilabel" and list(syn_rows.finding_names) != list(real.finding_names):
        raise EvaluateError(
            f"{path}: finding columns {syn_rows.finding_names} differ from the real data's "
            f"{real.finding_names}; the multilabel task needs synthetic findings of the same kind"
        )


def check_generator_patients(
    syn_path: Path,
    real: PreparedDataset,
    train_path: Path,
    test_source: PreparedDataset,
    test_path: Path,
    test_rows: PreparedDataset,
) -> None:
    """Refuse a test split holding patients the synthetic set's generator trained on.

    The generator's run folder (generation.json names it) records the prepared data it trained
    on by content hash; when that data is one of the inputs or still on disk, its training
    patients are compared with the test patients. A generator that saw a test patient makes every
    synthetic number on that test set optimistic.
    """

    generation = syn_path / SYNTHETIC_GENERATION
    if not generation.is_file():
        return
    try:
        run = Path(json.loads(generation.read_text()).get("run") or "")
        dataset = read_config_toml(run / RUN_CONFIG_TOML).get("dataset") or {}
    except (OSError, ValueError, AttributeError):
        return
    content_hash, where = dataset.get("content_hash"), dataset.get("path")
    candidates = [(real, train_path), (test_source, test_path)]
    source = next((d for d, _ in candidates if d.content_hash == content_hash), None)
    if source is None and where and Path(where).is_dir():
        try:
            other = load_prepared(where)
        except Exception:
            return
        source = other if other.content_hash == content_hash else None
    if source is None:
        return
    seen = set(source.select("train", labelled=True).patient_ids.tolist())
    shared = sorted(seen & set(test_rows.patient_ids.tolist()))
    if shared:
        raise EvaluateError(
            f"{test_path}: {len(shared)} patient(s) of its 'test' split (e.g. {shared[0]}) are "
            f"among those the generator of {syn_path} trained on (its run {run} trained on "
            f"{where}); synthetic images judged on patients their generator saw flatter it. "
            "Test on patients the generator never saw"
        )


def at_resolution(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, R, R] -> uint8 [N, size, size] (unchanged when R == size)."""
    if images.shape[-1] == size:
        return np.asarray(images, dtype=np.uint8)

    out = np.empty((len(images), size, size), dtype=np.uint8)
    for start in range(0, len(images), 256):
        x = torch.from_numpy(np.asarray(images[start : start + 256], dtype=np.float32))[:, None]
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + len(x)] = x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def dataset_info(data: PreparedDataset, path: Path, splits: Sequence[str]) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(path), "content_hash": data.content_hash, "splits": {}}
    for split in splits:
        rows = data.select(split, labelled=False)
        info["splits"][split] = {
            "images": len(rows),
            "patients": len(set(rows.patient_ids.tolist())),
            "class_counts": rows.class_counts(),
        }
    return info


def shared_patients(*sets: PreparedDataset) -> int:
    *earlier, test = sets
    seen = set().union(*(set(s.patient_ids.tolist()) for s in earlier))
    return len(seen & set(test.patient_ids.tolist()))
