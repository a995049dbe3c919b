"""A site's long-lived ClientApp worker (issue 13, items 2 and 10).

Flower's default SuperNode starts a fresh ``flwr-clientapp`` process for every message, which pays
the imports of torch, flwr and fedspine (5-8 s) each time, and runs whatever app bundle (FAB) the
run names. ``fedspine client start`` instead starts the SuperNode with ``--isolation process``,
so the SuperNode only queues tasks on its loopback Runtime API, and this worker beside it:

1. imports torch, flwr and every fedspine module a round needs, once;
2. acquires each ClientApp task from the Runtime API (``AcquireTask``, signed with the SuperExec
   shared secret that the SuperNode also reads, so no other local process can take a task);
3. forks a child for the task: the parent stays clean and warm, the child starts with every
   import done. The child pulls the task's input (message, context, run, FAB) and checks the FAB
   against the bundle shipped in this fedspine (:mod:`fedspine.federated.bundle_check`) *before
   any app code is loaded*: a foreign bundle is refused with an error reply and a logged reason,
   and nothing of it is extracted or imported. A genuine bundle is identical to the installed
   one, so the child loads the ClientApp with Flower's own loader from the installed bundle
   folder (never from the received bytes), runs it, and pushes the reply and the task's outcome
   as Flower's ``flwr-clientapp`` does.

The worker exits when the SuperNode it serves is gone; `fedspine client stop` stops both.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import PULL_MAX_TIME, TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedspine.federated.bundle_check import (
    BundleIdentity,
    ForeignBundle,
    check_fab,
    installed_bundle_dir,
    installed_identity,
)
from fedspine.federated.client_app import SITE_REFUSED

LOG = logging.getLogger("fedspine.site_worker")
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
DEFAULT_POLL_INTERVAL = 0.2
# The SuperNode queues a task before it has fetched the message's objects from the SuperLink;
# a task acquired at once polls for them. Flower's backoff (1 s doubling to 10 s) suits a process
# that took seconds to start; a warm worker polls its loopback API every 0.05-0.5 s instead.
PULL_INITIAL_BACKOFF = 0.05
PULL_BACKOFF_CAP = 0.5
# The worker's command line names this module; `client stop` checks it before signalling.
MODULE = "fedspine.federated.site_worker"


def warm_up() -> None:
    """Import what a round imports, so that no task pays for it.

    :mod:`fedspine.federated.site` and its helpers import the trainers inside functions (the
    SuperNode's node-config checks stay light); here they are imported up front, once. Modules
    that fail to import (an optional dependency) are left to the round, which reports it.
    """
    import importlib

    for name in (
        "fedspine.federated.weights",
        "fedspine.federated.classifier_phase",
        "fedspine.federated.site_privacy",
        "fedspine.training.batches",
        "fedspine.training.checkpoint",
        "fedspine.training.config",
        "fedspine.training.gan_trainer",
        "fedspine.training.clinical",
        "fedspine.training.classifier_trainer",
        "fedspine.training.classifier_dp",
        "fedspine.training.dp_trainer",
        "fedspine.models.classifier",
    ):
        try:
            importlib.import_module(name)
        except ImportError as err:  # pragma: no cover - depends on the installation
            LOG.warning("warm-up: %s not imported (%s)", name, err)


def run_task(address: str, token: str, expected: BundleIdentity, bundle: Path) -> int:
    """Run one acquired ClientApp task in this (forked) process; return the exit code.

    The steps and the replies on failure follow Flower's ``flwr-clientapp``
    (``flwr.supernode.runtime.run_clientapp``), with the bundle check between pulling the task's
    input and loading the app.
    """
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry_invoker,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = reply = context = None
    sub_status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    started = time.monotonic()
    pulled = ran = None
    label = "?"
    try:
        heartbeat.start()
        message, context, run, fab = _pull_task_input(client)
        pulled = time.monotonic()
        label = (
            f"run {run.run_id}, {message.metadata.message_type}, {message.metadata.group_id or '-'}"
        )
        try:
            identity = check_fab(fab.content, expected)
        except ForeignBundle as err:
            LOG.error("task %s: REFUSED the app bundle (FAB %s): %s", label, fab.hash_str[:12], err)
            reason = "refused: the app bundle is not the fedspine app installed at this site"
            reply = Message(Error(code=SITE_REFUSED, reason=reason), reply_to=message)
            details = f"{reason} ({err})"
            code = 0  # handled: the refusal is the task's answer
        else:
            LOG.info("task %s: app bundle %s verified", label, identity.describe())
            # Its content is the installed bundle's: load that, never the received bytes.
            load = get_load_client_app_fn(default_app_ref="", app_path=str(bundle), multi_app=True)
            app = load(run.fab_id, run.fab_version, fab.hash_str)
            reply = app(message=message, context=context)
            sub_status, details, code = SubStatus.COMPLETED, "", 0
            ran = time.monotonic()
    except Exception as err:  # as flwr-clientapp: the server gets an error reply, the log the rest
        LOG.error("task failed: %s", err, exc_info=True)
        if isinstance(err, LoadClientAppError):
            error = Error(ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "the ClientApp could not be loaded")
        else:
            error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}")
        details = f"{type(err).__name__}: {err}"
        if message is not None:
            reply = Message(error, reply_to=message)
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception:  # noqa: BLE001 - reported, and the task output still goes
                LOG.error("could not push the reply", exc_info=True)
                code = 1
        if ran is not None and pulled is not None:
            LOG.info(
                "task %s: done in %.2f s (input %.2f s, app %.2f s, reply %.2f s)",
                label,
                time.monotonic() - started,
                pulled - started,
                ran - pulled,
                time.monotonic() - ran,
            )
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return code


def _pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """Flower's ``pull_task_input`` (run_clientapp) with a backoff for a warm process."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    # Objects that have not come within the message's ttl never will (the SuperNode gave the
    # message up): the child ends instead of polling for Flower's default two hours.
    ttl = pulled.messages_list[0].metadata.ttl
    max_time = min(PULL_MAX_TIME, ttl) if ttl > 0 else PULL_MAX_TIME
    pull = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)

    def pull_counted(object_id: str) -> bytes:
        try:
            return pull(object_id)
        except ObjectUnavailableError:
            waits.append(time.monotonic())
            raise

    waits: list[float] = []
    started = time.monotonic()
    message = pull_and_inflate_object_from_tree(
        tree,
        pull_counted,
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        max_time=max_time,
        max_tries_per_object=None,
        initial_backoff=PULL_INITIAL_BACKOFF,
        backoff_cap=PULL_BACKOFF_CAP,
    )
    # The deflated message does not carry its own id (its object id), as in Flower.
    message.metadata.__dict__["_message_id"] = tree.object_id
    LOG.info(
        "task input: %d objects in %.2f s; %d polls found an object not yet at the SuperNode%s",
        len(list(iterate_object_tree(tree))),
        time.monotonic() - started,
        len(waits),
        f" (the last {waits[-1] - started:.2f} s in)" if waits else "",
    )
    return message, context, run, fab


class Worker:
    """The warm parent: acquires tasks and forks one child per task."""

    def __init__(
        self,
        address: str,
        secret: bytes | None,
        supernode_pid: int | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.address = address
        self.supernode_pid = supernode_pid
        self.poll_interval = poll_interval
        self.bundle = installed_bundle_dir()
        self.expected = installed_identity(self.bundle)
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods={ACQUIRE_METHOD}
                )
            )
        # No retry invoker: a failed poll is retried by the loop, which also notices when the
        # SuperNode is gone.
        self.client = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None, interceptors=interceptors
        )
        self.children: dict[int, int] = {}  # PID -> task id
        self.tasks = 0

    def serve(self) -> None:
        LOG.info(
            "worker %d ready: Runtime API %s, installed app %s",
            os.getpid(),
            self.address,
            self.expected.describe(),
        )
        unreachable_since: float | None = None
        while True:
            self.reap()
            if self.supernode_pid is not None and not _alive(self.supernode_pid):
                LOG.info("the SuperNode (PID %d) is gone; worker exits", self.supernode_pid)
                return
            try:
                res = self.client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
                )
            except (httpx.TransportError, httpx.HTTPStatusError) as err:
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    LOG.warning("Runtime API %s not answering (%s); retrying", self.address, err)
                time.sleep(max(self.poll_interval, 1.0))
                continue
            if unreachable_since is not None:
                LOG.info("Runtime API %s answers again", self.address)
                unreachable_since = None
            if res.HasField("task") and res.token:
                self.run_forked(res.token, res.task.task_id)
            else:
                time.sleep(self.poll_interval)

    def run_forked(self, token: str, task_id: int) -> None:
        """Start the task in a forked child and return at once.

        Tasks may overlap: the SuperNode hands out one message at a time, but when it gives up
        on a message (its run stopped, the SuperLink restarted) the task it already queued stays
        with its child, and the next message must not wait for that child.
        """
        self.tasks += 1
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as err:  # out of processes or memory: the task expires, the worker stays
            LOG.error("task %d: could not fork (%s)", task_id, err)
            return
        if pid == 0:  # the child: one task, then out without running the parent's cleanup
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                code = run_task(self.address, token, self.expected, self.bundle)
            except BaseException:  # noqa: BLE001 - a child must never return into the loop
                traceback.print_exc()
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = task_id
        LOG.info(
            "task %d: child %d of worker %d (%d running)",
            task_id,
            pid,
            os.getpid(),
            len(self.children),
        )

    def reap(self) -> None:
        """Collect the children that ended, and log how."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            task_id = self.children.pop(pid, None)
            if os.WIFSIGNALED(status):
                LOG.error(
                    "task %s: child %d killed by signal %d", task_id, pid, os.WTERMSIG(status)
                )
            elif os.waitstatus_to_exitcode(status) != 0:
                LOG.warning("task %s: child %d exited %d", task_id, pid, os.WEXITSTATUS(status))

    def stop_children(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def read_secret(path: Path | None) -> bytes | None:
    if path is None:
        return None
    secret = Path(path).read_bytes()
    if not secret:
        raise SystemExit(f"{path}: the SuperExec secret is empty")
    return secret


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's HOST:PORT")
    parser.add_argument(
        "--secret-file", type=Path, help="the SuperExec shared secret the SuperNode also reads"
    )
    parser.add_argument("--supernode-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s [site-worker %(process)d] %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO: a poll every 0.2 s would bury the worker's own lines.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warm_up()
    worker = Worker(
        args.runtime_api_address,
        read_secret(args.secret_file),
        args.supernode_pid,
        args.poll_interval,
    )
    age = _process_age()
    if age is not None:
        LOG.info("imports warm %.1f s after the worker started", age)

    def on_term(signum, _frame):
        worker.stop_children()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        worker.serve()
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop_children()
        worker.client.close()


def _process_age() -> float | None:
    """Seconds since this process started (Linux), imports included."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
