"""A GAN run's folder: its metrics log, snapshots and their pointer, sample grids, generator.

:func:`fedspine.training.run.train` writes through a :class:`RunFolder`; resuming drops the
ticks logged after the snapshot it resumes from, since they are about to be redone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fedspine.fileio import (
    RUN_GENERATOR,
    RUN_LATEST,
    RUN_METRICS,
    RUN_REALS,
    save_png_atomic,
    write_text_atomic,
)
from fedspine.training.checkpoint import save_checkpoint
from fedspine.training.generate import class_grid, image_grid, save_generator


class RunFolder:
    """The run folder: metrics log, snapshots with their pointer, sample grids, generator."""

    def __init__(
        self,
        out: Path,
        trainer,
        dataset_info: dict,
        last_snapshot_nimg: int,
        training_meta: dict | None = None,
    ) -> None:
        self.out = out
        self.trainer = trainer
        self.dataset_info = dataset_info
        self.training_meta = dict(training_meta or {})
        self.last_snapshot_nimg = last_snapshot_nimg
        latest = out / RUN_LATEST
        self.last_snapshot = (
            out / json.loads(latest.read_text())["snapshot"] if latest.is_file() else None
        )
        self._drop_metrics_after(trainer.cur_nimg)
        net = trainer.config.network
        grid_gen = torch.Generator().manual_seed(trainer.config.seed + 12345)
        self.grid_latents = torch.randn([8, net.z_dim], generator=grid_gen)

    def _drop_metrics_after(self, nimg: int) -> None:
        """Ticks logged after the snapshot a run resumes from are about to be redone."""
        path = self.out / RUN_METRICS
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line)["cur_nimg"] <= nimg]
        if len(keep) != len(lines):
            write_text_atomic(path, "".join(f"{line}\n" for line in keep))

    def record_tick(self, record: dict, final: bool) -> None:
        with open(self.out / RUN_METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        snap_nimg = int(round(self.trainer.config.snapshot_kimg * 1000))
        cur = self.trainer.cur_nimg
        if final or cur // snap_nimg > self.last_snapshot_nimg // snap_nimg:
            self.snapshot()

    def snapshot(self) -> None:
        t = self.trainer
        kimg = _kimg_tag(t.cur_nimg)
        path = self.out / "snapshots" / f"snapshot_{kimg}.pt"
        save_checkpoint(path, "trainer", {"trainer": t.state_dict(), "dataset": self.dataset_info})
        write_text_atomic(
            self.out / RUN_LATEST,
            json.dumps(
                {
                    "snapshot": str(path.relative_to(self.out)),
                    "cur_nimg": t.cur_nimg,
                    "kimg": t.cur_nimg / 1000,
                }
            )
            + "\n",
        )
        self.last_snapshot = path
        self.last_snapshot_nimg = t.cur_nimg
        self.save_fakes(self.out / "samples" / f"fakes_{kimg}.png")

    def save_fakes(self, path: Path) -> None:

        # The grid must not move any RNG the training draws from, or resume would diverge.
        with torch.random.fork_rng(devices=[]):
            grid = class_grid(
                self.trainer.G_ema, self.dataset_info["class_names"], self.grid_latents
            )
        save_png_atomic(grid, path)

    def save_reals(self, data) -> None:
        rng = np.random.default_rng(0)
        rows = []
        for k in range(data.num_classes):
            idx = np.flatnonzero(data.labels.numpy() == k)
            pick = rng.choice(idx, size=min(8, len(idx)), replace=False) if len(idx) else idx
            imgs = (
                data.images[pick, 0].numpy()
                if len(pick)
                else np.zeros((1, data.resolution, data.resolution), np.uint8)
            )
            rows.append(imgs)
        save_png_atomic(image_grid(rows, data.class_names), self.out / "samples" / RUN_REALS)

    def save_generator(self) -> None:
        t = self.trainer
        save_generator(
            self.out / RUN_GENERATOR,
            t.G_ema,
            t.config.to_dict()["network"],
            self.dataset_info["class_names"],
            training={
                "cur_nimg": t.cur_nimg,
                "kimg": t.cur_nimg / 1000,
                "preset": t.config.preset,
                "seed": t.config.seed,
                **self.training_meta,
            },
        )


def _kimg_tag(nimg: int) -> str:
    return f"{nimg / 1000:09.3f}"
