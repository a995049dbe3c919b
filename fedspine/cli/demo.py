"""`fedspine demo`: the whole pipeline on phantom data, on a laptop CPU."""

from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path

import typer

from fedspine.cli.common import fail
from fedspine.fileio import PRIVACY_REPORT


def register(app: typer.Typer) -> None:
    """Add the `demo` command to the root app."""
    app.command("demo")(demo)


def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", help="Folder for every demo output."),
    images_per_site: int = typer.Option(300, help="Phantom images per site."),
    rounds: int = typer.Option(4, help="Federated rounds."),
    local_kimg: float = typer.Option(
        0.5, help="Thousands of images each site trains on per round."
    ),
    seed: int = typer.Option(0, help="Seed for the phantoms, splits and training."),
) -> None:
    """Phantom hospitals → ingestion → federated DP training over TLS → synthetic data →
    evaluation → privacy report → signed release → one HTML report.

    Needs no data and no network: three phantom sites with different domains are made, a real
    Flower SuperLink and three SuperNodes run on loopback with TLS and site authentication and
    train with patient-level DP under an ε cap, and the averaged generator's synthetic images
    are evaluated and released if every gate passes. Every process it starts is stopped when it
    ends, Ctrl-C included. Outputs go under --out (see the README); open OUT/report.html in a
    browser for every result on one page.
    """
    from fedspine.experiments.demo import DemoConfig, run_demo  # lazy: no torch for --help
    from fedspine.reporting.html import HtmlReportError  # lazy: as above

    config = DemoConfig(
        images_per_site=images_per_site, rounds=rounds, local_kimg=local_kimg, seed=seed
    )
    # A plain `kill` must stop the SuperLink and SuperNodes too: turn SIGTERM into an exit that
    # runs the demo's clean-up, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    command = (
        f"fedspine demo --out {shlex.quote(str(out))} --images-per-site {images_per_site} "
        f"--rounds {rounds} --local-kimg {local_kimg} --seed {seed}"
    )
    try:
        result = run_demo(
            out, config, stage=lambda msg: typer.echo(f"==> {msg}", err=True), command=command
        )
    except KeyboardInterrupt:
        fail("interrupted; every process the demo started has been stopped")
    except (RuntimeError, ValueError, OSError, HtmlReportError) as err:
        fail(str(err))
    typer.echo(f"\nfedspine demo: {len(result.sites)} phantom sites under {result.out}")
    for site, info in result.ingest.items():
        counts = info["counts"]
        typer.echo(
            f"  {site}: {info['images']} images (train {counts['train']['total']}, "
            f"val {counts['val']['total']}, test {counts['test']['total']}), "
            f"rejected {info['rejected']}"
        )
    if result.rounds:
        last = result.rounds[-1]
        typer.echo(
            f"  federation: {len(result.rounds)} rounds, last with "
            + ", ".join(
                f"{s['site']} (loss G {s.get('loss-g', float('nan')):.2f})" for s in last["sites"]
            )
        )
    if result.privacy:
        eps = ", ".join(f"{k} ε={v:.2f}" for k, v in result.privacy["sites"].items())
        typer.echo(
            f"  privacy (δ={result.privacy['delta']:.1g}): {eps}; "
            f"overall ε={result.privacy['overall_epsilon']:.2f}"
        )
    if result.evaluation:
        ev = result.evaluation
        typer.echo(
            f"  classifier AUC on real test images: trained on real {ev['trtr_auc']:.3f}, "
            f"on synthetic {ev['tstr_auc']:.3f} (TSTR/TRTR {ev['tstr_over_trtr']:.3f})"
        )
        typer.echo(f"  synthetic data: {ev['verdict']}")
        typer.echo(f"  evaluation report: {ev['report']}")
    html = Path(PRIVACY_REPORT).with_suffix(".html").name
    typer.echo(f"  privacy report: {result.out / 'federation' / html}")
    if result.release.get("released"):
        typer.echo(f"  signed release: {result.release['path']} (verify with `fedspine verify`)")
    elif result.release:
        typer.echo(f"  release refused: {result.release['reason']}")
    if result.report is not None:
        typer.echo(f"  report (open in a browser): {result.report}")
    typer.echo("  times: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()))


_MAIN_PID = os.getpid()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Forked helpers (the ingest pool) inherit this handler; they must just end quietly.
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt
