"""Federation overhead: 2 sites x R rounds on Flower's deployment engine vs centralised training.

Both arms train the `cpu` preset conditional GAN on the same images for the same number of real
images: the federation runs a SuperLink and two SuperNodes on loopback (the real `fedspine`
deployment path: `start_superlink`, `start_supernode`, `submit_run`, `wait_for_run`), each site
training ``--kimg-per-round`` per round on its own data with ``--threads-per-site`` threads; the
centralised arm trains one GanTrainer on the union of the sites' data (`merge_prepared`) for
2 x R x kimg-per-round kimg with the threads of both sites together. Prints one JSON object:
the wall-time ratio federated / centralised, and where the federated time went:

- start-up: the SuperLink until its /health answers, `flwr run` (packs and submits the app),
  the ServerApp's process start until it wrote federation_config.json (its first act);
- per round (from rounds.jsonl): the slowest site's training, its setup (data, state, trainer)
  and state save, FedAvg, the round checkpoint, and the message overhead: the exchange time
  minus the slowest site's work, split (by timestamping the SuperNodes' log lines as they are
  written) into delivery (the SuperNode polls the SuperLink every 3 s when idle), the ClientApp
  process (interpreter start, imports of torch, flwr and fedspine, the app bundle,
  (de)serialising the weights) and the reply's way back
  (the ServerApp polls for replies every 3 s);
- the rest (initial weights, final generator, run teardown). The run's end is seen by reading
  federation.json every --poll seconds; the `flwr` CLI is asked once, afterwards, so that the
  federated arm carries no polling process the centralised arm does not.

The ClientApp import cost is also measured once on its own (a fresh interpreter importing what a
message's process imports). Both arms see the same number of real images: a site's round ends
on a whole batch, so the centralised run trains 2 x R x (images of one site's round). On a shared
machine every number moves with the other load (multi-threaded torch suffers most): the JSON
records the load average before and after.

    python benchmarks/federation_overhead.py                   # about 5 minutes on 2 cores
    python benchmarks/federation_overhead.py --rounds 2 --kimg-per-round 0.1 --resolution 16 \\
        --images-per-site 64                                   # a quick check that it works
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CLASSES = ["normal", "abnormal"]
# What a non-DP ClientApp process imports (opacus loads only with a DP round, so it is not here).
IMPORTS = "import torch, flwr; import fedspine.federated.client_app"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (R)")
    parser.add_argument(
        "--kimg-per-round", type=float, default=0.75, help="thousands of images per site per round"
    )
    parser.add_argument("--resolution", type=int, default=32, help="image side (16-64, cpu)")
    parser.add_argument("--images-per-site", type=int, default=256, help="images at each site")
    parser.add_argument(
        "--threads-per-site",
        type=int,
        default=max(1, len(os.sched_getaffinity(0)) // 2),
        help="torch threads of each site; the centralised run gets both sites' threads",
    )
    parser.add_argument(
        "--central-threads",
        type=int,
        default=None,
        help="torch threads of the centralised run (default: both sites' threads together)",
    )
    parser.add_argument("--tls", action="store_true", help="TLS on loopback (default: insecure)")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between status polls")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after (s)")
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.rounds < 1 or args.kimg_per_round <= 0 or args.images_per_site < 16:
        parser.error("--rounds >= 1, --kimg-per-round > 0 and --images-per-site >= 16 are needed")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedspine-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work.resolve())
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


def run(args: argparse.Namespace, work: Path) -> dict:
    """Both arms, the import cost, and the breakdown; returns the JSON-ready result."""
    load_before = os.getloadavg()[0]
    sites = [
        _site_dataset(work / f"site-{k}", args.images_per_site, args.resolution, args.seed + k)
        for k in range(2)
    ]
    imports = _import_seconds()
    central = _centralised(args, work, sites)
    federated = _federated(args, work, sites)
    central_total = imports + central["setup_seconds"] + central["train_seconds"]
    breakdown = federated.pop("breakdown")
    wall = federated["wall_seconds"]
    return {
        "benchmark": "federation_overhead",
        "settings": {
            "sites": 2,
            "rounds": args.rounds,
            "kimg_per_round_per_site": args.kimg_per_round,
            "total_kimg": central["kimg"],
            "resolution": args.resolution,
            "images_per_site": args.images_per_site,
            "threads_per_site": args.threads_per_site,
            "centralised_threads": central["threads"],
            "transport": "TLS on loopback" if args.tls else "insecure loopback",
            "preset": "cpu",
        },
        "ratio_wall_federated_over_centralised": wall / central_total,
        "ratio_run_federated_over_centralised": federated["run_seconds"] / central_total,
        "ratio_training_only": breakdown["slowest_site_training"] / central["train_seconds"],
        "federated": federated,
        "centralised": {**central, "wall_seconds": central_total, "import_seconds": imports},
        "federated_breakdown_seconds": breakdown,
        "federated_breakdown_fraction": {k: v / wall for k, v in breakdown.items()},
        "clientapp_import_seconds": imports,
        "environment": {
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0],
        },
    }


def _federated(args: argparse.Namespace, work: Path, sites: list[Path]) -> dict:
    """Two SuperNodes and a SuperLink on loopback, one run, timed from the outside and inside."""
    from fedspine.federated.deploy import (
        SiteProcessConfig,
        start_superlink,
        start_supernode,
        stop_superlink,
        submit_run,
        wait_for_run,
    )
    from fedspine.federated.federation_config import FederationConfig
    from fedspine.federated.processes import free_port
    from fedspine.federated.run_folder import read_rounds, read_status

    server = work / "server"
    out = work / "federation-out"
    ca = None
    if args.tls:
        from fedspine.federated.security import make_server_certificates

        ca = make_server_certificates(server / "certs", hosts=["127.0.0.1", "localhost"]).ca_cert
    port = free_port()
    nodes = []
    clocks = [_LogClock(work / f"node-{k}" / "supernode.log") for k in range(len(sites))]
    for clock in clocks:
        clock.start()
    arrivals: dict[tuple[str, int], float] = {}
    t_start = time.time()
    start_superlink(server, host="127.0.0.1", port=port, insecure=not args.tls, node_auth=False)
    t_link = time.time()
    try:
        for k, data in enumerate(sites):
            nodes.append(
                start_supernode(
                    SiteProcessConfig(
                        server=f"127.0.0.1:{port}",
                        data=data,
                        site=f"site-{k}",
                        workdir=work / f"node-{k}",
                        ca=ca,
                        port=free_port(),
                        insecure=not args.tls,
                        threads=args.threads_per_site,
                        privacy_home=work / f"node-{k}" / "privacy",
                    )
                )
            )
        t_nodes = time.time()
        fed = FederationConfig(
            name="overhead",
            output_dir=str(out),
            rounds=args.rounds,
            local_kimg=args.kimg_per_round,
            min_sites=2,
            round_timeout=args.timeout,
            preset="cpu",
            resolution=args.resolution,
            class_names=CLASSES,
            seed=args.seed,
            resume=False,
        )
        run_id = submit_run(server, fed.to_run_config())
        t_submitted = time.time()
        t_end = _wait_for_federation_file(out, arrivals, args.poll, args.timeout)
        # Flower's own verdict once, after the end: polling the `flwr` CLI during the run would
        # load a core the centralised arm does not pay for.
        status = wait_for_run(server, run_id, out, poll=1.0, timeout=args.timeout)
    finally:
        for node in nodes:
            node.stop()
        stop_superlink(server)
        for clock in clocks:
            clock.stop()
    final = read_status(out) or {}
    if status != "finished:completed" or final.get("state") != "completed":
        raise SystemExit(f"the federated run ended as {status}: {final.get('reason')}")

    serverapp_started = (out / "federation_config.json").stat().st_mtime
    site_clocks = {f"site-{k}": clock for k, clock in enumerate(clocks)}
    rounds = [_round_times(r, k, site_clocks) for k, r in enumerate(read_rounds(out))]
    startup = {
        "superlink_until_healthy": t_link - t_start,
        "supernodes_spawn": t_nodes - t_link,
        "flwr_run_submit": t_submitted - t_nodes,
        "serverapp_process_start": max(serverapp_started - t_submitted, 0.0),
    }
    per_round_total = sum(r["round_seconds"] + r["checkpoint"] for r in rounds)
    breakdown = {
        **startup,
        "slowest_site_training": sum(r["slowest_site_training"] for r in rounds),
        "site_setup_and_save": sum(r["site_setup"] + r["site_save"] for r in rounds),
        "message_overhead": sum(r["message_overhead"] for r in rounds),
        "of_which_delivery_to_site": _sum(rounds, "delivery_to_site"),
        "of_which_clientapp_process": _sum(rounds, "clientapp_process"),
        "of_which_reply_to_server": _sum(rounds, "reply_to_server"),
        "aggregation": sum(r["aggregate"] for r in rounds),
        "checkpoint": sum(r["checkpoint"] for r in rounds),
        "server_round_bookkeeping": sum(
            r["round_seconds"] - r["exchange"] - r["aggregate"] for r in rounds
        ),
    }
    breakdown["rest"] = (t_end - t_start) - sum(startup.values()) - per_round_total
    return {
        "wall_seconds": t_end - t_start,
        "run_seconds": t_end - t_submitted,
        "flower_status": status,
        "rounds": rounds,
        "round_arrival_seconds_after_submit": {
            f"{phase}-{rnd}": t - t_submitted for (phase, rnd), t in sorted(arrivals.items())
        },
        "breakdown": breakdown,
    }


def _wait_for_federation_file(
    out: Path, arrivals: dict[tuple[str, int], float], poll: float, timeout: float
) -> float:
    """Wait until federation.json says the run ended, reading files only; returns that time."""
    from fedspine.federated.run_folder import read_rounds, read_status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in read_rounds(out):
            arrivals.setdefault((record.get("phase", "gan"), record["round"]), time.time())
        state = (read_status(out) or {}).get("state")
        if state in ("completed", "failed"):
            return time.time()
        time.sleep(poll)
    raise SystemExit(f"the federated run did not end within {timeout:.0f} s")


def _round_times(record: dict, index: int, clocks: dict[str, _LogClock]) -> dict:
    """One round's server and site timings; the slowest site is the one the round waited for.

    ``index`` is the round's place among the messages each SuperNode logged (one per round).
    """
    timing = record.get("timing", {})

    def work(site: dict) -> float:
        return site["seconds"] + site.get("setup-seconds", 0.0) + site.get("save-seconds", 0.0)

    slowest = max(record["sites"], key=work)
    exchange = float(timing.get("exchange", record["seconds"]))
    out = {
        "round": record["round"],
        "round_seconds": record["seconds"],
        "exchange": exchange,
        "aggregate": float(timing.get("aggregate", 0.0)),
        "checkpoint": float(timing.get("checkpoint", 0.0)),
        "slowest_site": slowest["site"],
        "slowest_site_training": slowest["seconds"],
        "site_setup": slowest.get("setup-seconds", 0.0),
        "site_save": slowest.get("save-seconds", 0.0),
        "message_overhead": exchange - work(slowest),
        "site_training_seconds": {s["site"]: s["seconds"] for s in record["sites"]},
        "images_per_site": {s["site"]: s["images-seen"] for s in record["sites"]},
    }
    clock = clocks.get(slowest["site"])
    if (
        clock is not None
        and "sent_at" in timing
        and index < min(len(clock.received), len(clock.sent))
    ):
        received, sent = clock.received[index], clock.sent[index]
        out["delivery_to_site"] = received - timing["sent_at"]
        out["clientapp_process"] = sent - received - work(slowest)
        out["reply_to_server"] = timing["replied_at"] - sent
    return out


def _sum(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if key in r]
    return sum(values) if len(values) == len(rounds) else None


class _LogClock(threading.Thread):
    """Timestamps a SuperNode's log lines as they are written (Flower's lines carry no time):
    a message pulled from the SuperLink ("Receiving:") and its reply pushed ("Sent successfully")."""

    def __init__(self, path: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.interval = interval
        self.received: list[float] = []
        self.sent: list[float] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        offset, pending = 0, ""
        while not self._stop_event.is_set():
            if self.path.is_file():
                with open(self.path, errors="replace") as fh:
                    fh.seek(offset)
                    pending += fh.read()
                    offset = fh.tell()
                now = time.time()
                *lines, pending = pending.split("\n")
                for line in lines:
                    if "Receiving:" in line:
                        self.received.append(now)
                    elif "Sent successfully" in line:
                        self.sent.append(now)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _centralised(args: argparse.Namespace, work: Path, sites: list[Path]) -> dict:
    """One GanTrainer on the union of the sites' data, for the federation's total images."""
    from fedspine.data.prepared import load_prepared, merge_prepared
    from fedspine.training.batches import BatchSampler, training_data
    from fedspine.training.config import preset_config
    from fedspine.training.gan_trainer import GanTrainer, configure_cpu

    merged = merge_prepared(
        [load_prepared(p) for p in sites], work / "union", [p.name for p in sites]
    )
    threads = configure_cpu(args.central_threads or 2 * args.threads_per_site)
    t0 = time.time()
    config = preset_config("cpu", args.resolution, len(CLASSES))
    # A site's round ends on a whole batch: train exactly the images both sites will see.
    per_site_round = math.ceil(round(args.kimg_per_round * 1000) / config.batch) * config.batch
    kimg = 2 * args.rounds * per_site_round / 1000
    config.seed = args.seed
    config.device = "cpu"
    data = training_data(load_prepared(merged).select("train"), args.resolution)
    trainer = GanTrainer(config, data.label_prior(), device="cpu")
    batches = BatchSampler(data, config.batch, trainer.np_rng)
    t1 = time.time()
    trainer.run(kimg, batches, tick_kimg=kimg)
    t2 = time.time()
    return {
        "kimg": kimg,
        "images_seen": trainer.cur_nimg,
        "threads": threads,
        "setup_seconds": t1 - t0,
        "train_seconds": t2 - t1,
        "train_images": len(data),
    }


def _import_seconds() -> float:
    """What each ClientApp message's fresh process pays before it can train: the imports."""
    code = f"import time; t = time.perf_counter(); {IMPORTS}; print(time.perf_counter() - t)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return float(proc.stdout.strip().splitlines()[-1])


def _site_dataset(root: Path, n: int, resolution: int, seed: int) -> Path:
    """A site's prepared dataset: two classes (a bright bar for class 1), two images per patient,
    80 % train, 10 % val, 10 % test by patient."""
    from fedspine.data.prepared import write_prepared

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    images = rng.normal(80 + 10 * seed, 20, size=(n, resolution, resolution))
    mid = resolution // 2
    images[labels == 1, mid - max(1, resolution // 16) : mid + max(1, resolution // 16), :] += 120
    patients = [f"s{seed}p{i // 2}" for i in range(n)]
    fraction = np.array([(i // 2) / max(n // 2, 1) for i in range(n)])
    splits = np.where(fraction < 0.8, "train", np.where(fraction < 0.9, "val", "test"))
    return write_prepared(
        root,
        images=np.clip(images, 0, 255).astype(np.uint8),
        files=[f"img{i}.png" for i in range(n)],
        patient_ids=patients,
        splits=list(splits),
        labels=labels,
        findings=np.eye(2, dtype=np.uint8)[labels],
        finding_names=CLASSES,
        class_names=CLASSES,
        rejected=[],
        manifest={"source": "benchmarks/federation_overhead.py"},
    )


if __name__ == "__main__":
    main()
