"""Utility of the federated generator against the centralised one, without and with DP.

Trains four generators on the same sites' training images for the same number of real images
shown: federated (the real ServerApp round loop and ClientApp through the in-process Grid, one
ClientApp per site, FedAvg every round) and centralised (`fedspine train` on the sites' pooled
data), each once without DP and once with patient-level DP-SGD at the same target ε. Each
generator's synthetic set goes through `fedspine evaluate` against the pooled real test split.
Prints one JSON object: TRTR, TSTR, TRTS and TSTR/TRTR per arm, the ε spent, and seconds.

Every site's prepared folder is copied first, so the DP arms spend nothing from the originals'
privacy ledgers, and all outputs stay under --out.

    python benchmarks/federated_vs_centralised.py SITE_1 SITE_2 SITE_3 --out DIR \\
        --rounds 4 --local-kimg 0.5 --epsilon 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedspine.training.run import DPRequest, TrainRequest, train

ARMS = ("federated", "centralised", "federated-dp", "centralised-dp")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sites", nargs="+", type=Path, help="prepared dataset of each site")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-kimg", type=float, default=0.5)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--patients-per-step", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10, help="evaluation classifier epochs")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from fedspine.data.prepared import load_prepared, merge_prepared

    args.out.mkdir(parents=True, exist_ok=True)
    sites = [load_prepared(p) for p in args.sites]
    names = [f"site_{k + 1}" for k in range(len(sites))]
    pooled = args.out / "pooled"
    if not pooled.exists():
        merge_prepared(sites, pooled, names)
    total_kimg = args.rounds * args.local_kimg * len(sites)
    results: dict[str, dict] = {}
    for arm in args.arms:
        folder = args.out / arm
        dp = arm.endswith("-dp")
        start = time.perf_counter()
        if arm.startswith("federated"):
            copies = [_copy(p, folder / "data" / n) for p, n in zip(args.sites, names, strict=True)]
            run = _federate(copies, names, folder, args, dp)
        else:
            data = _copy(pooled, folder / "data" / "pooled")
            run = folder / "run"
            request = TrainRequest(
                prepared=data,
                out=run,
                preset="cpu",
                kimg=total_kimg,
                seed=args.seed,
                dp=DPRequest(
                    target_epsilon=args.epsilon,
                    expected_patients_per_step=args.patients_per_step,
                    privacy_home=folder / "privacy",
                )
                if dp
                else None,
            )
            if not (run / "generator.pt").exists():
                shutil.rmtree(run, ignore_errors=True)
                train(request)
        train_seconds = time.perf_counter() - start
        syn, report = folder / "synthetic", folder / "evaluation"
        if not syn.exists():
            _fedspine(["generate", str(run), "--out", str(syn), "--per-class", str(args.per_class)])
        if not report.exists():
            _fedspine(
                ["evaluate", "--synthetic", str(syn), "--train", str(pooled), "--test", str(pooled)]
                + ["--out", str(report), "--epochs", str(args.epochs), "--seed", str(args.seed)]
            )
        results[arm] = _summary(report, run, train_seconds)
        print(f"{arm}: {json.dumps(results[arm])}", file=sys.stderr, flush=True)
    out = {
        "benchmark": "federated_vs_centralised",
        "sites": [str(p) for p in args.sites],
        "images_per_site": [int((s.splits == "train").sum()) for s in sites],
        "rounds": args.rounds,
        "local_kimg": args.local_kimg,
        "total_kimg": total_kimg,
        "epsilon_target": args.epsilon,
        "patients_per_step": args.patients_per_step,
        "load_average_1min": os.getloadavg()[0],
        "arms": results,
    }
    (args.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


def _federate(data: list[Path], names: list[str], folder: Path, args, dp: bool) -> Path:
    """The ServerApp round loop over one in-process ClientApp per site; returns the output."""
    from fedspine.data.prepared import load_prepared
    from fedspine.federated.client_app import app as client_app
    from fedspine.federated.federation import FederationConfig, run_federation
    from fedspine.federated.grid import InProcessGrid, InProcessNode

    out = folder / "federation"
    if (out / "generator.pt").exists():
        return out
    first = load_prepared(data[0])
    nodes = [
        InProcessNode(
            node_id=100 + k,
            node_config={
                "data-path": str(path),
                "site-name": name,
                "state-dir": str(folder / "state" / name),
                "privacy-home": str(folder / "privacy" / name),
                **({"max-epsilon": float(args.epsilon)} if dp else {}),
            },
            app=client_app,
        )
        for k, (path, name) in enumerate(zip(data, names, strict=True))
    ]
    config = FederationConfig(
        name=f"compare-{folder.name}",
        output_dir=str(out),
        rounds=args.rounds,
        local_kimg=args.local_kimg,
        min_sites=len(data),
        preset="cpu",
        resolution=int(first.resolution),
        class_names=list(first.class_names),
        seed=args.seed,
        dp=dp,
        dp_epsilon=args.epsilon if dp else None,
        dp_patients_per_step=args.patients_per_step,
    )
    status = run_federation(InProcessGrid(nodes), config, log=lambda m: print(m, file=sys.stderr))
    if status.get("state") != "completed":
        raise SystemExit(f"{folder.name}: federation ended {status.get('state')}: {status}")
    return out


def _summary(report_dir: Path, run: Path, seconds: float) -> dict:
    from fedspine.evaluation.records import read_evaluation
    from fedspine.fileio import PRIVACY_SUMMARY

    report = read_evaluation(report_dir)
    arms, utility = report.arms or {}, (report.utility.arms or {}) if report.utility else {}
    epsilons = {}
    privacy = run / PRIVACY_SUMMARY
    if privacy.exists():
        data = json.loads(privacy.read_text())
        for name, site in (data.get("sites") or {}).items():
            epsilons[name] = site.get("epsilon")
    tstr = utility.get("TSTR")
    return {
        "trtr_auc": arms["TRTR"].auc,
        "tstr_auc": arms["TSTR"].auc,
        "tstr_ci": arms["TSTR"].ci,
        "tstr_over_trtr": report.ratios.tstr_over_trtr if report.ratios else None,
        "signal_retained": tstr.signal_retained if tstr else None,
        "signal_retained_ci": tstr.signal_retained_ci if tstr else None,
        "trts_auc": report.class_fidelity.auc if report.class_fidelity else None,
        "epsilon": epsilons,
        "train_seconds": seconds,
    }


def _copy(src: Path, dst: Path) -> Path:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst)
    return dst


def _fedspine(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "fedspine", *args]
    print("$ fedspine " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fedspine {args[0]} failed:\n{done.stderr[-2000:]}")


if __name__ == "__main__":
    main()
