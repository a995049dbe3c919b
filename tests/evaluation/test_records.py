"""The typed records of report.json: every record type round-trips, and older files read."""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest

from fedspine.evaluation import records
from fedspine.evaluation.records import (
    EvaluationRecord,
    JsonRecord,
    MetricRow,
    read_evaluation,
    write_evaluation,
)

RECORD_TYPES = [
    cls
    for cls in vars(records).values()
    if isinstance(cls, type) and issubclass(cls, JsonRecord) and cls is not JsonRecord
]


def sample(hint: Any, depth: int = 0) -> Any:
    """A value of every field's type, nested records included (one per dict and list)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return sample(next(a for a in get_args(hint) if a is not type(None)), depth)
    if isinstance(hint, type) and issubclass(hint, JsonRecord):
        return filled(hint, depth + 1)
    if origin is dict:
        return {"k": sample(get_args(hint)[1], depth)}
    if origin is list:
        return [sample(get_args(hint)[0], depth)]
    return {bool: True, int: 7, float: 0.25, str: "text"}.get(hint, {"any": [1, "two"]})


def filled(cls: type[JsonRecord], depth: int = 0) -> JsonRecord:
    """An instance with every field set (a row with a reason has no metrics, so none here)."""
    hints = get_type_hints(cls)
    values = {
        f.name: None if depth > 3 else sample(hints[f.name], depth) for f in dataclasses.fields(cls)
    }
    if cls is MetricRow:
        values["reason"] = None
    return cls(**values)


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=lambda c: c.__name__)
def test_every_record_round_trips_through_json(cls):
    record = filled(cls)
    data = json.loads(json.dumps(record.to_json()))
    assert cls.from_json(data) == record
    assert cls.from_json(data).to_json() == data


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=lambda c: c.__name__)
def test_an_older_file_reads_missing_keys_as_none(cls):
    record = cls.from_json({})
    assert all(getattr(record, f.name) is None for f in dataclasses.fields(cls))


def test_optional_keys_are_written_only_when_set():
    row = MetricRow(compared="synthetic vs real reference", extractor="pixels", n_real=4)
    assert row.to_json() == {
        "compared": "synthetic vs real reference",
        "extractor": "pixels",
        "n_real": 4,
        "fid": None,
        "kid": None,
        "kid_std": None,
        "precision": None,
        "recall": None,
        "density": None,
        "coverage": None,
        "n_other": None,
    }
    reason = MetricRow(compared="c", extractor="e", n_real=1, reason="too few")
    assert reason.to_json() == {"compared": "c", "extractor": "e", "n_real": 1, "reason": "too few"}
    arm = records.ArmRecord(auc=0.5)
    assert "reused_from" not in arm.to_json() and "skipped_outputs" not in arm.to_json()
    assert arm.to_json()["ci"] is None


def test_the_writer_and_the_reader_agree(tmp_path):
    record = filled(EvaluationRecord)
    path = write_evaluation(tmp_path, record)
    assert path.name == "report.json"
    assert read_evaluation(tmp_path) == record == read_evaluation(path)
    assert path.read_text() == json.dumps(record.to_json(), indent=2) + "\n"
