"""Ingestion throughput: fedspine ingest with 1 and N workers vs bare pydicom decoding.

Prints one JSON object. All variants run in one process on the same phantom files, so the
ratios are meaningful on a shared, noisy machine even when the absolute numbers are not.

    python benchmarks/ingest_throughput.py [--images 120] [--size 512] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120, help="phantom images per site")
    parser.add_argument("--size", type=int, default=512, help="phantom short side, pixels")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--sites", type=int, default=3, help="one per transfer syntax")
    args = parser.parse_args()

    import pydicom

    from fedspine.data.ingest import IngestConfig, ingest
    from fedspine.data.phantom import write_phantom_sites

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sites = write_phantom_sites(
            tmp / "phantom", sites=args.sites, images_per_site=args.images, size=args.size, seed=0
        )
        files = sorted(f for s in sites for f in s.rglob("*.dicom"))
        results: dict[str, object] = {
            "files": len(files),
            "size": args.size,
            "resolution": args.resolution,
            "cpus": os.cpu_count(),
        }

        t0 = time.perf_counter()
        for f in files:
            pydicom.dcmread(f).pixel_array  # noqa: B018 - the decode is what is timed
        bare = len(files) / (time.perf_counter() - t0)
        results["pydicom_pixel_array_img_per_s"] = round(bare, 2)

        for workers in sorted({1, args.workers}):
            t0 = time.perf_counter()
            for k, site in enumerate(sites):
                ingest(
                    site,
                    tmp / f"prep_{workers}_{k}",
                    IngestConfig(resolution=args.resolution, workers=workers),
                )
            rate = len(files) / (time.perf_counter() - t0)
            results[f"ingest_{workers}_workers_img_per_s"] = round(rate, 2)
            results[f"ingest_{workers}_workers_vs_pydicom"] = round(rate / bare, 3)
        if args.workers > 1:
            results["speedup_workers"] = round(
                results[f"ingest_{args.workers}_workers_img_per_s"]
                / results["ingest_1_workers_img_per_s"],
                3,
            )
        per_syntax = {}
        for site in sites:
            ts = str(
                pydicom.dcmread(
                    next(site.rglob("*.dicom")), stop_before_pixels=True
                ).file_meta.TransferSyntaxUID.name
            )
            site_files = sorted(site.rglob("*.dicom"))
            t0 = time.perf_counter()
            for f in site_files:
                pydicom.dcmread(f).pixel_array  # noqa: B018
            per_syntax[ts] = round(len(site_files) / (time.perf_counter() - t0), 2)
        results["pydicom_img_per_s_by_transfer_syntax"] = per_syntax
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
