"""`fedspine demo`: the whole pipeline on phantom data, on a laptop CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from fedspine.cli.common import fail


def register(app: typer.Typer) -> None:
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
    """Phantom hospitals → ingestion → federated training over TLS → synthetic data → evaluation.

    Needs no data and no network: three phantom sites with different domains are made, a real
    Flower SuperLink and three SuperNodes run on loopback with TLS and site authentication, and
    the averaged generator's synthetic images are written. Every process it starts is stopped
    when it ends, Ctrl-C included. Outputs go under --out (see the README).
    """
    from fedspine.experiments.demo import DemoConfig, run_demo

    config = DemoConfig(
        images_per_site=images_per_site, rounds=rounds, local_kimg=local_kimg, seed=seed
    )
    try:
        result = run_demo(out, config, stage=lambda msg: typer.echo(f"==> {msg}", err=True))
    except KeyboardInterrupt:
        fail("interrupted; every process the demo started has been stopped")
    except RuntimeError as err:
        fail(str(err))
    typer.echo(f"\nfedspine demo: {len(result.sites)} phantom sites under {result.out}")
    for site, info in result.ingest.items():
        counts = info["counts"]
        typer.echo(
            f"  {site}: {info['images']} images (train {counts['train']['total']}, "
            f"val {counts['val']['total']}, test {counts['test']['total']}), rejected {info['rejected']}"
        )
    if result.rounds:
        last = result.rounds[-1]
        typer.echo(
            f"  federation: {len(result.rounds)} rounds, last with "
            + ", ".join(
                f"{s['site']} (loss G {s.get('loss-g', float('nan')):.2f})" for s in last["sites"]
            )
        )
    typer.echo(f"  synthetic images: {result.out / 'synthetic'}")
    typer.echo("  times: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()))
