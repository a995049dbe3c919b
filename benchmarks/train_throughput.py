"""Training throughput of the `cpu` preset: torch.set_flush_denormal on and off, and bf16
autocast (`--precision bf16`) against float32, in one run.

Prints one JSON object: images per second (real images through one full iteration: G step, D
step, lazy R1 / path-length at their intervals, EMA, ADA) per resolution and setting, and the
ratios denormal-flushing on / off and bf16 / float32 (both with flushing on). On a shared
machine wall-clock rates depend on the other load; images per CPU-second are the steadier
comparison. Each setting gets a fresh trainer from the same seed, a few warm-up steps, then
`--steps` timed steps (use a multiple of 16 to include R1 at its rate). Whether bf16 pays
depends on the CPU having bf16 instructions: `cpu_bf16_flags` lists those /proc/cpuinfo shows.

    python benchmarks/train_throughput.py --threads 2 --steps 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from fedspine.training.batches import BatchSampler, TrainingData
from fedspine.training.config import preset_config
from fedspine.training.gan_trainer import GanTrainer
from fedspine.training.precision import cpu_bf16_flags

# name: (flush denormals, mixed precision)
SETTINGS = {
    "denormal_on": (True, "off"),
    "denormal_off": (False, "off"),
    "bf16": (True, "bf16"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=16, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = {}
    for res in args.resolutions:
        row = {}
        for name in args.settings:
            flush, precision = SETTINGS[name]
            row[name] = _measure(res, flush, precision, args.steps, args.warmup)
        _ratio(row, "ratio_on_over_off", "denormal_on", "denormal_off")
        _ratio(row, "ratio_bf16_over_fp32", "bf16", "denormal_on")
        results[f"{res}px"] = row
    torch.set_flush_denormal(False)
    report = {
        "benchmark": "train_throughput",
        "preset": "cpu",
        "threads": args.threads,
        "steps": args.steps,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "load_average_1min": os.getloadavg()[0],
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


def _ratio(row: dict, key: str, a: str, b: str) -> None:
    if a in row and b in row:
        row[key] = row[a]["img_per_sec"] / row[b]["img_per_sec"]
        row[key + "_cpu_time"] = row[a]["img_per_cpu_sec"] / row[b]["img_per_cpu_sec"]


def _measure(
    resolution: int, flush_denormal: bool, precision: str, steps: int, warmup: int
) -> dict:
    torch.set_flush_denormal(flush_denormal)
    cfg = preset_config("cpu", resolution, num_classes=2)
    cfg.device = "cpu"
    cfg.mixed_precision = precision
    rng = np.random.default_rng(0)
    n = 256
    images = torch.from_numpy(
        rng.integers(0, 256, size=(n, 1, resolution, resolution), dtype=np.uint8)
    )
    data = TrainingData(images, torch.from_numpy(np.arange(n) % 2), ["a", "b"])
    trainer = GanTrainer(cfg, data.label_prior())
    batches = BatchSampler(data, cfg.batch, trainer.np_rng)
    for _ in range(warmup):
        trainer.train_step(*next(batches))
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step(*next(batches))
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    images = steps * cfg.batch
    return {
        "img_per_sec": images / seconds,
        "img_per_cpu_sec": images / cpu_seconds,
        "sec_per_kimg": seconds / (images / 1000),
        "batch": cfg.batch,
        "g_params": sum(p.numel() for p in trainer.G.parameters()),
        "d_params": sum(p.numel() for p in trainer.D.parameters()),
    }


if __name__ == "__main__":
    main()
