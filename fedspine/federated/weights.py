"""What travels between server and sites: G, D and G_ema as one flat state dict, and FedAvg.

Only weights move. Optimizer moments, ADA state and RNGs stay at the site.

On the wire a state dict is *packed* (:func:`pack_weights`): the raw bytes of every tensor,
concatenated in key order, as ONE Flower ``Array`` (Flower cuts it into 5 MB ``ArrayChunk``
objects), and its layout (name, dtype and shape of each tensor) as a JSON string in a
``ConfigRecord`` beside it (:func:`weight_records`: records ``arrays`` and ``arrays-layout``).
Flower 1.42 moves a message object by object, one RPC each, from
few threads with a 1-10 s backoff; ``ArrayRecord(state_dict)`` makes an ``Array`` and chunk(s)
per tensor (about 300 objects for the cpu preset's G, D and G_ema at 32 px), the packed form
a handful (9 for that whole message).

A received layout is untrusted (a hostile server or site wrote it): :func:`unpack_weights`
checks it strictly before it slices anything, and refuses it with a ``ValueError``.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

PARTS = ("G", "D", "G_ema")

# The packed form: the one Array's key in its ArrayRecord, its Flower ``stype``, the layout's
# format tag, and the key of the layout's ConfigRecord entry.
PACKED_KEY = "packed"
PACKED_STYPE = "fedspine.packed"
LAYOUT_FORMAT = "fedspine-packed-1"
LAYOUT_KEY = "layout"
# What a received layout may hold. The cpu preset's G, D and G_ema (32 px) are 147 tensors and
# 13 MB, the paper preset's about 290 MB.
MAX_TENSORS = 10_000
MAX_BYTES = 4 * 2**30
MAX_NAME_CHARS = 256
MAX_DIMS = 8
# JSON characters a layout may take per tensor beyond its name (dtype, shape, punctuation).
_LAYOUT_CHARS_PER_TENSOR = 2 * MAX_NAME_CHARS + 32 + MAX_DIMS * 12
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


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


def pack_weights(state: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, str]:
    """``state`` as one ArrayRecord holding ONE Array (every tensor's bytes, in key order) and
    the layout that :func:`unpack_weights` needs to cut it up again (a JSON string).

    Refuses (``ValueError``) what a receiver would refuse: a dtype outside :data:`DTYPES`, a name
    that is not 1-:data:`MAX_NAME_CHARS` printable characters, more than :data:`MAX_DIMS`
    dimensions, :data:`MAX_TENSORS` tensors or :data:`MAX_BYTES` bytes.
    """
    entries: list[list[Any]] = []
    parts: list[memoryview] = []
    total = 0
    for name, tensor in state.items():
        _check_name(name, f"tensor {len(entries)}")
        dtype = _DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be packed")
        if tensor.dim() > MAX_DIMS:
            raise ValueError(f"{name}: {tensor.dim()} dimensions, more than {MAX_DIMS}")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        entries.append([name, dtype, list(tensor.shape)])
        parts.append(memoryview(raw.numpy()))
        total += raw.numel()
    if len(entries) > MAX_TENSORS or total > MAX_BYTES:
        raise ValueError(
            f"{len(entries)} tensors of {total} bytes: more than {MAX_TENSORS} tensors or "
            f"{MAX_BYTES} bytes cannot be packed"
        )
    blob = b"".join(parts)  # the only copy of the weights' bytes
    array = Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)
    layout = {"format": LAYOUT_FORMAT, "byteorder": sys.byteorder, "tensors": entries}
    return ArrayRecord({PACKED_KEY: array}), json.dumps(layout, separators=(",", ":"))


def unpack_weights(
    record: Any, layout_json: Any, *, max_tensors: int = MAX_TENSORS, max_bytes: int = MAX_BYTES
) -> OrderedDict[str, torch.Tensor]:
    """The state dict that :func:`pack_weights` packed into ``record`` with ``layout_json``.

    Both are untrusted: the layout is checked in full (:func:`parse_layout`, at most
    ``max_tensors`` tensors of ``max_bytes`` bytes together, exactly the packed array's length)
    before anything is sliced. Every tensor owns its memory. Raises ``ValueError`` (one line).
    """
    blob = _packed_bytes(record)
    entries = parse_layout(layout_json, max_tensors=max_tensors, max_bytes=max_bytes)
    total = sum(nbytes for _, _, _, nbytes in entries)
    if total != len(blob):
        raise ValueError(
            f"the layout describes {total} bytes, the packed array holds {len(blob)} bytes"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    offset = 0
    with warnings.catch_warnings():
        # ``bytes`` is read-only; every slice is cloned before it is used.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for name, dtype, shape, nbytes in entries:
            if nbytes:
                raw = torch.frombuffer(blob, dtype=torch.uint8, count=nbytes, offset=offset)
                raw = raw.clone()
            else:
                raw = torch.empty(0, dtype=torch.uint8)
            if dtype == torch.bool and bool((raw > 1).any()):
                raise ValueError(f"{name}: a bool tensor holds bytes other than 0 and 1")
            out[name] = raw.view(dtype).reshape(shape)
            offset += nbytes
    return out


def parse_layout(
    layout_json: Any, *, max_tensors: int = MAX_TENSORS, max_bytes: int = MAX_BYTES
) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    """A received layout, checked: ``(name, dtype, shape, bytes)`` per tensor, in order.

    The JSON is bounded in length before it is parsed; it must hold this format and byte
    order, at most ``max_tensors`` entries of distinct printable names of at most
    :data:`MAX_NAME_CHARS` characters, dtypes from :data:`DTYPES`, shapes of at most
    :data:`MAX_DIMS` non-negative integers, and at most ``max_bytes`` bytes in all.
    """
    if not isinstance(layout_json, str):
        raise ValueError(f"the layout is a {type(layout_json).__name__}, not a JSON string")
    limit = 64 + max_tensors * _LAYOUT_CHARS_PER_TENSOR
    if len(layout_json) > limit:
        raise ValueError(f"the layout is {len(layout_json)} characters long, more than {limit}")
    try:
        layout = json.loads(layout_json, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"the layout is not valid JSON ({type(err).__name__})") from None
    if not isinstance(layout, dict) or set(layout) != {"format", "byteorder", "tensors"}:
        raise ValueError("the layout is not an object of format, byteorder and tensors")
    if layout["format"] != LAYOUT_FORMAT:
        raise ValueError(f"unknown layout format {_show(layout['format'])}, not {LAYOUT_FORMAT}")
    if layout["byteorder"] != sys.byteorder:
        raise ValueError(f"byte order {_show(layout['byteorder'])}, not {sys.byteorder}")
    tensors = layout["tensors"]
    if not isinstance(tensors, list):
        raise ValueError("the layout's tensors are not a list")
    if len(tensors) > max_tensors:
        raise ValueError(f"the layout lists {len(tensors)} tensors, more than {max_tensors}")
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
    seen: set[str] = set()
    total = 0
    for index, entry in enumerate(tensors):
        if not isinstance(entry, list) or len(entry) != 3:
            raise ValueError(f"layout entry {index} is not [name, dtype, shape]")
        name, dtype_name, shape = entry
        _check_name(name, f"layout entry {index}")
        if name in seen:
            raise ValueError(f"layout entry {index}: duplicate name {name!r}")
        seen.add(name)
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise ValueError(f"{name}: dtype {_show(dtype_name)} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS:
            raise ValueError(f"{name}: the shape is not a list of at most {MAX_DIMS} sizes")
        numel = 1
        for dim in shape:
            if type(dim) is not int or not 0 <= dim <= max_bytes:
                raise ValueError(
                    f"{name}: shape {_show(shape)} holds {_show(dim)}, not a size from 0 to "
                    f"{max_bytes}"
                )
            numel *= dim
        nbytes = numel * dtype.itemsize
        total += nbytes
        if total > max_bytes:
            raise ValueError(f"the layout's tensors exceed {max_bytes} bytes (at {name})")
        entries.append((name, dtype, tuple(shape), nbytes))
    return entries


def weight_records(
    state: Mapping[str, torch.Tensor], name: str = "arrays"
) -> dict[str, ArrayRecord | ConfigRecord]:
    """The records that carry ``state`` in a message's content: ``name``, the packed
    ArrayRecord, and ``name-layout``, a ConfigRecord holding its layout under ``layout``."""
    record, layout = pack_weights(state)
    return {name: record, layout_record_name(name): ConfigRecord({LAYOUT_KEY: layout})}


def read_weight_records(
    content: Mapping[str, Any],
    name: str = "arrays",
    *,
    max_tensors: int = MAX_TENSORS,
    max_bytes: int = MAX_BYTES,
) -> OrderedDict[str, torch.Tensor]:
    """The state dict that :func:`weight_records` put into a received message's ``content``
    under ``name``, checked by :func:`unpack_weights` (``ValueError`` where it is missing,
    malformed or does not fit its layout)."""
    layout_name = layout_record_name(name)
    for key in (name, layout_name):
        if key not in content:
            raise ValueError(f"no {key!r} record")
    layouts = content[layout_name]
    if not isinstance(layouts, ConfigRecord) or LAYOUT_KEY not in layouts:
        raise ValueError(f"the {layout_name!r} record holds no {LAYOUT_KEY!r}")
    return unpack_weights(
        content[name], layouts[LAYOUT_KEY], max_tensors=max_tensors, max_bytes=max_bytes
    )


def layout_record_name(name: str) -> str:
    """The content key of the layout record that goes with the packed record ``name``."""
    return f"{name}-layout"


def _packed_bytes(record: Any) -> bytes:
    """The bytes of a received packed ArrayRecord: one uint8 Array of :data:`PACKED_STYPE`."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"the weights are a {type(record).__name__}, not an ArrayRecord")
    if len(record) != 1 or PACKED_KEY not in record:
        raise ValueError(f"the weights record holds {len(record)} arrays, not one {PACKED_KEY!r}")
    array = record[PACKED_KEY]
    data = array.data
    if array.stype != PACKED_STYPE or array.dtype != "uint8" or not isinstance(data, bytes):
        raise ValueError(
            f"the packed array is {_show(array.stype)} {_show(array.dtype)}, not "
            f"{PACKED_STYPE} uint8 bytes"
        )
    if tuple(array.shape) != (len(data),):
        raise ValueError(f"the packed array's shape {_show(array.shape)} is not its length")
    return data


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise ValueError(f"{where}: the name is not 1-{MAX_NAME_CHARS} printable characters")


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a layout value")


def _show(value: Any, limit: int = 40) -> str:
    """A bounded, one-line repr of an untrusted value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
