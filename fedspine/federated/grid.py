"""An in-process Flower Grid: the real ServerApp logic and ClientApp, without sockets or Ray.

For tests and quick experiments: each "node" is a ClientApp with its own node config, called
directly. It relies on Flower's Message internals (metadata fields), which is why flwr is
pinned exactly. A node can be made to fail or to stay silent, to exercise fault tolerance.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


@dataclass
class InProcessNode:
    node_id: int
    node_config: dict
    app: object
    state: RecordDict = field(default_factory=RecordDict)
    behaviour: Callable[[Message], str | None] | None = None
    """Return "silent" to drop the message (a disconnected site), else None."""


class InProcessGrid(Grid):
    """Delivers each message to its node's ClientApp and collects the replies in order.

    Delivery is synchronous (``synchronous``): once messages are pushed every reply there will
    be is waiting, and a silent node's reply never comes, as after a round timeout.
    """

    synchronous = True

    def __init__(
        self, nodes: Iterable[InProcessNode], run_id: int = 1, run_config: Mapping | None = None
    ):
        self.nodes = {n.node_id: n for n in nodes}
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config or {})
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        # Flower stamps new messages with the identity of the process that runs the ServerApp.
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = self._run.run_id
            message.metadata.__dict__["_src_node_id"] = 0
            node = self.nodes[message.metadata.dst_node_id]
            if node.behaviour is not None and node.behaviour(message) == "silent":
                ids.append(message_id)
                continue
            context = Context(
                run_id=self._run.run_id,
                node_id=node.node_id,
                node_config=dict(node.node_config),
                state=node.state,
                run_config=dict(self._run.override_config),
            )
            reply = node.app(message, context)
            reply.metadata.__dict__["_src_node_id"] = node.node_id
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))
