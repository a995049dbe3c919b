"""Cost of the privacy engine's write-ahead reservation against the DP discriminator step.

Prints one JSON object: the median seconds of a DP D step (the ``cpu`` preset's D at 32 px, one
patient per image, R1 inside) with no reservation, with the default block-wise reservation
(``RESERVE_BLOCK`` steps written ahead per ledger write) and with a write before every step
(block 1, the worst case), their ratios to the bare step, and the median seconds of one ledger
write (fsync included) on the ledger's file system. Variants are interleaved in a shuffled
order each round, since the machine may be shared and noisy.

    python benchmarks/reservation_cost.py --rounds 15 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedspine.models import Discriminator, NetworkConfig
from fedspine.privacy.engine import RESERVE_BLOCK, PrivacyEngine
from fedspine.training.dp import DPConfig, DPDiscriminatorStep

VARIANTS = ("bare", "reserved_block", "reserved_every_step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = NetworkConfig(
        resolution=args.resolution, c_dim=2, z_dim=128, w_dim=128,
        channel_base=2048, channel_max=128, mbstd_group=0,
    )  # fmt: skip
    D = Discriminator(cfg)
    n = args.batch
    images = torch.rand(n, 1, args.resolution, args.resolution) * 2 - 1
    labels = torch.randint(0, 2, (n,))
    fakes = torch.rand(n, 1, args.resolution, args.resolution) * 2 - 1
    dp = DPConfig(noise_multiplier=1.0, expected_patients_per_step=n)
    step = DPDiscriminatorStep(
        D, torch.optim.Adam(D.parameters(), lr=1e-4), None, dp, r1_gamma=0.05,
        label_prior=torch.tensor([0.5, 0.5]), make_fakes=lambda k, c: fakes[:k],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as home:
        engine = PrivacyEngine([f"p{i}" for i in range(500)], unit="patient", home=Path(home))
        steps = 10 * args.rounds + 10
        plan = engine.plan(
            steps=steps, sample_rate=0.1, noise_multiplier=1.0, clip_norm=1.0, label="bench"
        )
        reservations = {
            "bare": None,
            "reserved_block": engine.reserve(plan, block=RESERVE_BLOCK),
            "reserved_every_step": engine.reserve(plan, block=1),
        }
        unit_index = np.arange(n)
        for name in VARIANTS:  # warm-up
            step.reservation = reservations[name]
            step.step(images, labels, unit_index)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            order = list(VARIANTS)
            random.shuffle(order)
            for name in order:
                step.reservation = reservations[name]
                start = time.perf_counter()
                step.step(images, labels, unit_index)
                times[name].append(time.perf_counter() - start)
        writes = []
        record = reservations["reserved_every_step"].record_id
        for _ in range(args.rounds):
            start = time.perf_counter()
            engine.ledger.extend(record, 1)
            writes.append(time.perf_counter() - start)
    median = {name: statistics.median(v) for name, v in times.items()}
    write = statistics.median(writes)
    report = {
        "batch": n,
        "resolution": args.resolution,
        "threads": args.threads,
        "reserve_block": RESERVE_BLOCK,
        "seconds_per_d_step": median,
        "ratio_block_over_bare": median["reserved_block"] / median["bare"],
        "ratio_every_step_over_bare": median["reserved_every_step"] / median["bare"],
        "seconds_per_ledger_write": write,
        "amortised_write_share_of_d_step": write / RESERVE_BLOCK / median["bare"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
