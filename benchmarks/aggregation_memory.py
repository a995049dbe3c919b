"""Peak server memory of one FedAvg round: every reply held at once vs the running weighted sum.

Each variant runs in a fresh subprocess that receives N replies of a model of M MB (float32
tensors, made one at a time as they would arrive) and reports its peak resident set size. The
default M is the paper preset's G + D + G_ema at 256 px, counted from fedspine's networks.

    python benchmarks/aggregation_memory.py --sites 20
    python benchmarks/aggregation_memory.py --sites 3 --megabytes 8   # seconds, for CI

Prints JSON: peak RSS per variant, the model size, and the ratio all / running.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from fedspine.federated.processes import SERVER_ALLOCATOR_ENV

VARIANTS = ("all_replies", "running_sum")


def paper_model_megabytes() -> float:
    """G + D + G_ema of the paper preset, in MB of float32."""
    from fedspine.models import Discriminator, Generator
    from fedspine.training.config import preset_config

    net = preset_config("paper", 256, 2).network
    g = sum(p.numel() for p in Generator(net).parameters())
    d = sum(p.numel() for p in Discriminator(net).parameters())
    return (2 * g + d) * 4 / 2**20


def _reply(megabytes: float, seed: int, parts: int = 32):
    import torch

    gen = torch.Generator().manual_seed(seed)
    numel = int(megabytes * 2**20 / 4 / parts)
    return {f"t{k}": torch.randn(numel, generator=gen) for k in range(parts)}


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024
    return None


def _reset_peak_mb() -> float:
    """Reset the peak resident set size to the current one (Linux: clear_refs 5) and return it,
    so that import-time transients do not hide the aggregation's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return _status_mb("VmRSS") or 0.0


def _peak_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_variant(variant: str, sites: int, megabytes: float) -> dict:
    """In this process: receive ``sites`` replies and aggregate them; report peak RSS."""
    import torch

    from fedspine.federated.weights import RunningFedAvg

    torch.set_num_threads(1)
    base = _reset_peak_mb()
    counts = [10 + k for k in range(sites)]
    if variant == "all_replies":
        # Every reply held until the last arrived, as Flower's send_and_receive does.
        replies = [_reply(megabytes, k) for k in range(sites)]
        held = RunningFedAvg()
        for reply, count in zip(replies, counts, strict=True):
            held.add(reply, count)
        result = held.result()
        del replies
    else:
        running = RunningFedAvg()
        for k in range(sites):
            reply = _reply(megabytes, k)
            running.add(reply, counts[k])
            del reply
        result = running.result()
    return {
        "variant": variant,
        "peak_rss_mb": _peak_mb(),
        "baseline_rss_mb": base,
        "checksum": float(sum(t.double().sum() for t in result.values())),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--megabytes", type=float, default=None, help="model size per reply")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    megabytes = args.megabytes if args.megabytes is not None else paper_model_megabytes()
    if args.variant:
        print(json.dumps(_run_variant(args.variant, args.sites, megabytes)))
        return {}
    results = {}
    # Each variant runs with the allocator setting `fedspine server start` gives the ServerApp.
    env = {**os.environ, **SERVER_ALLOCATOR_ENV}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--sites", str(args.sites)]
        cmd += ["--megabytes", str(megabytes)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    all_peak = results["all_replies"]["peak_rss_mb"] - results["all_replies"]["baseline_rss_mb"]
    run_peak = results["running_sum"]["peak_rss_mb"] - results["running_sum"]["baseline_rss_mb"]
    report = {
        "sites": args.sites,
        "model_mb": megabytes,
        "allocator_env": SERVER_ALLOCATOR_ENV,
        "results": results,
        "models_in_memory": {
            "all_replies": all_peak / megabytes,
            "running_sum": run_peak / megabytes,
        },
        "ratios": {"all_over_running_peak_growth": all_peak / max(run_peak, 1e-9)},
        "same_average": abs(results["all_replies"]["checksum"] - results["running_sum"]["checksum"])
        <= 1e-6 * max(1.0, abs(results["all_replies"]["checksum"])),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
