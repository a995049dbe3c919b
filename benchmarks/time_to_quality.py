"""Time to quality (issue 18): signal retained against wall-clock minutes of training, for the
`cpu` preset as it is (`today`) and a tuned candidate (`tuned`), side by side in one run.

Data: three phantom sites (`--images-per-site` each), ingested at every `--resolutions` and
pooled (`merge_prepared`), cached under `--work` so reruns reuse them. For each resolution,
one fresh trainer per variant and training seed (`build_trainer`, the library's own) trains on
the pooled train split against its own wall clock, in turns of `--chunk-seconds` (the one with
the least time goes next, so a change in the machine's load falls on every variant alike; each
keeps its own torch RNG stream). At each `--minutes` mark the clocks stop, each G_ema is saved as
a generator, `--per-class` synthetic images per class are generated and evaluated (`fedspine
evaluate`'s pipeline: TSTR against TRTR on the pooled real test split), and the clocks resume.
Every evaluation of one resolution shares one TRTR classifier (a TRTR cache folder beside the
pooled data, keyed by the evaluation settings), so every number is against the same reference.
The sites' own test split is small (174 images at 300 per site: intervals about ±0.1 AUC), so
`--heldout-per-site M` adds M images per site of new patients of the same three sites (same
domains, another patient seed) to the test split alone; nothing trains on them. `--reevaluate
RESULTS_JSON` trains nothing and scores an earlier run's saved synthetic sets again (e.g. on the
held-out test set), keeping its kimg and clocks.

`tuned` applies issue 18's items 1-2 to the cpu preset: ADA adjusts over 15 kimg instead of 100,
path-length regularisation and style mixing are off. `--set key=value` changes the tuned
candidate further (dotted keys into TrainConfig: `augment.adjust_kimg=10`, `r1_gamma=0.05`,
`network.mapping_layers=1`, `batch=16`, `ema_kimg=2`); `start_p=0.2` starts ADA's p there
instead of 0 (a benchmark knob: AugmentConfig has no such field yet); `clinical=0.1` makes the
variant a SpineGAN with that λ: it first trains its clinical classifier (the evaluation's `small`
architecture, on the pooled train split, selected on the val split) on its own clock, so its
minutes include the classifier's. `--candidate NAME K=V ...`
adds a variant of its own (item 3's sweep: one knob per candidate, all racing together), and
`--variants` picks which run (default: today, tuned and every candidate).

Prints one JSON object: one row per (variant, resolution, seed, minute mark) with kimg reached,
TSTR and TRTR AUC [95 % CI], signal retained (TSTR − 0.5)/(TRTR − 0.5) [CI], TSTR/TRTR and ADA p;
and per resolution and mark the mean over seeds of each variant and its ratios over today.
The clock is wall time, so on a shared machine the minutes buy less training: the load average
before and after, the training CPU seconds and the thread count are recorded with the argv.
Issue 18's measurement (15 minutes on 2 quiet cores):

    python benchmarks/time_to_quality.py --work DIR --threads 2 --heldout-per-site 600 \\
        --resolutions 32 64 --seeds 0 1 --minutes 5 10 15

`--quick` is a smoke run of the whole path at toy sizes (16 px, seconds per mark).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedspine.data.phantom_pool import phantom_pool
from fedspine.data.prepared import load_prepared
from fedspine.evaluation.config import EvaluateConfig
from fedspine.evaluation.records import read_evaluation
from fedspine.reporting.evaluation_report import evaluate
from fedspine.training.batches import BatchSampler, training_data
from fedspine.training.classifier_run import ClassifierRequest, train_classifier_run
from fedspine.training.clinical import ClinicalLoss
from fedspine.training.config import TrainConfig, preset_config
from fedspine.training.factory import TrainerSpec, build_trainer
from fedspine.training.gan_trainer import configure_cpu
from fedspine.training.generate import generate_dataset, save_generator

# Issue 18, items 1-2: ADA that can react within a short run; no path-length regularisation and
# no style mixing (NVIDIA's own 32 px configuration turns both off).
TUNED = {"augment.adjust_kimg": 15.0, "pl_weight": 0.0, "style_mixing": 0.0}
BENCHMARK_KNOBS = ("start_p", "clinical")
QUICK = {
    "images_per_site": 40,
    "phantom_size": 64,
    "resolutions": [16],
    "seeds": [0],
    "minutes": [0.04, 0.08],
    "per_class": 16,
    "epochs": 2,
    "bootstrap": 50,
    "chunk_seconds": 1.0,
}
SITES = 3
# Compared as tuned / today at every mark. Signal retained is None where TRTR's interval holds
# chance (then only the plain AUC ratio and the kimg reached compare).
RATIO_KEYS = ("signal_retained", "tstr_over_trtr", "kimg")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("time_to_quality"))
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument(
        "--variants", nargs="+", default=None, help="default: today, tuned and every --candidate"
    )
    parser.add_argument(
        "--candidate",
        dest="candidates",
        action="append",
        nargs="+",
        default=[],
        metavar=("NAME", "K=V"),
        help="one more variant: a name and its changes to the cpu preset (same keys as --set), "
        "e.g. --candidate no-pl pl_weight=0 --candidate ema2 ema_kimg=2 (item 3's sweep)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 10.0, 15.0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--images-per-site", type=int, default=300)
    parser.add_argument("--phantom-size", type=int, default=256, help="phantom short side, px")
    parser.add_argument(
        "--heldout-per-site",
        type=int,
        default=0,
        help="new patients' images per site added to the test split alone (never trained on): "
        "a larger test set narrows every interval (default: 0, the sites' own test split)",
    )
    parser.add_argument("--per-class", type=int, default=300, help="synthetic images per class")
    parser.add_argument("--epochs", type=int, default=20, help="evaluation classifier epochs")
    parser.add_argument(
        "--patience",
        type=int,
        default=0,
        help="checks without a better validation AUC before the evaluation classifier stops; "
        "0: none (stopping early on these sites' 66 validation images made TRTR swing by 0.25 "
        "across classifier seeds, benchmarks/trtr_stability.py)",
    )
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--eval-seed", type=int, default=0, help="one for every evaluation")
    parser.add_argument("--threads", type=int, default=None, help="default: the usable cores")
    parser.add_argument(
        "--chunk-seconds", type=float, default=10.0, help="training turn of each contender"
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke run")
    parser.add_argument(
        "--reevaluate",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="train nothing: score again the synthetic sets an earlier run of this --work saved "
        "(its rows keep their kimg and clocks), e.g. against a --heldout-per-site test set",
    )
    args = parser.parse_args(argv)
    if args.quick:  # toy sizes as defaults; options given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    minutes = sorted(set(args.minutes))
    overrides = parse_overrides(args.overrides)
    candidates = parse_candidates(args.candidates, overrides)
    variants = args.variants or list(candidates)
    unknown = [v for v in variants if v not in candidates]
    if unknown:
        raise SystemExit(f"--variants {unknown}: choose from {sorted(candidates)}")
    earlier = None
    if args.reevaluate is not None:  # the earlier run's own resolutions, marks and settings
        earlier = json.loads(args.reevaluate.read_text())
        args.resolutions = sorted({r["resolution"] for r in earlier["rows"]})
        minutes = sorted({r["minutes"] for r in earlier["rows"]})
        args.per_class = earlier["evaluation"]["per_class"]

    load_before = os.getloadavg()
    threads = configure_cpu(args.threads)
    started = time.perf_counter()
    work = args.work
    pooled = {res: _pooled_data(work, args, res) for res in args.resolutions}
    eval_cfg = EvaluateConfig(
        arch="small",
        epochs=args.epochs,
        patience=args.patience or args.epochs,
        seed=args.eval_seed,
        bootstrap=args.bootstrap,
        mix_per_class=0,  # no mixed arm: TSTR and TRTR are what this measures
        domain_epochs=1,
        threads=threads,
    )
    eval_tag = hashlib.sha256(json.dumps(eval_cfg.to_dict(), sort_keys=True).encode())
    rows: list[dict] = []
    configs: dict[str, dict] = {}
    for res in args.resolutions:
        data_path = pooled[res]
        trtr_cache = _trtr_cache(data_path, res, args.heldout_per_site, eval_tag.hexdigest())
        if args.reevaluate is not None:
            rows += _reevaluate(earlier, res, work, data_path, trtr_cache, eval_cfg, threads)
            continue
        dataset = load_prepared(data_path)
        data = training_data(dataset.select("train", labelled=True), res)
        contenders = []
        for variant in variants:
            cfg, start_p = variant_config(candidates[variant], res, data.num_classes)
            clinical = float(candidates[variant].get("clinical", 0.0))
            configs[f"{variant}/{res}px"] = {
                **cfg.to_dict(),
                "start_p": start_p,
                "clinical": clinical,
            }
            for seed in args.seeds:
                folder = work / "runs" / f"{variant}-{res}px-seed{seed}"
                shutil.rmtree(folder, ignore_errors=True)
                spinegan = (
                    SpineGANSetup(clinical, data_path, args.epochs, threads) if clinical else None
                )
                contenders.append(Contender(variant, cfg, start_p, seed, data, folder, spinegan))

        def evaluate_row(c: Contender, mark: float, path=data_path, cache=trtr_cache) -> dict:
            return c.evaluate_at(mark, path, cache, eval_cfg, args.per_class, threads)

        rows += _race(contenders, minutes, args.chunk_seconds, evaluate_row)
    report = {
        "benchmark": "time_to_quality",
        "argv": ["benchmarks/time_to_quality.py", *(sys.argv[1:] if argv is None else argv)],
        "quick": args.quick,
        "clock": "wall seconds of training only (saving, generating, evaluating paused it)",
        "torch_threads": threads,
        "torch": torch.__version__,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "seconds_total": time.perf_counter() - started,
        "data": {
            "sites": SITES,
            "images_per_site": args.images_per_site,
            "phantom_size": args.phantom_size,
            "heldout_per_site": args.heldout_per_site,
            "train_images": {f"{r}px": _split_size(pooled[r], "train") for r in pooled},
            "test_images": {f"{r}px": _split_size(pooled[r], "test") for r in pooled},
        },
        "evaluation": {"per_class": args.per_class, **eval_cfg.to_dict()},
        "tuned_changes": earlier["tuned_changes"] if earlier else candidates["tuned"],
        "candidates": earlier.get("candidates") if earlier else candidates,
        "configs": earlier["configs"] if earlier else configs,
        "reevaluated": {"from_argv": earlier["argv"]} if earlier else None,
        "rows": rows,
        "summary": summarise(rows, args.resolutions, minutes),
    }
    work.mkdir(parents=True, exist_ok=True)
    suffix = "-reevaluated" if earlier else ""  # the earlier run's own files stay as they were
    (work / f"results{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / f"report{suffix}.md").write_text(markdown(report))
    print(json.dumps(report, indent=2))
    return report


def parse_candidates(items: list[list[str]], overrides: dict) -> dict[str, dict]:
    """Every variant's changes to the cpu preset: today (none), tuned (``TUNED`` and ``--set``)
    and each ``--candidate NAME K=V ...``."""
    out: dict[str, dict] = {"today": {}, "tuned": {**TUNED, **overrides}}
    for name, *changes in items:
        if name in out or "=" in name:
            raise SystemExit(f"--candidate {name}: give a new name first, then its K=V changes")
        out[name] = parse_overrides(changes)
    return out


def variant_config(changes: dict, resolution: int, num_classes: int) -> tuple[TrainConfig, float]:
    """The cpu preset with ``changes`` applied, and ADA's starting p."""
    cfg = preset_config("cpu", resolution, num_classes)
    cfg.device = "cpu"
    changes = dict(changes)
    start_p = float(changes.pop("start_p", 0.0))
    changes.pop("clinical", None)
    return apply_overrides(cfg, changes), start_p


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings as a dict; values read as JSON (numbers, booleans, null) or text."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out[key.strip()] = value
    return out


def apply_overrides(cfg: TrainConfig, changes: dict) -> TrainConfig:
    """``cfg`` with dotted keys replaced (``augment.adjust_kimg``, ``network.mapping_layers``,
    ``pl_weight``); every part is rebuilt, so its own checks run. Unknown keys are refused."""
    data = cfg.to_dict()
    for key, value in changes.items():
        if key in BENCHMARK_KNOBS:
            continue
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"--set {key}: {part!r} is not a section of TrainConfig")
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"--set {key}: no such setting (see fedspine/training/config.py)")
        node[leaf] = value
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--set: {err}") from None


def summarise(rows: list[dict], resolutions: list[int], minutes: list[float]) -> dict:
    """Per resolution and minute mark: each variant's means over seeds, and each other variant
    over today (``signal_retained_tuned_over_today``, ...)."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    out: dict[str, dict] = {}
    for res in resolutions:
        per_mark: dict[str, dict] = {}
        for mark in minutes:
            entry: dict[str, dict | float | None] = {}
            for variant in variants:
                picked = [
                    r for r in rows if r["variant"] == variant
                    and r["resolution"] == res and r["minutes"] == mark
                ]  # fmt: skip
                if picked:
                    entry[variant] = {
                        key: _mean([r[key] for r in picked])
                        for key in (*RATIO_KEYS, "tstr_auc", "trtr_auc", "ada_p")
                    } | {"seeds": len(picked)}
            for variant in variants:
                if variant != "today" and "today" in entry and variant in entry:
                    for key in RATIO_KEYS:
                        entry[f"{key}_{variant}_over_today"] = _ratio(
                            entry[variant][key], entry["today"][key]
                        )
            per_mark[_mark(mark)] = entry
        out[f"{res}px"] = per_mark
    return out


def markdown(report: dict) -> str:
    """The rows as a Markdown table (one line per resolution, mark and variant; seeds side by
    side), for the README and for a person to read."""
    lines = [
        "| px | minutes | variant | kimg | TSTR AUC [95 % CI] | TRTR AUC [95 % CI] "
        "| signal retained [95 % CI] | TSTR/TRTR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = report["rows"]
    for res in sorted({r["resolution"] for r in rows}):
        for mark in sorted({r["minutes"] for r in rows}):
            for variant in dict.fromkeys(r["variant"] for r in rows):
                picked = sorted(
                    (r for r in rows if (r["resolution"], r["minutes"], r["variant"])
                     == (res, mark, variant)),
                    key=lambda r: r["seed"],
                )  # fmt: skip
                if not picked:
                    continue
                cells = [
                    " / ".join(_fmt(r["kimg"], 1) for r in picked),
                    " / ".join(_with_ci(r["tstr_auc"], r["tstr_ci"]) for r in picked),
                    _with_ci(picked[0]["trtr_auc"], picked[0]["trtr_ci"]),
                    " / ".join(
                        _with_ci(r["signal_retained"], r["signal_retained_ci"]) for r in picked
                    ),
                    " / ".join(_fmt(r["tstr_over_trtr"], 2) for r in picked),
                ]
                lines.append(f"| {res} | {mark:g} | {variant} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    variants = {r["variant"] for r in rows}
    lines += [
        "",
        f"Seeds {', '.join(map(str, seeds))} side by side (separated by /). Signal retained is "
        "(TSTR − 0.5)/(TRTR − 0.5); undefined (–) where TRTR's interval holds chance. "
        "Changes to the cpu preset: "
        + "; ".join(
            f"{name} {json.dumps(changes)}"
            for name, changes in (
                report.get("candidates") or {"tuned": report["tuned_changes"]}
            ).items()
            if name != "today" and name in variants
        )
        + f". Load average before "
        f"{report['load_average_before'][0]:.2f}, after {report['load_average_after'][0]:.2f}; "
        f"{report['torch_threads']} torch threads.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: list | None) -> str:
    if value is None:
        return "–"
    if not ci:
        return _fmt(value, 2)
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


@dataclasses.dataclass(frozen=True)
class SpineGANSetup:
    """A SpineGAN contender: λ of the clinical loss, and how its classifier is trained (on the
    pooled train split, selected on its val split; the test split is never touched)."""

    weight: float
    data_path: Path
    epochs: int
    threads: int

    def classifier(self, folder: Path, seed: int, class_names: list[str]) -> ClinicalLoss:
        """Train C (the evaluation's `small` architecture, every epoch kept to the best val
        AUC) into ``folder`` and load it as the clinical loss."""
        request = ClassifierRequest(
            data=self.data_path,
            out=folder,
            arch="small",
            epochs=self.epochs,
            patience=self.epochs,
            seed=seed,
            device="cpu",
            threads=self.threads,
            overwrite=True,
        )
        train_classifier_run(request)
        torch.set_num_threads(self.threads)
        return ClinicalLoss.from_file(folder, class_names, weight=self.weight)


class Contender:
    """One (variant, seed) trainer with its own clock and its own torch RNG stream. A SpineGAN
    contender trains its clinical classifier first, on its own clock: the minutes it reports
    include the classifier's."""

    def __init__(
        self,
        variant: str,
        cfg: TrainConfig,
        start_p: float,
        seed: int,
        data,
        folder: Path,
        spinegan: SpineGANSetup | None = None,
    ) -> None:
        self.variant, self.seed, self.data, self.folder = variant, seed, data, folder
        self.cfg = dataclasses.replace(cfg, seed=seed)
        self.wall = self.cpu = 0.0
        spec = TrainerSpec()
        if spinegan is not None:
            start, cpu_start = time.perf_counter(), time.process_time()
            spec = TrainerSpec(
                clinical=spinegan.classifier(folder / "classifier", seed, data.class_names)
            )
            self.wall = time.perf_counter() - start
            self.cpu = time.process_time() - cpu_start
        self.classifier_seconds = self.wall
        self.trainer = build_trainer(spec, self.cfg, data.label_prior(), "cpu")
        if self.trainer.augment_pipe is not None and start_p > 0:
            with torch.no_grad():
                self.trainer.augment_pipe.p.fill_(start_p)
        self.batches = BatchSampler(data, self.cfg.batch, self.trainer.np_rng)
        self.rng_state = torch.get_rng_state()

    def train_for(self, seconds: float) -> None:
        """Train about ``seconds`` of wall time (the clock is read after every step)."""
        tick_kimg = self.cfg.batch / 1000
        start, cpu_start = time.perf_counter(), time.process_time()

        def stop(_trainer, _record) -> bool:
            return time.perf_counter() - start >= seconds

        torch.set_rng_state(self.rng_state)
        self.trainer.run(1e6, self.batches, on_tick=stop, tick_kimg=tick_kimg)
        self.rng_state = torch.get_rng_state()
        self.wall += time.perf_counter() - start
        self.cpu += time.process_time() - cpu_start

    def evaluate_at(
        self,
        mark: float,
        data_path: Path,
        trtr_cache: Path,
        eval_cfg: EvaluateConfig,
        per_class: int,
        threads: int,
    ) -> dict:
        """Save G_ema, generate ``per_class`` images per class, evaluate them: one row."""
        trainer, out = self.trainer, self.folder / f"m{_mark(mark)}"
        generator = save_generator(
            out / "generator.pt",
            trainer.G_ema,
            self.cfg.to_dict()["network"],
            self.data.class_names,
            training={"cur_nimg": trainer.cur_nimg, "preset": self.cfg.preset, "seed": self.seed},
        )
        start = time.perf_counter()
        generate_dataset(generator, out / "synthetic", per_class=per_class, seed=self.seed)
        scores = _score_set(out, "evaluation", data_path, trtr_cache, eval_cfg, threads)
        row = {
            "variant": self.variant,
            "resolution": self.cfg.resolution,
            "seed": self.seed,
            "minutes": mark,
            "train_wall_seconds": self.wall,
            "train_cpu_seconds": self.cpu,
            "clinical_classifier_seconds": self.classifier_seconds,
            "kimg": trainer.cur_nimg / 1000,
            "ada_p": trainer.ada_p,
            **scores,
            "eval_seconds": time.perf_counter() - start,
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row


def _race(
    contenders: list[Contender],
    minutes: list[float],
    chunk_seconds: float,
    evaluate_row,
) -> list[dict]:
    """Advance every contender to each minute mark in turns of ``chunk_seconds`` (the one with
    the least wall time goes next, so a change in the machine's load falls on all of them),
    then evaluate each at the mark."""
    rows = []
    for mark in minutes:
        deadline = mark * 60.0
        while True:
            behind = [c for c in contenders if c.wall < deadline]
            if not behind:
                break
            nxt = min(behind, key=lambda c: c.wall)
            nxt.train_for(min(chunk_seconds, deadline - nxt.wall))
        rows += [evaluate_row(c, mark) for c in contenders]
    return rows


def _reevaluate(
    earlier: dict,
    res: int,
    work: Path,
    data_path: Path,
    trtr_cache: Path,
    eval_cfg: EvaluateConfig,
    threads: int,
) -> list[dict]:
    """The earlier run's rows at ``res``, scored again from the synthetic sets it saved."""
    rows = []
    for old in (r for r in earlier["rows"] if r["resolution"] == res):
        folder = work / "runs" / f"{old['variant']}-{res}px-seed{old['seed']}"
        out = folder / f"m{_mark(old['minutes'])}"
        if not (out / "synthetic").is_dir():
            raise SystemExit(f"{out / 'synthetic'}: missing; --reevaluate needs the earlier --work")
        start = time.perf_counter()
        report = f"evaluation-{data_path.name}"
        shutil.rmtree(out / report, ignore_errors=True)
        scores = _score_set(out, report, data_path, trtr_cache, eval_cfg, threads)
        row = {**old, **scores, "eval_seconds": time.perf_counter() - start}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def _score_set(
    out: Path,
    report: str,
    data_path: Path,
    trtr_cache: Path,
    eval_cfg: EvaluateConfig,
    threads: int,
) -> dict:
    """``out/synthetic`` evaluated into ``out/report`` (TSTR against the shared TRTR on
    ``data_path``'s test split); its scores."""
    evaluate(
        out / "synthetic",
        data_path,
        data_path,
        out / report,
        dataclasses.replace(eval_cfg),
        trtr_cache=trtr_cache,
    )
    torch.set_num_threads(threads)  # the evaluation sets its own thread count
    return _scores(out / report)


def _trtr_cache(data_path: Path, res: int, heldout: int, tag: str) -> Path:
    """One TRTR per pooled data set and evaluation settings (a held-out test set is its own)."""
    return data_path.parent / (
        f"trtr-{res}" + (f"-heldout{heldout}" if heldout else "") + f"-{tag[:10]}"
    )


def _scores(report_dir: Path) -> dict:
    report = read_evaluation(report_dir)
    arms = report.arms or {}
    tstr = ((report.utility.arms or {}) if report.utility else {}).get("TSTR")
    return {
        "tstr_auc": arms["TSTR"].auc,
        "tstr_ci": arms["TSTR"].ci,
        "trtr_auc": arms["TRTR"].auc,
        "trtr_ci": arms["TRTR"].ci,
        "signal_retained": tstr.signal_retained if tstr else None,
        "signal_retained_ci": tstr.signal_retained_ci if tstr else None,
        "tstr_over_trtr": report.ratios.tstr_over_trtr if report.ratios else None,
        "verdict": tstr.verdict if tstr else None,
    }


def _pooled_data(work: Path, args, resolution: int) -> Path:
    """The three sites pooled, with the held-out population in the test split if asked."""
    root = work / f"phantom-{SITES}x{args.images_per_site}-{args.phantom_size}px"
    pool = phantom_pool(
        root, SITES, args.images_per_site, args.phantom_size, resolution,
        seed=0, heldout_per_site=args.heldout_per_site,
    )  # fmt: skip
    return pool.scored


def _split_size(path: Path, split: str) -> int:
    return int((load_prepared(path).splits == split).sum())


def _mean(values: list) -> float | None:
    kept = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _mark(minutes: float) -> str:
    return f"{minutes:g}"


if __name__ == "__main__":
    main()
