"""Property tests of fedspine.fileio: what is written reads back unchanged, and a write that fails
leaves the old file exactly as it was, with no staging file beside it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedspine.fileio import (
    json_text,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

FAST = settings(max_examples=40, deadline=None, database=None)

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    # No subnormals: a library loaded by other tests may switch them off (flush to zero).
    | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
    | st.text(max_size=16)
)
JSON_OBJECTS = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)


class Boom(RuntimeError):
    """The writer's failure, distinct from anything fileio raises itself."""


def _folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@FAST
@given(obj=JSON_OBJECTS, sort_keys=st.booleans(), strict=st.booleans())
def test_write_json_atomic_round_trips_any_json_object(obj, sort_keys: bool, strict: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nested" / "record.json"
        written = write_json_atomic(path, obj, sort_keys=sort_keys, strict=strict)
        assert written == path
        text = path.read_text(encoding="utf-8")
        assert json.loads(text) == obj
        assert text == json_text(obj, sort_keys=sort_keys, strict=strict)
        assert text.endswith("\n")
        assert _folder_listing(path.parent) == ["record.json"]


@FAST
@given(
    old=st.binary(max_size=64),
    partial=st.binary(max_size=64),
    durable=st.booleans(),
    mode=st.sampled_from([None, 0o600, 0o644]),
)
def test_a_failing_writer_leaves_the_old_file_and_no_staging_file(
    old: bytes, partial: bytes, durable: bool, mode: int | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.bin"
        write_bytes_atomic(path, old)
        before = os.stat(path)

        def failing(handle) -> None:
            handle.write(partial)
            raise Boom("the writer failed half-way")

        with pytest.raises(Boom):
            write_atomic(path, failing, durable=durable, mode=mode)
        assert path.read_bytes() == old
        assert os.stat(path).st_ino == before.st_ino
        assert _folder_listing(Path(tmp)) == ["state.bin"]


@FAST
@given(obj=JSON_OBJECTS, bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_a_strict_write_of_a_non_finite_number_changes_nothing(obj, bad: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        write_json_atomic(path, obj)
        before = path.read_bytes()
        with pytest.raises(ValueError):
            write_json_atomic(path, {"kept": obj, "value": bad}, strict=True)
        assert path.read_bytes() == before
        assert _folder_listing(Path(tmp)) == ["report.json"]


@FAST
@given(data=st.binary(max_size=256), mode=st.sampled_from([0o600, 0o640, 0o644]))
def test_mode_is_set_on_the_written_file(data: bytes, mode: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "key"
        write_bytes_atomic(path, data, mode=mode, durable=True)
        assert path.read_bytes() == data
        assert path.stat().st_mode & 0o777 == mode


def test_without_a_mode_a_file_gets_what_a_plain_write_gives(tmp_path: Path) -> None:
    """Moving a writer onto write_atomic must not make its outputs private (mkstemp's 0600)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = write_text_atomic(tmp_path / "atomic.txt", "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
