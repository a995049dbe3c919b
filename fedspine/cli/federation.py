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
    name: str = typer.Option(
        None, "--name", help="The site's name in `server status` (default: the key's file name)."
    ),
    workdir: Path = typer.Option(Path("fedspine-server"), "--workdir", help=WORKDIR_HELP),
) -> None:
    """Allow a site's SuperNode to connect (its public key, from `fedspine client keygen`)."""
    from fedspine.federated.operations import register
    from fedspine.federated.processes import FlowerProcessError

    try:
        site = register(workdir, public_key, name)
    except (FlowerProcessError, ValueError) as err:
        fail(str(err))
    typer.echo(f"registered {public_key} as node {site.node_id} ({site.name})")


@server_app.command("unregister-site")
def server_unregister_site(
    site: str = typer.Argument(
        ..., help="The site to remove: its node id, its name, or its public key file."
    ),
    workdir: Path = typer.Option(Path("fedspine-server"), "--workdir", help=WORKDIR_HELP),
) -> None:
    """Remove a site: the SuperLink refuses its key from now on (register it again to undo)."""
    from fedspine.federated.operations import unregister
    from fedspine.federated.processes import FlowerProcessError

    try:
        removed = unregister(workdir, site)
    except (FlowerProcessError, ValueError) as err:
        fail(str(err))
    label = removed if isinstance(removed, int) else f"{removed.node_id} ({removed.name})"
    typer.echo(f"unregistered node {label}")


@server_app.command("status")
def server_status(
    workdir: Path = typer.Option(Path("fedspine-server"), "--workdir", help=WORKDIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Is the coordinator up: SuperLink and front, address, certificate expiry, sites, last run.

    Exits with status 1 when something needs an operator (a process down, a certificate that
    expires within 30 days), so monitoring can call it.
    """
    from fedspine.federated.operations import server_status as read_server_status

    status = read_server_status(workdir)
    _print_status(status, as_json, _server_lines)


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
    from fedspine.federated.federation_config import (
        EMBEDDING_ROUTE,
        FederationConfig,
        FederationError,
    )
    from fedspine.federated.operations import record_last_run
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
        elif record.get("phase") == "embedding":
            sites = ", ".join(
                f"{s['site']} ({s.get('patients')} patients, ε {_fmt(s.get('epsilon'))})"
                for s in record["sites"]
            )
            head = "embedding release round"
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
        record_last_run(workdir, run_id, out)
        what = "one DP release round" if fed.route == EMBEDDING_ROUTE else f"{fed.rounds} rounds"
        typer.echo(f"submitted run {run_id} ({fed.name}, {what}); output: {out}")
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
    config: Path = typer.Option(
        None,
        "--config",
        help="This site's settings (sites/site.toml is the template); options given here win.",
    ),
    server: str = typer.Option(None, "--server", help="The coordinator's HOST:PORT."),
    data: Path = typer.Option(
        None, "--data", help="This site's prepared dataset (`fedspine ingest`)."
    ),
    site: str = typer.Option(None, "--site", help="This site's name, as reports will show it."),
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
        None, help="Local port of the SuperNode (default 9094; differs per SuperNode on a host)."
    ),
    workdir: Path = typer.Option(
        None, "--workdir", help=SITE_WORKDIR_HELP + " [default: fedspine-site]"
    ),
    insecure: bool = typer.Option(
        None, "--insecure", help="No TLS (only towards a loopback server)."
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
        False,
        "--detach",
        help="Return once the coordinator accepted the site; stop with `fedspine client stop`.",
    ),
    auth_timeout: float = typer.Option(
        60.0,
        "--auth-timeout",
        help="Seconds to wait for the coordinator to accept this site before failing.",
    ),
) -> None:
    """Start this site's SuperNode: it trains on --data when the coordinator asks, never sends an image.

    The data path, site name, ε cap and privacy home are this site's node config: the server cannot change them.
    It says "running" only once the coordinator accepted the site (its node id is shown); a
    refused key, a wrong CA or an unreachable coordinator is an error with the reason.
    """
    import time

    from fedspine.data.prepared import PreparedDatasetError
    from fedspine.federated.deploy import SiteProcessConfig, start_supernode
    from fedspine.federated.operations import wait_for_authentication
    from fedspine.federated.processes import FlowerProcessError

    given = {
        "server": server,
        "data": data,
        "site": site,
        "workdir": workdir,
        "ca": ca,
        "key": key,
        "max_epsilon": max_epsilon,
        "privacy_home": privacy_home,
        "privacy_unit": privacy_unit,
        "port": port,
        "insecure": insecure,
        "threads": threads,
        "max_local_kimg": max_local_kimg,
        "max_resolution": max_resolution,
    }
    try:
        if config is not None:
            cfg = SiteProcessConfig.from_toml(config, given)
        else:
            missing = [f"--{k}" for k in ("server", "data", "site") if given[k] is None]
            if missing:
                fail(f"missing {', '.join(missing)} (or give --config site.toml)")
            given["workdir"] = workdir or Path("fedspine-site")
            cfg = SiteProcessConfig(**{k: v for k, v in given.items() if v is not None})
        process = start_supernode(cfg)
    except (FlowerProcessError, PreparedDatasetError) as err:
        fail(str(err))
    site = cfg.site
    try:
        node_id = wait_for_authentication(process.log, process.pid, timeout=auth_timeout)
    except FlowerProcessError as err:
        process.stop()
        fail(str(err))
    workers = ", ".join(f"{c.name} PID {c.pid}, log: {c.log}" for c in process.companions)
    typer.echo(
        f"SuperNode for {site} running (PID {process.pid}), accepted by the coordinator as "
        f"node {node_id}; log: {process.log}"
    )
    if workers:
        typer.echo(workers)
    if detach:
        return
    try:
        while process.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        typer.echo("stopping the SuperNode")
    finally:
        dead = [c for c in process.companions if not c.alive()]
        process.stop()
    if process.popen is not None and process.popen.returncode not in (0, None, -15):
        fail(f"the SuperNode exited with {process.popen.returncode}; see {process.log}")
    for companion in dead:
        fail(f"the {companion.name} exited; see {companion.log}")


@client_app.command("stop")
def client_stop(
    workdir: Path = typer.Option(Path("fedspine-site"), "--workdir", help=SITE_WORKDIR_HELP),
) -> None:
    """Stop a SuperNode started with --detach, and its ClientApp worker."""
    from fedspine.federated.deploy import stop_supernode

    typer.echo("SuperNode stopped" if stop_supernode(workdir) else "no SuperNode was running")


def _fmt(value) -> str:
    if value is None or value != value or value == -1.0:
        return "n/a"
    return f"{float(value):.3f}"


@client_app.command("status")
def client_status(
    workdir: Path = typer.Option(Path("fedspine-site"), "--workdir", help=SITE_WORKDIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Is this site up: SuperNode, node id (accepted by the coordinator), last round, ε spent.

    Exits with status 1 when something needs an operator (the SuperNode down, not
    authenticated, the last round refused or failed).
    """
    from fedspine.federated.operations import client_status as read_client_status

    _print_status(read_client_status(workdir), as_json, _client_lines)


def _print_status(status: dict, as_json: bool, lines) -> None:
    """Print a status (as JSON or as lines) and exit 1 when it lists problems."""
    import json

    if as_json:
        typer.echo(json.dumps(status, indent=2))
    else:
        for line in lines(status):
            typer.echo(line)
        for problem in status["problems"]:
            typer.echo(f"PROBLEM: {problem}")
    if status["problems"]:
        raise typer.Exit(1)


def _alive(process: dict) -> str:
    return f"running (PID {process['pid']})" if process["alive"] else "not running"


def _server_lines(status: dict) -> list[str]:
    cert = status["certificate"]
    lines = [
        f"SuperLink: {_alive(status['superlink'])}; log: {status['log']}",
        f"TLS front: {_alive(status['front'])}; sites dial {status['address'] or '?'}",
        "certificate: "
        + (
            f"valid until {cert.get('not_after')} ({cert.get('days_left')} days)"
            if cert
            else "none"
        ),
    ]
    for site in status["sites"]:
        lines.append(
            f"site {site.get('name')}: node {site['node_id']}, {site.get('status', 'unknown')}"
        )
    if not status["sites"]:
        lines.append("no sites registered")
    run = status["last_run"]
    if run:
        state = (run.get("status") or {}).get("state", "unknown")
        lines.append(
            f"last run {run['run_id']}: {state}, last round {run.get('last_round')} "
            f"({run.get('last_round_finished') or 'none yet'}); output: {run['output_dir']}"
        )
    return lines


def _client_lines(status: dict) -> list[str]:
    node = status["node_id"]
    lines = [
        f"SuperNode: {_alive(status['supernode'])}; log: {status['log']}",
        f"node id: {node} (accepted by the coordinator)" if node else "node id: not yet accepted",
    ]
    last = status["last_round"]
    if last:
        lines.append(
            f"last round: {last.get('federation')} round {last.get('round')} "
            f"({last.get('action')}): {last.get('outcome')} at {last.get('updated')}"
        )
    else:
        lines.append("last round: none yet")
    privacy = status["privacy"]
    if privacy:
        phases = ", ".join(f"{k} {_fmt(v)}" for k, v in privacy["phases"].items()) or "none"
        lines.append(
            f"ε spent: {_fmt(privacy['epsilon'])} at δ={privacy['delta']:.2g} "
            f"(cap {_fmt(privacy.get('cap'))}); this federation by phase: {phases}"
        )
    return lines
