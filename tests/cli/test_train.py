import json
import tomllib

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedspine.cli.main import app
from fedspine.training.checkpoint import load_checkpoint
from fedspine.training.gan_trainer import GanTrainer
from fedspine.training.generate import load_generator
from tests.training import make_prepared

runner = CliRunner()
TIMING_KEYS = {"tick_seconds", "sec_per_kimg", "img_per_sec"}


pytestmark = pytest.mark.usefixtures("tiny_cpu_preset")


@pytest.fixture
def prepared(tmp_path):
    return make_prepared(tmp_path / "prepared", resolution=16)


def _train(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_the_whole_run_folder(prepared, tmp_path):
    run = tmp_path / "run"
    args = ["--preset", "cpu", "--kimg", "0.032", "--snapshot-kimg", "0.016", "--device", "cpu"]
    result = _train(prepared, "--out", run, *args)
    assert result.exit_code == 0, result.output
    records = _metrics(run)
    assert [r["cur_nimg"] for r in records] == [16, 32]
    assert all(r["loss_g"] > 0 and r["loss_d"] > 0 for r in records)
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert (
        cfg["dataset"]["content_hash"]
        == json.loads((prepared / "manifest.json").read_text())["content_hash"]
    )
    assert cfg["dataset"]["train_images"] == 39  # one train row is unlabelled
    assert cfg["train"]["batch"] == 8 and cfg["train"]["network"]["resolution"] == 16
    assert cfg["model"] == "cgan"
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == ["snapshot_00000.016.pt", "snapshot_00000.032.pt"]
    assert (
        json.loads((run / "latest.json").read_text())["snapshot"]
        == "snapshots/snapshot_00000.032.pt"
    )
    fakes = sorted(p.name for p in (run / "samples").iterdir())
    assert fakes == ["fakes_00000.016.png", "fakes_00000.032.png", "reals.png"]
    grid = Image.open(run / "samples" / "fakes_00000.032.png")
    assert grid.mode == "L" and grid.height == 2 * 64  # one row per class, 16 px tiles upscaled
    G, meta = load_generator(run / "generator.pt")
    assert meta["class_names"] == ["class0", "class1"] and meta["training"]["cur_nimg"] == 32
    assert "D" not in meta and G.c_dim == 2
    snap = load_checkpoint(run / "snapshots" / "snapshot_00000.032.pt", kind="trainer")
    assert torch.equal(snap["trainer"]["G_ema"]["mapping.w_avg"], G.mapping.w_avg)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(prepared, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--preset", "cpu", "--snapshot-kimg", "0.016", "--seed", "3", "--device", "cpu"]
    assert _train(prepared, "--out", straight, "--kimg", "0.048", *common).exit_code == 0
    assert _train(prepared, "--out", split, "--kimg", "0.016", *common).exit_code == 0
    result = _train(prepared, "--out", split, "--kimg", "0.048", "--resume", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    a, b = _metrics(straight), _metrics(split)
    assert len(a) == len(b) == 3
    assert any(r["ada_p"] > 0 for r in a)  # the augmentation RNG is part of what resumes
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in TIMING_KEYS} == {
            k: v for k, v in rb.items() if k not in TIMING_KEYS
        }
    ga, _ = load_generator(straight / "generator.pt")
    gb, _ = load_generator(split / "generator.pt")
    for x, y in zip(ga.state_dict().values(), gb.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_ctrl_c_keeps_the_last_snapshot_and_resume_redoes_later_ticks(
    prepared, tmp_path, monkeypatch
):
    run, straight = tmp_path / "run", tmp_path / "straight"
    args = ["--preset", "cpu", "--kimg", "0.064", "--snapshot-kimg", "0.032", "--device", "cpu"]
    assert _train(prepared, "--out", straight, *args).exit_code == 0
    original = GanTrainer.train_step
    calls = {"n": 0}

    def interrupted_step(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 7:  # ticks every 2 steps, snapshots every 4: the last one at step 4
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(GanTrainer, "train_step", interrupted_step)
    result = _train(prepared, "--out", run, *args)
    monkeypatch.setattr(GanTrainer, "train_step", original)
    assert result.exit_code == 130
    assert "snapshot_00000.032.pt" in result.output and "--resume" in result.output
    assert not (run / "generator.pt").exists()
    latest = json.loads((run / "latest.json").read_text())
    state = load_checkpoint(run / latest["snapshot"], kind="trainer")["trainer"]
    assert state["counters"]["cur_nimg"] == 32
    assert [r["cur_nimg"] for r in _metrics(run)] == [16, 32, 48]
    assert not [p for p in (run / "snapshots").iterdir() if p.name.startswith(".")]

    resumed = _train(prepared, "--out", run, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = _metrics(straight), _metrics(run)
    assert [r["cur_nimg"] for r in b] == [16, 32, 48, 64]
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in TIMING_KEYS} == {
            k: v for k, v in rb.items() if k not in TIMING_KEYS
        }


def test_resized_when_the_preset_resolution_differs(tmp_path):
    prepared = make_prepared(tmp_path / "prep32", resolution=32)
    run = tmp_path / "run"
    result = _train(
        prepared, "--out", run, "--preset", "cpu", "--resolution", "16", "--kimg", "0.008"
    )
    assert result.exit_code == 0, result.output
    assert "32 px -> 16 px" in result.output
    assert tomllib.loads((run / "config.toml").read_text())["train"]["network"]["resolution"] == 16


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing-dataset", "--out", "{tmp}/r"], "not a prepared dataset"),
        (["{prep}", "--out", "{tmp}/nowhere", "--resume"], "not a run folder"),
        (["{prep}", "--out", "{tmp}/r", "--model", "spinegan"], "needs --classifier"),
        (["{prep}", "--out", "{tmp}/r", "--preset", "huge"], "--preset huge"),
        (["{prep}", "--out", "{tmp}/r", "--preset", "paper", "--resolution", "64"], "256"),
        (["{prep}", "--out", "{tmp}/r", "--precision", "fp8"], "--precision fp8"),
        (["{prep}", "--out", "{tmp}/r", "--device", "cpu", "--precision", "fp16"], "needs CUDA"),
    ],
)
def test_errors_are_one_line_and_non_zero(prepared, tmp_path, args, needle):
    args = [a.format(tmp=tmp_path, prep=prepared) for a in args]
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code != 0
    assert needle in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_existing_run_needs_resume_and_resume_checks_the_dataset(prepared, tmp_path):
    run = tmp_path / "run"
    assert _train(prepared, "--out", run, "--preset", "cpu", "--kimg", "0.008").exit_code == 0
    again = _train(prepared, "--out", run, "--preset", "cpu", "--kimg", "0.008")
    assert again.exit_code != 0 and "--resume" in again.output
    other = make_prepared(tmp_path / "other", seed=5)
    wrong = _train(other, "--out", run, "--resume", "--kimg", "0.016")
    assert wrong.exit_code != 0 and "content hash" in wrong.output
    conflict = _train(prepared, "--out", run, "--resume", "--batch", "4")
    assert conflict.exit_code != 0 and "--batch 4 conflicts" in conflict.output


def test_precision_is_written_to_the_config_and_kept_on_resume(prepared, tmp_path, monkeypatch):
    from fedspine.training import precision

    # bf16 on a CPU needs bf16 instructions; the tiny networks run either way.
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    run = tmp_path / "run"
    args = ["--preset", "cpu", "--device", "cpu", "--snapshot-kimg", "0.008"]
    result = _train(prepared, "--out", run, *args, "--kimg", "0.008", "--precision", "bf16")
    assert result.exit_code == 0, result.output
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["train"]["mixed_precision"] == "bf16"
    assert cfg["precision"] == {"used": "bf16", "how": "asked for bf16; this CPU has avx512_bf16"}
    assert "precision: bf16" in result.output
    assert cfg["modconv_path"]["fused"] is cfg["train"]["network"]["fused_modconv"]
    assert all(r["loss_g"] > 0 for r in _metrics(run))
    conflict = _train(prepared, "--out", run, "--resume", "--kimg", "0.016", "--precision", "off")
    assert conflict.exit_code != 0 and "--precision off conflicts" in conflict.output
    resumed = _train(prepared, "--out", run, "--resume", "--kimg", "0.016")
    assert resumed.exit_code == 0, resumed.output
    assert tomllib.loads((run / "config.toml").read_text())["train"]["mixed_precision"] == "bf16"


def test_bf16_is_refused_on_a_cpu_without_bf16_instructions(prepared, tmp_path, monkeypatch):
    from fedspine.training import precision

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    result = _train(prepared, "--out", tmp_path / "r", "--device", "cpu", "--precision", "bf16")
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1
    assert "no bf16 instructions" in result.output and "use off" in result.output
    assert not (tmp_path / "r").exists()
