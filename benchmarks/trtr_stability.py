"""How much the evaluation's own classifier moves TRTR (and with it every signal retained).

Every utility number fedspine reports is (TSTR − 0.5) / (TRTR − 0.5) against a TRTR classifier
trained once, with one seed. On three pooled phantom sites at 32 px (issue 15's setting), seed 0
gave TRTR 0.751 and seed 1 0.533 on the same real data, which made seed 1's signal retained
meaningless. This trains the TRTR arm exactly as `fedspine evaluate` does (same step budget,
validation checks and early stopping) for several classifier seeds and evaluation settings, on
the same data, and prints the spread as JSON, with what each run stopped on, so the cause can be
seen: the early-stopping patience, the validation split's size, or the training itself.

    python benchmarks/trtr_stability.py --work DIR --seeds 5 --heldout-per-site 600 \\
        --variants default no-early-stop

Variants: ``default`` (dp_utility's: 10 checks, patience 5), ``no-early-stop`` (patience =
checks: the best validation check of the whole budget), ``longer`` (20 checks, patience 5),
``longer-no-early-stop`` (20 checks, patience 20).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

VARIANTS = ("default", "no-early-stop", "longer", "longer-no-early-stop")


@dataclass
class Settings:
    images_per_site: int = 300
    heldout_per_site: int = 0
    phantom_size: int = 128
    resolution: int = 32
    seeds: int = 5
    classifier_epochs: int = 10
    patience: int = 5
    bootstrap: int = 200
    threads: int = 0


def parse(argv: list[str] | None) -> tuple[Settings, Path, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the data")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=VARIANTS)
    defaults = Settings()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    parser.add_argument("--quick", action="store_true", help="tiny everything: a pipeline check")
    args = parser.parse_args(argv)
    values = {k: getattr(args, k) for k in asdict(defaults)}
    if args.quick:
        values.update(
            images_per_site=40, phantom_size=64, resolution=16, seeds=2,
            classifier_epochs=2, patience=1, bootstrap=20,
        )  # fmt: skip
    if values["seeds"] < 1:
        parser.error("--seeds: at least 1")
    return Settings(**values), args.work, list(args.variants)


def variant_config(name: str, s: Settings, seed: int):
    """The evaluation settings of one variant (dp_utility's evaluation otherwise)."""
    from fedspine.evaluation.config import EvaluateConfig

    cfg = EvaluateConfig(
        epochs=s.classifier_epochs,
        patience=s.patience,
        seed=seed,
        mix_per_class=0,
        bootstrap=s.bootstrap,
        device="cpu",
    )
    if name == "no-early-stop":
        return replace(cfg, patience=cfg.epochs)
    if name == "longer":
        return replace(cfg, epochs=2 * cfg.epochs)
    if name == "longer-no-early-stop":
        return replace(cfg, epochs=2 * cfg.epochs, patience=2 * cfg.epochs)
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from fedspine.data.phantom_pool import phantom_pool
    from fedspine.data.prepared import load_prepared
    from fedspine.evaluation.arms import run_arm, step_budget
    from fedspine.training.classifier_trainer import resolve_task

    s, work, variants = parse(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    pool = phantom_pool(
        work / "data", 3, s.images_per_site, s.phantom_size, s.resolution,
        heldout_per_site=s.heldout_per_site,
    )  # fmt: skip
    real, scored = load_prepared(pool.pooled), load_prepared(pool.scored)
    train = real.select("train", labelled=False)
    val = real.select("val", labelled=False)
    test = scored.select("test", labelled=False)
    task = resolve_task("auto", train)
    runs: list[dict[str, Any]] = []
    for name in variants:
        for seed in range(s.seeds):
            cfg = variant_config(name, s, seed)
            budget = step_budget(train, task, cfg)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                record, _, _ = run_arm(
                    "TRTR", train, val, test, task, cfg, budget, Path(tmp), lambda _e: None
                )
            history = record["history"]
            runs.append(
                {
                    "variant": name,
                    "seed": seed,
                    "auc": record["auc"],
                    "ci": record["ci"],
                    "best_check": history.get("best_epoch"),
                    "checks_run": len(history.get("epochs") or []),
                    "best_val_auc": history.get("best_val_auc"),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {}
    for name in variants:
        aucs = [r["auc"] for r in runs if r["variant"] == name]
        summary[name] = {
            "mean": statistics.fmean(aucs),
            "sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "min": min(aucs),
            "max": max(aucs),
        }
    out = {
        "benchmark": "trtr_stability",
        "settings": asdict(s),
        "data": {"train": len(train), "val": len(val), "test": len(test)},
        "runs": runs,
        "summary": summary,
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
