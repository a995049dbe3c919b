"""Helpers shared by the training tests: tiny configs and small class-dependent datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedspine.data.prepared import write_prepared
from fedspine.models import NetworkConfig
from fedspine.models.augment import AugmentConfig
from fedspine.training.config import TrainConfig


def tiny_config(
    resolution: int = 16, num_classes: int = 2, batch: int = 8, **overrides
) -> TrainConfig:
    """A network small enough that a step takes well under a second on one core.

    Lazy intervals of 2 and a fast ADA controller (target -1: p rises whenever any real logit is
    positive) make a handful of steps cover every code path.
    """
    cfg = TrainConfig(
        preset="tiny",
        network=NetworkConfig(
            resolution=resolution,
            img_channels=1,
            c_dim=num_classes,
            z_dim=16,
            w_dim=16,
            mapping_layers=1,
            channel_base=256,
            channel_max=32,
            mbstd_group=4,
            mbstd_channels=1,
        ),
        augment=AugmentConfig(preset="bgc", target=-1.0, adjust_kimg=0.1, interval=2),
        batch=batch,
        r1_gamma=1.0,
        r1_interval=2,
        pl_interval=2,
        ema_kimg=0.05,
        total_kimg=0.032,
        tick_kimg=0.016,
        snapshot_kimg=0.016,
        device="cpu",
        mixed_precision="off",
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def shape_images(labels: np.ndarray, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Class 0: a bright disc; class 1: a bright vertical bar; class 2+: a bright ring.

    Positions and sizes jitter a little, plus noise, so the classes are easy to tell apart and
    each still has some variety.
    """
    r = resolution
    yy, xx = np.mgrid[0:r, 0:r].astype(np.float32)
    out = np.empty((len(labels), r, r), dtype=np.uint8)
    for i, label in enumerate(labels):
        cy, cx = r / 2 + rng.uniform(-r / 10, r / 10, size=2)
        img = np.full((r, r), 30.0, dtype=np.float32)
        if label == 0:
            rad = r * rng.uniform(0.22, 0.3)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= rad**2] = 220.0
        elif label == 1:
            half_w = r * rng.uniform(0.08, 0.12)
            img[(np.abs(xx - cx) <= half_w) & (np.abs(yy - r / 2) <= r * 0.4)] = 220.0
        else:
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            img[(d >= r * 0.2) & (d <= r * 0.32)] = 220.0
        img += rng.normal(0, 8, size=img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_prepared(
    root: Path,
    n_train: int = 40,
    n_val: int = 8,
    resolution: int = 16,
    num_classes: int = 2,
    seed: int = 0,
) -> Path:
    """A prepared dataset of class-dependent shapes; a few unlabelled rows (-1) in train too.
    Its patients are the seed's own: datasets of other seeds share none."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    labels = np.arange(n) % num_classes
    images = shape_images(labels, resolution, rng)
    labels = labels.astype(np.int64)
    labels[1] = -1  # not eligible under the schema: must be skipped by training
    splits = ["train"] * n_train + ["val"] * n_val
    class_names = [f"class{k}" for k in range(num_classes)]
    findings = np.zeros((n, num_classes), dtype=np.uint8)
    for i, lab in enumerate(labels):
        if lab >= 0:
            findings[i, lab] = 1
    return write_prepared(
        root,
        images=images,
        files=[f"img{i:04d}.png" for i in range(n)],
        patient_ids=[f"s{seed}-p{i:04d}" for i in range(n)],
        splits=splits,
        labels=labels,
        findings=findings,
        finding_names=class_names,
        class_names=class_names,
        rejected=[],
        manifest={"source": "test shapes"},
    )


def public_checkpoint(
    path: Path, public: str | None, content_hash: str = "other", resolution: int = 16
) -> Path:
    """A tiny trainer snapshot without minibatch-std, declared public when ``public`` says why
    (as ``fedspine train --public-data`` writes it, with its two patients' digests), of the
    dataset hash ``content_hash``."""
    import dataclasses

    import torch

    from fedspine.models import Discriminator, Generator
    from fedspine.training.checkpoint import save_checkpoint

    cfg = tiny_config(resolution=resolution, num_classes=2)
    net = dataclasses.replace(cfg.network, mbstd_group=0)
    cfg.network = net
    torch.manual_seed(0)
    G, D = Generator(net), Discriminator(net)
    dataset = {"content_hash": content_hash, "class_names": ["class0", "class1"]}
    if public is not None:
        from fedspine.training.public_init import PATIENT_DIGESTS, patient_digests

        dataset["public"] = public
        dataset[PATIENT_DIGESTS] = patient_digests(["public-patient-0", "public-patient-1"])
    state = {"config": cfg.to_dict(), "G": G.state_dict(), "G_ema": G.state_dict()}
    state["D"] = D.state_dict()
    return save_checkpoint(path, "trainer", {"trainer": state, "dataset": dataset})
