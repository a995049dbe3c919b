"""The Flower ClientApp: a thin adapter from messages to :mod:`fedspine.federated.site`."""

from __future__ import annotations

import traceback

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedspine.federated.site import RoundConfig, SiteConfig, SiteRefusal, check_version, train_round

# Error codes the server shows; Flower reserves small numbers for its own.
SITE_REFUSED = 601
SITE_FAILED = 602

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the round's local kimg on this site's data and reply with the new weights."""
    try:
        site = SiteConfig.from_node_config(context.node_config)
        rc = RoundConfig.from_record(msg.content["config"])
        weights = msg.content["arrays"].to_torch_state_dict()
        new_weights, metrics, extra = train_round(site, rc, weights)
    except SiteRefusal as err:
        return Message(Error(code=SITE_REFUSED, reason=f"refused: {err}"), reply_to=msg)
    except Exception as err:  # the server must learn why a site dropped out
        detail = traceback.format_exc(limit=3)
        return Message(
            Error(code=SITE_FAILED, reason=f"failed: {type(err).__name__}: {err}\n{detail}"),
            reply_to=msg,
        )
    content = RecordDict(
        {
            "arrays": ArrayRecord(new_weights),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord(extra),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report only what is safe to release: the site's size and name, nothing from its images."""
    try:
        site = SiteConfig.from_node_config(context.node_config)
        check_version(str(msg.content["config"].get("fedspine-version", "")))
    except (SiteRefusal, KeyError) as err:
        return Message(Error(code=SITE_REFUSED, reason=f"refused: {err}"), reply_to=msg)
    from fedspine.data.prepared import load_prepared

    train_images = len(load_prepared(site.data_path).select("train"))
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": train_images}),
            "site": ConfigRecord({"site-name": site.site_name}),
        }
    )
    return Message(content, reply_to=msg)
