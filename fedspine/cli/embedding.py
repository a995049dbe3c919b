"""`fedspine embedding release|fit`: the one-shot DP mean-embedding route (issue 15, item 4).

`release` is the only step that reads private data: per class, the sum of per-patient mean
feature embeddings and the counts, noised once through the privacy engine (one ledger record).
`fit` trains the conditional generator to the released means of one or more sites (their sums
pooled), reads no private data and costs no ε; its run folder works with `fedspine generate`,
`evaluate`, `privacy report` and `release`. The library lives in
`fedspine.training.mean_embedding` (imported inside the commands: `--help` loads no torch).
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedspine.cli.common import fail, privacy_home_option, privacy_unit_option, progress_bar

embedding_app = typer.Typer(
    help="The one-shot DP mean-embedding route: a site releases noisy per-class mean "
    "embeddings once; a generator is fitted to them at no further privacy cost.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(embedding_app, name="embedding")


@embedding_app.command("release")
def release_command(
    prepared: Path = typer.Argument(..., help="Prepared dataset folder (from `fedspine ingest`)."),
    epsilon: float = typer.Option(
        ...,
        "--epsilon",
        help="Target ε of the worst patient, everything on record in the privacy home composed.",
    ),
    out: Path = typer.Option(..., "--out", help="Release file to write (*.npz; must not exist)."),
    clip: float = typer.Option(
        1.0,
        "--clip",
        help="Norm bound C of each patient's mean embedding (features have norm <= 1). "
        "The sensitivity is sqrt(2)·C.",
    ),
    features: str = typer.Option(
        "rff",
        "--features",
        help="rff (random Fourier features of pixels), a public run folder or snapshot (its D's "
        "features; its data must be declared public), or both joined by '+'.",
    ),
    dim: int = typer.Option(256, "--dim", help="Number of random Fourier features."),
    seed: int = typer.Option(0, "--seed", help="Public seed of the random Fourier features."),
    bandwidth: list[float] = typer.Option(
        None,
        "--bandwidth",
        help="RFF kernel scale(s) s: ell = s·sqrt(pixels), images in [-1, 1]; repeat for "
        "several. Choose a priori, never from the private data. (default: 0.1, 0.25, 0.5 and 1)",
    ),
    feature_resolution: int = typer.Option(
        32, "--feature-resolution", help="Images are resized to this many px before the RFF."
    ),
    privacy_home: Path = privacy_home_option(),
    privacy_unit: str = privacy_unit_option(),
    delta: float = typer.Option(
        None, "--delta", help="δ, at most the site's min(1e-5, 1/(10·patients)). (default: it)"
    ),
    max_epsilon: float = typer.Option(
        None, "--max-epsilon", help="Refuse if the worst patient would pass this ε."
    ),
    site: str = typer.Option(None, "--site", help="Site name in the release (default: folder)."),
) -> None:
    """Release a site's noisy per-class mean embeddings and counts (one Gaussian mechanism)."""
    from fedspine.privacy.home import PrivacyHomeError
    from fedspine.privacy.ledger import LedgerError
    from fedspine.training.mean_embedding import release_embedding
    from fedspine.training.mean_embedding_features import DEFAULT_BANDWIDTHS

    try:
        release = release_embedding(
            prepared,
            out,
            epsilon=epsilon,
            clip_norm=clip,
            features=features,
            dim=dim,
            seed=seed,
            bandwidths=tuple(bandwidth) if bandwidth else DEFAULT_BANDWIDTHS,
            feature_resolution=feature_resolution,
            privacy_home=privacy_home,
            privacy_unit=privacy_unit,
            delta=delta,
            max_epsilon=max_epsilon,
            site=site,
        )
    except (ValueError, LedgerError, PrivacyHomeError) as err:
        fail(str(err))
    m = release.metadata
    typer.echo(
        f"released {out}: site {m['site']}, {len(m['class_names'])} classes × "
        f"{m['feature_map']['dim']} features, σ = {m['noise_multiplier']:.4g}, "
        f"Δ = {m['sensitivity']:.4g}; ε = {m['epsilon']:.3f} at δ = {m['delta']:.2g} "
        f"({m['accountant'].upper()}) for the worst of {m['patients']} units ({m['unit']})"
    )


@embedding_app.command("fit")
def fit_command(
    releases: list[Path] = typer.Argument(
        ..., help="Release files of one or more sites (their sums are pooled)."
    ),
    out: Path = typer.Option(..., "--out", help="Run folder to create."),
    steps: int = typer.Option(1000, "--steps", help="Adam steps on the generator."),
    batch: int = typer.Option(32, "--batch", help="Generated images per class per step."),
    lr: float = typer.Option(0.0025, "--lr", help="Adam learning rate."),
    preset: str = typer.Option(
        "cpu", "--preset", help="Network preset of the generator: cpu, auto or paper."
    ),
    resolution: int = typer.Option(
        None, "--resolution", help="Generator resolution. (default: the preset's)"
    ),
    init_from: Path = typer.Option(
        None,
        "--init-from",
        help="Start G from a public run folder or snapshot (its data declared public).",
    ),
    feature_network: list[Path] = typer.Option(
        None,
        "--feature-network",
        help="The public checkpoint(s) a network feature map of the releases names.",
    ),
    g_trainable: str = typer.Option(
        None,
        "--g-trainable",
        help="What of G the fit moves: all, or mapping (the public checkpoint's synthesis "
        "network, and the spines it draws, stay as they are). (default: mapping with "
        "--init-from, else all)",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed of the fit."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Fit the conditional generator to released mean embeddings (no private data, no ε)."""
    from fedspine.training.mean_embedding_fit import (
        EmbeddingFitError,
        FitRequest,
        fit_generator,
    )

    request = FitRequest(
        releases=list(releases),
        out=out,
        steps=steps,
        batch_per_class=batch,
        lr=lr,
        preset=preset,
        resolution=resolution,
        init_from=init_from,
        feature_networks=list(feature_network or []),
        seed=seed,
        device=device,
        g_trainable=g_trainable,
    )
    try:
        with progress_bar() as bar:
            task = bar.add_task("fitting", total=steps)
            result = fit_generator(request, progress=lambda step, loss: bar.update(task, advance=1))
    except (EmbeddingFitError, ValueError) as err:
        fail(str(err))
    eps = ", ".join(f"{site} ε = {value:.3f}" for site, value in result.epsilon.items())
    typer.echo(
        f"fitted {out}: embedding distance {result.distance_start:.4f} -> "
        f"{result.distance_end:.4f} in {result.steps} steps; privacy (the releases'): {eps}"
    )
