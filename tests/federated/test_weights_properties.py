"""Property tests of FedAvg (fedspine.federated.weights): averaging identical states gives the
state back (bit for bit below float64), whatever the weights; the result is the example-weighted mean; and
the server's running sum agrees with averaging every reply at once."""

from __future__ import annotations

from collections import OrderedDict

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedspine.federated.weights import RunningFedAvg
from tests.federated.reference import fedavg

FAST = settings(max_examples=50, deadline=None, database=None)
WEIGHTS = st.floats(1e-3, 1e6)
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


def _state(seed: int, dtype: torch.dtype, scale: float = 1.0) -> OrderedDict[str, torch.Tensor]:
    """A small state dict: floating weights of ``dtype`` and an integer counter, as a
    network's buffers hold one."""
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict(
        [
            ("conv.weight", (torch.randn(3, 2, 2, generator=gen) * scale).to(dtype)),
            ("conv.bias", (torch.randn(3, generator=gen) * scale).to(dtype)),
            ("steps", torch.tensor([7], dtype=torch.int64)),
        ]
    )


def _running(states, weights) -> OrderedDict[str, torch.Tensor]:
    running = RunningFedAvg()
    for state, weight in zip(states, weights, strict=True):
        running.add(state, weight)
    return running.result()


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    dtype=DTYPES,
    scale=st.floats(1e-30, 1e30),
    weights=st.lists(WEIGHTS, min_size=1, max_size=6),
)
def test_fedavg_of_identical_states_is_the_identity(seed, dtype, scale, weights) -> None:
    state = _state(seed, dtype, scale)
    copies = [OrderedDict((k, v.clone()) for k, v in state.items()) for _ in weights]
    for averaged in (fedavg(copies, weights), _running(copies, weights)):
        assert list(averaged) == list(state)
        for key, tensor in state.items():
            assert averaged[key].dtype == tensor.dtype
            if tensor.dtype == torch.float64:
                # Summed in float64 itself: equal up to its rounding.
                torch.testing.assert_close(averaged[key], tensor, rtol=1e-14, atol=0.0)
            else:
                # Summed in float64, then rounded back: exactly the state that was sent.
                assert torch.equal(averaged[key], tensor), key


@FAST
@given(
    seeds=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=6),
    data=st.data(),
)
def test_fedavg_is_the_weighted_mean(seeds, data) -> None:
    weights = data.draw(st.lists(WEIGHTS, min_size=len(seeds), max_size=len(seeds)))
    states = [_state(seed, torch.float64) for seed in seeds]
    total = sum(weights)
    for averaged in (fedavg(states, weights), _running(states, weights)):
        for key in ("conv.weight", "conv.bias"):
            mean = sum(s[key] * (w / total) for s, w in zip(states, weights, strict=True))
            torch.testing.assert_close(averaged[key], mean, rtol=1e-12, atol=1e-12)
            # A mean lies within the range of what it averages.
            stacked = torch.stack([s[key] for s in states])
            assert bool((averaged[key] >= stacked.min(0).values - 1e-12).all())
            assert bool((averaged[key] <= stacked.max(0).values + 1e-12).all())
        assert torch.equal(averaged["steps"], states[0]["steps"])


@FAST
@given(
    seeds=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=6),
    factor=WEIGHTS,
    data=st.data(),
)
def test_fedavg_depends_only_on_relative_weights_and_not_on_order(seeds, factor, data) -> None:
    weights = data.draw(st.lists(WEIGHTS, min_size=len(seeds), max_size=len(seeds)))
    states = [_state(seed, torch.float32) for seed in seeds]
    order = data.draw(st.permutations(range(len(seeds))))
    reference = fedavg(states, weights)
    scaled = fedavg(states, [w * factor for w in weights])
    shuffled = _running([states[i] for i in order], [weights[i] for i in order])
    for key in ("conv.weight", "conv.bias"):
        torch.testing.assert_close(scaled[key], reference[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(shuffled[key], reference[key], rtol=1e-6, atol=1e-6)
