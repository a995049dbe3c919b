"""Coordinator and site deployment on Flower's engine: SuperLink, SuperNodes, run submission.

A coordinator keeps everything in one work folder::

    certs/            ca.crt, server.pem, server.key (and ca.key: keep it offline if you can)
    flwr_home/        the `flwr` CLI's own home with one connection, ``fedspine`` (loopback)
    state.db          the SuperLink's database (registered sites, runs): survives restarts
    superlink.pid     superlink.log     server.json (address and TLS mode); superlink.log is
                                        Flower's own, rotated daily; superlink.console.log
                                        the process's console output
    front.pid         front.log         the TLS front on the public address (Fleet API only)

With TLS the SuperLink listens on loopback only, where its Control and Runtime APIs stay; the
public HOST:PORT is :mod:`fedspine.federated.front`, which forwards the Fleet API alone.

A site keeps its own work folder::

    supernode.pid     supernode.log     the SuperNode (`--isolation process`: it runs no app itself)
    worker.pid        worker.log        the ClientApp worker (:mod:`fedspine.federated.site_worker`)
    superexec.secret  the shared secret (0600) with which the worker acquires the SuperNode's tasks
    state/            local training state     flwr_home/   Flower's home for this site
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedspine.data.prepared import load_prepared
from fedspine.federated.bundle_check import installed_bundle_dir
from fedspine.federated.processes import (
    CONNECTION,
    SERVER_ALLOCATOR_ENV,
    FlowerProcessError,
    ManagedProcess,
    executable,
    flower_env,
    flwr_cli,
    free_port,
    recorded_pid,
    start_process,
    stop_pid,
    wait_for_health,
    write_connection,
)
from fedspine.federated.run_folder import STATUS_FILE, read_rounds, read_status
from fedspine.federated.security import read_public_key
from fedspine.privacy.home import resolve_home

SERVER_FILE = "server.json"
FRONT_PID = "front.pid"
# What each recorded process's command line must name before fedspine signals it.
SUPERLINK_MARKER = "flower-superlink"
SUPERNODE_MARKER = "flower-supernode"
FRONT_MARKER = "fedspine.federated.front"
WORKER_MARKER = "fedspine.federated.site_worker"
WORKER_PID = "worker.pid"
SUPEREXEC_SECRET = "superexec.secret"
# How often the worker asks the SuperNode for a task (seconds): AcquireTask on loopback is cheap.
WORKER_POLL_INTERVAL = 0.2
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass
class ServerInfo:
    host: str
    port: int
    insecure: bool
    connect_host: str
    superlink_port: int | None = None

    @property
    def address(self) -> str:
        host = f"[{self.connect_host}]" if ":" in self.connect_host else self.connect_host
        return f"{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_superlink(
    workdir: Path,
    host: str = "0.0.0.0",
    port: int = 9092,
    insecure: bool = False,
    node_auth: bool = True,
    timeout: float = 60.0,
) -> ManagedProcess:
    """Start the SuperLink with TLS and SuperNode authentication and wait for /health."""
    workdir = Path(workdir).resolve()
    pid_file = workdir / "superlink.pid"
    old = recorded_pid(pid_file, SUPERLINK_MARKER)
    if old is not None:
        raise FlowerProcessError(
            f"a SuperLink already runs from {workdir} (PID {old}); stop it first"
        )
    if insecure and not is_loopback(host):
        raise FlowerProcessError(
            f"--insecure is only allowed on loopback (127.0.0.1, ::1), not on {host}: "
            "sites would send weights in clear text"
        )
    certs = workdir / "certs"
    if not insecure:
        for name in ("ca.crt", "server.pem", "server.key"):
            if not (certs / name).is_file():
                raise FlowerProcessError(
                    f"{certs / name} is missing; run `fedspine server certs --workdir {workdir}` first"
                )
    # With TLS the SuperLink (Fleet, Control and Runtime APIs on one port) binds loopback only and
    # the front below is the one public port; --insecure is loopback-only, so nothing is exposed.
    link_host, link_port = ("127.0.0.1", free_port()) if not insecure else (host, port)
    argv = [
        executable("flower-superlink"),
        "--host",
        link_host,
        "--port",
        str(link_port),
        "--database",
        str(workdir / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile",
            str(certs / "ca.crt"),
            "--ssl-certfile",
            str(certs / "server.pem"),
            "--ssl-keyfile",
            str(certs / "server.key"),
        ]
    if node_auth:
        argv.append("--enable-supernode-auth")
    # Flower's own log, rotated by Flower (a day a file, LOG_BACKUPS kept); the process's console
    # output (start-up errors before logging is set up) goes beside it, rolled at each start.
    argv += [
        "--log-file",
        str(workdir / SUPERLINK_LOG),
        "--log-rotation-interval-hours",
        "24",
        "--log-rotation-backup-count",
        str(LOG_BACKUPS),
    ]
    console = workdir / SUPERLINK_CONSOLE
    _roll(console)
    flwr_home = workdir / "flwr_home"
    process = start_process(
        "SuperLink",
        argv,
        console,
        flower_env(flwr_home, SERVER_ALLOCATOR_ENV),
        pid_file=pid_file,
        cwd=workdir,
    )
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
    info = ServerInfo(
        host=host,
        port=port,
        insecure=insecure,
        connect_host=connect_host,
        superlink_port=None if insecure else link_port,
    )
    scheme = "http" if insecure else "https"
    ca = None if insecure else certs / "ca.crt"
    front = None
    try:
        link_address = info.address if insecure else f"127.0.0.1:{link_port}"
        wait_for_health(f"{scheme}://{link_address}/health", ca, timeout, process)
        if not insecure:
            front = start_process(
                "front",
                [
                    sys.executable,
                    "-m",
                    "fedspine.federated.front",
                    "--listen",
                    f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                    "--upstream",
                    f"https://127.0.0.1:{link_port}",
                    "--ca",
                    str(certs / "ca.crt"),
                    "--cert",
                    str(certs / "server.pem"),
                    "--key",
                    str(certs / "server.key"),
                ],
                workdir / "front.log",
                flower_env(flwr_home),
                pid_file=workdir / FRONT_PID,
                cwd=workdir,
            )
            # Through the front, as a site would; the chain is verified, the name is not (the
            # operator's certificate names the public host, this check dials this machine).
            wait_for_health(f"https://{info.address}/health", ca, timeout, front, False)
    except FlowerProcessError:
        if front is not None:
            front.stop()
        process.stop()
        raise
    write_connection(flwr_home, link_address, ca, insecure)
    _write_json(workdir / SERVER_FILE, asdict(info))
    return process


def stop_superlink(workdir: Path) -> bool:
    """Stop the front and the SuperLink of ``workdir`` with their children; False if neither
    was running."""
    front = _stop_recorded(Path(workdir) / FRONT_PID, FRONT_MARKER)
    return _stop_recorded(Path(workdir) / "superlink.pid", SUPERLINK_MARKER) or front


def register_site(workdir: Path, public_key: Path) -> dict:
    """Register a site's public key with the SuperLink; returns Flower's answer (node id)."""
    read_public_key(public_key)
    return flwr_cli(
        ["supernode", "register", str(Path(public_key).resolve()), CONNECTION, "--format", "json"],
        _flwr_home(workdir),
    )


def list_sites(workdir: Path) -> list[dict]:
    data = flwr_cli(["supernode", "ls", CONNECTION, "--format", "json"], _flwr_home(workdir))
    return list(data.get("nodes", []))


def submit_run(workdir: Path, run_config: dict) -> int:
    """Submit fedspine's Flower app with ``run_config``; returns the run id."""
    with tempfile.TemporaryDirectory(prefix="fedspine-app-") as tmp:
        app_dir = Path(tmp) / "app"
        _copy_bundle(app_dir)
        config_file = Path(tmp) / "run-config.toml"
        config_file.write_text(_toml_flat(run_config))
        data = flwr_cli(
            ["run", str(app_dir), CONNECTION, "--run-config", str(config_file), "--format", "json"],
            _flwr_home(workdir),
            timeout=300,
        )
    return int(data["run-id"])


def run_status(workdir: Path, run_id: int) -> str:
    """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
    data = flwr_cli(
        ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], _flwr_home(workdir)
    )
    runs = data.get("runs", [])
    return str(runs[0]["status"]) if runs else "unknown"


def stop_run(workdir: Path, run_id: int) -> None:
    flwr_cli(["stop", str(run_id), CONNECTION, "--format", "json"], _flwr_home(workdir))


def run_logs(workdir: Path, run_id: int) -> str:
    try:
        return str(
            flwr_cli(
                ["log", str(run_id), CONNECTION, "--show"],
                _flwr_home(workdir),
                timeout=30,
                parse_json=False,
            )
        )
    except FlowerProcessError as err:
        return str(err)


def wait_for_run(
    workdir: Path,
    run_id: int,
    output_dir: Path,
    on_round: Callable[[dict], None] | None = None,
    poll: float = 2.0,
    timeout: float | None = None,
    ask_every: float = 30.0,
) -> str:
    """Follow a run until Flower says it finished; report each new round from rounds.jsonl.

    Files are read every ``poll`` seconds; Flower itself (a ``flwr`` process, about a second of
    CPU) is asked only when the run's status file turns final, and every ``ask_every`` seconds
    in case the ServerApp ended without writing it: asking every poll took most of a core away
    from the run on a two-core machine.
    """
    seen = 0
    start = time.monotonic()
    started_at = time.time()
    asked = -math.inf
    while True:
        rounds = read_rounds(output_dir)
        for record in rounds[seen:]:
            if on_round is not None:
                on_round(record)
        seen = len(rounds)
        if _status_final_since(output_dir, started_at) or time.monotonic() - asked >= ask_every:
            asked = time.monotonic()
            status = run_status(workdir, run_id)
            if status.startswith("finished"):
                for record in read_rounds(output_dir)[seen:]:
                    if on_round is not None:
                        on_round(record)
                return status
        if timeout is not None and time.monotonic() - start > timeout:
            raise FlowerProcessError(
                f"run {run_id} did not finish within {timeout:.0f} s (status {status})"
            )
        time.sleep(poll)


def _status_final_since(output_dir: Path, since: float) -> bool:
    """Whether the run folder's status file says completed or failed, written after ``since``."""
    path = Path(output_dir) / STATUS_FILE
    try:
        if path.stat().st_mtime < since:
            return False
    except OSError:
        return False
    state = (read_status(output_dir) or {}).get("state")
    return state in ("completed", "failed")


def server_info(workdir: Path) -> ServerInfo:
    path = Path(workdir) / SERVER_FILE
    try:
        return ServerInfo(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        raise FlowerProcessError(
            f"{path}: no running server recorded; run `fedspine server start`"
        ) from None


SUPERLINK_LOG = "superlink.log"
SUPERLINK_CONSOLE = "superlink.console.log"
LOG_BACKUPS = 14
CONSOLE_ROLL_BYTES = 10 * 2**20


def _roll(path: Path) -> None:
    """Keep one previous console log, and only when it has grown (a start does not lose one)."""
    if path.is_file() and path.stat().st_size > CONSOLE_ROLL_BYTES:
        os.replace(path, path.with_name(path.name + ".1"))


SITE_PATH_FIELDS = ("data", "workdir", "ca", "key", "privacy_home")
"""site.toml settings that name files or folders (relative to the file)."""


@dataclass
class SiteProcessConfig:
    """What `fedspine client start` needs; node config values come from here, never the server."""

    server: str
    data: Path
    site: str
    workdir: Path
    ca: Path | None = None
    key: Path | None = None
    max_epsilon: float | None = None
    privacy_home: Path | None = None
    privacy_unit: str | None = None
    port: int = 9094
    insecure: bool = False
    threads: int | None = None
    max_local_kimg: float | None = None
    max_resolution: int | None = None

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: dict | None = None) -> SiteProcessConfig:
        """A site's settings from its site.toml (sites/site.toml is the template), with
        ``overrides`` (command-line options that were given) on top. Paths in the file are
        relative to the file's folder."""
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                values = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise FlowerProcessError(f"{path}: cannot read the site config ({err})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FlowerProcessError(
                f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}"
            )
        for name in SITE_PATH_FIELDS:
            if values.get(name) is not None:
                given = Path(str(values[name])).expanduser()
                values[name] = given if given.is_absolute() else path.parent / given
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        values.setdefault("workdir", Path("fedspine-site"))
        missing = [name for name in ("server", "data", "site") if not values.get(name)]
        if missing:
            raise FlowerProcessError(
                f"{path}: no {', '.join(missing)}; set them in the file or pass "
                + ", ".join(f"--{m}" for m in missing)
            )
        for name in SITE_PATH_FIELDS:
            if values.get(name) is not None:
                values[name] = Path(values[name])
        return cls(**values)

    def node_config(self) -> str:
        """Flower's ``--node-config``: TOML values, strings double-quoted."""
        items = {
            "data-path": str(self.data.resolve()),
            "site-name": self.site,
            "state-dir": str((self.workdir / "state").resolve()),
        }
        if self.max_epsilon is not None:
            items["max-epsilon"] = float(self.max_epsilon)
        # Resolved here, from the site's own option or environment: the ClientApp process
        # must not fall back to another default than the one the site admin sees.
        items["privacy-home"] = str(resolve_home(self.privacy_home).resolve())
        if self.privacy_unit is not None:
            items["privacy-unit"] = self.privacy_unit
        if self.threads is not None:
            items["threads"] = int(self.threads)
        if self.max_local_kimg is not None:
            items["max-local-kimg"] = float(self.max_local_kimg)
        if self.max_resolution is not None:
            items["max-resolution"] = int(self.max_resolution)
        return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def start_supernode(cfg: SiteProcessConfig) -> ManagedProcess:
    """Start the site's SuperNode and its ClientApp worker in the background.

    The SuperNode runs with ``--isolation process``: it queues each message as a task on its
    loopback Runtime API and starts nothing itself. The worker (:mod:`~fedspine.federated.site_worker`,
    its own process group, stopped with the SuperNode) acquires the tasks with the SuperExec shared
    secret, refuses any app bundle but the installed one, and runs each task in a fork of its warm
    imports. The returned process carries the worker as a companion: ``stop`` stops both.
    """
    load_prepared(cfg.data)  # refuse to start on a folder that is not a prepared dataset
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pid_file = workdir / "supernode.pid"
    old = recorded_pid(pid_file, SUPERNODE_MARKER)
    if old is not None:
        raise FlowerProcessError(
            f"a SuperNode already runs from {workdir} (PID {old}); stop it first"
        )
    old = recorded_pid(workdir / WORKER_PID, WORKER_MARKER)
    if old is not None:
        raise FlowerProcessError(
            f"a site worker already runs from {workdir} (PID {old}); run `fedspine client stop`"
        )
    server_host = cfg.server.rsplit(":", 1)[0].strip("[]")
    secret = _write_secret(workdir / SUPEREXEC_SECRET)
    argv = [
        executable("flower-supernode"),
        "--superlink",
        cfg.server,
        "--host",
        "127.0.0.1",
        "--port",
        str(cfg.port),
        "--node-config",
        cfg.node_config(),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
    ]
    if cfg.insecure:
        if not is_loopback(server_host):
            raise FlowerProcessError("--insecure is only allowed towards a server on loopback")
        argv.append("--insecure")
    else:
        if cfg.ca is None or not Path(cfg.ca).is_file():
            raise FlowerProcessError(
                f"the coordinator's CA certificate is needed (--ca); not found: {cfg.ca}"
            )
        argv += ["--root-certificates", str(Path(cfg.ca).resolve())]
    if cfg.key is not None:
        if not Path(cfg.key).is_file():
            raise FlowerProcessError(
                f"{cfg.key}: no such site key (make one with `fedspine client keygen`)"
            )
        argv += ["--auth-supernode-private-key", str(Path(cfg.key).resolve())]
    env = flower_env(workdir / "flwr_home")
    supernode = start_process(
        f"SuperNode {cfg.site}",
        argv,
        workdir / "supernode.log",
        env,
        pid_file=pid_file,
        cwd=workdir,
    )
    try:
        worker = start_process(
            f"site worker {cfg.site}",
            [
                sys.executable,
                "-m",
                WORKER_MARKER,
                "--runtime-api-address",
                f"127.0.0.1:{cfg.port}",
                "--secret-file",
                str(secret),
                "--supernode-pid",
                str(supernode.pid),
                "--poll-interval",
                str(WORKER_POLL_INTERVAL),
            ],
            workdir / "worker.log",
            env,
            pid_file=workdir / WORKER_PID,
            cwd=workdir,
        )
    except OSError as err:
        supernode.stop()
        raise FlowerProcessError(f"the site worker did not start: {err}") from None
    supernode.companions.append(worker)
    return supernode


def stop_supernode(workdir: Path) -> bool:
    """Stop the ClientApp worker and the SuperNode of a site's ``workdir``; False if neither
    was running."""
    worker = _stop_recorded(Path(workdir) / WORKER_PID, WORKER_MARKER)
    return _stop_recorded(Path(workdir) / "supernode.pid", SUPERNODE_MARKER) or worker


def _write_secret(path: Path) -> Path:
    """A fresh SuperExec shared secret, readable by this user only, for one SuperNode start."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_hex(32).encode())
    os.replace(tmp, path)
    return path


def _stop_recorded(pid_file: Path, marker: str) -> bool:
    """Stop the process a PID file names, only if it is still fedspine's (see recorded_pid)."""
    pid = recorded_pid(pid_file, marker)
    pid_file.unlink(missing_ok=True)
    if pid is None:
        return False
    stop_pid(pid)
    return True


def bundle_dir() -> Path:
    return installed_bundle_dir()


def _copy_bundle(dest: Path) -> None:
    shutil.copytree(bundle_dir(), dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _flwr_home(workdir: Path) -> Path:
    home = Path(workdir).resolve() / "flwr_home"
    if not (home / "config.toml").is_file():
        raise FlowerProcessError(
            f"{workdir}: no SuperLink connection; run `fedspine server start` first"
        )
    return home


def _toml_flat(values: dict) -> str:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        lines.append(f'"{key}" = {text}')
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
