"""Flower's own SuperLink, SuperNode and `flwr` CLI, driven as subprocesses of this environment.

Flower 1.42 has no stable in-process API for its deployment engine, so fedspine starts the
executables that ship with the pinned flwr. Each process gets its own session (process group):
the SuperLink and SuperNodes spawn `flower-superexec` children that outlive a plain kill of the
parent, so stopping means signalling the whole group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CONNECTION = "fedspine"


class FlowerProcessError(Exception):
    """A Flower process did not start, did not answer, or a `flwr` command failed."""


SERVER_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
"""For the coordinator's processes (the SuperLink and the ServerApp it starts): glibc serves every
allocation above 1 MB by mmap and returns it on free. Without it glibc raises its threshold as
large tensors are freed and keeps their memory, so a round's peak grows past the running sum and
one reply (benchmarks/aggregation_memory.py: 3.6 models at the paper preset, 3.1 with it). Not
for sites: training allocates and frees activations all the time, and mmap would slow it."""


def flower_env(
    flwr_home: Path | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for every Flower child: no telemetry, no update check, no `uv sync`."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if extra:
        env.update(extra)
    return env


def executable(name: str) -> str:
    """A Flower executable from this environment (the one fedspine was installed into)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FlowerProcessError(f"{name} not found beside {sys.executable}; is flwr installed?")
    return str(path)


@dataclass
class ManagedProcess:
    """A started process group, its PID file and its log.

    ``companions`` are processes that serve this one and live and die with it (a site's
    ClientApp worker beside its SuperNode): ``alive`` needs them all, ``stop`` stops them first.
    """

    name: str
    pid: int
    log: Path
    pid_file: Path | None = None
    popen: subprocess.Popen | None = None
    companions: list[ManagedProcess] = field(default_factory=list)

    def alive(self) -> bool:
        alive = self.popen.poll() is None if self.popen is not None else pid_alive(self.pid)
        return alive and all(c.alive() for c in self.companions)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout``."""
        for companion in self.companions:
            companion.stop(timeout)
        stop_pid(self.pid, timeout)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_process(
    name: str,
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str],
    pid_file: Path | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start ``argv`` in its own session with output to ``log``; record its PID."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        popen = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{popen.pid}\n")
    return ManagedProcess(name=name, pid=popen.pid, log=log, pid_file=pid_file, popen=popen)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for loopback deployments and tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recorded_pid(pid_file: Path, marker: str) -> int | None:
    """The PID in ``pid_file`` if that process is alive and still the one fedspine started.

    A PID file outlives its process, and the kernel reuses PIDs: before signalling (or refusing
    to start because "one already runs"), the process's command line must name ``marker`` (e.g.
    ``flower-superlink``). Where /proc is missing, a live PID is taken at its word.
    """
    pid = read_pid_file(pid_file)
    if pid is None or not pid_alive(pid):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not Path("/proc/self/cmdline").exists():
        return pid
    try:
        argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return pid if marker in argv else None


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Terminate the process group led by ``pid`` (and ``pid`` itself), then kill leftovers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                return
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            _reap(pid)
            if not _group_alive(pid):
                return
            time.sleep(0.1)
    _reap(pid)


def read_pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def wait_for_health(
    url: str,
    ca_cert: Path | None,
    timeout: float,
    process: ManagedProcess | None = None,
    check_hostname: bool = True,
) -> None:
    """Poll ``url`` until it answers 200; fail early if ``process`` dies.

    ``check_hostname`` False still verifies the certificate chain against ``ca_cert``, for a
    local check that dials this machine under a name the certificate need not carry.
    """
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    if context is not None and not check_hostname:
        context.check_hostname = False
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise FlowerProcessError(
                f"{process.name} exited during start-up; last log lines:\n{process.tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:  # noqa: S310 - local health check
                if resp.status == 200:
                    return
                last_error = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError, ssl.SSLError) as err:
            last_error = str(err)
        time.sleep(0.3)
    raise FlowerProcessError(f"{url} did not answer within {timeout:.0f} s ({last_error})")


def write_connection(
    flwr_home: Path, address: str, ca_cert: Path | None, insecure: bool = False
) -> Path:
    """The `flwr` CLI's connection file: one connection named ``fedspine``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{address}"',
    ]
    if insecure:
        lines.append("insecure = true")
    elif ca_cert is not None:
        lines.append(f'root-certificates = "{Path(ca_cert).resolve()}"')
    path = flwr_home / "config.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def flwr_cli(
    args: Sequence[str], flwr_home: Path, timeout: float = 120.0, parse_json: bool = True
) -> dict | str:
    """Run the `flwr` CLI; with ``parse_json`` return the JSON object it prints."""
    try:
        proc = subprocess.run(
            [executable("flwr"), *args],
            capture_output=True,
            text=True,
            env=flower_env(flwr_home),
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise FlowerProcessError(
            f"`flwr {' '.join(args)}` did not finish within {timeout:.0f} s"
        ) from None
    if not parse_json:
        if proc.returncode != 0:
            raise FlowerProcessError(
                f"`flwr {args[0]}` failed: {(proc.stderr or proc.stdout).strip()[-800:]}"
            )
        return proc.stdout
    text = proc.stdout
    start = text.find("{")
    if start < 0:
        raise FlowerProcessError(
            f"`flwr {' '.join(args[:2])}` printed no JSON (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-800:]}"
        )
    try:
        data = json.loads(text[start:])
    except json.JSONDecodeError as err:
        raise FlowerProcessError(f"`flwr {args[0]}` printed malformed JSON ({err})") from None
    if not data.get("success", True):
        raise FlowerProcessError(
            f"`flwr {' '.join(args[:2])}` failed: {data.get('error-message', data)}"
        )
    return data


def _group_alive(pid: int) -> bool:
    """Whether any live (non-zombie) process remains in the group led by ``pid``."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(not _is_zombie(p) for p in _group_members(pid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
