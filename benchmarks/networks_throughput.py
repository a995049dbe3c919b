"""Forward+backward throughput of fedspine's G+D on CPU: fused vs non-fused modulated conv, and
torch.set_flush_denormal on vs off. Prints one JSON object.

One step = G(z, c) on a batch, D on the fakes, softplus(-logit).mean(), backward through both
networks (the generator's training pass). The four settings are timed in rotating order within
each round so that load from other processes hits them alike; the median over rounds is kept.
Besides wall-clock images/s it reports images per CPU-second of this process, which moves less
when other processes share the cores (the per-step CPU time of both threads together).

    python benchmarks/networks_throughput.py --resolution 32   # channel_base 2048, max 128
    python benchmarks/networks_throughput.py --resolution 64   # channel_base 4096, max 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fedspine.models import Discriminator, Generator, NetworkConfig
from fedspine.models.layers import count_parameters

WIDTHS = {32: (2048, 128), 64: (4096, 256)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=32, choices=sorted(WIDTHS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-rounds", type=int, default=5)
    parser.add_argument(
        "--budget-s", type=float, default=50.0, help="start no new round after this many seconds"
    )
    args = parser.parse_args()
    result = run(args.resolution, args.batch, args.threads, args.max_rounds, args.budget_s)
    print(json.dumps(result))


def run(resolution: int, batch: int, threads: int, max_rounds: int, budget_s: float) -> dict:
    """Time every (path, flush-denormal) setting over rotating rounds; medians and ratios."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    channel_base, channel_max = WIDTHS[resolution]
    cfg = NetworkConfig(resolution=resolution, channel_base=channel_base, channel_max=channel_max)
    G, D = Generator(cfg), Discriminator(cfg)
    z = torch.randn(batch, cfg.z_dim)
    c = F.one_hot(torch.arange(batch) % cfg.c_dim, cfg.c_dim).float()
    settings = [(fused, flush) for fused in (True, False) for flush in (False, True)]
    flush_supported = torch.set_flush_denormal(True)
    torch.set_flush_denormal(False)
    load_before = os.getloadavg()
    start = time.perf_counter()
    for fused in (True, False):
        _step(G, D, z, c, fused)
    wall: dict[tuple[bool, bool], list[float]] = {s: [] for s in settings}
    cpu: dict[tuple[bool, bool], list[float]] = {s: [] for s in settings}
    for round_index in range(max_rounds):
        if round_index > 0 and time.perf_counter() - start > budget_s:
            break
        shift = round_index % len(settings)
        for fused, flush in settings[shift:] + settings[:shift]:
            torch.set_flush_denormal(flush)
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            _step(G, D, z, c, fused)
            wall[(fused, flush)].append(time.perf_counter() - t_wall)
            cpu[(fused, flush)].append(time.process_time() - t_cpu)
    torch.set_flush_denormal(False)

    def rate(times: list[float]) -> float:
        return round(batch / statistics.median(times), 3)

    results = {}
    for fused, flush in settings:
        key = f"{'fused' if fused else 'non_fused'}_flush_denormal_{'on' if flush else 'off'}"
        results[key] = {
            "img_per_s": rate(wall[(fused, flush)]),
            "img_per_cpu_s": rate(cpu[(fused, flush)]),
            "step_s": [round(t, 3) for t in wall[(fused, flush)]],
        }

    def ratio(a: tuple[bool, bool], b: tuple[bool, bool], times: dict) -> float:
        return round(statistics.median(times[b]) / statistics.median(times[a]), 3)

    ratios = {}
    for flush in (False, True):
        tag = "on" if flush else "off"
        ratios[f"fused_over_non_fused_flush_{tag}"] = ratio((True, flush), (False, flush), wall)
        ratios[f"fused_over_non_fused_flush_{tag}_cpu"] = ratio((True, flush), (False, flush), cpu)
    for fused in (True, False):
        tag = "fused" if fused else "non_fused"
        ratios[f"flush_on_over_off_{tag}"] = ratio((fused, True), (fused, False), wall)
        ratios[f"flush_on_over_off_{tag}_cpu"] = ratio((fused, True), (fused, False), cpu)
    return {
        "benchmark": "networks_throughput",
        "step": "G forward, D forward on fakes, backward through G and D",
        "resolution": resolution,
        "batch": batch,
        "channel_base": channel_base,
        "channel_max": channel_max,
        "z_dim": cfg.z_dim,
        "w_dim": cfg.w_dim,
        "g_params": count_parameters(G),
        "d_params": count_parameters(D),
        "threads": threads,
        "torch": torch.__version__,
        "flush_denormal_supported": flush_supported,
        "rounds": len(wall[settings[0]]),
        "seconds": round(time.perf_counter() - start, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "results": results,
        "ratios": ratios,
    }


def _step(G: Generator, D: Discriminator, z: torch.Tensor, c: torch.Tensor, fused: bool) -> None:
    G.zero_grad(set_to_none=True)
    D.zero_grad(set_to_none=True)
    img = G(z, c, fused_modconv=fused)
    F.softplus(-D(img, c)).mean().backward()


if __name__ == "__main__":
    main()
