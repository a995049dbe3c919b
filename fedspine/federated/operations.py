"""What hospital IT asks of a running federation: is it up, who is registered, what did a site
last do, how much ε has it spent, when do the certificates expire.

Everything here reads files the processes already write (PID files, logs, the round log, the
site's ``last_round.json`` and its privacy ledger) or asks the SuperLink's Control API on
loopback; nothing here starts or changes training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedspine.federated.deploy import (
    FRONT_MARKER,
    FRONT_PID,
    SUPERLINK_MARKER,
    SUPERNODE_MARKER,
    list_sites,
    register_site,
    server_info,
)
from fedspine.federated.processes import (
    CONNECTION,
    FlowerProcessError,
    flwr_cli,
    pid_alive,
    recorded_pid,
)
from fedspine.federated.run_folder import read_rounds, read_status
from fedspine.federated.security import certificate_expiry, read_public_key
from fedspine.fileio import SERVER_SITES, SITE_LAST_ROUND, write_json_atomic

SUPERLINK_PID = "superlink.pid"
SUPERNODE_PID = "supernode.pid"
SUPERLINK_LOG = "superlink.log"
SUPERNODE_LOG = "supernode.log"
SERVER_CERT = Path("certs") / "server.pem"
LAST_RUN = "last_run.json"
NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
AUTH_FAILURE = re.compile(
    r"(PERMISSION_DENIED|UNAUTHENTICATED|not registered|Invalid node|authentication)[^\n]*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SiteRegistration:
    """One registered site, as the coordinator recorded it when it registered the key."""

    node_id: int
    name: str
    key_sha256: str
    key_file: str
    registered: str


def key_fingerprint(public_key: str | Path) -> str:
    """SHA-256 of the public key line (what the SuperLink stores), to recognise a key file."""
    return hashlib.sha256(read_public_key(public_key).strip().encode()).hexdigest()


def registered_sites(workdir: str | Path) -> list[SiteRegistration]:
    """The sites this coordinator registered (oldest first); empty before the first one."""
    path = Path(workdir) / SERVER_SITES
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError) as err:
        raise FlowerProcessError(f"{path}: unreadable site registry ({err})") from None
    return [SiteRegistration(**row) for row in rows]


def register(
    workdir: str | Path, public_key: str | Path, name: str | None = None
) -> SiteRegistration:
    """Register a site's key with the SuperLink and remember which node id it became."""
    public_key = Path(public_key)
    fingerprint = key_fingerprint(public_key)
    answer = register_site(Path(workdir), public_key)
    site = SiteRegistration(
        node_id=int(answer["node-id"]),
        name=name or public_key.name.removesuffix(".pub").removesuffix(".key"),
        key_sha256=fingerprint,
        key_file=public_key.name,
        registered=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    others = [s for s in registered_sites(workdir) if s.node_id != site.node_id]
    _write_registry(workdir, [*others, site])
    return site


def unregister(workdir: str | Path, which: str) -> SiteRegistration | int:
    """Remove a site: ``which`` is its node id, its registered name or its public key file.

    Returns the registration removed (or the bare node id where the site was registered
    before fedspine kept a registry). The SuperLink then refuses that key until it is
    registered again.
    """
    sites = registered_sites(workdir)
    node_id = _resolve_site(sites, which)
    flwr_cli(
        ["supernode", "unregister", str(node_id), CONNECTION, "--format", "json"],
        Path(workdir) / "flwr_home",
    )
    _write_registry(workdir, [s for s in sites if s.node_id != node_id])
    return next((s for s in sites if s.node_id == node_id), node_id)


def record_last_run(workdir: str | Path, run_id: int, output_dir: str | Path) -> None:
    """Remember the run `fedspine server run` submitted, for `fedspine server status`."""
    write_json_atomic(
        Path(workdir) / LAST_RUN,
        {"run_id": int(run_id), "output_dir": str(Path(output_dir).resolve())},
    )


def server_status(workdir: str | Path, now: datetime | None = None) -> dict[str, Any]:
    """The coordinator at a glance: processes, address, certificate, sites, the last run."""
    workdir = Path(workdir)
    superlink = recorded_pid(workdir / SUPERLINK_PID, SUPERLINK_MARKER)
    front = recorded_pid(workdir / FRONT_PID, FRONT_MARKER)
    status: dict[str, Any] = {
        "workdir": str(workdir.resolve()),
        "superlink": {"pid": superlink, "alive": superlink is not None},
        "front": {"pid": front, "alive": front is not None},
        "log": str((workdir / SUPERLINK_LOG).resolve()),
        "address": None,
        "certificate": _certificate(workdir / SERVER_CERT, now),
        "sites": [asdict(s) for s in registered_sites(workdir)],
        "last_run": None,
        "problems": [],
    }
    with contextlib.suppress(FlowerProcessError):
        status["address"] = server_info(workdir).address
    if superlink is not None:
        try:
            online = {str(n.get("node-id")): n for n in list_sites(workdir)}
        except FlowerProcessError as err:
            status["problems"].append(f"cannot list sites: {err}")
            online = {}
        known = {str(s["node_id"]) for s in status["sites"]}
        for site in status["sites"]:
            site["status"] = online.get(str(site["node_id"]), {}).get("status", "unknown")
        for node_id, node in online.items():
            if node_id not in known and node.get("status") != "unregistered":
                status["sites"].append(
                    {
                        "node_id": int(node_id),
                        "name": "(not in registry)",
                        "status": node.get("status"),
                    }
                )
    else:
        status["problems"].append("the SuperLink is not running (`fedspine server start`)")
    if superlink is not None and front is None and status["address"] is not None:
        status["problems"].append("the TLS front is not running: sites cannot connect")
    status["last_run"] = _last_run(workdir)
    warning = (status["certificate"] or {}).get("warning")
    if warning:
        status["problems"].append(warning)
    return status


def client_status(workdir: str | Path, now: datetime | None = None) -> dict[str, Any]:
    """A site at a glance: its SuperNode, node id, authentication, last round, ε per phase."""
    workdir = Path(workdir)
    pid = recorded_pid(workdir / SUPERNODE_PID, SUPERNODE_MARKER)
    log = workdir / SUPERNODE_LOG
    node_id, auth_problem = node_id_from_log(log)
    status: dict[str, Any] = {
        "workdir": str(workdir.resolve()),
        "supernode": {"pid": pid, "alive": pid is not None},
        "log": str(log.resolve()),
        "node_id": node_id,
        "authenticated": node_id is not None,
        "last_round": _read_json(workdir / "state" / SITE_LAST_ROUND),
        "privacy": None,
        "problems": [],
    }
    if pid is None:
        status["problems"].append("the SuperNode is not running (`fedspine client start`)")
    if node_id is None:
        status["problems"].append(
            "not accepted by the coordinator yet"
            + (f": {auth_problem}" if auth_problem else " (is this site's key registered?)")
        )
    last = status["last_round"] or {}
    if last.get("outcome") in ("refused", "failed"):
        status["problems"].append(f"last round {last.get('round')}: {last.get('reason')}")
    privacy = last.get("privacy")
    if privacy:
        status["privacy"] = {
            "epsilon": privacy.get("epsilon"),
            "delta": privacy.get("delta"),
            "cap": privacy.get("cap"),
            "phases": {k: v.get("epsilon") for k, v in (privacy.get("phases") or {}).items()},
        }
    return status


def node_id_from_log(log: Path) -> tuple[int | None, str | None]:
    """The node id the SuperNode logged once the SuperLink accepted it, else the last line that
    looks like an authentication failure (or None)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None, None
    found = NODE_ID_LINE.findall(text)
    if found:
        return int(found[-1]), None
    lines = [m.group(0).strip() for m in AUTH_FAILURE.finditer(text)]
    return None, (lines[-1][:300] if lines else None)


def wait_for_authentication(log: Path, pid: int, timeout: float = 60.0) -> int:
    """Block until the SuperNode's log shows the node id the SuperLink gave it.

    Raises :class:`FlowerProcessError` with the reason when the SuperNode exits first or the
    time runs out (an unregistered key, a wrong CA, an unreachable coordinator).
    """
    deadline = time.monotonic() + timeout
    while True:
        node_id, problem = node_id_from_log(log)
        if node_id is not None:
            return node_id
        if not pid_alive(pid):
            raise FlowerProcessError(
                f"the SuperNode exited before the coordinator accepted it: "
                f"{problem or _tail(log)} (log: {log})"
            )
        if time.monotonic() >= deadline:
            raise FlowerProcessError(
                f"the coordinator did not accept this site within {timeout:.0f} s: "
                f"{problem or 'no answer (is the server reachable and this key registered?)'} "
                f"(log: {log})"
            )
        time.sleep(0.5)


def _resolve_site(sites: list[SiteRegistration], which: str) -> int:
    if which.isdigit():
        return int(which)
    by_name = [s for s in sites if s.name == which]
    if by_name:
        return by_name[0].node_id
    path = Path(which)
    if path.is_file():
        fingerprint = key_fingerprint(path)
        for site in sites:
            if site.key_sha256 == fingerprint:
                return site.node_id
        raise FlowerProcessError(f"{path}: this key is not in the coordinator's site registry")
    names = ", ".join(s.name for s in sites) or "none"
    raise FlowerProcessError(
        f"no registered site {which!r}: give a node id, a name ({names}) or the site's .pub file"
    )


def _write_registry(workdir: str | Path, sites: list[SiteRegistration]) -> None:
    write_json_atomic(Path(workdir) / SERVER_SITES, [asdict(s) for s in sites])


def _certificate(path: Path, now: datetime | None) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        expiry = certificate_expiry(path, now)
    except ValueError as err:
        return {"path": str(path), "warning": str(err)}
    return {
        "path": str(path),
        "not_after": expiry.not_after.isoformat(timespec="seconds"),
        "days_left": round(expiry.days_left, 1),
        "warning": expiry.warning,
    }


def _last_run(workdir: Path) -> dict[str, Any] | None:
    last = _read_json(workdir / LAST_RUN)
    if not last:
        return None
    out = Path(last["output_dir"])
    rounds = read_rounds(out)
    return {
        **last,
        "status": read_status(out),
        "last_round": rounds[-1]["round"] if rounds else None,
        "last_round_finished": rounds[-1]["finished"] if rounds else None,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _tail(log: Path, lines: int = 3) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "no log"
