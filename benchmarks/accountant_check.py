"""Accountant cross-check: ε from Opacus PRV and RDP against Google dp_accounting PLD.

Prints one JSON object: for each (σ, q, steps) of the grid, ε from each accountant, the
relative differences to PLD, seconds per accountant, and the PRV memory estimate; then
worst cases and total seconds. Imports are warmed up first and the per-step RDP cache is
cleared before each timing, so the seconds are of one cold accounting each.

    python benchmarks/accountant_check.py [--delta 1e-5] [--sigmas 0.8 1 2]
        [--rates 0.01 0.05] [--steps 100 1000]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.8, 1.0, 2.0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()

    from fedspine.privacy import accounting
    from fedspine.privacy.accounting import (
        Mechanism,
        epsilon,
        prv_eps_error,
        prv_memory_estimate,
    )

    warm = [Mechanism(1.0, 0.01, 10)]
    for accountant in ("prv", "rdp", "pld"):
        epsilon(warm, args.delta, accountant)

    cases = [[Mechanism(s, q, n)] for s in args.sigmas for q in args.rates for n in args.steps]
    cases.append(
        [
            Mechanism(1.0, 0.01, 500, label="gan-discriminator"),
            Mechanism(1.5, 0.02, 300, label="clinical-classifier"),
            Mechanism(0.9, 0.05, 200, label="gan-discriminator"),
        ]
    )
    rows, seconds = [], {"prv": 0.0, "rdp": 0.0, "pld": 0.0}
    for mechanisms in cases:
        row: dict[str, object] = {
            "mechanisms": [[m.noise_multiplier, m.sample_rate, m.steps] for m in mechanisms]
        }
        for accountant in ("prv", "rdp", "pld"):
            accounting._rdp_per_step.cache_clear()  # time every accountant cold
            start = time.perf_counter()
            row[f"eps_{accountant}"] = round(epsilon(mechanisms, args.delta, accountant), 5)
            elapsed = time.perf_counter() - start
            seconds[accountant] += elapsed
            row[f"seconds_{accountant}"] = round(elapsed, 3)
        pld = row["eps_pld"]
        row["prv_vs_pld"] = round(row["eps_prv"] / pld - 1, 5)
        row["rdp_vs_pld"] = round(row["eps_rdp"] / pld - 1, 5)
        eps_error = prv_eps_error(mechanisms, args.delta)
        row["prv_eps_error"] = round(eps_error, 5)
        memory = prv_memory_estimate(mechanisms, args.delta, eps_error)
        row["prv_memory_mb"] = round(memory / 1e6, 1)
        rows.append(row)

    print(
        json.dumps(
            {
                "delta": args.delta,
                "cases": rows,
                "max_abs_prv_vs_pld": max(abs(r["prv_vs_pld"]) for r in rows),
                "min_rdp_vs_pld": min(r["rdp_vs_pld"] for r in rows),
                "max_rdp_vs_pld": max(r["rdp_vs_pld"] for r in rows),
                "total_seconds": {k: round(v, 3) for k, v in seconds.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
