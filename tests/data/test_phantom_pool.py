"""The measurement pool: a held-out population joins the test split only, and is made once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedspine.data.phantom_pool import phantom_pool
from fedspine.data.prepared import load_prepared


def test_heldout_patients_join_the_test_split_alone(tmp_path: Path) -> None:
    pool = phantom_pool(tmp_path, sites=2, images_per_site=12, size=64, resolution=16,
                        heldout_per_site=5)  # fmt: skip
    pooled, scored = load_prepared(pool.pooled), load_prepared(pool.scored)
    assert len(pool.sites) == 2 and pool.scored != pool.pooled
    assert len(scored) == len(pooled) + 10
    for split in ("train", "val"):  # what anything trains or selects on is unchanged
        mine, theirs = pooled.splits == split, scored.splits == split
        assert pooled.patient_ids[mine].tolist() == scored.patient_ids[theirs].tolist()
        np.testing.assert_array_equal(pooled.images[mine], scored.images[theirs])
    new = ~np.isin(scored.patient_ids, pooled.patient_ids)
    assert new.sum() == 10 and set(scored.splits[new].tolist()) == {"test"}
    assert not set(scored.privacy_ids[new]) & set(pooled.privacy_ids)  # new people, not copies
    # Made once: a second call finds everything and returns the same folders.
    stamp = pool.scored.stat().st_mtime_ns
    assert phantom_pool(tmp_path, 2, 12, 64, 16, heldout_per_site=5) == pool
    assert pool.scored.stat().st_mtime_ns == stamp
    assert phantom_pool(tmp_path, 2, 12, 64, 16).scored == pool.pooled
    with pytest.raises(ValueError, match="heldout_per_site"):
        phantom_pool(tmp_path, 2, 12, 64, 16, heldout_per_site=-1)
