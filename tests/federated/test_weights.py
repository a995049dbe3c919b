"""Weights on the wire (fedspine.federated.weights): one packed Array and its layout.

A round trip is bit-exact for every dtype a model holds; the packed message is a handful of
Flower objects where one Array per tensor made hundreds; a layout from a hostile server or site
is refused before anything is sliced, and a reply carrying one fails its site, not the run.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedspine.federated.replies import take_reply
from fedspine.federated.weights import (
    LAYOUT_FORMAT,
    PACKED_KEY,
    PACKED_STYPE,
    RunningFedAvg,
    pack_weights,
    read_weight_records,
    trainer_weights,
    unpack_weights,
    weight_records,
)
from fedspine.training.gan_trainer import GanTrainer
from tests.training import tiny_config


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _trained_like(seed: int = 0, extras: bool = True) -> OrderedDict[str, torch.Tensor]:
    """A real GanTrainer's G, D and G_ema, every floating tensor moved (as training moves them:
    no two tensors alike); with ``extras``, G_ema in bf16 and integer, bool, scalar and empty
    tensors beside."""
    trainer = GanTrainer(tiny_config(), [0.5, 0.5], device="cpu")
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, tensor in trainer_weights(trainer).items():
        if tensor.is_floating_point():
            tensor = tensor + torch.randn(tensor.shape, generator=gen)
            if extras and key.startswith("G_ema."):
                tensor = tensor.to(torch.bfloat16)
        state[key] = tensor
    if not extras:
        return state
    state["extra.steps"] = torch.tensor([7, -3], dtype=torch.int64)
    state["extra.counts"] = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    state["extra.mask"] = torch.tensor([True, False, True])
    state["extra.scalar"] = torch.tensor(2.5, dtype=torch.float64)
    state["extra.empty"] = torch.empty(0, 4)
    state["extra.nan"] = torch.tensor([float("nan"), float("inf"), -0.0])
    return state


def test_a_trainers_weights_round_trip_bit_exact_in_every_dtype():
    state = _trained_like()
    assert {t.dtype for t in state.values()} >= {
        torch.float32,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.bool,
    }
    record, layout = pack_weights(state)
    back = unpack_weights(record, layout)
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        assert _bits(back[key]) == _bits(tensor), key
        # Each tensor owns its memory: not a view into the message's bytes.
        assert back[key].untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    # The weights a GanTrainer loads, through the message records.
    again = read_weight_records(RecordDict(weight_records(state)))
    assert all(_bits(again[k]) == _bits(v) for k, v in state.items())


def test_a_packed_message_is_a_handful_of_flower_objects():
    """Flower moves a message object by object (one RPC each); count them with its own tree."""
    state = _trained_like(extras=False)  # Flower's per-tensor Array cannot hold bf16
    config = ConfigRecord({"server-round": 1})
    per_tensor = get_all_nested_objects(
        RecordDict({"arrays": ArrayRecord(state), "config": config})
    )
    packed = get_all_nested_objects(RecordDict({**weight_records(state), "config": config}))
    assert len(per_tensor) > 100
    assert len(packed) <= 10
    kinds = sorted(type(o).__name__ for o in packed.values())
    assert kinds.count("Array") == 1 and kinds.count("ArrayRecord") == 1


def _packed(state=None) -> tuple[ArrayRecord, dict]:
    state = state or OrderedDict(
        [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)), ("b", torch.tensor([1, 2]))]
    )
    record, layout = pack_weights(state)
    return record, json.loads(layout)


def _layout(**changes) -> dict:
    layout = {
        "format": LAYOUT_FORMAT,
        "byteorder": "little",
        "tensors": [["a", "float32", [2, 3]], ["b", "int64", [2]]],
    }
    layout.update(changes)
    return layout


HOSTILE = {
    "too few bytes": (
        _layout(tensors=[["a", "float32", [2, 3]], ["b", "int64", [1]]]),
        "describes 32 bytes, the packed array holds 40",
    ),
    "too many bytes": (
        _layout(tensors=[["a", "float32", [2, 3]], ["b", "int64", [3]]]),
        "describes 48 bytes, the packed array holds 40",
    ),
    "unknown dtype": (
        _layout(tensors=[["a", "complex64", [2, 3]], ["b", "int64", [2]]]),
        "not one of",
    ),
    "dtype not a string": (_layout(tensors=[["a", ["float32"], [2, 3]]]), "not one of"),
    "negative dim": (_layout(tensors=[["a", "float32", [-2, 3]], ["b", "int64", [2]]]), "-2"),
    "float dim": (_layout(tensors=[["a", "float32", [2.0, 3]], ["b", "int64", [2]]]), "2.0"),
    "bool dim": (_layout(tensors=[["a", "float32", [True, 3]]]), "True"),
    "huge dim": (_layout(tensors=[["a", "float32", [10**15, 0]]]), "not a size"),
    "huge element count": (_layout(tensors=[["a", "float32", [10**5] * 4]]), "exceed"),
    "too many dims": (_layout(tensors=[["a", "float32", [1] * 9]]), "at most 8"),
    "huge tensor count": (_layout(tensors=[[f"t{i}", "int8", [0]] for i in range(10_001)]), "more"),
    "duplicate names": (
        _layout(tensors=[["a", "float32", [2, 3]], ["a", "int64", [2]]]),
        "duplicate",
    ),
    "empty name": (_layout(tensors=[["", "float32", [2, 3]], ["b", "int64", [2]]]), "name"),
    "long name": (_layout(tensors=[["x" * 257, "float32", [2, 3]]]), "name"),
    "control character in a name": (_layout(tensors=[["a\nb", "float32", [2, 3]]]), "name"),
    "entry not a triple": (_layout(tensors=[["a", "float32"]]), r"not \[name, dtype, shape\]"),
    "tensors not a list": (_layout(tensors={"a": ["float32", [2, 3]]}), "not a list"),
    "unknown format": (_layout(format="fedspine-packed-9"), "unknown layout format"),
    "other byte order": (_layout(byteorder="big"), "byte order"),
    "extra field": (_layout(note="hi"), "not an object"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_layout_is_refused(case):
    record, _ = _packed()
    layout, message = HOSTILE[case]
    with pytest.raises(ValueError, match=message) as err:
        unpack_weights(record, json.dumps(layout))
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": NaN}', "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        (json.dumps(["a"] * 2_000_000), "characters long"),
        (None, "not a JSON string"),
        (b"{}", "not a JSON string"),
        ("[]", "not an object"),
    ],
    ids=["truncated", "NaN", "deeply nested", "too long", "none", "bytes", "a list"],
)
def test_a_layout_that_is_not_a_small_json_object_is_refused(layout, message):
    record, _ = _packed()
    with pytest.raises(ValueError, match=message):
        unpack_weights(record, layout)


def test_the_receivers_bounds_hold():
    record, layout = _packed()
    text = json.dumps(layout)
    assert list(unpack_weights(record, text, max_tensors=2, max_bytes=40)) == ["a", "b"]
    with pytest.raises(ValueError, match="2 tensors, more than 1"):
        unpack_weights(record, text, max_tensors=1)
    with pytest.raises(ValueError, match="exceed 39 bytes"):
        unpack_weights(record, text, max_bytes=39)


def test_a_packed_record_that_is_not_one_packed_array_is_refused():
    record, layout = _packed()
    text = json.dumps(layout)
    blob = record[PACKED_KEY].data
    wrong = {
        "a ConfigRecord": ConfigRecord({"packed": "x"}),
        "two arrays": ArrayRecord({PACKED_KEY: record[PACKED_KEY], "b": record[PACKED_KEY]}),
        "another key": ArrayRecord({"weights": record[PACKED_KEY]}),
        "another stype": ArrayRecord(
            {PACKED_KEY: Array(dtype="uint8", shape=(40,), stype="numpy.ndarray", data=blob)}
        ),
        "another shape": ArrayRecord(
            {PACKED_KEY: Array(dtype="uint8", shape=(41,), stype=PACKED_STYPE, data=blob)}
        ),
        "per-tensor arrays": ArrayRecord(OrderedDict(a=torch.zeros(2, 3))),
    }
    for case, bad in wrong.items():
        with pytest.raises(ValueError):
            unpack_weights(bad, text)
            pytest.fail(case)
    bools = _packed(OrderedDict(m=torch.tensor([True, False])))[0]
    forged = Array(dtype="uint8", shape=(2,), stype=PACKED_STYPE, data=b"\x01\x07")
    with pytest.raises(ValueError, match="bool"):
        unpack_weights(
            ArrayRecord({PACKED_KEY: forged}),
            json.dumps(_layout(tensors=[["m", "bool", [2]]])),
        )
    assert unpack_weights(bools, json.dumps(_layout(tensors=[["m", "bool", [2]]])))["m"].tolist()


def test_packing_refuses_what_a_receiver_would_refuse():
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_weights({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="name"):
        pack_weights({"x" * 300: torch.zeros(2)})
    # Non-contiguous and grad-requiring tensors pack as their values.
    base = torch.arange(12.0).reshape(3, 4)
    w = torch.nn.Parameter(torch.ones(2))
    back = unpack_weights(*pack_weights({"t": base.t(), "w": w}))
    assert torch.equal(back["t"], base.t()) and torch.equal(back["w"], torch.ones(2))


def test_a_message_without_its_layout_is_refused():
    records = weight_records({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="no 'arrays-layout' record"):
        read_weight_records({"arrays": records["arrays"]})
    with pytest.raises(ValueError, match="holds no 'layout'"):
        read_weight_records({**records, "arrays-layout": ConfigRecord({"other": "x"})})


def test_a_site_refuses_a_server_message_it_cannot_read():
    from fedspine.federated.client_app import _received
    from fedspine.federated.site import SiteRefusal

    records = weight_records({"a": torch.zeros(2)})
    records["arrays-layout"] = ConfigRecord({"layout": json.dumps(_layout())})
    with pytest.raises(SiteRefusal, match="'arrays' weights cannot be read: the layout describes"):
        _received(SimpleNamespace(content=records), "arrays")


def _reply(state, layout: str | None = None, round_: int = 1):
    records = weight_records(state)
    if layout is not None:
        records["arrays-layout"] = ConfigRecord({"layout": layout})
    content = RecordDict(
        {
            **records,
            "metrics": MetricRecord({"num-examples": 10}),
            "site": ConfigRecord({"site-name": "a", "federation": "f", "round": round_}),
        }
    )
    return SimpleNamespace(
        metadata=SimpleNamespace(reply_to_message_id="m1", src_node_id=5),
        has_error=lambda: False,
        content=content,
    )


def test_a_reply_with_a_tampered_layout_fails_its_site_only():
    sent = OrderedDict(a=torch.arange(6.0).reshape(2, 3), b=torch.tensor([1, 2]))
    expected = {"weights": sent, "federation": "f", "round": 1}
    good = OrderedDict(a=sent["a"] + 1, b=sent["b"].clone())

    average = RunningFedAvg()
    entry, failure = take_reply(_reply(good), {"m1": 5}, {}, expected, average)
    assert failure is None and entry["site"] == "a" and average.count == 1

    bigger = OrderedDict(a=torch.zeros(4, 3), b=sent["b"])  # more bytes than were sent
    tampered = {
        "shorter": json.dumps(_layout(tensors=[["a", "float32", [2, 2]], ["b", "int64", [2]]])),
        "dtype": json.dumps(_layout(tensors=[["a", "object", [2, 3]], ["b", "int64", [2]]])),
        "not JSON": "{",
        "duplicate": json.dumps(_layout(tensors=[["a", "float32", [2, 3]], ["a", "int64", [2]]])),
    }
    cases = [_reply(good, layout) for layout in tampered.values()] + [_reply(bigger)]
    for reply in cases:
        average = RunningFedAvg()
        entry, failure = take_reply(reply, {"m1": 5}, {5: "a"}, expected, average)
        assert entry is None and average.count == 0
        assert failure["site"] == "a"
        assert failure["reason"].startswith("invalid reply: unreadable weights: "), failure
    # A reply whose layout names other tensors than were sent is checked as before.
    other = OrderedDict(a=sent["a"], c=sent["b"])
    _, failure = take_reply(_reply(other), {"m1": 5}, {}, expected, RunningFedAvg())
    assert "weight keys differ" in failure["reason"]


@pytest.mark.parametrize("round_", ["one", 2.5, True, 2, "1"])
def test_a_reply_naming_another_or_no_number_as_its_round_fails_its_site_only(round_):
    sent = OrderedDict(a=torch.arange(6.0).reshape(2, 3))
    expected = {"weights": sent, "federation": "f", "round": 1}
    entry, failure = take_reply(
        _reply(OrderedDict(a=sent["a"] + 1), round_=round_),
        {"m1": 5},
        {5: "a"},
        expected,
        RunningFedAvg(),
    )
    assert entry is None and failure["site"] == "a"
    assert failure["reason"].startswith("invalid reply: answers round "), failure
