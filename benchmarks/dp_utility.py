"""Utility against ε of every route to DP synthetic data (issue 15, item 6), in one run.

Data: three phantom sites (`--images-per-site` each, DICOM from the simulator, ingested at
`--resolution`) and their pooled union, plus fedspine's public phantom corpus and a checkpoint
pretrained on it (`fedspine pretrain`: its own seed and prevalence, no private site's). All are
made under `--work` once and reused by reruns; every arm writes its own folder there and a
`row.json` when done, so an interrupted run continues where it stopped. The folder keeps its
settings (`settings.json`): a rerun may add ε, arms, modes or a held-out test set, and is refused
under other training or evaluation settings, whose cached rows would be passed off as its own.

Arms, for each ε of `--epsilons` (the first two once, without ε):

| arm | what it is |
| --- | --- |
| non-private | the cpu preset's cGAN on the private data, no DP: the utility DP gives up |
| non-private-public | all of G and D fine-tuned from the public checkpoint without DP: the ceiling of the public-pretraining routes |
| public-only | the public checkpoint itself: no private image at all (ε 0) |
| dp-sgd | today's DP recipe: DP-SGD on all of D, from scratch |
| dp-sgd-public | DP-SGD from the public checkpoint, only D's `--trainable-d` stages privatised (and G trains its mapping only) |
| dp-embedding | the one-shot DP mean-embedding release, then G fitted to it (no further ε; `--embedding-features` picks pixel random Fourier features, DP-MERF, and/or the public D's features, DP-MEPF; G's mapping network only is fitted, `--embedding-g all` fits all of G) |
| dp-classifier | the ceiling: the evaluation's classifier trained directly with DP-SGD |
| public-embedding | control for dp-embedding: G's mapping fitted the same way to the public corpus's own mean embedding (same features, no noise, no private image; ε 0): what the fit gives without the private release |
| public-classifier | control for every arm: the evaluation's classifier trained on the public corpus alone and scored on the private test split (ε 0): what the public data gives without any generator or private image |

Modes: `pooled` (one site holding the three sites' patients) and `federated` (three sites,
FedAvg through the real ServerApp round loop and ClientApp over the in-process Grid; the
embedding route as each site's release at its own ε, summed by the server). The DP classifier
is measured pooled only: fedspine has no federated DP classifier to compare with, and the pooled
one is an upper bound for it.

Every generator's synthetic set is evaluated as `fedspine evaluate` does (TSTR against TRTR on the
pooled real test split, patient-level bootstrap CIs, one shared TRTR classifier), and ε is read
back from each arm's own privacy home (the worst patient, every mechanism composed; federated:
the worst site). What DP contributes is reported as the DP arm's TSTR minus the public-only
arm's: a DP arm that only matches public-only learned nothing from the private data; and the
dp-embedding arm's minus public-embedding's, which holds the fit itself fixed (a fit to public
statistics can beat the checkpoint it starts from without any private data).

Prints one JSON object (also `results.json`), and writes `report.md` and `report.html` (the
table and a plot of utility against ε, `utility_vs_epsilon.png`). Issue 15's table:

    python benchmarks/dp_utility.py --work DIR --epsilons 1 3 10 --images-per-site 300 \\
        --heldout-per-site 600

`--heldout-per-site M` adds M images per site of new patients of the same three sites to the
test split alone (nothing trains on them; `fedspine.data.phantom_pool`): the sites' own test
split (about 170 images) gives intervals of about ±0.1 AUC, wider than most differences here.
Rows on another test set are other files (`row-pooled-32-heldout600.json`), so adding the
held-out set to a finished work folder re-scores every arm without training it again.

`--seeds N` trains, generates and evaluates every arm with N training seeds (the first seed's
folders keep their names, so seeds can be added to a finished work folder) and adds a table of
the mean, lowest and highest value across seeds: a generator near chance moves by more between
training seeds than its test-sampling interval shows.

`--quick` shrinks everything (16 px, a few images, tiny runs) to check the pipeline runs.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedspine.dp_options import FEDERATED_FEATURES

ARMS = (
    "non-private",
    "non-private-public",
    "public-only",
    "dp-sgd",
    "dp-sgd-public",
    "dp-embedding",
    "dp-classifier",
    "public-embedding",
    "public-classifier",
)
PRIVATE_ARMS = ("dp-sgd", "dp-sgd-public", "dp-embedding", "dp-classifier")
NON_PRIVATE_ARMS = ("non-private", "non-private-public")
FROM_PUBLIC = ("non-private-public", "public-only", "dp-sgd-public")
"""Arms that start from (or are) the public checkpoint."""
PUBLIC_ARMS = ("public-only", "public-embedding", "public-classifier")
"""Arms that see no private image: the same in every mode, measured once."""
MODES = ("pooled", "federated")
SITES = 3


@dataclass
class Settings:
    """Every setting of one benchmark run; written to WORK/settings.json."""

    epsilons: list[float]
    modes: list[str]
    arms: list[str]
    images_per_site: int = 300
    heldout_per_site: int = 0
    """New patients' images per site added to the test split alone (never trained on)."""
    phantom_size: int = 128
    resolution: int = 32
    kimg: float = 4.0
    """Real images shown to each GAN (pooled); a federation shows the same in total."""
    rounds: int = 4
    patients_per_step: int = 64
    d_steps_per_g: int = 1
    trainable_d: str = "top:2"
    augment_views: int = 1
    ada_p: float = 0.0
    public_images: int = 2000
    public_kimg: float = 8.0
    embedding_steps: int = 600
    embedding_g: str = "mapping"
    """What of G the dp-embedding fit moves from the public checkpoint: "mapping" or "all"."""
    embedding_features: str = "rff"
    """The released embedding: random Fourier features of pixels ("rff", DP-MERF), the public
    checkpoint's D features ("public", DP-MEPF) or both ("rff+public")."""
    per_class: int = 300
    classifier_epochs: int = 20
    classifier_patience: int = 0
    """Checks without a better validation AUC before the evaluation classifier stops; 0: none
    (the best check of the whole budget is kept). On these sites' 66 validation images, stopping
    after 5 made TRTR swing from 0.53 to 0.78 across classifier seeds
    (benchmarks/trtr_stability.py); 20 checks without stopping gave 0.72 to 0.82."""
    bootstrap: int = 1000
    seed: int = 0
    seeds: int = 1
    """Training seeds per arm (``seed``, ``seed`` + 1, …): their spread is the training
    randomness that the test-sampling intervals do not cover."""
    threads: int = 0


def parse(argv: list[str] | None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True, help="folder for data, arms, results")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    defaults = Settings(epsilons=[], modes=[], arms=[])
    for name in (
        "images_per_site",
        "heldout_per_site",
        "phantom_size",
        "resolution",
        "rounds",
        "patients_per_step",
        "d_steps_per_g",
        "augment_views",
        "public_images",
        "embedding_steps",
        "per_class",
        "classifier_epochs",
        "classifier_patience",
        "bootstrap",
        "seed",
        "seeds",
        "threads",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("kimg", "public_kimg", "ada_p"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    parser.add_argument("--trainable-d", default=None, help='"all" or "top:K" (dp-sgd-public)')
    parser.add_argument(
        "--embedding-g", default=None, choices=("all", "mapping"), help="what dp-embedding fits"
    )
    parser.add_argument(
        "--embedding-features",
        default=None,
        choices=FEDERATED_FEATURES,
        help="what dp-embedding releases: pixel random Fourier features, the public D's "
        "features, or both",
    )
    parser.add_argument("--quick", action="store_true", help="tiny everything: a pipeline check")
    args = parser.parse_args(argv)
    values = asdict(defaults)
    if args.quick:
        values.update(
            images_per_site=60,
            phantom_size=64,
            resolution=16,
            kimg=0.096,
            rounds=2,
            patients_per_step=8,
            public_images=96,
            public_kimg=0.096,
            embedding_steps=4,
            per_class=24,
            classifier_epochs=1,
            bootstrap=50,
        )
    for key in values:
        given = getattr(args, key, None)
        if given is not None and key not in ("epsilons", "modes", "arms"):
            values[key] = given
    values.update(epsilons=list(args.epsilons), modes=list(args.modes), arms=list(args.arms))
    if any(not (e > 0 and math.isfinite(e)) for e in values["epsilons"]):
        parser.error("--epsilons: each ε must be a positive number")
    if values["seeds"] < 1:
        parser.error("--seeds: at least 1")
    return Settings(**values), args.work


def main(argv: list[str] | None = None) -> dict[str, Any]:
    settings, work = parse(argv)
    work.mkdir(parents=True, exist_ok=True)
    if settings.threads > 0:
        import torch

        torch.set_num_threads(settings.threads)
        os.environ["OMP_NUM_THREADS"] = str(settings.threads)
    from fedspine.fileio import write_text_atomic

    check_work_settings(work, settings)
    write_text_atomic(work / "settings.json", json.dumps(asdict(settings), indent=2) + "\n")
    load_before = os.getloadavg()[0]
    # The library's progress lines go to stderr: stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        pool = make_sites(work, settings)
        sites, pooled = pool.sites, pool.pooled
        public = make_public(work, settings) if _needs_public(settings) else None
        rows = []
        for replicate in range(settings.seeds):
            bench = Bench(work, settings, sites, pooled, public, pool.scored, replicate)
            for mode in settings.modes:
                for arm in settings.arms:
                    for eps in settings.epsilons if arm in PRIVATE_ARMS else [None]:
                        row = bench.row(mode, arm, eps)
                        rows.append(row)
                        log(f"{mode} {arm} ε={eps} seed {bench.seed}: {json.dumps(row)}")
    add_contributions(rows)
    out = {
        "benchmark": "dp_utility",
        "settings": asdict(settings),
        "images_per_site": [_count(p, "train") for p in sites],
        "test_images": _count(pool.scored, "test"),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "rows": rows,
        "across_seeds": across_seeds(rows),
    }
    write_results(work, out)
    print(json.dumps(out, indent=2))
    return out


RESCORE_ONLY = ("epsilons", "modes", "arms", "heldout_per_site", "seeds", "threads")
"""Settings a rerun of a work folder may change: they pick which cells run (more seeds are more
cells; the first seed's stay), where they are scored (other row files) and how fast; every
other setting changes what a cached row means."""


BEFORE_THE_SETTING = {"embedding_g": "all", "classifier_patience": 5}
"""What a work folder made before a setting existed used, where that is not the default."""


def check_work_settings(work: Path, settings: Settings) -> None:
    """Refuse to reuse a work folder's data and rows under other settings: a cached row trained
    with another ``--kimg`` (say) would be reported as this run's."""
    earlier_file = work / "settings.json"
    if not earlier_file.is_file():
        return
    earlier = json.loads(earlier_file.read_text())
    mine = asdict(settings)
    # A setting added since the folder was made had the value its runs then used.
    before = {**asdict(Settings(epsilons=[], modes=[], arms=[])), **BEFORE_THE_SETTING}
    changed = sorted(
        key
        for key in mine
        if key not in RESCORE_ONLY and earlier.get(key, before[key]) != mine[key]
    )
    if changed:
        was = ", ".join(f"{k} {earlier.get(k, before[k])!r} -> {mine[k]!r}" for k in changed)
        raise SystemExit(
            f"{work}: its rows were made with other settings ({was}); its cached arms would be "
            "reported as this run's. Use a new --work, or the same settings."
        )


# --------------------------------------------------------------------------------------------
# Data and the public checkpoint.


def make_sites(work: Path, s: Settings):
    """Three phantom sites ingested at the resolution, their pooled union, and the union with
    the held-out test population (``--heldout-per-site``); made once."""
    from fedspine.data.phantom_pool import phantom_pool

    return phantom_pool(
        work / "data", SITES, s.images_per_site, s.phantom_size, s.resolution,
        seed=s.seed, heldout_per_site=s.heldout_per_site,
    )  # fmt: skip


def make_public(work: Path, s: Settings) -> Path:
    """The public checkpoint: fedspine's phantom corpus (its own seed), pretrained for DP."""
    from fedspine.experiments.logs import PlainReporter
    from fedspine.experiments.pretrain import PretrainConfig, pretrain
    from fedspine.fileio import RUN_GENERATOR

    out = work / "public"
    if not (out / "run" / RUN_GENERATOR).is_file():
        log(f"pretraining the public checkpoint ({s.public_images} images, {s.public_kimg} kimg)")
        config = PretrainConfig(
            images=s.public_images,
            size=s.phantom_size,
            resolution=s.resolution,
            kimg=s.public_kimg,
            device="cpu",
        )
        pretrain(out, config, stage=log, reporter=PlainReporter())
    return out / "run"


def _needs_public(s: Settings) -> bool:
    return any(a in s.arms for a in (*FROM_PUBLIC, *PUBLIC_ARMS, "dp-embedding"))


# --------------------------------------------------------------------------------------------
# The arms.


class Bench:
    """Runs one (mode, arm, ε) cell of one training seed: train, generate, evaluate, read ε
    back; cached.

    Replicate k trains, generates and evaluates with seed ``s.seed + k``, in folders suffixed
    ``-seed{seed}`` (the first replicate's have no suffix, so adding seeds keeps its rows). The
    public checkpoint is made once: public-only's replicates vary only generation and the
    evaluation's classifier."""

    def __init__(
        self,
        work: Path,
        s: Settings,
        sites: list[Path],
        pooled: Path,
        public: Path | None,
        scored: Path | None = None,
        replicate: int = 0,
    ) -> None:
        self.work, self.s, self.sites, self.pooled, self.public = work, s, sites, pooled, public
        self.seed = s.seed + replicate
        self.suffix = f"-seed{self.seed}" if replicate else ""
        self.names = [p.name for p in sites]
        self.scored = scored or pooled
        """Whose test split every arm is scored on (train and val are the pool's): the pool,
        with the held-out test population if any. Results on another test set are other files,
        so adding one re-scores every arm, and trains none again."""
        self.tag = "" if self.scored == pooled else f"-{self.scored.name}"
        self.trtr_cache = work / f"trtr{self.tag}{self.suffix}"

    def row_file(self, folder: Path) -> Path:
        return folder / f"row{self.tag}.json"

    @staticmethod
    def train_seconds(folder: Path, seconds: float) -> float:
        """The training time of the arm's first row (a re-score on another test set finds the
        arm trained), else ``seconds``."""
        for earlier in sorted(folder.glob("row*.json")):
            value = json.loads(earlier.read_text()).get("train_seconds")
            if value is not None:
                return float(value)
        return seconds

    def row(self, mode: str, arm: str, eps: float | None) -> dict[str, Any]:
        name = arm if eps is None else f"{arm}-eps{eps:g}"
        folder = self.work / mode / (name + self.suffix)
        done = self.row_file(folder)
        if done.is_file():
            return {**json.loads(done.read_text()), "seed": self.seed}
        row: dict[str, Any] = {"mode": mode, "arm": arm, "epsilon_target": eps, "seed": self.seed}
        if arm in PUBLIC_ARMS and mode != self.s.modes[0]:
            # No private data: the same generator in every mode; measured once.
            first = self.row_file(self.work / self.s.modes[0] / (arm + self.suffix))
            if first.is_file():
                row.update({k: v for k, v in json.loads(first.read_text()).items() if k != "mode"})
                row["mode"] = mode
                return _save(done, row)
        if arm == "dp-classifier" and mode == "federated":
            row["note"] = "not measured: fedspine trains no federated DP classifier"
            return _save(done, row)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if arm == "dp-classifier":
            classifier = self.dp_classifier(folder, eps)
            row["train_seconds"] = self.train_seconds(folder, time.perf_counter() - start)
            row.update(self.score_classifier(folder, classifier))
            row["epsilon"] = accounted_epsilon([self.pooled], [folder / "privacy"])
            return _save(done, row)
        if arm == "public-classifier":
            classifier = self.public_classifier(folder)
            row["train_seconds"] = self.train_seconds(folder, time.perf_counter() - start)
            row.update(self.score_public_classifier(folder, classifier))
            row["epsilon"] = 0.0
            return _save(done, row)
        generator, homes, data = self.train(mode, arm, eps, folder)
        row["train_seconds"] = self.train_seconds(folder, time.perf_counter() - start)
        row.update(self.evaluate(folder, generator))
        row["epsilon"] = accounted_epsilon(data, homes) if homes else (0.0 if eps is None else None)
        if arm in NON_PRIVATE_ARMS:
            row["epsilon"] = math.inf
        return _save(done, row)

    # -- training ------------------------------------------------------------------------------

    def train(
        self, mode: str, arm: str, eps: float | None, folder: Path
    ) -> tuple[Path, list[Path], list[Path]]:
        """(the generator's run folder, the privacy homes, the data each home is about)."""
        if arm == "public-only":
            return self.public, [], []
        if arm == "dp-embedding":
            return self.embedding(mode, eps, folder)
        if arm == "public-embedding":
            return self.public_embedding(folder), [], []
        dp = arm not in NON_PRIVATE_ARMS
        init = self.public if arm in FROM_PUBLIC else None
        trainable = self.s.trainable_d if arm == "dp-sgd-public" else "all"
        if mode == "pooled":
            run = self.pooled_gan(folder, eps if dp else None, init, trainable)
            return run, [folder / "privacy"] if dp else [], [self.pooled] if dp else []
        return self.federated_gan(folder, eps if dp else None, init, trainable)

    def pooled_gan(
        self, folder: Path, eps: float | None, init: Path | None, trainable: str
    ) -> Path:
        from fedspine.experiments.logs import PlainReporter
        from fedspine.fileio import RUN_GENERATOR, RUN_LATEST
        from fedspine.training.run import DPRequest, TrainRequest, train

        run = folder / "run"
        if (run / RUN_GENERATOR).is_file():
            return run
        resume = (run / RUN_LATEST).is_file()
        if not resume:
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(folder / "privacy", ignore_errors=True)
        dp = None
        if eps is not None:
            dp = DPRequest(
                target_epsilon=eps,
                expected_patients_per_step=self.s.patients_per_step,
                d_steps_per_g=self.s.d_steps_per_g,
                ada_p=self.s.ada_p,
                trainable_d=trainable,
                augment_views=self.s.augment_views,
                privacy_home=folder / "privacy",
            )
        request = TrainRequest(
            prepared=self.pooled,
            out=run,
            preset=None if resume else "cpu",
            kimg=self.s.kimg,
            resolution=None if resume else self.s.resolution,
            seed=None if resume else self.seed,
            resume=resume,
            device="cpu",
            dp=dp,
            init_from=None if resume else init,
        )
        train(request, PlainReporter())
        return run

    def federated_gan(
        self, folder: Path, eps: float | None, init: Path | None, trainable: str
    ) -> tuple[Path, list[Path], list[Path]]:
        """FedAvg over the three sites (ServerApp loop + ClientApp, in-process Grid)."""
        from fedspine.data.prepared import load_prepared
        from fedspine.federated.client_app import app as client_app
        from fedspine.federated.federation import FederationConfig, run_federation
        from fedspine.federated.grid import InProcessGrid, InProcessNode
        from fedspine.fileio import RUN_GENERATOR

        out = folder / "federation"
        homes = [folder / "privacy" / n for n in self.names]
        data = [_copy(p, folder / "data" / n) for p, n in zip(self.sites, self.names, strict=True)]
        dp = eps is not None
        if not (out / RUN_GENERATOR).is_file():
            nodes = [
                InProcessNode(
                    node_id=100 + k,
                    node_config={
                        "data-path": str(path),
                        "site-name": name,
                        "state-dir": str(folder / "state" / name),
                        "privacy-home": str(home),
                        **({"max-epsilon": float(eps)} if dp else {}),
                    },
                    app=client_app,
                )
                for k, (path, name, home) in enumerate(zip(data, self.names, homes, strict=True))
            ]
            first = load_prepared(data[0])
            config = FederationConfig(
                name=f"dp-utility-{folder.name}",
                output_dir=str(out),
                rounds=self.s.rounds,
                local_kimg=self.s.kimg / (self.s.rounds * SITES),
                min_sites=SITES,
                preset="cpu",
                resolution=int(first.resolution),
                class_names=list(first.class_names),
                seed=self.seed,
                dp=dp,
                dp_epsilon=eps,
                dp_patients_per_step=max(1, self.s.patients_per_step // SITES),
                dp_d_steps_per_g=self.s.d_steps_per_g,
                dp_ada_p=self.s.ada_p,
                dp_trainable_d=trainable,
                dp_augment_views=self.s.augment_views,
                initial_checkpoint=str(init) if init is not None else None,
            )
            status = run_federation(InProcessGrid(nodes), config, log=log)
            if status.get("state") != "completed":
                raise SystemExit(f"{folder}: federation ended {status.get('state')}: {status}")
        return out, homes if dp else [], data if dp else []

    def embedding(
        self, mode: str, eps: float | None, folder: Path
    ) -> tuple[Path, list[Path], list[Path]]:
        """Each holder's one DP release at ε (pooled: one; federated: one per site), then G
        fitted to their sum."""
        from fedspine.training.mean_embedding import release_embedding

        holders = [self.pooled] if mode == "pooled" else self.sites
        features = self.s.embedding_features.replace("public", str(self.public))
        names = ["pooled"] if mode == "pooled" else self.names
        homes = [folder / "privacy" / n for n in names]
        releases = []
        for data, name, home in zip(holders, names, homes, strict=True):
            path = folder / "releases" / f"{name}.npz"
            if not path.is_file():
                shutil.rmtree(home, ignore_errors=True)  # a half-done release starts afresh
                path.parent.mkdir(parents=True, exist_ok=True)
                release_embedding(
                    data, path, epsilon=float(eps), privacy_home=home, site=name,
                    features=features,
                )  # fmt: skip
            releases.append(path)
        return self.fit_embedding(releases, folder / "run"), homes, list(holders)

    def fit_embedding(self, releases: list[Path], run: Path) -> Path:
        """G fitted from the public checkpoint to the summed releases, as dp-embedding does."""
        from fedspine.fileio import RUN_GENERATOR
        from fedspine.training.mean_embedding_fit import FitRequest, fit_generator

        if not (run / RUN_GENERATOR).is_file():
            shutil.rmtree(run, ignore_errors=True)
            fit_generator(
                FitRequest(
                    releases=releases,
                    out=run,
                    steps=self.s.embedding_steps,
                    resolution=self.s.resolution,
                    init_from=self.public,
                    feature_networks=[self.public] if self.s.embedding_features != "rff" else [],
                    seed=self.seed,
                    g_trainable=self.s.embedding_g,
                )
            )
        return run

    def public_embedding(self, folder: Path) -> Path:
        """The control for dp-embedding: the public corpus's own class sums of per-patient mean
        features (the same map, clip and count scale, no noise), fitted exactly as a release is.
        No private image is read; the file's ε is 0 because nothing private is in it."""
        import numpy as np

        from fedspine.data.prepared import load_prepared
        from fedspine.training.mean_embedding import (
            FORMAT,
            EmbeddingRelease,
            embedding_sums,
            image_features,
            sensitivity,
            split_vector,
            write_release,
        )
        from fedspine.training.mean_embedding_features import build_feature_map

        path = folder / "releases" / "public.npz"
        if not path.is_file():
            corpus = load_prepared(self.public_corpus())
            train = corpus.select("train", labelled=True)
            # The public network was trained on this very corpus: that is allowed here (nothing
            # in it is private), so no dataset is named for the map to refuse.
            feature_map = build_feature_map(
                self.s.embedding_features.replace("public", str(self.public))
            )
            feats = image_features(feature_map, np.asarray(train.images))
            k = corpus.num_classes
            exact = embedding_sums(feats, train.labels, train.privacy_ids, k, 1.0, 1.0)
            sums, counts = split_vector(exact, k, 1.0)
            metadata = {
                "format": FORMAT,
                "site": "public",
                "class_names": list(corpus.class_names),
                "feature_map": feature_map.describe(),
                "clip_norm": 1.0,
                "count_scale": 1.0,
                "sensitivity": sensitivity(1.0, 1.0),
                "noise_multiplier": 0.0,
                "noise_std": 0.0,
                "epsilon": 0.0,
                "delta": 0.0,
                "accountant": "none: public data, no noise",
                "unit": corpus.privacy_unit,
                "patients": len(set(train.privacy_ids.tolist())),
                "mechanisms": [],
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            write_release(path, EmbeddingRelease(sums=sums, counts=counts, metadata=metadata))
        return self.fit_embedding([path], folder / "run")

    def public_corpus(self) -> Path:
        from fedspine.experiments.pretrain import PREPARED_DIR

        assert self.public is not None
        return self.public.parent / PREPARED_DIR

    def dp_classifier(self, folder: Path, eps: float | None) -> Path:
        return self.classifier(folder, self.pooled, eps)

    def public_classifier(self, folder: Path) -> Path:
        """Trained as TRTR is (same recipe and seed) on the public corpus's train split, its
        epoch chosen on the corpus's own validation split."""
        return self.classifier(folder, self.public_corpus(), None)

    def classifier(self, folder: Path, data: Path, eps: float | None) -> Path:
        """The evaluation's classifier trained on ``data``: with DP-SGD at ``eps`` (its ledger
        in the arm's ``privacy`` folder), or without DP when ``eps`` is None."""
        from fedspine.fileio import CLASSIFIER_WEIGHTS
        from fedspine.training.classifier_run import (
            ClassifierDPRequest,
            ClassifierRequest,
            train_classifier_run,
        )

        out = folder / "classifier"
        if not (out / CLASSIFIER_WEIGHTS).is_file():
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(folder / "privacy", ignore_errors=True)
            cfg = self.evaluate_config()
            dp = None
            if eps is not None:
                dp = ClassifierDPRequest(
                    target_epsilon=float(eps),
                    patients_per_step=self.s.patients_per_step,
                    privacy_home=folder / "privacy",
                )
            train_classifier_run(
                ClassifierRequest(
                    data=data,
                    out=out,
                    arch=cfg.arch,
                    epochs=cfg.epochs,
                    patience=cfg.patience,
                    seed=self.seed,
                    device="cpu",
                    dp=dp,
                )
            )
        return out

    # -- measuring -----------------------------------------------------------------------------

    def evaluate_config(self):
        from fedspine.evaluation.config import EvaluateConfig

        return EvaluateConfig(
            epochs=self.s.classifier_epochs,
            patience=self.s.classifier_patience or self.s.classifier_epochs,
            seed=self.seed,
            mix_per_class=0,
            bootstrap=self.s.bootstrap,
            device="cpu",
        )

    def evaluate(self, folder: Path, run: Path) -> dict[str, Any]:
        from fedspine.evaluation.records import read_evaluation
        from fedspine.fileio import EVAL_REPORT_JSON, SYNTHETIC_LABELS
        from fedspine.reporting.evaluation_report import evaluate
        from fedspine.training.generate import generate_dataset

        synthetic, report = folder / "synthetic", folder / f"evaluation{self.tag}"
        if not (synthetic / SYNTHETIC_LABELS).is_file():
            shutil.rmtree(synthetic, ignore_errors=True)
            generate_dataset(run, synthetic, per_class=self.s.per_class, seed=self.seed)
        if not (report / EVAL_REPORT_JSON).is_file():
            evaluate(
                synthetic,
                self.pooled,
                self.scored,
                report,
                self.evaluate_config(),
                overwrite=True,
                trtr_cache=self.trtr_cache,
            )
        return scores(read_evaluation(report))

    def score_classifier(self, folder: Path, classifier: Path) -> dict[str, Any]:
        """The DP classifier scored as one more arm of an evaluation (threshold on val, AUC on
        test), beside the public-only synthetic set (any set would do; only the arm is read)."""
        from fedspine.evaluation.records import read_evaluation
        from fedspine.fileio import EVAL_REPORT_JSON, SYNTHETIC_LABELS
        from fedspine.reporting.evaluation_report import evaluate
        from fedspine.training.generate import generate_dataset

        report = folder / f"evaluation{self.tag}"
        if not (report / EVAL_REPORT_JSON).is_file():
            synthetic = folder / "synthetic-probe"
            if not (synthetic / SYNTHETIC_LABELS).is_file():
                shutil.rmtree(synthetic, ignore_errors=True)
                probe = self.public or self._any_generator()
                generate_dataset(probe, synthetic, per_class=8, seed=self.seed)
            evaluate(
                synthetic,
                self.pooled,
                self.scored,
                report,
                self.evaluate_config(),
                overwrite=True,
                trtr_cache=self.trtr_cache,
                compare={"dp-classifier": classifier},
            )
        record = read_evaluation(report)
        arm = (record.arms or {})["dp-classifier"]
        trtr = (record.arms or {}).get("TRTR")
        return {
            "tstr_auc": arm.auc,
            "tstr_ci": list(arm.ci) if arm.ci else None,
            "trtr_auc": trtr.auc if trtr else None,
            "tstr_over_trtr": arm.auc / trtr.auc if trtr and trtr.auc else None,
            "signal_retained": _signal(arm.auc, trtr.auc if trtr else None),
            "what": "test AUC of the DP classifier itself (in the TSTR columns)",
        }

    def score_public_classifier(self, folder: Path, classifier: Path) -> dict[str, Any]:
        """The public classifier's AUC [patient-level CI] on the scored test split, beside the
        shared TRTR (read from an evaluation of a small probe set)."""
        import numpy as np

        from fedspine.data.prepared import load_prepared
        from fedspine.evaluation.classification import bootstrap_auc_ci
        from fedspine.evaluation.records import read_evaluation
        from fedspine.fileio import EVAL_REPORT_JSON, SYNTHETIC_LABELS
        from fedspine.models.classifier import load_classifier, predict_proba
        from fedspine.reporting.evaluation_report import evaluate
        from fedspine.training.generate import generate_dataset

        report = folder / f"evaluation{self.tag}"
        if not (report / EVAL_REPORT_JSON).is_file():
            synthetic = folder / "synthetic-probe"
            if not (synthetic / SYNTHETIC_LABELS).is_file():
                shutil.rmtree(synthetic, ignore_errors=True)
                generate_dataset(self.public, synthetic, per_class=8, seed=self.seed)
            cfg = self.evaluate_config()
            evaluate(
                synthetic, self.pooled, self.scored, report, cfg, overwrite=True,
                trtr_cache=self.trtr_cache,
            )  # fmt: skip
        trtr = scores(read_evaluation(report))["trtr_auc"]
        test = load_prepared(self.scored).select("test", labelled=True)
        model, _, _ = load_classifier(classifier)
        p = predict_proba(model, np.asarray(test.images))[:, -1]
        value, low, high = bootstrap_auc_ci(
            test.labels, p, test.patient_ids, n_boot=self.s.bootstrap, seed=self.seed
        )
        return {
            "tstr_auc": value,
            "tstr_ci": [low, high],
            "trtr_auc": trtr,
            "tstr_over_trtr": value / trtr if trtr else None,
            "signal_retained": _signal(value, trtr),
            "what": "test AUC of a classifier trained on the public corpus alone (in the TSTR "
            "columns)",
        }

    def _any_generator(self) -> Path:
        from fedspine.fileio import RUN_GENERATOR

        for path in sorted(self.work.glob("*/*/run")) + sorted(self.work.glob("*/*/federation")):
            if (path / RUN_GENERATOR).is_file():
                return path
        raise SystemExit("dp-classifier needs one generator to probe with: add public-only")


def scores(record) -> dict[str, Any]:
    """TSTR and TRTR AUC [CI], their ratio and the signal retained, from an evaluation."""
    arms = record.arms or {}
    utility = (record.utility.arms or {}) if record.utility else {}
    tstr, trtr = arms.get("TSTR"), arms.get("TRTR")
    retained = utility.get("TSTR")
    return {
        "tstr_auc": tstr.auc if tstr else None,
        "tstr_ci": list(tstr.ci) if tstr and tstr.ci else None,
        "trtr_auc": trtr.auc if trtr else None,
        "trtr_ci": list(trtr.ci) if trtr and trtr.ci else None,
        "tstr_over_trtr": record.ratios.tstr_over_trtr if record.ratios else None,
        "signal_retained": retained.signal_retained if retained else None,
        "signal_retained_ci": retained.signal_retained_ci if retained else None,
    }


def accounted_epsilon(data: list[Path], homes: list[Path]) -> float | None:
    """ε of the worst patient in each privacy home (every mechanism composed), worst home."""
    from fedspine.data.prepared import load_prepared
    from fedspine.privacy.engine import PrivacyEngine
    from fedspine.training.dp_run import dp_unit_of

    worst = None
    for prepared, home in zip(data, homes, strict=True):
        if not home.exists():
            continue
        dataset = load_prepared(prepared).select("train")
        engine = PrivacyEngine(dataset.privacy_ids, unit=dp_unit_of(dataset, None), home=home)
        eps = engine.spent()
        worst = eps if worst is None else max(worst, eps)
    return worst


def add_contributions(rows: list[dict[str, Any]]) -> None:
    """``dp_minus_public``: a DP arm's TSTR minus the public-only arm's in the same mode and
    seed; ``dp_minus_public_fit``: a dp-embedding arm's minus the public-embedding arm's (the
    same fit to public statistics), i.e. what the private release itself added."""

    def tstr_of(arm: str) -> dict[tuple[Any, Any], Any]:
        return {(r["mode"], r.get("seed")): r.get("tstr_auc") for r in rows if r["arm"] == arm}

    public, public_fit = tstr_of("public-only"), tstr_of("public-embedding")
    for r in rows:
        if r["arm"] not in PRIVATE_ARMS or r.get("tstr_auc") is None:
            continue
        key = (r["mode"], r.get("seed"))
        if public.get(key) is not None:
            r["dp_minus_public"] = r["tstr_auc"] - public[key]
        if r["arm"] == "dp-embedding" and public_fit.get(key) is not None:
            r["dp_minus_public_fit"] = r["tstr_auc"] - public_fit[key]


SPREAD_KEYS = ("tstr_auc", "signal_retained", "dp_minus_public", "dp_minus_public_fit")


def across_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, arm, ε): the mean, minimum and maximum over training seeds of TSTR, signal
    retained and DP − public-only, for cells measured with two seeds or more."""
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("tstr_auc") is not None:
            cells.setdefault((r["mode"], r["arm"], r.get("epsilon_target")), []).append(r)
    out = []
    for (mode, arm, eps), members in cells.items():
        if len(members) < 2:
            continue
        cell: dict[str, Any] = {
            "mode": mode,
            "arm": arm,
            "epsilon_target": eps,
            "seeds": [r.get("seed") for r in members],
        }
        for key in SPREAD_KEYS:
            values = [r[key] for r in members if r.get(key) is not None]
            if len(values) == len(members):
                cell[key] = {
                    "mean": sum(values) / len(values),
                    "min": min(values),
                    "max": max(values),
                }
        out.append(cell)
    return out


# --------------------------------------------------------------------------------------------
# Results a person reads.


def write_results(work: Path, out: dict[str, Any]) -> None:
    from fedspine.fileio import write_bytes_atomic, write_json_atomic, write_text_atomic

    write_json_atomic(work / "results.json", out)
    png = plot(out["rows"])
    if png is not None:
        write_bytes_atomic(work / "utility_vs_epsilon.png", png)
    write_text_atomic(work / "report.md", markdown(out))
    write_text_atomic(work / "report.html", html_page(out, png))


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        ci = r.get("tstr_ci")
        out.append(
            [
                r["mode"],
                r["arm"],
                str(r.get("seed", "")),
                _num(r.get("epsilon_target"), "—"),
                _num(r.get("epsilon"), "—"),
                _num(r.get("tstr_auc")) + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else ""),
                _num(r.get("trtr_auc")),
                _num(r.get("tstr_over_trtr")),
                _num(r.get("signal_retained")),
                _signed(r.get("dp_minus_public")),
                _signed(r.get("dp_minus_public_fit")),
                _num(r.get("train_seconds"), "—", 0),
                r.get("note", ""),
            ]
        )
    return out


HEAD = [
    "mode",
    "arm",
    "seed",
    "ε target",
    "ε accounted",
    "TSTR AUC [95% CI]",
    "TRTR AUC",
    "TSTR/TRTR",
    "signal retained",
    "DP − public-only",
    "DP − public-embedding",
    "train s",
    "note",
]


def markdown(out: dict[str, Any]) -> str:
    s = out["settings"]
    lines = [
        "# Utility of DP synthetic data against ε (benchmarks/dp_utility.py)",
        "",
        f"Three phantom sites of {s['images_per_site']} images at {s['resolution']} px; "
        f"GANs shown {s['kimg']:g} kimg; test split: {out['test_images']} images"
        + (
            f" (the sites' own and {s['heldout_per_site']} held-out images per site: new "
            "patients of the same sites, never trained on). "
            if s.get("heldout_per_site")
            else ". "
        )
        + "DP arms: patient-level ε from each arm's own privacy home (worst patient; federated: "
        "worst site). The DP classifier's row holds its own test AUC. "
        "'DP − public-only' is what the private data added over the public checkpoint alone; "
        "'DP − public-embedding' is what the private release added over the same fit to the "
        "public corpus's own embedding. The public-classifier row holds the test AUC of a "
        "classifier trained on the public corpus alone.",
        "",
        *_markdown_table(HEAD, table_rows(out["rows"])),
    ]
    if out.get("across_seeds"):
        lines += [
            "",
            "Across training seeds (mean [min, max]): the spread that the intervals above, "
            "which cover the sampling of test patients only, leave out.",
            "",
            *_markdown_table(SPREAD_HEAD, spread_rows(out["across_seeds"])),
        ]
    lines += ["", "![utility against ε](utility_vs_epsilon.png)", ""]
    return "\n".join(lines)


def _markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


SPREAD_HEAD = [
    "mode",
    "arm",
    "ε target",
    "seeds",
    "TSTR AUC",
    "signal retained",
    "DP − public",
    "DP − public fit",
]


def spread_rows(cells: list[dict[str, Any]]) -> list[list[str]]:
    def spread(value: dict[str, float] | None) -> str:
        if not value:
            return "n/a"
        return f"{_num(value['mean'])} [{_num(value['min'])}, {_num(value['max'])}]"

    return [
        [
            c["mode"],
            c["arm"],
            _num(c.get("epsilon_target"), "—"),
            str(len(c["seeds"])),
            spread(c.get("tstr_auc")),
            spread(c.get("signal_retained")),
            spread(c.get("dp_minus_public")),
            spread(c.get("dp_minus_public_fit")),
        ]
        for c in cells
    ]


def html_page(out: dict[str, Any], png: bytes | None) -> str:
    from fedspine.reporting.html_parts import figure, table

    body = table(HEAD, table_rows(out["rows"]))
    if out.get("across_seeds"):
        body += table(SPREAD_HEAD, spread_rows(out["across_seeds"]))
    plot_html = (
        figure(png, "TSTR AUC against ε; dashed: the arms without ε (no DP, or no private data)")
        if png
        else ""
    )
    intro = html.escape(markdown(out).split("\n\n")[1])
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<title>fedspine: DP utility against ε</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}</style>"
        f"</head><body><h1>Utility of DP synthetic data against ε</h1><p>{intro}</p>"
        f"{plot_html}{body}</body></html>\n"
    )


def plot(rows: list[dict[str, Any]]) -> bytes | None:
    """TSTR AUC against ε per DP arm and mode, with the ε-free arms as horizontal lines; with
    several training seeds, their mean with a bar from the lowest to the highest."""
    from matplotlib.figure import Figure

    cells: dict[tuple[Any, ...], list[float]] = {}
    for r in rows:
        if r.get("tstr_auc") is not None:
            cells.setdefault((r["mode"], r["arm"], r.get("epsilon_target")), []).append(
                r["tstr_auc"]
            )
    if not any(arm in PRIVATE_ARMS for _, arm, _ in cells):
        return None
    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.add_subplot()
    styles = {"pooled": "-", "federated": ":"}
    for mode in MODES:
        for arm in PRIVATE_ARMS:
            points = sorted(
                (eps, sum(v) / len(v), min(v), max(v))
                for (m, a, eps), v in cells.items()
                if m == mode and a == arm
            )
            if points:
                xs, ys, lows, highs = zip(*points, strict=True)
                below = [y - lo for y, lo in zip(ys, lows, strict=True)]
                above = [hi - y for y, hi in zip(ys, highs, strict=True)]
                ax.errorbar(
                    xs, ys, yerr=[below, above], fmt=styles[mode], marker="o", capsize=3,
                    label=f"{arm} ({mode})",
                )  # fmt: skip
    drawn: set[str] = set()
    for (mode, arm, _), values in cells.items():
        if arm in PRIVATE_ARMS or (arm in PUBLIC_ARMS and arm in drawn):
            continue  # an arm without private data is the same line in every mode
        drawn.add(arm)
        level = sum(values) / len(values)
        name = arm if arm in PUBLIC_ARMS else f"{arm} ({mode})"
        ax.axhline(level, linestyle="--", linewidth=1, color=f"C{len(drawn) + 3}", label=name)
    ax.axhline(0.5, color="black", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("ε (target)")
    ax.set_ylabel("TSTR AUC (real test split)")
    ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _save(path: Path, row: dict[str, Any]) -> dict[str, Any]:
    from fedspine.fileio import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, row)
    return row


def _copy(src: Path, dst: Path) -> Path:
    """A site's data copied into the arm's folder: its ledger stays the arm's alone."""
    if not dst.exists():
        partial = dst.with_name(dst.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src, partial)
        partial.rename(dst)
    return dst


def _count(path: Path, split: str) -> int:
    from fedspine.data.prepared import load_prepared

    return int((load_prepared(path).splits == split).sum())


def _signal(tstr: float | None, trtr: float | None) -> float | None:
    """The library's signal retained, None where either AUC is missing."""
    from fedspine.evaluation.classification import signal_retained

    return None if tstr is None or trtr is None else signal_retained(tstr, trtr)


def _num(value: Any, missing: str = "n/a", digits: int = 3) -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def _signed(value: Any) -> str:
    return "" if value is None else f"{value:+.3f}"


if __name__ == "__main__":
    main()
