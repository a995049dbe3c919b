"""What limits the DP mean-embedding route (issue 15): one fit, targets that differ in one thing.

dp_utility.py measures the route as a user runs it. This takes it apart on the same data: every
variant fits G's mapping from the same public checkpoint with the same loop
(:func:`fedspine.training.mean_embedding_fit.fit_to_means`), steps and seed, to per-class target
means that differ from the DP release in one respect, and is evaluated exactly as dp_utility's
arms (same evaluation classifier and TRTR cache):

| variant | targets |
| --- | --- |
| release | the private class means with Gaussian noise as an ε release adds it (σ from the PRV accountant, q = 1, one step; Δ = √(C² + κ²)) |
| no-noise | the private class means, exact: the route's ceiling at any ε |
| classless | every class given the private pooled mean (exact): the sites' appearance without any class information |
| public | the public corpus's own class means (exact): the fit with no private image |
| last-block | as release, but only the last D block's spatial means are released (128 features at 32 px) with count scale κ = 0.5: far less noise on the class difference |
| last-block-no-noise | last-block's features, exact |

Each variant also reports how well its targets point the way the private data's classes differ:
‖μ_1 − μ_0‖ of the exact private means, of the targets, and their cosine.

**Benchmark only**: the noise here is drawn without the privacy engine and nothing is written to
a ledger; the route's privacy is dp_utility's and `fedspine embedding release`'s.

Reads a dp_utility work folder made with `--embedding-features rff+public` (its data, public
checkpoint, TRTR cache and settings); writes `WORK/ablation/VARIANT-…/` (named by the steps, and for the noisy variants ε, δ and
the noise seed, so other settings never read a cached row) and prints JSON:

    python benchmarks/embedding_ablation.py --work W --variants no-noise classless last-block
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("release", "no-noise", "classless", "public", "last-block", "last-block-no-noise")
NOISY = ("release", "last-block")
FULL_PARTS = "all"
LAST_BLOCK = "last-block-mean"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True, help="a dp_utility work folder")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epsilon", type=float, default=10.0, help="ε of the noisy variants")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=None, help="default: the work folder's")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    settings = json.loads((args.work / "settings.json").read_text())
    if settings.get("embedding_features") != "rff+public":
        raise SystemExit(
            f"{args.work}: made with --embedding-features {settings.get('embedding_features')}; "
            "this ablation slices the rff+public map (make one with --embedding-features "
            "rff+public)"
        )
    bench = Ablation(args, settings)
    rows = [bench.row(v) for v in args.variants]
    out = {
        "benchmark": "embedding_ablation",
        "epsilon": args.epsilon,
        "steps": bench.steps,
        "rows": rows,
    }
    from fedspine.fileio import write_json_atomic

    write_json_atomic(args.work / "ablation" / "results.json", out)
    print(json.dumps(out, indent=2))
    return out


class Ablation:
    def __init__(self, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        from fedspine.data.phantom_pool import phantom_pool
        from fedspine.experiments.pretrain import PREPARED_DIR, RUN_DIR

        self.args, self.s = args, settings
        self.steps = int(args.steps or settings["embedding_steps"])
        pool = phantom_pool(
            args.work / "data", 3, settings["images_per_site"], settings["phantom_size"],
            settings["resolution"], seed=settings["seed"],
            heldout_per_site=settings["heldout_per_site"],
        )  # fmt: skip
        self.pooled, self.scored = pool.pooled, pool.scored
        self.public_run = args.work / "public" / RUN_DIR
        self.public_corpus = args.work / "public" / PREPARED_DIR
        tag = "" if self.scored == self.pooled else f"-{self.scored.name}"
        self.trtr_cache = args.work / f"trtr{tag}"
        self._features: dict[str, Any] = {}

    def feature_map(self, parts: str):
        """Today's rff+public map, or one part of it (each part of unit norm, as in the map)."""
        if parts not in self._features:
            from fedspine.training.mean_embedding_features import build_feature_map

            full = build_feature_map(f"rff+{self.public_run}")
            self._features[parts] = full if parts == FULL_PARTS else LastBlockMean(full)
        return self._features[parts]

    def exact_means(self, data: Path, parts: str, kappa: float):
        """(class sums [K, D], counts [K], Δ) of ``data``'s train split, unnoised."""
        import numpy as np

        from fedspine.data.prepared import load_prepared
        from fedspine.training.mean_embedding import (
            embedding_sums,
            image_features,
            sensitivity,
            split_vector,
        )

        dataset = load_prepared(data)
        train = dataset.select("train", labelled=True)
        feats = image_features(self.feature_map(parts), np.asarray(train.images))
        k = dataset.num_classes
        vector = embedding_sums(feats, train.labels, train.privacy_ids, k, 1.0, kappa)
        sums, counts = split_vector(vector, k, kappa)
        return sums, counts, vector, sensitivity(1.0, kappa)

    def targets(self, variant: str) -> tuple[Any, dict[str, Any]]:
        import numpy as np

        from fedspine.privacy.accounting import calibrate_noise
        from fedspine.training.mean_embedding import split_vector

        parts = LAST_BLOCK if variant.startswith("last-block") else FULL_PARTS
        kappa = 0.5 if parts == LAST_BLOCK else 1.0
        sums, counts, vector, delta_sens = self.exact_means(self.pooled, parts, kappa)
        truth = sums / np.maximum(counts, 1.0)[:, None]
        info: dict[str, Any] = {"features": parts, "dim": int(sums.shape[1]), "kappa": kappa}
        if variant in NOISY:
            sigma = calibrate_noise(
                self.args.epsilon, self.args.delta, 1.0, 1, accountant="prv", label="ablation"
            )
            rng = np.random.default_rng(self.args.noise_seed)
            noisy = vector + rng.normal(0.0, sigma * delta_sens, size=vector.shape)
            n_sums, n_counts = split_vector(noisy, len(counts), kappa)
            means = n_sums / np.maximum(n_counts, 1.0)[:, None]
            info.update(noise_multiplier=sigma, noise_std=sigma * delta_sens)
        elif variant == "classless":
            means = np.repeat((sums.sum(axis=0) / counts.sum())[None], len(counts), axis=0)
        elif variant == "public":
            p_sums, p_counts, _, _ = self.exact_means(self.public_corpus, parts, kappa)
            means = p_sums / np.maximum(p_counts, 1.0)[:, None]
        else:
            means = truth
        true_diff, diff = truth[1] - truth[0], means[1] - means[0]
        norm = float(np.linalg.norm(diff))
        info.update(
            class_difference_private=float(np.linalg.norm(true_diff)),
            class_difference_targets=norm,
            cosine_to_private=(
                float(true_diff @ diff / (np.linalg.norm(true_diff) * norm)) if norm > 0 else None
            ),
        )
        return means, info

    def row(self, variant: str) -> dict[str, Any]:
        folder = self.args.work / "ablation" / self.folder_name(variant)
        done = folder / "row.json"
        if done.is_file():
            return json.loads(done.read_text())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        start = time.perf_counter()
        means, info = self.targets(variant)
        run = self.fit(folder, variant, means)
        row = {"variant": variant, **info, "fit_seconds": time.perf_counter() - start}
        row.update(self.evaluate(folder, run))
        from fedspine.fileio import write_json_atomic

        write_json_atomic(done, row)
        print(f"{variant}: {json.dumps(row)}", file=sys.stderr, flush=True)
        return row

    def folder_name(self, variant: str) -> str:
        """Everything a cached row depends on beyond the work folder's own settings."""
        name = f"{variant}-{self.steps}steps"
        if variant in NOISY:
            name += (
                f"-eps{self.args.epsilon:g}-delta{self.args.delta:g}-noise{self.args.noise_seed}"
            )
        return name

    def fit(self, folder: Path, variant: str, means) -> Path:
        import numpy as np
        import torch

        from fedspine.data.prepared import load_prepared
        from fedspine.models import Generator, NetworkConfig
        from fedspine.training.generate import save_generator
        from fedspine.training.mean_embedding_fit import FitRequest, fit_to_means
        from fedspine.training.public_init import load_public_init

        parts = LAST_BLOCK if variant.startswith("last-block") else FULL_PARTS
        public = load_public_init(self.public_run, "")
        request = FitRequest(
            releases=[], out=folder / "run", steps=self.steps, seed=self.s["seed"],
            g_trainable=self.s.get("embedding_g", "mapping"),
        )  # fmt: skip
        torch.manual_seed(request.seed)
        G = Generator(NetworkConfig(**public.network))
        G.load_state_dict(public.weights["G_ema"])
        G_ema, log, _, _ = fit_to_means(
            G, self.feature_map(parts), means, np.ones(len(means), dtype=bool), request
        )
        run = Path(request.out)
        run.mkdir()
        names = load_prepared(self.pooled).class_names
        training = {"model": "cgan", "route": f"embedding ablation: {variant}"}
        save_generator(run / "generator.pt", G_ema, public.network, names, training=training)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        return run

    def evaluate(self, folder: Path, run: Path) -> dict[str, Any]:
        from fedspine.evaluation.classification import signal_retained
        from fedspine.evaluation.config import EvaluateConfig
        from fedspine.evaluation.records import read_evaluation
        from fedspine.reporting.evaluation_report import evaluate
        from fedspine.training.generate import generate_dataset

        synthetic = folder / "synthetic"
        generate_dataset(run, synthetic, per_class=self.s["per_class"], seed=self.s["seed"])
        patience = self.s.get("classifier_patience", 0) or self.s["classifier_epochs"]
        cfg = EvaluateConfig(
            epochs=self.s["classifier_epochs"], patience=patience, seed=self.s["seed"],
            mix_per_class=0, bootstrap=self.s["bootstrap"], device="cpu",
        )  # fmt: skip
        report = folder / "evaluation"
        evaluate(
            synthetic, self.pooled, self.scored, report, cfg, overwrite=True,
            trtr_cache=self.trtr_cache,
        )  # fmt: skip
        record = read_evaluation(report)
        arms = record.arms or {}
        tstr, trtr = arms["TSTR"], arms["TRTR"]
        return {
            "tstr_auc": tstr.auc,
            "tstr_ci": list(tstr.ci) if tstr.ci else None,
            "trtr_auc": trtr.auc,
            "signal_retained": signal_retained(tstr.auc, trtr.auc),
        }


class LastBlockMean:
    """The last discriminator block's spatial mean alone, out of the rff+public map (unit norm,
    as each part of the map is)."""

    def __init__(self, full) -> None:
        import torch

        self.network = full.maps[1]
        with torch.no_grad():
            self.dim = int(self(torch.zeros(1, 1, 8, 8)).shape[1])

    def __call__(self, x):
        from fedspine.training.mean_embedding_features import resize

        D = self.network.D
        h = D.from_rgb(resize(x, self.network.resolution))
        for block in D.blocks:
            h = block(h)
        v = h.mean(dim=(2, 3))
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


if __name__ == "__main__":
    main()
