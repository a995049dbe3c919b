"""The canary audit of the DP step's clip-and-noise code alone (:func:`audit_dp_step`).

The clip-and-noise code path of the DP discriminator step
(:func:`fedspine.training.dp.make_dp_optimizer` and :func:`fedspine.training.dp.privatised_step`,
Opacus' DPOptimizer with chunked accumulation) on a flat parameter vector updated by plain SGD
with lr = 1, so the parameter change of a step is exactly the privatised gradient. Canaries are
gradient rows of norm C along fixed directions (Dirac: one coordinate each, or the columns of a
random rotation); background units with gradients larger than C are clipped alongside them. It
is tight but narrow: no sampler, no per-patient gradient engine, no ledger, so it cannot see a
sampling bug, a patient whose images end up in several rows, or steps that ran but were never
accounted for.

Why canaries live in blocks of steps: the bound's power grows with m, and a dense gradient row
costs ``dim`` floats, so with every canary in every step a step costs m·dim. Each block of
``steps_per_canary`` steps therefore carries its own ``dim`` canaries, one per direction, and a
canary's claimed ε is that of the Gaussian mechanism composed over its block (sample rate 1: a
member canary is in every step of its block). That is still one run in the theorem's sense: each
canary is one unit whose inclusion the mechanism protects with that (ε, δ).

How tight it can be: for a Gaussian mechanism the (ε, δ) one-run bound reaches roughly 0.6 of
the true ε at m = 10^5 (about 0.5 at m = 10^3), so noise of σ·C/2 where σ·C was claimed (true ε
about 2.2 times the claim) is caught by a margin of about 1.3×, and only with m ≳ 5·10^4 canaries
and a claim near ε ≈ 1 (σ ≈ 3 per step). See tests/audit/test_canary.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedspine.audit.one_run_bound import DEFAULT_BETA, eps_lower_bound, guess_members
from fedspine.privacy.accounting import REPORT_ACCOUNTANT, Accountant, Mechanism, epsilon
from fedspine.training.dp import make_dp_optimizer, privatised_step


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit: the empirical ε lower bound against the accountant's claim."""

    eps_lower_bound: float
    claimed_epsilon: float
    delta: float
    beta: float
    correct: int
    guesses: int
    k_plus: int
    k_minus: int
    num_canaries: int
    included: int
    steps: int
    steps_per_canary: int
    noise_multiplier: float
    clip_norm: float
    canary_norm: float
    directions: str
    accountant: str

    @property
    def passed(self) -> bool:
        """True when the audit found no evidence against the claim (bound ≤ claimed ε)."""
        return self.eps_lower_bound <= self.claimed_epsilon

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def audit_dp_step(
    noise_multiplier: float,
    *,
    num_canaries: int = 100_000,
    dim: int = 2_000,
    steps_per_canary: int = 1,
    clip_norm: float = 1.0,
    canary_norm: float | None = None,
    background_units: int = 16,
    background_norm: float = 3.0,
    k_plus: int | None = None,
    k_minus: int | None = None,
    delta: float = 1e-5,
    beta: float = DEFAULT_BETA,
    accountant: Accountant = REPORT_ACCOUNTANT,
    directions: Literal["dirac", "random"] = "dirac",
    chunk_size: int = 512,
    seed: int = 0,
    dp_optimizer_factory: Callable[..., Any] | None = None,
) -> AuditResult:
    """Run the one-run canary audit of the DP step's clip-and-noise path; see the module doc.

    ``noise_multiplier`` is the σ the accountant is told (the claim). ``dp_optimizer_factory``
    builds the DP optimizer with :func:`fedspine.training.dp.make_dp_optimizer`'s signature; the
    default is that function, and tests plant bugs by passing a wrong one. ``canary_norm``
    (default C) is a canary's norm before clipping: above C, the audit also checks clipping.
    ``k_plus`` and ``k_minus`` default to 1 % of the canaries each; they must be fixed before
    looking at the scores (trying several and keeping the best invalidates β).
    """
    m = int(num_canaries)
    if m < 2 or dim < 1 or steps_per_canary < 1 or chunk_size < 1:
        raise ValueError(
            "audit_dp_step: num_canaries must be >= 2 and dim, steps_per_canary and chunk_size "
            f">= 1; got {num_canaries}, {dim}, {steps_per_canary}, {chunk_size}"
        )
    if directions not in ("dirac", "random"):
        raise ValueError(f"audit_dp_step: directions must be 'dirac' or 'random', got {directions}")
    k_plus = max(1, m // 100) if k_plus is None else int(k_plus)
    k_minus = max(1, m // 100) if k_minus is None else int(k_minus)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus < 1 or k_plus + k_minus > m:
        raise ValueError(
            f"audit_dp_step: need 1 <= k_plus + k_minus <= {m} guesses, got {k_plus} + {k_minus}"
        )
    canary_norm = float(clip_norm if canary_norm is None else canary_norm)
    factory = make_dp_optimizer if dp_optimizer_factory is None else dp_optimizer_factory

    rng = np.random.default_rng(seed)
    torch_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    included = rng.random(m) < 0.5
    basis = _random_rotation(dim, torch_gen) if directions == "random" else None

    theta = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    expected = max(1, dim // 2 + background_units)
    dp_opt = factory(
        torch.optim.SGD([theta], lr=1.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm,
        expected_batch_size=expected,
        generator=noise_gen,
    )
    scores = np.empty(m)
    blocks = math.ceil(m / dim)
    for block in range(blocks):
        first = block * dim
        count = min(dim, m - first)
        members = torch.from_numpy(np.flatnonzero(included[first : first + count]))
        start = theta.detach().clone()
        for _ in range(steps_per_canary):
            chunks = _step_rows(
                members,
                basis,
                dim,
                canary_norm,
                background_units,
                background_norm * clip_norm,
                chunk_size,
                torch_gen,
            )
            privatised_step(dp_opt, chunks)
        # SGD with lr = 1: the block's parameter change is minus the sum of its noisy updates.
        update = (start - theta.detach()) * expected
        projected = update if basis is None else basis.T @ update
        scores[first : first + count] = projected[:count].numpy()

    guess_in, guess_out = guess_members(scores, k_plus, k_minus)
    correct = int(included[guess_in].sum() + (~included[guess_out]).sum())
    guesses = k_plus + k_minus
    claimed = epsilon(
        [Mechanism(noise_multiplier, 1.0, steps_per_canary, label="canary")], delta, accountant
    )
    return AuditResult(
        eps_lower_bound=eps_lower_bound(m, guesses, correct, delta, beta),
        claimed_epsilon=float(claimed),
        delta=float(delta),
        beta=float(beta),
        correct=correct,
        guesses=guesses,
        k_plus=k_plus,
        k_minus=k_minus,
        num_canaries=m,
        included=int(included.sum()),
        steps=blocks * steps_per_canary,
        steps_per_canary=int(steps_per_canary),
        noise_multiplier=float(noise_multiplier),
        clip_norm=float(clip_norm),
        canary_norm=canary_norm,
        directions=directions,
        accountant=accountant,
    )


def _step_rows(
    members: torch.Tensor,
    basis: torch.Tensor | None,
    dim: int,
    canary_norm: float,
    background_units: int,
    background_norm: float,
    chunk_size: int,
    generator: torch.Generator,
) -> Iterator[list[torch.Tensor]]:
    """Per-unit gradient rows of one step: the block's member canaries and fresh background
    units, ``chunk_size`` rows at a time (the same chunked path the D step uses)."""
    for begin in range(0, members.numel(), chunk_size):
        idx = members[begin : begin + chunk_size]
        if basis is None:
            rows = torch.zeros(idx.numel(), dim, dtype=torch.float64)
            rows[torch.arange(idx.numel()), idx] = canary_norm
        else:
            rows = basis[:, idx].T * canary_norm
        yield [rows]
    if background_units:
        rows = torch.randn(background_units, dim, generator=generator, dtype=torch.float64)
        rows = rows / rows.norm(dim=1, keepdim=True) * background_norm
        yield [rows]


def _random_rotation(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    gauss = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r))
