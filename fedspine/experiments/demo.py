"""`fedspine demo`: the whole job on phantom data made on the spot, on a laptop CPU.

Three phantom hospitals with different domains are ingested; a real Flower SuperLink and three
SuperNodes run on loopback with TLS and site authentication and train with patient-level DP
(each site capped at ε); the averaged generator's synthetic set is evaluated (TSTR against TRTR
on real phantom test images), the privacy report is written, and a signed release is made if
every gate passes. Last, ``OUT/report.html`` gathers all of it in one self-contained page, with
the commands and settings that made it. Every process the demo starts is stopped when it ends,
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
from fedspine.training.generate import generate_dataset


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
    classifier_epochs: int = 8
    release_per_class: int = 100


@dataclass
class DemoResult:
    out: Path
    sites: list[str] = field(default_factory=list)
    ingest: dict[str, dict] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)
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
) -> DemoResult:
    """Run each stage in order under ``out``; ``stage`` is told when each one starts.

    ``command`` is the command line that started the demo, recorded in the report (default:
    the ``fedspine demo`` line equivalent to ``config``).
    """
    config = config or DemoConfig()
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

    with _timed(result, "federation"):
        result.rounds = _federate(out, result.sites, config, stage)

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

    with _timed(result, "evaluate"):
        stage(
            "evaluating: TSTR (train on synthetic) against TRTR (train on real), "
            "on real test images"
        )
        result.evaluation = _evaluate(out, result.sites, config)

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
        commands=demo_commands(out, config, result.sites, command),
        config={f"demo ({DEMO_CONFIG})": asdict(config)},
        title=REPORT_TITLE,
    )


def demo_commands(
    out: Path, config: DemoConfig, sites: list[str], command: str | None = None
) -> list[str]:
    """The command that ran the demo, then each stage as the command that does the same."""
    out = Path(out)
    c = config
    ev = _evaluate_config(config)

    def q(*parts: str) -> str:
        return shlex.quote(str(out.joinpath(*parts)))

    fed, pooled = q("federation"), q("prepared", "pooled")
    audit_data = " ".join(f"--audit-data {q('prepared', s)}" for s in sites)
    return [
        command
        or f"fedspine demo --out {q()} --images-per-site {c.images_per_site} --rounds {c.rounds} "
        f"--local-kimg {c.local_kimg} --seed {c.seed}",
        "# The same stages one by one (the demo calls them through the Python API):",
        f"fedspine phantom {q('phantom')} --sites {c.sites} --images-per-site "
        f"{c.images_per_site} --size {c.phantom_size} --seed {c.seed}",
        *(
            f"fedspine ingest {q('phantom', s)} --out {q('prepared', s)} --resolution "
            f"{c.resolution} --workers {c.workers} --seed {c.seed} --overwrite"
            for s in sites
        ),
        f"# federation: a SuperLink and {len(sites)} SuperNodes on loopback (TLS, site "
        f"authentication), {c.rounds} rounds of {c.local_kimg} kimg per site, DP with each site "
        f"capped at epsilon {c.epsilon:g}; settings in federation/{FEDERATION_CONFIG}",
        f"fedspine generate {fed} --out {q('synthetic')} --per-class {c.per_class} --seed {c.seed}",
        "# the sites' prepared data pooled for the evaluation: "
        "fedspine.data.prepared.merge_prepared -> prepared/pooled",
        f"fedspine evaluate --synthetic {q('synthetic')} --train {pooled} --test {pooled} "
        f"--out {q('evaluation')} --arch {ev.arch} --epochs {ev.epochs} --patience "
        f"{ev.patience} --bootstrap {ev.bootstrap} --domain-epochs {ev.domain_epochs} "
        f"--seed {ev.seed} --overwrite",
        f"fedspine privacy report {fed} --format html",
        f"fedspine release {fed} --out {q('release')} --max-epsilon {c.epsilon:g} --per-class "
        f"{c.release_per_class} {audit_data} --key {q('steward', 'steward.key')} --seed "
        f"{c.seed} --audit-dir {q('steward', 'audit')} "
        + " ".join(f"--privacy-home {q('sites', s, 'privacy')}" for s in sites),
    ]


def _evaluate(out: Path, sites: list[str], config: DemoConfig) -> dict[str, Any]:
    """TSTR vs TRTR on the pooled phantom sites (a centralised upper bound the demo can see)."""
    pooled = merge_prepared(
        [load_prepared(out / "prepared" / s) for s in sites],
        out / "prepared" / "pooled",
        sites,
        overwrite=True,
    )
    report = EvaluationRecord.from_json(
        evaluate(
            out / "synthetic",
            pooled,
            pooled,
            out / "evaluation",
            _evaluate_config(config),
            overwrite=True,
        )
    )
    arms = report.arms or {}
    mixed = arms.get("mixed")
    tstr = (report.utility.arms or {})["TSTR"]
    return {
        "trtr_auc": arms["TRTR"].auc,
        "tstr_auc": arms["TSTR"].auc,
        "mixed_auc": mixed.auc if mixed else None,
        "tstr_over_trtr": report.ratios.tstr_over_trtr,
        "signal_retained": tstr.signal_retained,
        "signal_retained_ci": tstr.signal_retained_ci,
        "verdict": tstr.verdict,
        "report": str(out / "evaluation" / EVAL_REPORT_MD),
    }


def _evaluate_config(config: DemoConfig) -> EvaluateConfig:
    """The evaluation's settings, shared by the run and the command the report prints."""
    return EvaluateConfig(
        arch="small",
        epochs=config.classifier_epochs,
        patience=3,
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
        )
    except ReleaseRefused as err:
        return {"released": False, "reason": str(err)}
    return {
        "released": True,
        "path": str(result.out),
        "files": result.files,
        "fingerprint": result.fingerprint,
    }


def _federate(out: Path, sites: list[str], config: DemoConfig, stage: Stage) -> list[dict]:
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
        fed = FederationConfig(
            name="demo",
            output_dir=str(fed_out),
            rounds=config.rounds,
            local_kimg=config.local_kimg,
            min_sites=len(sites),
            dp=True,
            dp_epsilon=config.epsilon,
            dp_patients_per_step=config.patients_per_step,
            round_timeout=1800.0,
            preset="cpu",
            resolution=config.resolution,
            seed=config.seed,
            resume=False,
        )
        run_id = submit_run(server, fed.to_run_config())
        stage(f"federated run {run_id}: {config.rounds} rounds × {config.local_kimg} kimg per site")

        def show(record: dict) -> None:
            names = ", ".join(s["site"] for s in record["sites"])
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
