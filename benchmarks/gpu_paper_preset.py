"""The paper preset (256 px, batch 16) on one CUDA GPU: s/kimg and peak memory, per mixed
precision mode and modulated-convolution path, in one run. Prints one JSON object.

NVIDIA's StyleGAN2-ADA publishes 21.6-24.2 s/kimg for 256 px on one V100; this is the same
measurement for fedspine's own networks. Every setting gets a fresh GanTrainer from the same
seed, `--warmup` untimed steps (cuDNN autotuning, allocator growth), then `--steps` timed steps
(a multiple of 16 includes lazy R1 and path length at their published rates). The settings run
in one process one after another, so compare them as the ratios printed, not across runs.
`auto_choice` says which path the presets' `fused_modconv = "auto"` picks on this device.

`quality` (on a GPU by default, `--quality-steps N` elsewhere) trains float32 against the
reduced-precision setting (`auto`: bf16 in the highest-resolution blocks only) for the same
number of steps from the same seed on phantom radiographs, and reports the losses per quarter
of the run, the optimizer steps with non-finite gradients, and FID and KID of G_ema's images
against the training images on area-downsampled pixels (the repo's PixelExtractor: a sanity
figure, not a published FID; compare the two settings with each other only).

    python benchmarks/gpu_paper_preset.py                        # on a CUDA machine, ~3 min
    python benchmarks/gpu_paper_preset.py --device cpu --preset cpu --resolution 32 \\
        --precision off --steps 2 --warmup 1                     # does the script run at all
    python benchmarks/gpu_paper_preset.py --device cpu --preset cpu --resolution 16 \
        --precision off --fused non-fused --steps 1 --warmup 0 \
        --quality-steps 2 --quality-images 16                    # the quality path too
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from fedspine.data.phantom import phantom_arrays
from fedspine.evaluation.features import PixelExtractor
from fedspine.evaluation.generative import frechet_distance, kernel_inception_distance
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
    parser.add_argument(
        "--quality-steps",
        type=int,
        default=None,
        help="training steps per precision of the quality comparison (default: 300 on a GPU, "
        "0, skipped, elsewhere)",
    )
    parser.add_argument("--quality-precision", nargs="+", default=["off", "auto"])
    parser.add_argument("--quality-images", type=int, default=256)
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
    quality = _quality(args, device)
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
        "quality": quality,
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


def _quality(args: argparse.Namespace, device: torch.device) -> dict:
    """float32 against reduced precision: same seed, same data, same steps; losses per quarter,
    non-finite gradient steps, and FID / KID of G_ema on pixel features."""
    steps = args.quality_steps
    if steps is None:
        steps = 300 if device.type == "cuda" else 0
    if steps <= 0:
        return {"skipped": f"no quality comparison on {device.type} (pass --quality-steps N)"}
    cfg = preset_config(args.preset, args.resolution, num_classes=2)
    res = cfg.resolution
    phantoms = phantom_arrays(args.quality_images, resolution=res, seed=0)
    images = torch.from_numpy(np.round(phantoms.images * 255).astype(np.uint8))[:, None]
    labels = torch.from_numpy(phantoms.abnormal.astype(np.int64))
    data = TrainingData(images, labels, ["normal", "abnormal"])
    extractor = PixelExtractor(16)
    real_features = extractor(images)
    n = len(images)
    rows: dict[str, dict] = {}
    for precision in args.quality_precision:
        try:
            rows[precision] = _train_and_score(
                args, device, precision, steps, data, extractor, real_features
            )
        except torch.OutOfMemoryError as err:
            rows[precision] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        except ValueError as err:  # a precision this device does not run
            rows[precision] = {"error": str(err)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "steps": steps,
        "images": n,
        "extractor": extractor.name,
        "seed": 0,
        "results": rows,
    }


def _train_and_score(
    args: argparse.Namespace,
    device: torch.device,
    precision: str,
    steps: int,
    data: TrainingData,
    extractor: PixelExtractor,
    real_features: np.ndarray,
) -> dict:
    cfg = preset_config(args.preset, args.resolution, num_classes=2)
    cfg.device = device.type
    cfg.mixed_precision = precision
    cfg.seed = 0
    torch.manual_seed(0)
    trainer = GanTrainer(cfg, data.label_prior(), device=device)
    batches = BatchSampler(data, cfg.batch, trainer.np_rng)
    kimg = steps * cfg.batch / 1000
    ticks: list[dict] = []
    start = time.perf_counter()
    trainer.run(kimg, batches, on_tick=lambda t, r: ticks.append(r), tick_kimg=kimg / 4)
    _sync(device)
    seconds = time.perf_counter() - start
    n = len(real_features)
    fakes = []
    with torch.no_grad():
        for begin in range(0, n, 32):
            z, c = trainer.sample_latents(min(32, n - begin))
            onehot = torch.nn.functional.one_hot(c, 2).float()
            img = trainer.G_ema(z, onehot, noise_mode="const")
            fakes.append(((img.float().clamp(-1, 1) + 1) / 2).cpu())
    fake_features = extractor(torch.cat(fakes))
    kid_mean, kid_std = kernel_inception_distance(
        real_features, fake_features, subsets=20, subset_size=min(n, 1000)
    )
    return {
        "used": trainer.precision.to_dict(),
        "seconds": seconds,
        "loss_g_per_quarter": [t.get("loss_g") for t in ticks],
        "loss_d_per_quarter": [t.get("loss_d") for t in ticks],
        "nonfinite_grad_steps": sum(int(t.get("nonfinite_grads", 0)) for t in ticks),
        "fid_pixels": frechet_distance(real_features, fake_features),
        "kid_pixels": kid_mean,
        "kid_pixels_std": kid_std,
        "finite_weights": all(
            bool(torch.isfinite(p).all())
            for p in (*trainer.G.parameters(), *trainer.D.parameters())
        ),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
