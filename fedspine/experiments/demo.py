"""`fedspine demo`: the whole job on phantom data made on the spot, on a laptop CPU.

Three phantom hospitals with different domains are ingested; a real Flower SuperLink and three
SuperNodes run on loopback with TLS and site authentication. By default the federation takes the
route that measured best (issue 15): a public checkpoint is pretrained on a phantom population of
its own (no site's patient in it), every site releases once, under DP and its ε cap, the noisy
per-class means of its patients' pixel and public-discriminator features (DP-MEPF), and the
server fits the public generator's mapping to their sum. ``route="dp-sgd"`` instead trains the
GAN with patient-level DP-SGD in federated rounds. The federated generator's synthetic set is
evaluated (TSTR against TRTR on real phantom test images) beside the public checkpoint's own
(the public-only baseline: what DP adds is the difference), the privacy report is written, and
a signed release is made if every gate passes. Last, ``OUT/report.html`` gathers all of it in
one self-contained page, with the commands and settings that made it. Every process the demo starts is stopped when it ends,
Ctrl-C included.
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedspine.data.ingest import IngestConfig, ingest
from fedspine.data.phantom import write_phantom_sites
from fedspine.data.prepared import load_prepared, merge_prepared
from fedspine.evaluation.config import EvaluateConfig
from fedspine.evaluation.records import EvaluationRecord
from fedspine.experiments.budgets import ReproduceError
from fedspine.experiments.plan import CEILING_ARM
from fedspine.experiments.pretrain import PretrainConfig, pretrain
from fedspine.experiments.public_run import PRETRAIN_RUN_DIR, read_public_run
from fedspine.federated.deploy import (
    SiteProcessConfig,
    register_site,
    start_superlink,
    start_supernode,
    stop_superlink,
    submit_run,
    wait_for_run,
)
from fedspine.federated.federation import FederationConfig, read_rounds, read_status
from fedspine.federated.federation_config import EMBEDDING_ROUTE, EmbeddingRouteConfig
from fedspine.federated.processes import free_port
from fedspine.federated.security import make_server_certificates, make_site_keypair
from fedspine.fileio import (
    DEMO_CONFIG,
    DEMO_SUMMARY,
    EVAL_REPORT_HTML,
    EVAL_REPORT_MD,
    FEDERATION_CONFIG,
    RUN_GENERATOR,
    write_json_atomic,
)
from fedspine.privacy.report import build_report
from fedspine.privacy.signing import make_signing_key
from fedspine.release.gate import ReleaseRefused, make_release
from fedspine.reporting.evaluation_report import evaluate
from fedspine.reporting.html import write_html_report
from fedspine.reporting.privacy import write_privacy_report
from fedspine.training.classifier_run import (
    ClassifierDPRequest,
    ClassifierRequest,
    ClassifierRunError,
    train_classifier_run,
)
from fedspine.training.generate import generate_dataset
from fedspine.training.run import RunReporter


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes: small enough for two CPU cores in about ten minutes."""

    sites: int = 3
    images_per_site: int = 300
    phantom_size: int = 256
    resolution: int = 32
    seed: int = 0
    workers: int = 2
    rounds: int = 4
    local_kimg: float = 0.5
    epsilon: float = 10.0
    patients_per_step: int = 16
    per_class: int = 200
    classifier_epochs: int = 20
    """Validation checks of the evaluation classifiers, none skipped by an early stop: on the
    demo's 66 validation images an early stop made TRTR swing across classifier seeds
    (benchmarks/trtr_stability.py)."""
    release_per_class: int = 100
    route: str = "dp-mepf"
    """``dp-mepf``: one DP release of pixel and public-D features per site, G's mapping fitted
    on the server (measured best); ``dp-sgd``: federated DP-SGD rounds of the GAN."""
    public_run: str | None = None
    """A finished public run (``fedspine pretrain``'s OUT or a run folder) for ``dp-mepf``;
    None: pretrain one of ``public_kimg`` on ``public_images`` phantom images here."""
    public_images: int = 1000
    public_kimg: float = 8.0
    ceiling_patients_per_step: int = 32
    """Expected patients per DP-SGD step of the DP classifier ceiling."""
    fit_steps: int = 300
    fit_batch_per_class: int = 16
    """The server's fit: 300 steps of 16 images per class take about two minutes on two cores
    (dp_utility's measured rows fitted 600 of 32, about 5.5 minutes)."""

    def check(self) -> None:
        if self.route not in DEMO_ROUTES:
            raise ValueError(f"--route {self.route!r}: one of {', '.join(DEMO_ROUTES)}")
        if self.public_kimg <= 0 or self.public_images < 10 or self.fit_steps < 1:
            raise ValueError("--public-kimg, --public-images (>= 10) and --fit-steps: positive")


DEMO_ROUTES = ("dp-mepf", "dp-sgd")
PUBLIC_DIR = "public"
PUBLIC_ONLY = "public-only"
"""The public checkpoint's own synthetic set and evaluation: the baseline with no private data."""


@dataclass
class DemoResult:
    out: Path
    sites: list[str] = field(default_factory=list)
    ingest: dict[str, dict] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)
    public_only: dict = field(default_factory=dict)
    public_run: str | None = None
    privacy: dict = field(default_factory=dict)
    release: dict = field(default_factory=dict)
    report: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


Stage = Callable[[str], None]


REPORT_FILE = EVAL_REPORT_HTML
REPORT_TITLE = "fedspine demo: federated, differentially private synthetic spine radiographs"


def run_demo(
    out: Path,
    config: DemoConfig | None = None,
    stage: Stage | None = None,
    command: str | None = None,
    reporter: RunReporter | None = None,
) -> DemoResult:
    """Run each stage in order under ``out``; ``stage`` is told when each one starts.

    ``command`` is the command line that started the demo, recorded in the report (default:
    the ``fedspine demo`` line equivalent to ``config``); ``reporter`` shows the public
    pretraining's progress.
    """
    config = config or DemoConfig()
    config.check()
    stage = stage or (lambda _msg: None)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / DEMO_CONFIG, asdict(config))
    result = DemoResult(out=out)

    with _timed(result, "phantom"):
        stage(
            f"making {config.sites} phantom hospital sites × {config.images_per_site} DICOM images"
        )
        phantom_root = out / "phantom"
        if not phantom_root.exists():
            write_phantom_sites(
                phantom_root,
                sites=config.sites,
                images_per_site=config.images_per_site,
                size=config.phantom_size,
                seed=config.seed,
            )
        site_dirs = sorted(
            p for p in phantom_root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        result.sites = [p.name for p in site_dirs]

    with _timed(result, "ingest"):
        for site in site_dirs:
            stage(f"ingesting {site.name}")
            summary = ingest(
                site,
                out / "prepared" / site.name,
                IngestConfig(
                    resolution=config.resolution, workers=config.workers, seed=config.seed
                ),
                overwrite=True,
            )
            result.ingest[site.name] = {
                "images": summary.num_images,
                "rejected": summary.num_rejected,
                "counts": summary.counts,
            }

    if config.route == "dp-mepf":
        with _timed(result, "public pretraining"):
            result.public_run = str(_public_run(out, config, stage, reporter))

    with _timed(result, "federation"):
        _fresh_federation(out, stage)
        result.rounds = _federate(out, result.sites, config, stage, result.public_run)

    with _timed(result, "generate"):
        stage(
            f"generating {config.per_class} synthetic images per class from the federated generator"
        )
        if (out / "synthetic").exists():
            shutil.rmtree(out / "synthetic")
        generate_dataset(
            out / "federation" / RUN_GENERATOR,
            out / "synthetic",
            per_class=config.per_class,
            seed=config.seed,
        )

    pooled = merge_prepared(
        [load_prepared(out / "prepared" / s) for s in result.sites],
        out / "prepared" / "pooled",
        result.sites,
        overwrite=True,
    )
    with _timed(result, "DP classifier ceiling"):
        stage(
            f"the ceiling: the evaluation's classifier trained directly with DP-SGD at ε "
            f"{config.epsilon:g} on the pooled sites' patients (an upper bound for a federated "
            "one); a DP synthetic set is worth its risk for classification near it"
        )
        ceiling = _train_ceiling(out, pooled, config)

    with _timed(result, "evaluate"):
        stage(
            "evaluating: TSTR (train on synthetic) against TRTR (train on real), "
            "on real test images"
        )
        result.evaluation = _evaluate(
            out / "synthetic", pooled, out / "evaluation", config, ceiling=ceiling
        )

    if result.public_run is not None:
        with _timed(result, "public-only baseline"):
            stage(
                "the public-only baseline: the same evaluation of the public checkpoint's own "
                "synthetic images (no private data); what DP adds is the difference"
            )
            synthetic = out / PUBLIC_ONLY / "synthetic"
            if synthetic.exists():
                shutil.rmtree(synthetic)
            generate_dataset(
                Path(result.public_run) / RUN_GENERATOR,
                synthetic,
                per_class=config.per_class,
                seed=config.seed,
            )
            result.public_only = _evaluate(
                synthetic, pooled, out / PUBLIC_ONLY / "evaluation", config
            )

    with _timed(result, "privacy report"):
        write_privacy_report(out / "federation", "html")
        write_privacy_report(out / "federation", "md")
        report = build_report(out / "federation")
        result.privacy = {
            "private": report["private"],
            "overall_epsilon": report["overall_epsilon"],
            "delta": report["delta"],
            "sites": {name: site["epsilon"] for name, site in report["sites"].items()},
        }

    with _timed(result, "release"):
        stage(f"release: gated on ε ≤ {config.epsilon} and the memorisation audit, then signed")
        result.release = _release(out, result.sites, config)

    with _timed(result, "report"):
        stage(f"writing {out / REPORT_FILE}: one page with every result, for a browser")
        result.report = write_demo_report(out, result, config, command)

    _write_summary(out, result)
    return result


def write_demo_report(
    out: Path, result: DemoResult, config: DemoConfig, command: str | None = None
) -> Path:
    """``OUT/report.html`` from the demo's outputs, with the commands and settings behind them."""
    out = Path(out)
    released = bool(result.release.get("released"))
    steward_audit = out / "steward" / "audit"
    return write_html_report(
        out / REPORT_FILE,
        evaluation=out / "evaluation" if (out / "evaluation").is_dir() else None,
        run=out / "federation",
        release=out / "release" if released else None,
        release_refused=None if released else result.release.get("reason"),
        steward_audit=steward_audit if steward_audit.is_dir() else None,
        commands=demo_commands(out, config, result.sites, command, result.public_run),
        config={f"demo ({DEMO_CONFIG})": asdict(config), **_baseline_table(result)},
        title=REPORT_TITLE,
    )


def demo_command(out: Path, c: DemoConfig) -> str:
    """The ``fedspine demo`` line equivalent to ``c``."""
    line = f"fedspine demo --out {shlex.quote(str(out))} --route {c.route}"
    if c.route == "dp-mepf":
        line += f" --fit-steps {c.fit_steps}"
        if c.public_run is not None:
            line += f" --public-run {shlex.quote(str(c.public_run))}"
        else:
            line += f" --public-images {c.public_images} --public-kimg {c.public_kimg:g}"
    else:
        line += f" --rounds {c.rounds} --local-kimg {c.local_kimg:g}"
    return line + f" --images-per-site {c.images_per_site} --seed {c.seed}"


def _baseline_table(result: DemoResult) -> dict[str, dict[str, Any]]:
    """The public-only baseline and the DP classifier ceiling beside the federated generator,
    for the report's settings."""
    out: dict[str, dict[str, Any]] = {}
    ceiling = ceiling_text(result.evaluation) if result.evaluation else None
    if ceiling is not None:
        out[f"DP classifier ceiling ({CEILING_DIR}/classifier)"] = {
            "TSTR AUC, federated DP generator [95% CI]": tstr_text(result.evaluation),
            "AUC of the evaluation's classifier trained directly with DP-SGD at the same ε on "
            "the pooled patients [95% CI]": ceiling,
        }
    if not result.public_only or not result.evaluation:
        return out
    ours, base = result.evaluation, result.public_only
    return {
        **out,
        f"public-only baseline ({PUBLIC_ONLY}/evaluation)": {
            "public checkpoint": result.public_run,
            "TSTR AUC, federated DP generator [95% CI]": tstr_text(ours),
            "TSTR AUC, public checkpoint alone [95% CI]": tstr_text(base),
            "what DP adds (TSTR difference)": round(ours["tstr_auc"] - base["tstr_auc"], 3),
            "public-only signal retained": (
                None if base["signal_retained"] is None else round(base["signal_retained"], 3)
            ),
            "public-only verdict": base["verdict"],
        },
    }


def ceiling_text(ev: dict[str, Any]) -> str | None:
    """The DP classifier ceiling's AUC [95% CI] and signal retained, or None when not scored."""
    auc = ev.get("ceiling_auc")
    if auc is None:
        return None
    ci = ev.get("ceiling_ci")
    retained = ev.get("ceiling_signal_retained")
    return (
        f"{auc:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        + (f", signal retained {retained:.2f}" if retained is not None else "")
    )  # fmt: skip


def tstr_text(ev: dict[str, Any]) -> str:
    """TSTR AUC [95% CI] of an evaluation summary, as the console and the report show it."""
    ci = ev.get("tstr_ci")
    low_high = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{ev['tstr_auc']:.3f}{low_high}"


def demo_commands(
    out: Path,
    config: DemoConfig,
    sites: list[str],
    command: str | None = None,
    public_run: str | None = None,
) -> list[str]:
    """The command that ran the demo, then each stage as the command that does the same."""
    out = Path(out)
    c = config
    ev = _evaluate_config(config)

    def q(*parts: str) -> str:
        return shlex.quote(str(out.joinpath(*parts)))

    fed, pooled = q("federation"), q("prepared", "pooled")
    audit_data = " ".join(f"--audit-data {q('prepared', s)}" for s in sites)
    if c.route == "dp-mepf":
        federation = [
            *(
                [
                    f"fedspine pretrain --out {q(PUBLIC_DIR)} --images {c.public_images} "
                    f"--size {c.phantom_size} --resolution {c.resolution} --kimg "
                    f"{c.public_kimg:g} --device cpu"
                ]
                if c.public_run is None
                else []
            ),
            f"# federation: a SuperLink and {len(sites)} SuperNodes on loopback (TLS, site "
            f"authentication), route dp-mean-embedding: each site releases once, at epsilon "
            f"<= {c.epsilon:g}, its DP mean embedding of pixel and public-D features (from "
            f"{public_run}); the server fits G's mapping ({c.fit_steps} steps); settings in "
            f"federation/{FEDERATION_CONFIG}",
        ]
    else:
        federation = [
            f"# federation: a SuperLink and {len(sites)} SuperNodes on loopback (TLS, site "
            f"authentication), {c.rounds} rounds of {c.local_kimg} kimg per site, DP with each "
            f"site capped at epsilon {c.epsilon:g}; settings in federation/{FEDERATION_CONFIG}",
        ]
    ev_options = (
        f"--arch {ev.arch} --epochs {ev.epochs} --patience {ev.patience} --bootstrap "
        f"{ev.bootstrap} --domain-epochs {ev.domain_epochs} --seed {ev.seed} --overwrite"
    )
    baseline = (
        [
            f"fedspine generate {shlex.quote(str(Path(public_run)))} --out "
            f"{q(PUBLIC_ONLY, 'synthetic')} --per-class {c.per_class} --seed {c.seed}",
            f"fedspine evaluate --synthetic {q(PUBLIC_ONLY, 'synthetic')} --train {pooled} "
            f"--test {pooled} --out {q(PUBLIC_ONLY, 'evaluation')} {ev_options}",
        ]
        if public_run is not None
        else []
    )
    return [
        command or demo_command(out, c),
        "# The same stages one by one (the demo calls them through the Python API):",
        f"fedspine phantom {q('phantom')} --sites {c.sites} --images-per-site "
        f"{c.images_per_site} --size {c.phantom_size} --seed {c.seed}",
        *(
            f"fedspine ingest {q('phantom', s)} --out {q('prepared', s)} --resolution "
            f"{c.resolution} --workers {c.workers} --seed {c.seed} --overwrite"
            for s in sites
        ),
        *federation,
        f"fedspine generate {fed} --out {q('synthetic')} --per-class {c.per_class} --seed {c.seed}",
        "# the sites' prepared data pooled for the evaluation: "
        "fedspine.data.prepared.merge_prepared -> prepared/pooled",
        f"fedspine classifier train {pooled} --out {q(CEILING_DIR, 'classifier')} --arch small "
        f"--epochs {c.classifier_epochs} --seed {c.seed} --device cpu --dp --epsilon "
        f"{c.epsilon:g} --patients-per-step {c.ceiling_patients_per_step} --privacy-home "
        f"{q(CEILING_DIR, 'privacy')}",
        f"fedspine evaluate --synthetic {q('synthetic')} --train {pooled} --test {pooled} "
        f"--out {q('evaluation')} {ev_options} --compare "
        + shlex.quote(f"{CEILING_ARM}={out / CEILING_DIR / 'classifier'}"),
        *baseline,
        f"fedspine privacy report {fed} --format html",
        f"fedspine release {fed} --out {q('release')} --max-epsilon {c.epsilon:g} --per-class "
        f"{c.release_per_class} {audit_data} --key {q('steward', 'steward.key')} --seed "
        f"{c.seed} --audit-dir {q('steward', 'audit')} --evaluation {q('evaluation')} "
        + " ".join(f"--privacy-home {q('sites', s, 'privacy')}" for s in sites),
    ]


def _train_ceiling(out: Path, pooled: Path, config: DemoConfig) -> Path:
    """The DP classifier ceiling (issue 15): the evaluation's recipe trained with patient-level
    DP-SGD at the demo's ε on the pooled sites' training split, in a privacy home of its own
    (``OUT/ceiling/privacy``; a run again removes it with the rest of the federation's state)."""
    folder = out / CEILING_DIR
    request = ClassifierRequest(
        data=pooled,
        out=folder / "classifier",
        arch="small",
        epochs=config.classifier_epochs,
        patience=config.classifier_epochs,
        seed=config.seed,
        device="cpu",
        dp=ClassifierDPRequest(
            target_epsilon=config.epsilon,
            patients_per_step=config.ceiling_patients_per_step,
            privacy_home=folder / "privacy",
        ),
    )
    try:
        return train_classifier_run(request).out
    except ClassifierRunError as err:
        raise ValueError(f"the DP classifier ceiling: {err}") from None


def _evaluate(
    synthetic: Path, pooled, out: Path, config: DemoConfig, ceiling: Path | None = None
) -> dict[str, Any]:
    """TSTR vs TRTR on the pooled phantom sites (a centralised upper bound the demo can see),
    with the DP classifier ``ceiling`` scored beside them when given."""
    compare = {CEILING_ARM: ceiling} if ceiling is not None else None
    report = EvaluationRecord.from_json(
        evaluate(
            synthetic, pooled, pooled, out, _evaluate_config(config), overwrite=True,
            compare=compare,
        )
    )  # fmt: skip
    arms = report.arms or {}
    mixed = arms.get("mixed")
    tstr = (report.utility.arms or {})["TSTR"]
    ceiling_arm = arms.get(CEILING_ARM)
    ceiling_utility = (report.utility.arms or {}).get(CEILING_ARM)
    return {
        "ceiling_auc": ceiling_arm.auc if ceiling_arm else None,
        "ceiling_ci": ceiling_arm.ci if ceiling_arm else None,
        "ceiling_signal_retained": ceiling_utility.signal_retained if ceiling_utility else None,
        "ceiling_verdict": ceiling_utility.verdict if ceiling_utility else None,
        "trtr_auc": arms["TRTR"].auc,
        "tstr_auc": arms["TSTR"].auc,
        "tstr_ci": tstr.ci,
        "mixed_auc": mixed.auc if mixed else None,
        "tstr_over_trtr": report.ratios.tstr_over_trtr,
        "signal_retained": tstr.signal_retained,
        "signal_retained_ci": tstr.signal_retained_ci,
        "verdict": tstr.verdict,
        "report": str(out / EVAL_REPORT_MD),
    }


def _evaluate_config(config: DemoConfig) -> EvaluateConfig:
    """The evaluation's settings, shared by the run and the command the report prints."""
    return EvaluateConfig(
        arch="small",
        epochs=config.classifier_epochs,
        patience=config.classifier_epochs,
        seed=config.seed,
        bootstrap=500,
        domain_epochs=5,
        threads=0,
    )


def _release(out: Path, sites: list[str], config: DemoConfig) -> dict:
    """A signed release if every gate passes; otherwise the refusal, said as it is."""
    key = out / "steward" / "steward.key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        make_signing_key(key)
    target = out / "release"
    if target.exists():
        shutil.rmtree(target)
    try:
        result = make_release(
            out / "federation",
            target,
            max_epsilon=config.epsilon,
            per_class=config.release_per_class,
            audit_data=[out / "prepared" / s for s in sites],
            signing_key=key,
            seed=config.seed,
            steward_audit_dir=out / "steward" / "audit",
            # Where the demo's sites keep their privacy homes: their ledgers show which
            # prepared set each site trained on (the audits' coverage).
            privacy_homes=[out / "sites" / s / "privacy" for s in sites],
            # The release states whether the generator carries signal (its category only).
            evaluation=out / "evaluation" if (out / "evaluation").is_dir() else None,
        )
    except ReleaseRefused as err:
        return {"released": False, "reason": str(err)}
    return {
        "released": True,
        "utility": result.utility.category,
        "path": str(result.out),
        "files": result.files,
        "fingerprint": result.fingerprint,
    }


CEILING_DIR = "ceiling"
FEDERATION_STATE = ("federation", "server", "sites", CEILING_DIR)
"""What a demo's private work leaves in OUT: the federation's output, the SuperLink's state, the
sites' state, and the DP classifier ceiling with its privacy home."""


def _fresh_federation(out: Path, stage: Stage) -> None:
    """A demo run again in its folder starts its federation afresh.

    The earlier run's phantom sites have spent their ε (their ledgers refuse a second release
    under the same cap) and its releases name the earlier public checkpoint. The demo's sites
    are simulated, their images hold no patient, so their state is removed, and said so; the
    phantom and prepared data and the public checkpoint (continued to ``--public-kimg``) stay.
    """
    earlier = [out / name for name in FEDERATION_STATE if (out / name).exists()]
    if earlier:
        stage(
            "an earlier demo's federation is here: removing "
            + ", ".join(f"{p.name}/" for p in earlier)
            + " (its phantom sites' ledgers included) to start it afresh"
        )
        for path in earlier:
            shutil.rmtree(path)


def _public_run(out: Path, config: DemoConfig, stage: Stage, reporter: RunReporter | None) -> Path:
    """The public checkpoint DP-MEPF starts from: the one given, or one pretrained here on a
    phantom population of its own seed, imaging chain and prevalence (no site's patient)."""
    if config.public_run is not None:
        try:
            public = read_public_run(config.public_run)
        except ReproduceError as err:
            raise ValueError(str(err)) from None
        stage(f"public checkpoint {public.short()} from {public.path}")
        if public.resolution != config.resolution:
            raise ValueError(
                f"--public-run {public.path}: trained at {public.resolution} px, the demo "
                f"works at {config.resolution} px"
            )
        return public.path
    pretrain(
        out / PUBLIC_DIR,
        PretrainConfig(
            images=config.public_images,
            size=config.phantom_size,
            resolution=config.resolution,
            kimg=config.public_kimg,
            workers=config.workers,
            device="cpu",
        ),
        stage=stage,
        reporter=reporter,
    )
    return (out / PUBLIC_DIR / PRETRAIN_RUN_DIR).resolve()


def _federation_config(
    out: Path, sites: list[str], config: DemoConfig, public_run: str | None
) -> FederationConfig:
    """The coordinator's settings for the demo's route (written to federation/)."""
    common = dict(
        name="demo",
        output_dir=str(out / "federation"),
        min_sites=len(sites),
        dp=True,
        dp_epsilon=config.epsilon,
        round_timeout=1800.0,
        preset="cpu",
        resolution=config.resolution,
        seed=config.seed,
        resume=False,
    )
    if config.route == "dp-mepf":
        return FederationConfig(
            rounds=1,
            route=EMBEDDING_ROUTE,
            initial_checkpoint=str(public_run),
            embedding=EmbeddingRouteConfig(
                features="rff+public",
                feature_resolution=config.resolution,
                fit_steps=config.fit_steps,
                fit_batch_per_class=config.fit_batch_per_class,
            ),
            **common,
        )
    return FederationConfig(
        rounds=config.rounds,
        local_kimg=config.local_kimg,
        dp_patients_per_step=config.patients_per_step,
        **common,
    )


def _federate(
    out: Path, sites: list[str], config: DemoConfig, stage: Stage, public_run: str | None = None
) -> list[dict]:
    """A real SuperLink and one SuperNode per site on loopback, TLS and node authentication on."""
    server = out / "server"
    fed_out = out / "federation"
    certs = server / "certs"
    if not (certs / "ca.crt").exists():
        make_server_certificates(certs, hosts=["127.0.0.1", "localhost"])
    port = free_port()
    stage(f"starting the SuperLink on 127.0.0.1:{port} (TLS, site authentication)")
    start_superlink(server, host="127.0.0.1", port=port)
    nodes = []
    try:
        for site in sites:
            key = out / "sites" / site / "site.key"
            if not key.exists():
                make_site_keypair(key, comment=site)
            register_site(server, key.with_name("site.key.pub"))
            nodes.append(
                start_supernode(
                    SiteProcessConfig(
                        server=f"127.0.0.1:{port}",
                        data=out / "prepared" / site,
                        site=site,
                        workdir=out / "sites" / site,
                        ca=certs / "ca.crt",
                        key=key,
                        port=free_port(),
                        max_epsilon=config.epsilon,
                        # Each site's privacy home inside the demo's own folder: a second
                        # demo starts fresh and a user's real ledger is never touched.
                        privacy_home=out / "sites" / site / "privacy",
                        # Three sites share this machine's cores: one thread each avoids
                        # oversubscription (a real site uses all of its own cores).
                        threads=1,
                    )
                )
            )
            stage(f"SuperNode of {site} started (PID {nodes[-1].pid})")
        fed = _federation_config(out, sites, config, public_run)
        run_id = submit_run(server, fed.to_run_config())
        if fed.route == EMBEDDING_ROUTE:
            stage(
                f"federated run {run_id}: each site releases its DP mean embedding once "
                f"(ε ≤ {config.epsilon:g}), then the server fits the generator "
                f"({config.fit_steps} steps)"
            )
        else:
            stage(
                f"federated run {run_id}: {config.rounds} rounds × {config.local_kimg} kimg "
                "per site"
            )

        def show(record: dict) -> None:
            names = ", ".join(s["site"] for s in record["sites"])
            if record.get("phase") == "embedding":
                stage(f"releases received from {names} in {record['seconds']:.0f} s; fitting G")
                return
            stage(
                f"round {record['round']}/{config.rounds} done in {record['seconds']:.0f} s "
                f"({names})"
            )

        status = wait_for_run(server, run_id, fed_out, on_round=show)
        final = read_status(fed_out) or {}
        if status != "finished:completed" or final.get("state") != "completed":
            raise RuntimeError(f"the federated run ended as {status}: {final.get('reason', '')}")
        return read_rounds(fed_out)
    finally:
        for node in nodes:
            node.stop()
        stop_superlink(server)


def _write_summary(out: Path, result: DemoResult) -> None:
    summary = {
        "sites": result.ingest,
        "rounds": result.rounds,
        "evaluation": result.evaluation,
        "public_only": result.public_only,
        "public_run": result.public_run,
        "privacy": result.privacy,
        "release": result.release,
        "report": str(result.report) if result.report else None,
        "seconds": result.seconds,
    }
    write_json_atomic(out / DEMO_SUMMARY, summary)


class _timed:
    def __init__(self, result: DemoResult, name: str):
        self.result, self.name = result, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.result.seconds[self.name] = round(time.perf_counter() - self.start, 1)
