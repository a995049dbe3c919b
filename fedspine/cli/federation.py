"""`fedspine server …` (the coordinator) and `fedspine client …` (a hospital site)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedspine.cli.common import fail

server_app = typer.Typer(
    help="Coordinator: certificates, the SuperLink, site registration, federated runs.",
    no_args_is_help=True,
)
client_app = typer.Typer(
    help="Hospital site: a key pair, and the SuperNode that trains on local data.",
    no_args_is_help=True,
)

WORKDIR_HELP = "The coordinator's work folder (certificates, SuperLink state, logs)."
SITE_WORKDIR_HELP = "The site's work folder (SuperNode log and PID, local training state)."


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")
    app.add_typer(client_app, name="client")


@server_app.command("certs")
def server_certs(
    workdir: Path = typer.Option(Path("fedspine-server"), "--workdir", help=WORKDIR_HELP),
    host: list[str] = typer.Option(
        ["localhost", "127.0.0.1", "::1"],
        "--host",
        help="Host name or IP the sites will dial; repeat for each (all go into the certificate).",
    ),
    days: int = typer.Option(825, help="Validity of the certificates, in days."),
) -> None:
    """Make a CA and a server certificate naming every --host; sites get certs/ca.crt."""
    from fedspine.federated.security import make_server_certificates

    certs = workdir / "certs"
    if (certs / "ca.crt").exists():
        fail(f"{certs} already holds certificates; remove them first to make new ones")
    paths = make_server_certificates(certs, hosts=host, days=days)
    typer.echo(f"CA certificate (give it to every site): {paths.ca_cert}")
    typer.echo(f"server certificate for {', '.join(host)}: {paths.server_cert}")
    typer.echo(f"keep {paths.ca_key} and {paths.server_key} private")


@server_app.command("start")
def server_start(
    workdir: Path = typer.Option(Path("fedspine-server"), "--workdir", help=WORKDIR_HELP),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(9092, help="Port of the SuperLink (sites dial HOST:PORT)."),
    insecure: bool = typer.Option(
        False, "--insecure", help="No TLS. Only allowed on loopback, for local experiments."
    ),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the SuperLink's /health."),
) -> None:
    """Start the SuperLink in the background: TLS and site authentication on."""
    from fedspine.federated.deploy import start_superlink
    from fedspine.federated.processes import FlowerProcessError

    try:
        process = start_superlink(workdir, host=host, port=port, insecure=insecure, timeout=timeout)
    except FlowerProcessError as err:
        fail(str(err))
    typer.echo(f"SuperLink running (PID {process.pid}) on {host}:{port}; log: {process.log}")


@server_app.command("stop")
def server_stop(
    workdir: Path = typer.Option(Path("fedspine-server"), "--workdir", help=WORKDIR_HELP),
) -> None:
    """Stop the SuperLink and everything it started."""
    from fedspine.federated.deploy import stop_superlink

    if stop_superlink(workdir):
        typer.echo("SuperLink stopped")
    else:
        typer.echo("no SuperLink was running")


@server_app.command("register-site")
def server_register_site(
    public_key: Path = typer.Argument(..., help="The site's public key (site.key.pub)."),
    workdir: Path = typer.Option(Path("fedspine-server"), "--workdir", help=WORKDIR_HELP),
) -> None:
    """Allow a site's SuperNode to connect (its public key, from `fedspine client keygen`)."""
    from fedspine.federated.deploy import register_site
    from fedspine.federated.processes import FlowerProcessError

    try:
        answer = register_site(workdir, public_key)
    except (FlowerProcessError, ValueError) as err:
        fail(str(err))
    typer.echo(f"registered {public_key} as node {answer.get('node-id')}")


@server_app.command("sites")
def server_sites(
    workdir: Path = typer.Option(Path("fedspine-server"), "--workdir", help=WORKDIR_HELP),
) -> None:
    """List registered sites and whether they are online."""
    from fedspine.federated.deploy import list_sites
    from fedspine.federated.processes import FlowerProcessError

    try:
        nodes = list_sites(workdir)
    except FlowerProcessError as err:
        fail(str(err))
    if not nodes:
        typer.echo("no sites registered")
    for node in nodes:
        typer.echo(
            f"{node.get('node-id')}  {node.get('status')}  online since {node.get('online-at')}"
        )


@server_app.command("run")
def server_run(
    config: Path = typer.Option(
        Path("server/federation.toml"), "--config", help="The federation's settings."
    ),
    rounds: int = typer.Option(None, "--rounds", help="Override the number of rounds."),
    workdir: Path = typer.Option(Path("fedspine-server"), "--workdir", help=WORKDIR_HELP),
    fresh: bool = typer.Option(
        False, "--fresh", help="Start from round 1 even if the output folder holds rounds."
    ),
    timeout: float = typer.Option(None, help="Give up after this many seconds."),
) -> None:
    """Submit a federated run and follow it round by round.

    Checkpoints, the rounds log, the final generator and the sites' metrics go to the
    federation's output folder. A run stopped part-way resumes from its last completed round.
    A SpineGAN federation (model = "spinegan") first federates its clinical classifier
    ([classifier] table), then trains the GAN with it frozen.
    """
    from fedspine.federated.deploy import run_logs, submit_run, wait_for_run
    from fedspine.federated.federation_config import FederationConfig, FederationError
    from fedspine.federated.processes import FlowerProcessError
    from fedspine.federated.run_folder import read_status

    try:
        fed = FederationConfig.from_toml(config)
    except FederationError as err:
        fail(str(err))
    if rounds is not None:
        fed.rounds = rounds
    if fresh:
        fed.resume = False
    out = Path(fed.output_dir)

    def show(record: dict) -> None:
        if record.get("phase") == "classifier":
            sites = ", ".join(
                f"{s['site']} (loss {_fmt(s.get('mean-loss'))}, val AUC {_fmt(s.get('val-auc'))}"
                + (f", ε {_fmt(s.get('epsilon'))})" if fed.dp else ")")
                for s in record["sites"]
            )
            head = f"classifier round {record['round']}/{fed.classifier.rounds}"
        else:
            sites = ", ".join(
                f"{s['site']} (loss G {_fmt(s.get('loss-g'))}, D {_fmt(s.get('loss-d'))})"
                for s in record["sites"]
            )
            head = f"round {record['round']}/{fed.rounds}"
        typer.echo(f"{head}: {sites or 'no site'} in {record['seconds']:.0f} s")
        for failure in record["failures"]:
            reason = failure["reason"].splitlines()[0]
            typer.echo(f"  site {failure['site']} failed: {reason}")

    try:
        run_id = submit_run(workdir, fed.to_run_config())
        typer.echo(f"submitted run {run_id} ({fed.name}, {fed.rounds} rounds); output: {out}")
        status = wait_for_run(workdir, run_id, out, on_round=show, timeout=timeout)
    except FlowerProcessError as err:
        fail(str(err))
    final = read_status(out) or {}
    if status != "finished:completed" or final.get("state") != "completed":
        reason = final.get("reason") or run_logs(workdir, run_id)[-1500:]
        fail(f"run {run_id} ended as {status}: {reason}")
    typer.echo(f"federation complete: generator {out / 'generator.pt'}")
    if fed.model == "spinegan":
        typer.echo(f"clinical classifier (federated): {out / 'classifier.pt'}")


@client_app.command("keygen")
def client_keygen(
    out: Path = typer.Option(Path("site.key"), "--out", help="Private key file to create."),
) -> None:
    """Make the site's EC P-384 key pair; send only the .pub file to the coordinator."""
    from fedspine.federated.security import make_site_keypair

    try:
        pair = make_site_keypair(out)
    except FileExistsError as err:
        fail(str(err))
    typer.echo(f"private key (stays at the site): {pair.private_key}")
    typer.echo(f"public key (send to the coordinator): {pair.public_key}")


@client_app.command("start")
def client_start(
    server: str = typer.Option(..., "--server", help="The coordinator's HOST:PORT."),
    data: Path = typer.Option(
        ..., "--data", help="This site's prepared dataset (`fedspine ingest`)."
    ),
    site: str = typer.Option(..., "--site", help="This site's name, as reports will show it."),
    ca: Path = typer.Option(None, "--ca", help="The coordinator's CA certificate (ca.crt)."),
    key: Path = typer.Option(
        None, "--key", help="This site's private key (`fedspine client keygen`)."
    ),
    max_epsilon: float = typer.Option(
        None,
        "--max-epsilon",
        help="This site's privacy cap: rounds that would exceed it are refused.",
    ),
    privacy_home: Path = typer.Option(
        None,
        "--privacy-home",
        help="This site's privacy home: its ledger and patient key (default: "
        "$FEDSPINE_PRIVACY_HOME, else ~/.local/share/fedspine/privacy).",
    ),
    privacy_unit: str = typer.Option(
        None,
        "--privacy-unit",
        help="'image' lets DP rounds run on data without patient identifiers, each image "
        "counted as one person (refused otherwise).",
    ),
    port: int = typer.Option(
        9094, help="Local port of the SuperNode (differs per SuperNode on one host)."
    ),
    workdir: Path = typer.Option(Path("fedspine-site"), "--workdir", help=SITE_WORKDIR_HELP),
    insecure: bool = typer.Option(
        False, "--insecure", help="No TLS (only towards a loopback server)."
    ),
    threads: int = typer.Option(
        None,
        "--threads",
        help="CPU threads for training (default: all cores this process may use).",
    ),
    max_local_kimg: float = typer.Option(
        None,
        "--max-local-kimg",
        help="Most local work per round this site accepts, in kimg (default: 50); a server "
        "asking for more is refused.",
    ),
    max_resolution: int = typer.Option(
        None,
        "--max-resolution",
        help="Largest network resolution this site trains, in px (default: 256).",
    ),
    detach: bool = typer.Option(
        False, "--detach", help="Return at once; stop with `fedspine client stop`."
    ),
) -> None:
    """Start this site's SuperNode: it trains on --data when the coordinator asks, never sends an image.

    The data path, site name, ε cap and privacy home are this site's node config: the server cannot change them.
    """
    import time

    from fedspine.data.prepared import PreparedDatasetError
    from fedspine.federated.deploy import SiteProcessConfig, start_supernode
    from fedspine.federated.processes import FlowerProcessError

    cfg = SiteProcessConfig(
        server=server,
        data=data,
        site=site,
        workdir=workdir,
        ca=ca,
        key=key,
        max_epsilon=max_epsilon,
        privacy_home=privacy_home,
        privacy_unit=privacy_unit,
        port=port,
        insecure=insecure,
        threads=threads,
        max_local_kimg=max_local_kimg,
        max_resolution=max_resolution,
    )
    try:
        process = start_supernode(cfg)
    except (FlowerProcessError, PreparedDatasetError) as err:
        fail(str(err))
    typer.echo(f"SuperNode for {site} running (PID {process.pid}); log: {process.log}")
    if detach:
        return
    try:
        while process.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        typer.echo("stopping the SuperNode")
    finally:
        process.stop()
    if process.popen is not None and process.popen.returncode not in (0, None, -15):
        fail(f"the SuperNode exited with {process.popen.returncode}; see {process.log}")


@client_app.command("stop")
def client_stop(
    workdir: Path = typer.Option(Path("fedspine-site"), "--workdir", help=SITE_WORKDIR_HELP),
) -> None:
    """Stop a SuperNode started with --detach."""
    from fedspine.federated.deploy import stop_supernode

    typer.echo("SuperNode stopped" if stop_supernode(workdir) else "no SuperNode was running")


def _fmt(value) -> str:
    if value is None or value != value or value == -1.0:
        return "n/a"
    return f"{float(value):.3f}"
