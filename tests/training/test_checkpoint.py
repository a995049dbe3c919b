import os

import pytest
import torch

from fedspine.training import checkpoint
from fedspine.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


class _Payload:
    """Stands for any object pickle can carry: not a tensor, not a plain type."""

    def __init__(self):
        self.x = 1


class _RunsCode:
    """Unpickling this calls a function of the attacker's choice (here: touching a file)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_round_trip_keeps_tensors_and_plain_metadata(tmp_path):
    payload = {
        "weights": {"a": torch.arange(4.0)},
        "config": {"betas": (0.0, 0.99), "name": "x", "none": None},
        "rng": {"numpy": {"state": {"state": 2**100 + 3, "inc": 5}}},
    }
    path = save_checkpoint(tmp_path / "sub" / "c.pt", "trainer", payload)
    data = load_checkpoint(path, kind="trainer")
    assert torch.equal(data["weights"]["a"], torch.arange(4.0))
    assert data["config"] == payload["config"]
    assert data["rng"]["numpy"]["state"]["state"] == 2**100 + 3
    assert data["format_version"] == checkpoint.FORMAT_VERSION
    assert data["fedspine_checkpoint"] == "trainer"
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"fedspine_checkpoint": "trainer", "format_version": 1, "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)


def test_a_code_running_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(
        {"fedspine_checkpoint": "generator", "format_version": 1, "x": _RunsCode(marker)}, path
    )
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_wrong_kind_version_and_foreign_files(tmp_path):
    path = save_checkpoint(tmp_path / "g.pt", "generator", {"G_ema": {}})
    with pytest.raises(CheckpointError, match="trainer checkpoint is needed"):
        load_checkpoint(path, kind="trainer")
    torch.save({"fedspine_checkpoint": "trainer", "format_version": 99}, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "v.pt")
    torch.save({"state": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a fedspine checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x.pt", "discriminator", {})


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", "trainer", {"v": torch.ones(2)})

    def broken_save(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, "trainer", {"v": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["v"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pt"]
