"""Property tests of the DP step's clipping (fedspine.training.dp.make_dp_optimizer and
privatised_step, the path every DP mechanism takes): for any per-unit gradient rows and clip
norm C, each row reaches the update with norm at most C, a row already under C unchanged, and
the update is the sum of the clipped rows however they are chunked."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedspine.training.dp import make_dp_optimizer, privatised_step

FAST = settings(max_examples=40, deadline=None, database=None)
SHAPES = ((3, 2), (4,))
"""Two parameters, so a row's norm is taken over all of them together."""

STABILISER = 1e-6
"""Opacus adds this to a row's norm before dividing C by it."""
CLIP_NORMS = st.floats(1e-3, 1e3)
SCALES = st.floats(1e-4, 1e4)


def _update(rows: list[list[torch.Tensor]], clip_norm: float) -> list[torch.Tensor]:
    """p.grad after one noiseless DP step over ``rows`` (chunks of per-unit rows), times the
    expected batch size: the plain sum of the clipped rows."""
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for shape in SHAPES]
    optimizer = torch.optim.SGD(params, lr=0.0)
    dp = make_dp_optimizer(
        optimizer, noise_multiplier=0.0, max_grad_norm=clip_norm, expected_batch_size=1
    )
    assert privatised_step(dp, rows) == 0
    return [p.grad.detach().clone() for p in params]


def _rows(seed: int, units: int, scale: float) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(units, *s, generator=gen, dtype=torch.float64) * scale for s in SHAPES]


def _norms(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([r.flatten(1) for r in rows], dim=1).norm(dim=1)


@FAST
@given(seed=st.integers(0, 2**31 - 1), scale=SCALES, clip_norm=CLIP_NORMS)
def test_clipping_bounds_every_row_and_leaves_short_rows_alone(
    seed: int, scale: float, clip_norm: float
) -> None:
    row = _rows(seed, 1, scale)
    update = _update([row], clip_norm)
    norm = float(_norms(row)[0])
    clipped = float(_norms([u[None] for u in update])[0])
    assert clipped <= clip_norm * (1 + 1e-9)
    # Opacus scales a row by min(1, C / (norm + 1e-6)): 1 for a row under C by that margin.
    if norm + STABILISER <= clip_norm:
        for got, want in zip(update, row, strict=True):
            torch.testing.assert_close(got, want[0], rtol=1e-12, atol=0.0)
    else:
        # A long row keeps its direction and is scaled to C (less the stabiliser's share).
        assert clipped == pytest.approx(clip_norm * norm / (norm + STABILISER), rel=1e-9)
        for got, want in zip(update, row, strict=True):
            torch.testing.assert_close(got * norm, want[0] * clipped, rtol=1e-9, atol=1e-12)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    units=st.integers(1, 9),
    scale=SCALES,
    clip_norm=CLIP_NORMS,
    chunk=st.integers(1, 9),
)
def test_the_update_is_the_sum_of_clipped_rows_however_chunked(
    seed: int, units: int, scale: float, clip_norm: float, chunk: int
) -> None:
    rows = _rows(seed, units, scale)
    factors = (clip_norm / (_norms(rows) + STABILISER)).clamp(max=1.0)
    expected = [(r * factors.view(-1, *[1] * (r.dim() - 1))).sum(0) for r in rows]
    chunks = [[r[i : i + chunk] for r in rows] for i in range(0, units, chunk)]
    update = _update(chunks, clip_norm)
    assert float(_norms([u[None] for u in update])[0]) <= units * clip_norm * (1 + 1e-9)
    for got, want in zip(update, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * clip_norm)
