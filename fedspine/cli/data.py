"""`fedspine phantom` and `fedspine ingest`: making and preparing data."""

from __future__ import annotations

from pathlib import Path

import typer

from fedspine.cli.common import fail, progress_bar


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.command("phantom")(phantom)
    app.command("ingest")(ingest)


def phantom(
    out: Path = typer.Argument(
        ..., help="Folder to create; one sub-folder per site (site_1, site_2, …)."
    ),
    sites: int = typer.Option(3, "--sites", min=1, help="Number of hospital sites."),
    images_per_site: int = typer.Option(200, "--images-per-site", min=4, help="Images per site."),
    size: int = typer.Option(
        512, "--size", min=64, help="Short side of the stored images, in pixels."
    ),
    seed: int = typer.Option(0, "--seed", help="Same seed, same phantoms."),
) -> None:
    """Make phantom lumbar spine radiographs as real DICOM in the VinDr-SpineXR layout.

    Sites differ like hospitals do (exposure, noise, resolution, MONOCHROME1/2, rescale,
    transfer syntax, prevalence). The images are synthetic: no real patient is in them.
    """
    from fedspine.data.phantom import write_phantom_sites

    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty; choose another folder")
    total = sites * images_per_site
    with progress_bar() as bar:
        task = bar.add_task("phantom images", total=total)
        paths = write_phantom_sites(
            out,
            sites=sites,
            images_per_site=images_per_site,
            size=size,
            seed=seed,
            progress=lambda n: bar.update(task, completed=n),
        )
    typer.echo(
        f"wrote {len(paths)} phantom site(s) under {out}: " + ", ".join(p.name for p in paths)
    )


def ingest(
    source: Path = typer.Argument(
        ..., help="Source folder: VinDr-SpineXR layout or a folder with labels.csv."
    ),
    out: Path = typer.Option(..., "--out", help="Prepared dataset folder to write (atomically)."),
    layout: str = typer.Option("auto", help="auto, vindr or folder."),
    split: str = typer.Option("all", help="Which source split to ingest: all, train or test."),
    resolution: int = typer.Option(256, help="Side of the square stored images, in pixels."),
    fit: str = typer.Option(
        "crop", help="crop: centre square crop (the paper's); pad: pad to square."
    ),
    labels: str = typer.Option(
        "abnormality", help="abnormality (normal/abnormal) or lesion (8 classes)."
    ),
    label_rule: str = typer.Option(
        "correct",
        help="correct: abnormal iff any lesion row. paper: the original code's rule, which calls a "
        "single-annotation lesion normal (only for a faithful reproduction).",
    ),
    classes: str = typer.Option(
        None, help="Folder layout: class order, comma separated (else classes.txt or sorted)."
    ),
    val_fraction: float = typer.Option(
        0.1, help="Share of training patients held out for validation."
    ),
    test_fraction: float = typer.Option(
        0.2, help="Share of patients held out as test when the source has no test split."
    ),
    seed: int = typer.Option(0, help="Seed of the patient-level splits."),
    workers: int = typer.Option(1, min=1, help="Parallel decoding processes."),
    overwrite: bool = typer.Option(False, help="Replace an existing prepared dataset at --out."),
) -> None:
    """Decode DICOM/PNG images once into a prepared dataset (images, index, manifest, rejected.csv).

    Files that cannot be decoded are skipped and listed with the reason in rejected.csv;
    splits are by patient, so no patient is in two of train, val and test.
    """
    from fedspine.data.dicom import ImageDecodeError
    from fedspine.data.ingest import IngestConfig
    from fedspine.data.ingest import ingest as run_ingest
    from fedspine.data.prepared import PreparedDatasetError
    from fedspine.data.sources import SourceLayoutError

    config = IngestConfig(
        layout=layout,
        split=None if split == "all" else split,
        resolution=resolution,
        fit=fit,
        labels=labels,
        label_rule=label_rule,
        classes=tuple(c.strip() for c in classes.split(",")) if classes else None,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        workers=workers,
    )
    try:
        with progress_bar() as bar:
            task = bar.add_task("decoding", total=None)

            def report(done: int, total: int, skipped: int) -> None:
                bar.update(
                    task, completed=done, total=total, description=f"decoding ({skipped} skipped)"
                )

            summary = run_ingest(source, out, config, progress=report, overwrite=overwrite)
    except (SourceLayoutError, PreparedDatasetError, ImageDecodeError, ValueError) as err:
        fail(str(err))
    typer.echo(
        f"prepared {summary.num_images} images ({summary.layout} layout) into {summary.out}; "
        f"skipped {summary.num_rejected} (see rejected.csv)"
    )
    for split_name, per_class in summary.counts.items():
        parts = ", ".join(f"{k} {v}" for k, v in per_class.items() if k != "total" and v)
        typer.echo(f"  {split_name:5s} {per_class['total']:6d} images: {parts}")
    if summary.rejection_reasons:
        typer.echo(
            "  skipped: " + "; ".join(f"{n} × {r}" for r, n in summary.rejection_reasons.items())
        )
    if summary.patients_moved_to_test:
        typer.echo(
            f"  {summary.patients_moved_to_test} patient(s) were in both source splits and went to test"
        )
