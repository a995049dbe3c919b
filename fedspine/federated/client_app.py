"""The Flower ClientApp: a thin adapter from messages to :mod:`fedspine.federated.site`.

Two train actions: the default one trains the GAN (``train``), Flower's custom action
``train.classifier`` trains SpineGAN's clinical classifier in a federation's first phase.
"""

from __future__ import annotations

import json
import re
import sys
import traceback
from collections.abc import Callable
from datetime import UTC, datetime

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedspine.data.prepared import load_prepared
from fedspine.federated.classifier_phase import (
    CLASSIFIER_ACTION,
    ClassifierRoundConfig,
    train_classifier_round,
)
from fedspine.federated.embedding_site import (
    EMBEDDING_ACTION,
    EmbeddingRoundConfig,
    release_round,
)
from fedspine.federated.site import (
    RoundConfig,
    SiteConfig,
    SiteRefusal,
    check_not_stale,
    check_version,
    train_round,
)
from fedspine.federated.weights import read_weight_records, weight_records
from fedspine.fileio import SITE_LAST_ROUND, write_json_atomic

# Error codes the server shows; Flower reserves small numbers for its own.
SITE_REFUSED = 601
SITE_FAILED = 602

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the round's local kimg on this site's data and reply with the new weights."""

    def run(site: SiteConfig):
        rc = RoundConfig.from_record(msg.content["config"])
        weights = _received(msg, "arrays")
        classifier = _received(msg, "classifier") if "classifier" in msg.content else None
        return train_round(site, rc, weights, classifier)

    return _reply(msg, context, run)


@app.train(CLASSIFIER_ACTION)
def train_classifier(msg: Message, context: Context) -> Message:
    """Train the federation's clinical classifier for the round's local steps on this site."""

    def run(site: SiteConfig):
        rc = ClassifierRoundConfig.from_record(msg.content["config"])
        return train_classifier_round(site, rc, _received(msg, "arrays"))

    return _reply(msg, context, run)


@app.train(EMBEDDING_ACTION)
def release_embedding(msg: Message, context: Context) -> Message:
    """The site's one DP mean-embedding release (the ``dp-mean-embedding`` route)."""

    def run(site: SiteConfig):
        rc = EmbeddingRoundConfig.from_record(msg.content["config"])
        return release_round(site, rc, msg.content)

    return _reply(msg, context, run)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report only what is safe to release: the site's size and name, nothing from its images."""
    try:
        site = SiteConfig.from_node_config(context.node_config)
        check_version(str(msg.content["config"].get("fedspine-version", "")))
    except (SiteRefusal, KeyError) as err:
        return Message(
            Error(code=SITE_REFUSED, reason=f"refused: {public_reason(err)}"), reply_to=msg
        )
    train_images = len(load_prepared(site.data_path).select("train"))
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": train_images}),
            "site": ConfigRecord({"site-name": site.site_name}),
        }
    )
    return Message(content, reply_to=msg)


_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][^\s'\":,;()\[\]]+)+")


def public_reason(err: BaseException, limit: int = 300) -> str:
    """What the server may learn about a site's failure: one line, no local path, no traceback.

    Paths name a hospital's folders and, through them, sometimes patients; the full traceback
    goes to the site's own SuperNode log instead.
    """
    first = (str(err).strip().splitlines() or [""])[0]
    text = _PATH.sub("<local path>", first)
    reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def _reply(msg: Message, context: Context, run: Callable[[SiteConfig], tuple]) -> Message:
    """Run a train action and reply with weights, metrics and the site record, or the error.

    Whatever the outcome, the site keeps a line of its own (``last_round.json`` in its state
    folder) for `fedspine client status`: what it was asked, what happened, and its ε.
    """
    site = None
    try:
        check_not_stale(msg.metadata.created_at, msg.metadata.ttl)
        site = SiteConfig.from_node_config(context.node_config)
        new_weights, metrics, extra = run(site)
        packed = weight_records(new_weights)
    except SiteRefusal as err:
        reason = f"refused: {public_reason(err)}"
        _note_round(site, msg, "refused", reason)
        return Message(Error(code=SITE_REFUSED, reason=reason), reply_to=msg)
    except Exception as err:  # the server learns that and roughly why; the site log has the rest
        traceback.print_exc(file=sys.stderr)
        reason = f"failed: {public_reason(err)}"
        _note_round(site, msg, "failed", reason)
        return Message(Error(code=SITE_FAILED, reason=reason), reply_to=msg)
    _note_round(site, msg, "trained", "", extra)
    content = RecordDict(
        {
            **packed,
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord(extra),
        }
    )
    return Message(content, reply_to=msg)


def _received(msg: Message, name: str):
    """The weights the server packed into the message under ``name``; a message whose weights
    or layout cannot be read is refused (:func:`fedspine.federated.weights.unpack_weights`)."""
    try:
        return read_weight_records(msg.content, name)
    except ValueError as err:
        raise SiteRefusal(f"the message's {name!r} weights cannot be read: {err}") from None


def _note_round(
    site: SiteConfig | None, msg: Message, outcome: str, reason: str, extra: dict | None = None
) -> None:
    """Record the site's view of this round for its operators; never fails the reply."""
    if site is None:
        return
    config = msg.content.get("config", {})
    # What the server sent is untrusted: short text, and the round only if it is a number.
    record = {
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "action": str(msg.metadata.message_type)[:100],
        "group": str(msg.metadata.group_id)[:100],
        "federation": str(config.get("federation", ""))[:200],
        "round": _round_number(config.get("server-round")),
        "outcome": outcome,
        "reason": reason,
        "privacy": json.loads(str(extra["privacy"])) if extra and "privacy" in extra else None,
    }
    try:
        write_json_atomic(site.state_dir / SITE_LAST_ROUND, record)
    except OSError as err:
        print(f"fedspine: could not write {SITE_LAST_ROUND}: {err}", file=sys.stderr)


def _round_number(value: object) -> int | None:
    """The round a message names, or None where the server sent no whole number."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
