"""`fedspine demo`: the whole pipeline on phantom data, on a laptop CPU."""

from __future__ import annotations

import os
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
    route: str = typer.Option(
        "dp-mepf",
        "--route",
        help="dp-mepf: each site releases once, under DP, its patients' mean pixel and "
        "public-discriminator features and the server fits a public generator to them (the "
        "route that measured best); dp-sgd: federated DP-SGD rounds of the GAN.",
    ),
    public_run: Path = typer.Option(
        None,
        "--public-run",
        help="dp-mepf: a finished `fedspine pretrain` OUT (or public run folder) at 32 px; "
        "default: pretrain one here (--public-kimg). A longer pretraining draws better spines.",
    ),
    public_images: int = typer.Option(
        1000, "--public-images", min=16, help="dp-mepf: phantom images of the public corpus."
    ),
    public_kimg: float = typer.Option(
        8.0, "--public-kimg", min=0.001, help="dp-mepf: thousands of images to pretrain on."
    ),
    fit_steps: int = typer.Option(
        300, "--fit-steps", min=1, help="dp-mepf: steps of the server's fit of G."
    ),
    images_per_site: int = typer.Option(300, help="Phantom images per site."),
    rounds: int = typer.Option(4, help="dp-sgd: federated rounds."),
    local_kimg: float = typer.Option(
        0.5, help="dp-sgd: thousands of images each site trains on per round."
    ),
    seed: int = typer.Option(0, help="Seed for the phantoms, splits and training."),
) -> None:
    """Phantom hospitals → ingestion → federated DP over TLS → synthetic data → evaluation
    beside the public-only baseline → privacy report → signed release → one HTML report.

    Needs no data and no network: three phantom sites with different domains are made and a
    real Flower SuperLink and three SuperNodes run on loopback with TLS and site
    authentication. By default (--route dp-mepf) a public checkpoint is pretrained on a phantom
    population of its own, every site releases its DP mean embedding once under its ε cap, and
    the server fits the generator to their sum; its synthetic images are evaluated beside the
    public checkpoint's own (what DP adds is the difference) and released if every gate passes.
    Every process it starts is stopped when it ends, Ctrl-C included. Outputs go under --out
    (see the README); open OUT/report.html in a browser for every result on one page.
    """
    from fedspine.cli.train import ConsoleReporter  # lazy: no torch for --help
    from fedspine.experiments.demo import (  # lazy: as above
        DemoConfig,
        ceiling_text,
        demo_command,
        run_demo,
        tstr_text,
    )
    from fedspine.reporting.html import HtmlReportError  # lazy: as above
    from fedspine.training.run import TrainInterrupted, TrainRunError  # lazy: as above

    config = DemoConfig(
        images_per_site=images_per_site,
        rounds=rounds,
        local_kimg=local_kimg,
        seed=seed,
        route=route,
        public_run=str(public_run) if public_run is not None else None,
        public_images=public_images,
        public_kimg=public_kimg,
        fit_steps=fit_steps,
    )
    # A plain `kill` must stop the SuperLink and SuperNodes too: turn SIGTERM into an exit that
    # runs the demo's clean-up, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        result = run_demo(
            out,
            config,
            stage=lambda msg: typer.echo(f"==> {msg}", err=True),
            command=demo_command(out, config),
            reporter=ConsoleReporter(),
        )
    except (KeyboardInterrupt, TrainInterrupted):
        fail("interrupted; every process the demo started has been stopped")
    except (RuntimeError, ValueError, OSError, HtmlReportError, TrainRunError) as err:
        fail(str(err))
    typer.echo(f"\nfedspine demo: {len(result.sites)} phantom sites under {result.out}")
    for site, info in result.ingest.items():
        counts = info["counts"]
        typer.echo(
            f"  {site}: {info['images']} images (train {counts['train']['total']}, "
            f"val {counts['val']['total']}, test {counts['test']['total']}), "
            f"rejected {info['rejected']}"
        )
    if result.rounds and result.rounds[-1].get("phase") == "embedding":
        typer.echo(
            "  federation: one DP release per site ("
            + ", ".join(f"{s['site']} {s['patients']} patients" for s in result.rounds[-1]["sites"])
            + f"), the generator fitted to their sum from {result.public_run}"
        )
    elif result.rounds:
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
        ceiling = ceiling_text(ev)
        if ceiling is not None:
            typer.echo(
                "  ceiling (the evaluation's classifier trained directly with DP-SGD at the "
                f"same ε on the pooled patients): AUC {ceiling}"
            )
        typer.echo(f"  evaluation report: {ev['report']}")
    if result.public_only and result.evaluation:
        base, ev = result.public_only, result.evaluation
        typer.echo(
            f"  public-only baseline (the public checkpoint alone, no private data): TSTR "
            f"{tstr_text(base)} against {tstr_text(ev)} with the sites' DP releases; what DP adds: "
            f"{ev['tstr_auc'] - base['tstr_auc']:+.3f} AUC"
        )
        typer.echo(f"  public-only synthetic data: {base['verdict']}")
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
