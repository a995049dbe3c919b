"""A reference FedAvg for tests: every state dict at once, the textbook weighted mean.

The server never does this (it would hold every reply: see weights.RunningFedAvg); tests check
the running average against it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch


def fedavg(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> OrderedDict[str, torch.Tensor]:
    """The example-weighted mean of state dicts (floating tensors; others must agree)."""
    if not state_dicts or len(state_dicts) != len(weights):
        raise ValueError("fedavg needs one weight per state dict, and at least one")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    keys = list(state_dicts[0])
    for sd in state_dicts[1:]:
        if list(sd) != keys:
            raise ValueError("the state dicts hold different tensors")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key in keys:
        first = state_dicts[0][key]
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for sd, w in zip(state_dicts, weights, strict=True):
                acc += sd[key].to(torch.float64) * (float(w) / total)
            out[key] = acc.to(first.dtype)
        else:
            for sd in state_dicts[1:]:
                if not torch.equal(sd[key], first):
                    raise ValueError(f"non-floating tensor {key} differs between sites")
            out[key] = first.clone()
    return out
