"""Cost of the DP discriminator step against a non-private D step, on the same batch.

Prints one JSON object with the median seconds per D step of four variants and their ratios:

- ``plain``: autograd on the mean logistic D loss over the batch's reals and as many fakes;
- ``plain_r1``: the same plus R1 (γ/2·||∇x D(x)||², double backward) on the reals;
- ``dp``: :class:`fedspine.training.dp.DPDiscriminatorStep` with one patient per image
  (per-unit gradients by torch.func, clipping, noise, Adam), no R1;
- ``dp_r1``: the DP step with R1 inside every per-unit loss.

Fakes are fixed random images for every variant, so G's cost is left out. The machine may be
shared and noisy: variants are interleaved in a shuffled order each round and the median taken.
The networks are the ``cpu`` preset's at 32 px (mbstd off, as DP requires).

    python benchmarks/dp_step_cost.py --batch 32 --rounds 15 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from fedspine.models import Discriminator, NetworkConfig
from fedspine.training.dp import DPConfig, DPDiscriminatorStep

VARIANTS = ("plain", "plain_r1", "dp", "dp_r1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--r1-gamma", type=float, default=0.0512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    cfg = NetworkConfig(
        resolution=args.resolution,
        c_dim=2,
        z_dim=128,
        w_dim=128,
        channel_base=2048,
        channel_max=128,
        mbstd_group=0,
    )
    gen = torch.Generator().manual_seed(args.seed)
    n, res = args.batch, args.resolution
    real = torch.rand(n, 1, res, res, generator=gen) * 2 - 1
    labels = torch.randint(0, 2, (n,), generator=gen)
    fakes = torch.rand(n, 1, res, res, generator=gen) * 2 - 1
    fake_labels = torch.randint(0, 2, (n,), generator=gen)
    unit_index = np.arange(n)

    steps = {
        "plain": _plain_step(cfg, real, labels, fakes, fake_labels, 0.0),
        "plain_r1": _plain_step(cfg, real, labels, fakes, fake_labels, args.r1_gamma),
        "dp": _dp_step(cfg, real, labels, unit_index, fakes, 0.0, args.chunk_size, n),
        "dp_r1": _dp_step(cfg, real, labels, unit_index, fakes, args.r1_gamma, args.chunk_size, n),
    }
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    order = list(VARIANTS)
    shuffle = random.Random(args.seed)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    D = Discriminator(cfg)
    print(
        json.dumps(
            {
                "benchmark": "dp_step_cost",
                "batch": n,
                "resolution": res,
                "d_parameters": sum(p.numel() for p in D.parameters()),
                "chunk_size": args.chunk_size,
                "r1_gamma": args.r1_gamma,
                "threads": args.threads,
                "rounds": args.rounds,
                "median_seconds": median,
                "ratio_dp_over_plain": median["dp"] / median["plain"],
                "ratio_dp_r1_over_plain_r1": median["dp_r1"] / median["plain_r1"],
                "ratio_dp_r1_over_plain": median["dp_r1"] / median["plain"],
                "torch": torch.__version__,
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
            },
            indent=2,
        )
    )


def _plain_step(cfg, real, labels, fakes, fake_labels, r1_gamma):
    """A non-private D step: one batch forward of reals and fakes, R1 by double backward."""
    torch.manual_seed(1)
    D = Discriminator(cfg)
    opt = torch.optim.Adam(D.parameters(), lr=0.0025, betas=(0.0, 0.99), eps=1e-8)
    c_real = F.one_hot(labels, cfg.c_dim).float()
    c_fake = F.one_hot(fake_labels, cfg.c_dim).float()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x = real.detach().requires_grad_(r1_gamma > 0)
        real_logits = D(x, c_real)
        loss = F.softplus(-real_logits).mean() + F.softplus(D(fakes, c_fake)).mean()
        if r1_gamma > 0:
            (grad,) = torch.autograd.grad(real_logits.sum(), x, create_graph=True)
            loss = loss + grad.square().flatten(1).sum(1).mean() * (r1_gamma / 2)
        loss.backward()
        opt.step()

    return step


def _dp_step(cfg, real, labels, unit_index, fakes, r1_gamma, chunk_size, expected):
    torch.manual_seed(1)
    D = Discriminator(cfg)
    opt = torch.optim.Adam(D.parameters(), lr=0.0025, betas=(0.0, 0.99), eps=1e-8)
    dp = DPConfig(
        noise_multiplier=1.0,
        expected_patients_per_step=expected,
        chunk_size=chunk_size,
    )
    step = DPDiscriminatorStep(
        D,
        opt,
        None,
        dp,
        r1_gamma=r1_gamma,
        label_prior=torch.tensor([0.5, 0.5]),
        make_fakes=lambda n, c: fakes[:n],
        generator=torch.Generator().manual_seed(2),
    )
    return lambda: step.step(real, labels, unit_index)


if __name__ == "__main__":
    main()
