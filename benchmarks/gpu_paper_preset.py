"""The paper preset (256 px, batch 16) on one CUDA GPU: s/kimg and peak memory, per mixed
precision mode and modulated-convolution path, in one run. Prints one JSON object.

NVIDIA's StyleGAN2-ADA publishes 21.6-24.2 s/kimg for 256 px on one V100; this is the same
measurement for fedspine's own networks. Every setting gets a fresh GanTrainer from the same
seed, `--warmup` untimed steps (cuDNN autotuning, allocator growth), then `--steps` timed steps
(a multiple of 16 includes lazy R1 and path length at their published rates). The settings run
in one process one after another, so compare them as the ratios printed, not across runs.
`auto_choice` says which path the presets' `fused_modconv = "auto"` picks on this device.

    python benchmarks/gpu_paper_preset.py                        # on a CUDA machine, ~3 min
    python benchmarks/gpu_paper_preset.py --device cpu --preset cpu --resolution 32 \\
        --precision off --steps 2 --warmup 1                     # does the script run at all
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from fedspine.training.batches import BatchSampler, TrainingData
from fedspine.training.config import preset_config
from fedspine.training.gan_trainer import GanTrainer

PUBLISHED_V100_SEC_PER_KIMG = (21.6, 24.2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="paper", choices=["paper", "auto", "cpu"])
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp16", "off"])
    parser.add_argument("--fused", nargs="+", default=["fused", "non-fused"])
    parser.add_argument("--steps", type=int, default=48, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=8)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; pass --device cpu for a functional check")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    results: dict[str, dict] = {}
    for path in args.fused:
        for precision in args.precision:
            key = f"{path}/{precision}"
            try:
                results[key] = _measure(args, device, path == "fused", precision)
            except torch.OutOfMemoryError as err:
                results[key] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            except ValueError as err:  # a precision this device does not run (fp16 on CPU)
                results[key] = {"error": str(err)}
            if device.type == "cuda":
                torch.cuda.empty_cache()

    auto_choice = {
        precision: _auto_choice(args, device, precision)
        for precision in args.precision
        if "error" not in results.get(f"{args.fused[0]}/{precision}", {})
    }

    timed = {k: v for k, v in results.items() if "sec_per_kimg" in v}
    fastest = min(timed, key=lambda k: timed[k]["sec_per_kimg"]) if timed else None
    ratios = {}
    for precision in args.precision:
        a, b = timed.get(f"fused/{precision}"), timed.get(f"non-fused/{precision}")
        if a and b:
            ratios[f"fused_over_non_fused_speed/{precision}"] = (
                b["sec_per_kimg"] / a["sec_per_kimg"]
            )
    report = {
        "benchmark": "gpu_paper_preset",
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "machine": platform.machine(),
        "steps": args.steps,
        "warmup": args.warmup,
        "published_nvidia_v100_sec_per_kimg": list(PUBLISHED_V100_SEC_PER_KIMG),
        "results": results,
        "ratios": ratios,
        "fastest": fastest,
        "auto_choice": auto_choice,
    }
    print(json.dumps(report, indent=2))
    return report


def _measure(args: argparse.Namespace, device: torch.device, fused: bool, precision: str) -> dict:
    cfg = preset_config(args.preset, args.resolution, num_classes=2)
    cfg.device = device.type
    cfg.mixed_precision = precision
    cfg.network.fused_modconv = fused
    res = cfg.resolution
    rng = np.random.default_rng(0)
    n = 64
    images = torch.from_numpy(rng.integers(0, 256, size=(n, 1, res, res), dtype=np.uint8))
    data = TrainingData(images, torch.from_numpy(np.arange(n) % 2), ["normal", "abnormal"])
    torch.manual_seed(0)
    trainer = GanTrainer(cfg, data.label_prior(), device=device)
    batches = BatchSampler(data, cfg.batch, trainer.np_rng)
    for _ in range(args.warmup):
        trainer.train_step(*next(batches))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = trainer.train_step(*next(batches))
    _sync(device)
    seconds = time.perf_counter() - start
    shown = args.steps * cfg.batch
    row = {
        "resolution": res,
        "batch": cfg.batch,
        "sec_per_kimg": seconds / (shown / 1000),
        "img_per_sec": shown / seconds,
        "autocast_dtype": str(trainer.amp_dtype).removeprefix("torch.")
        if trainer.amp_dtype
        else "float32",
        "finite_losses": bool(np.isfinite([float(metrics.loss_g), float(metrics.loss_d)]).all()),
        "g_params": sum(p.numel() for p in trainer.G.parameters()),
        "d_params": sum(p.numel() for p in trainer.D.parameters()),
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _auto_choice(args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    """What `fused_modconv = "auto"` (the paper and auto presets) picks here: on CUDA its own
    short timing of G alone, to set beside the full training steps timed above."""
    cfg = preset_config(args.preset, args.resolution, num_classes=2)
    cfg.device = device.type
    cfg.mixed_precision = precision
    cfg.network.fused_modconv = "auto"
    trainer = GanTrainer(cfg, [0.5, 0.5], device=device)
    choice = trainer.modconv_choice.to_dict()
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return choice


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
