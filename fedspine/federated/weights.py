"""What travels between server and sites: G, D and G_ema as one flat state dict, and FedAvg.

Only weights move. Optimizer moments, ADA state and RNGs stay at the site.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

PARTS = ("G", "D", "G_ema")


def trainer_weights(trainer) -> OrderedDict[str, torch.Tensor]:
    """G, D and G_ema of a :class:`GanTrainer` as one state dict with ``part.`` prefixes."""
    flat: OrderedDict[str, torch.Tensor] = OrderedDict()
    for part in PARTS:
        for name, tensor in getattr(trainer, part).state_dict().items():
            flat[f"{part}.{name}"] = tensor.detach().cpu()
    return flat


def load_trainer_weights(trainer, flat: Mapping[str, torch.Tensor]) -> None:
    """Load a flat state dict from :func:`trainer_weights` into ``trainer`` (strictly)."""
    for part in PARTS:
        prefix = f"{part}."
        sub = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        if not sub:
            raise ValueError(f"the received weights hold no {part}")
        getattr(trainer, part).load_state_dict(sub, strict=True)


def split_weights(flat: Mapping[str, torch.Tensor], part: str) -> OrderedDict[str, torch.Tensor]:
    prefix = f"{part}."
    return OrderedDict((k[len(prefix) :], v) for k, v in flat.items() if k.startswith(prefix))


class RunningFedAvg:
    """FedAvg accumulated one reply at a time: the example-weighted mean of the replies.

    The server keeps a float64 running sum and the reply being added, never every reply at once:
    at the paper preset (G, D and G_ema ≈ 290 MB a reply) a list of 100 replies would be 29 GB.
    """

    def __init__(self) -> None:
        self._sum: OrderedDict[str, torch.Tensor] | None = None
        self._fixed: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total = 0.0
        self.count = 0

    def problem(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        """Why ``state_dict`` cannot join the sum (its non-floating tensors differ), or None."""
        for key, fixed in self._fixed.items():
            if not torch.equal(state_dict[key], fixed):
                return f"non-floating tensor {key} differs from the other sites'"
        return None

    def add(self, state_dict: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError("a reply's weight (its example count) must be positive")
        problem = self.problem(state_dict)
        if problem is not None:
            raise ValueError(problem)
        if self._sum is None:
            self._sum = OrderedDict()
            for key, tensor in state_dict.items():
                self._dtypes[key] = tensor.dtype
                if tensor.is_floating_point():
                    self._sum[key] = torch.zeros_like(tensor, dtype=torch.float64)
                else:
                    self._fixed[key] = tensor.clone()
        for key, acc in self._sum.items():
            acc.add_(state_dict[key], alpha=float(weight))  # cast on the fly: no float64 copy
        self.total += float(weight)
        self.count += 1

    def result(self) -> OrderedDict[str, torch.Tensor]:
        """The weighted mean, in the replies' dtypes. It consumes the sum tensor by tensor (each
        float64 tensor is freed as its mean is cast), so the round never holds the whole sum and
        the whole result at once; no reply can be added afterwards."""
        if self._sum is None or self.total <= 0:
            raise ValueError("no reply was added")
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key, dtype in self._dtypes.items():
            if key in self._fixed:
                out[key] = self._fixed[key].clone()
            else:
                acc = self._sum.pop(key)
                out[key] = acc.div_(self.total).to(dtype)
                del acc
        self._sum = None
        self.total = 0.0
        return out
