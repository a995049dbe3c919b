"""Checking a site's reply before it may reach the average: a bad reply fails its site only.

The server trusts nothing a site sends: the records it must hold, the federation and round it
answers, and weights with exactly the keys, shapes and dtypes that were sent, all finite. The
weights come packed (:func:`fedspine.federated.weights.pack_weights`); their layout is checked
against the size of what was sent before the packed bytes are cut up.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from fedspine.federated.weights import RunningFedAvg, layout_record_name, read_weight_records


def take_reply(
    reply,
    sent_to: dict[str, int],
    names: dict[int, str],
    expected: dict[str, Any],
    average: RunningFedAvg,
) -> tuple[dict | None, dict | None]:
    """One reply: checked (:func:`reply_problem`), folded into ``average`` and described as a
    site entry, or described as a failure. A bad reply fails its site, not the run, and never
    reaches the average. ``names`` learns each replying site's name."""
    node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
    if reply.has_error():
        site = names.get(node, f"node {node}")
        return None, {"node_id": node, "site": site, "reason": reply.error.reason}
    problem, weights, privacy = reply_problem(reply, expected)
    if problem is None:
        problem = average.problem(weights)
    if problem is not None:
        site = names.get(node, f"node {node}")
        return None, {"node_id": node, "site": site, "reason": f"invalid reply: {problem}"}
    metrics = dict(reply.content["metrics"])
    average.add(weights, float(metrics["num-examples"]))
    site_name = str(reply.content["site"]["site-name"])
    names[node] = site_name
    entry = {"node_id": node, "site": site_name, **{k: plain(v) for k, v in metrics.items()}}
    if privacy is not None:
        entry["privacy"] = privacy
    return entry, None


def reply_problem(reply, expected: dict[str, Any]) -> tuple[str | None, dict | None, Any]:
    """Why a site's reply cannot be aggregated, or None: the records it must hold, the round and
    federation it answers, and weights with the sent keys, shapes and dtypes, all finite.

    Returns ``(problem, weights, privacy)``: what was decoded on the way (the reply's state dict
    and privacy summary), so that the caller never decodes a whole model twice.
    """
    content = reply.content
    for name in ("arrays", layout_record_name("arrays"), "metrics", "site"):
        if name not in content:
            return f"no {name!r} record", None, None
    site = content["site"]
    if "site-name" not in site:
        return "no site name", None, None
    if str(site.get("federation", "")) != expected["federation"]:
        return (
            f"answers federation {site.get('federation')!r}, not {expected['federation']!r}",
            None,
            None,
        )
    answered = site.get("round")
    if isinstance(answered, bool) or not isinstance(answered, int):
        return f"answers round {str(answered)[:40]!r}, not {expected['round']}", None, None
    if answered != expected["round"]:
        return f"answers round {answered}, not {expected['round']}", None, None
    privacy = None
    if "privacy" in site:
        try:
            privacy = json.loads(str(site["privacy"]))
        except ValueError:
            return "unreadable privacy summary", None, None
    examples = content["metrics"].get("num-examples")
    if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
        return f"num-examples {examples!r} is not a positive count", None, None
    sent = expected["weights"]
    # At most what was sent: a layout cannot make the server cut up more than one model's bytes.
    sent_bytes = sum(t.numel() * t.element_size() for t in sent.values())
    try:
        weights = read_weight_records(content, max_tensors=len(sent), max_bytes=sent_bytes)
    except ValueError as err:
        return f"unreadable weights: {err}", None, None
    except Exception as err:  # anything else a malformed record raises fails this site only
        return f"unreadable weights ({type(err).__name__})", None, None
    if set(weights) != set(sent):
        missing, extra = sorted(set(sent) - set(weights)), sorted(set(weights) - set(sent))
        return f"weight keys differ (missing {missing[:3]}, unexpected {extra[:3]})", None, None
    for key, tensor in weights.items():
        want = sent[key]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            problem = (
                f"{key}: {tuple(tensor.shape)} {tensor.dtype}, sent {tuple(want.shape)} "
                f"{want.dtype}"
            )
            return problem, None, None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"{key} holds NaN or infinite values", None, None
    return None, weights, privacy


def plain(value):
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, float | int | str | bool):
        return value
    return float(value)
