"""Which modulated-convolution path a run trains with: fused (one grouped convolution) or
non-fused (scale activations, one shared convolution, scale outputs).

Both compute the same function (a test holds them to float tolerance), so the choice is a
matter of speed, and speed depends on the device and the shapes. ``fused_modconv = "auto"``
resolves it from a measurement:

- on a CPU, from the measurements recorded in the README (2 cores: a training step ran 1.37x,
  1.45x and 1.10x as fast non-fused at 32, 64 and 256 px), without timing anything at start,
  because one 256 px step there takes minutes;
- on any other device (CUDA), by timing G's forward and backward on a training-sized batch with
  each path, a fraction of a second on a GPU, and keeping the faster.

The result is written into the run's config, so a resumed run keeps the path it started with.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from fedspine.models.generator import Generator

CPU_RULE = (
    "non-fused on CPU: measured 1.37x, 1.45x and 1.10x as fast per training step at 32, 64 and "
    "256 px on 2 cores"
)


@dataclass
class ModconvChoice:
    """The path chosen, how, and the timings behind it (seconds per forward + backward)."""

    fused: bool
    how: str
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def choose_modconv_path(
    setting: bool | str,
    G: Generator,
    device: torch.device,
    batch: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    repeats: int = 3,
) -> ModconvChoice:
    """Resolve a config's ``fused_modconv`` (True, False or "auto") for ``G`` on ``device``."""
    if setting is True or setting is False:
        return ModconvChoice(fused=setting, how="set in the config")
    if setting != "auto":
        raise ValueError(f'fused_modconv must be true, false or "auto", not {setting!r}')
    if device.type == "cpu":
        return ModconvChoice(fused=False, how=CPU_RULE)
    seconds = time_modconv_paths(G, device, batch, autocast=autocast, repeats=repeats)
    fused = seconds["fused"] < seconds["non_fused"]
    return ModconvChoice(
        fused=fused, how=f"timed on {device.type} at batch {batch}", seconds=seconds
    )


def time_modconv_paths(
    G: Generator,
    device: torch.device,
    batch: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    repeats: int = 3,
) -> dict[str, float]:
    """Best-of-``repeats`` seconds of one synthesis forward + backward per path, after one
    untimed pass each (cuDNN autotuning, allocator growth).

    Leaves G as it found it: parameters, buffers, gradients and the global RNG are untouched
    (styles come from a private generator, noise is the stored constant).
    """
    gen = torch.Generator().manual_seed(0)
    ws = torch.randn([batch, G.num_ws, G.w_dim], generator=gen).to(device)
    saved_grads = {name: p.grad for name, p in G.named_parameters()}
    saved_requires = {name: p.requires_grad for name, p in G.named_parameters()}
    G.requires_grad_(True)
    seconds: dict[str, float] = {}
    try:
        for name, fused in (("fused", True), ("non_fused", False)):
            best = float("inf")
            for i in range(repeats + 1):
                _sync(device)
                start = time.perf_counter()
                with autocast():
                    img = G.synthesis(ws, noise_mode="const", fused_modconv=fused)
                img.float().square().mean().backward()
                _sync(device)
                if i > 0:
                    best = min(best, time.perf_counter() - start)
                G.zero_grad(set_to_none=True)
            seconds[name] = best
    finally:
        for pname, p in G.named_parameters():
            p.grad = saved_grads[pname]
            p.requires_grad_(saved_requires[pname])
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
