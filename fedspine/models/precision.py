"""Layer-limited reduced precision: which blocks compute in bf16/fp16, and their clamp.

As in NVIDIA's StyleGAN2-ADA, only the blocks at the highest resolutions run in reduced
precision (``NetworkConfig.reduced_precision_resolutions``, 4 by default, never the 4x4 block):
their activations are large and their arithmetic is most of the cost. Everything else stays
float32: G's mapping network and styles, the modulation and demodulation coefficients, the
image skip path of G, D's label mapping, epilogue and logits, and every weight and gradient.

Nothing changes unless a caller opens :func:`reduced_precision` (the trainer does, around its
forward passes, when its precision mode is bf16 or fp16). Inside it each block casts its input
to :func:`block_dtype`, its layers follow the activation's dtype, and a reduced block clamps its
activations to ``conv_clamp`` (:data:`REDUCED_CLAMP` when the network sets none): the guard
that keeps fp16 from overflowing to inf. Outside it every block computes in float32, bit for
bit as before. There is no global ``torch.autocast``: the casts are explicit, so what runs
reduced is exactly what the blocks say.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

REDUCED_DTYPES = (torch.bfloat16, torch.float16)
REDUCED_CLAMP = 256.0
"""The activation clamp of a reduced block whose network sets no ``conv_clamp`` (NVIDIA's)."""

_ACTIVE: ContextVar[torch.dtype | None] = ContextVar("fedspine_reduced_precision", default=None)


@contextlib.contextmanager
def reduced_precision(dtype: torch.dtype | None) -> Iterator[None]:
    """Within: the networks' reduced blocks compute in ``dtype`` (None: everything float32)."""
    if dtype is not None and dtype not in REDUCED_DTYPES:
        raise ValueError(f"reduced precision is bfloat16 or float16, not {dtype}")
    token = _ACTIVE.set(dtype)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_dtype() -> torch.dtype | None:
    """The reduced dtype of the innermost :func:`reduced_precision` (None outside one)."""
    return _ACTIVE.get()


def block_dtype(reduced: bool) -> torch.dtype:
    """What a block computes in: the active reduced dtype if the block is a reduced one."""
    dtype = _ACTIVE.get()
    return dtype if reduced and dtype is not None else torch.float32


def activation_clamp(conv_clamp: float | None, dtype: torch.dtype) -> float | None:
    """A layer's clamp: its own, or :data:`REDUCED_CLAMP` when it computes in reduced precision
    without one (float32 layers without one are left unclamped, as before)."""
    if conv_clamp is not None or dtype not in REDUCED_DTYPES:
        return conv_clamp
    return REDUCED_CLAMP
