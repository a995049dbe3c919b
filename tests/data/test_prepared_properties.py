"""Property tests of the prepared dataset (fedspine.data.prepared): what write_prepared writes,
load_prepared reads back unchanged (pixels, files, patients, splits, labels, findings, names),
and writing what was read gives the same content hash."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedspine.data.prepared import (
    SPLITS,
    PreparedDatasetError,
    content_hash,
    load_prepared,
    write_prepared,
)

FAST = settings(max_examples=25, deadline=None, database=None)

# Identifiers as sources give them: any text, commas, quotes, spaces and line feeds included.
# Not a carriage return (refused on write, see the last test), nor NUL: numpy's str arrays drop a
# trailing NUL, so privacy_ids would merge "p" and "p\0" (which can only over-count).
IDENTIFIERS = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"),
    min_size=1,
    max_size=12,
)
INDEX_COLUMNS = ("row", "file", "patient_id", "split", "label")
"""index.csv's own columns: a finding may not be named like one (findings come from the
label schema's fixed lesion types, so ingest never writes such a name)."""
NAMES = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
        lambda name: name not in INDEX_COLUMNS
    ),
    min_size=1,
    max_size=4,
    unique=True,
)


@st.composite
def datasets(draw) -> dict:
    n = draw(st.integers(1, 12))
    resolution = draw(st.sampled_from([4, 8]))
    class_names = draw(NAMES)
    finding_names = draw(NAMES)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (n, resolution, resolution), dtype=np.uint8),
        "files": draw(st.lists(IDENTIFIERS, min_size=n, max_size=n, unique=True)),
        "patient_ids": draw(st.lists(IDENTIFIERS, min_size=n, max_size=n)),
        "splits": draw(st.lists(st.sampled_from(SPLITS), min_size=n, max_size=n)),
        "labels": draw(st.lists(st.integers(-1, len(class_names) - 1), min_size=n, max_size=n)),
        "findings": rng.integers(0, 2, (n, len(finding_names)), dtype=np.uint8),
        "finding_names": finding_names,
        "class_names": class_names,
        "rejected": draw(st.lists(st.tuples(IDENTIFIERS, IDENTIFIERS), max_size=3)),
        "manifest": {"format": "fedspine-prepared/1", "privacy_unit": "patient"},
    }


@FAST
@given(dataset=datasets())
def test_a_prepared_dataset_round_trips(dataset: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = write_prepared(Path(tmp) / "prepared", **dataset)
        data = load_prepared(root)
        np.testing.assert_array_equal(np.asarray(data.images), dataset["images"])
        assert data.images.dtype == np.uint8
        assert data.files == dataset["files"]
        assert data.patient_ids.tolist() == dataset["patient_ids"]
        assert data.splits.tolist() == dataset["splits"]
        assert data.labels.tolist() == dataset["labels"]
        np.testing.assert_array_equal(data.findings, dataset["findings"])
        assert data.finding_names == dataset["finding_names"]
        assert data.class_names == dataset["class_names"]
        assert len(data) == len(dataset["files"])
        assert data.privacy_unit == "patient"
        assert data.privacy_ids.tolist() == dataset["patient_ids"]

        again = write_prepared(
            Path(tmp) / "again",
            images=np.asarray(data.images),
            files=data.files,
            patient_ids=data.patient_ids.tolist(),
            splits=data.splits.tolist(),
            labels=data.labels,
            findings=data.findings,
            finding_names=data.finding_names,
            class_names=data.class_names,
            rejected=[],
            manifest=dataset["manifest"],
        )
        assert load_prepared(again).content_hash == data.content_hash != ""
        # Each row's label, split and patient stays with its own image.
        for split in SPLITS:
            rows = data.select(split, labelled=False)
            wanted = [i for i, s in enumerate(dataset["splits"]) if s == split]
            np.testing.assert_array_equal(
                np.asarray(rows.images),
                dataset["images"][wanted].reshape(-1, *data.images.shape[1:]),
            )
            assert rows.labels.tolist() == [dataset["labels"][i] for i in wanted]


@FAST
@given(dataset=datasets(), other=st.integers(0, 255))
def test_the_content_hash_changes_with_any_pixel(dataset: dict, other: int) -> None:
    images = dataset["images"]
    index = b"row,file\n"
    changed = images.copy()
    flat = changed.reshape(-1)
    position = other % flat.size
    flat[position] = (int(flat[position]) + 1 + other) % 256 or 1
    if flat[position] == images.reshape(-1)[position]:
        flat[position] ^= 1
    assert content_hash(images, index) == content_hash(images.copy(), index)
    assert content_hash(changed, index) != content_hash(images, index)


def test_an_identifier_with_a_carriage_return_is_refused_on_write(tmp_path: Path) -> None:
    """index.csv could not read it back, so write_prepared refuses it and names the value."""
    with pytest.raises(PreparedDatasetError, match="holds a carriage return"):
        write_prepared(
            tmp_path / "prepared",
            images=np.zeros((1, 4, 4), dtype=np.uint8),
            files=["scan\r1.png"],
            patient_ids=["p\r1"],
            splits=["train"],
            labels=[0],
            findings=np.zeros((1, 1), dtype=np.uint8),
            finding_names=["fracture"],
            class_names=["normal"],
            rejected=[],
            manifest={},
        )
    assert not (tmp_path / "prepared").exists()
