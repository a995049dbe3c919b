"""The classifier trainer and `fedspine classifier train`: learning, selection, weighting, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from fedspine.cli.classifier import register
from fedspine.data.prepared import PreparedDataset, load_prepared, write_prepared
from fedspine.models.classifier import ClassifierConfig, load_classifier, predict_proba
from fedspine.training.classifier_trainer import (
    ClassifierTrainConfig,
    augment_batch,
    evaluate_classifier,
    resolve_task,
    targets,
    train_classifier,
)

SIZE = 24


def make_dataset(
    root: Path,
    counts: dict[str, list[int]],
    class_names: tuple[str, ...] = ("normal", "abnormal"),
    size: int = SIZE,
    seed: int = 0,
) -> PreparedDataset:
    """A prepared dataset of noisy grey images; class k >= 1 carries a bright mark somewhere.

    ``counts[split][k]`` images of class k per split, one patient per image. Class 1 has a
    bright 6x6 square, class 2 a bright 2x12 bar; the findings columns mark both.
    """
    rng = np.random.default_rng(seed)
    images, files, patients, splits, labels = [], [], [], [], []
    for split, per_class in counts.items():
        for label, n in enumerate(per_class):
            for _ in range(n):
                img = rng.normal(70, 20, (size, size))
                if label == 1:
                    y, x = rng.integers(0, size - 6, 2)
                    img[y : y + 6, x : x + 6] += 120
                elif label == 2:
                    y, x = rng.integers(0, size - 12, 2)
                    img[y : y + 2, x : x + 12] += 120
                i = len(files)
                images.append(np.clip(img, 0, 255).astype(np.uint8))
                files.append(f"img_{i:04d}.png")
                patients.append(f"p{i:04d}")
                splits.append(split)
                labels.append(label)
    lab = np.array(labels)
    findings = np.stack([(lab == 1), (lab == 2)], axis=1).astype(np.uint8)
    write_prepared(
        root,
        np.stack(images),
        files,
        patients,
        splits,
        labels,
        findings,
        ["square", "bar"],
        list(class_names),
        [],
        {"source": "test"},
    )
    return load_prepared(root)


def small_cfg(**overrides) -> ClassifierTrainConfig:
    values = dict(
        epochs=6,
        batch=16,
        lr=3e-3,
        patience=6,
        device="cpu",
        seed=0,
        model=ClassifierConfig(arch="small", dropout=0.0),
    )
    values.update(overrides)
    return ClassifierTrainConfig(**values)


@pytest.fixture
def binary_data(tmp_path: Path) -> PreparedDataset:
    return make_dataset(tmp_path / "binary", {"train": [60, 60], "val": [20, 20], "test": [10, 10]})


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the test machine's cores are shared, and extra threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_small_classifier_learns_bright_square(binary_data: PreparedDataset) -> None:
    model, history = train_classifier(
        binary_data.select("train"), binary_data.select("val"), small_cfg(epochs=3)
    )
    assert history["task"] == "binary"
    assert history["best_val_auc"] > 0.9
    best = max(history["epochs"], key=lambda r: (r["val_auc"], -r["val_loss"]))
    assert history["best_epoch"] == best["epoch"] and history["best_val_auc"] == best["val_auc"]
    report = evaluate_classifier(model, binary_data.select("test"), small_cfg())
    assert report["splits"] == ["test"] and report["rows"] == 20
    assert report["mean_auc"] > 0.85


def test_multiclass_gives_one_vs_rest_aucs_and_their_mean(tmp_path: Path) -> None:
    data = make_dataset(
        tmp_path / "three",
        {"train": [40, 40, 40], "val": [12, 12, 12]},
        class_names=("normal", "square", "bar"),
    )
    model, history = train_classifier(data.select("train"), data.select("val"), small_cfg(epochs=4))
    assert history["task"] == "multiclass"
    assert history["output_names"] == ["normal", "square", "bar"]
    last = history["epochs"][-1]
    per_output = list(last["val_auc_per_output"].values())
    assert len(per_output) == 3 and all(0.0 <= a <= 1.0 for a in per_output)
    assert last["val_auc"] == pytest.approx(np.mean(per_output))
    assert history["best_val_auc"] > 0.9
    probs = predict_proba(model, data.select("val").images)
    assert probs.shape == (36, 3)
    _, history = train_classifier(
        data.select("train"), data.select("val"), small_cfg(epochs=1, task="multilabel")
    )
    assert history["output_names"] == ["square", "bar"]
    assert history["pos_weight"] == pytest.approx([80 / 40, 80 / 40])
    assert len(history["epochs"][0]["val_auc_per_output"]) == 2


def test_early_stopping_keeps_the_best_epoch(binary_data: PreparedDataset) -> None:
    # lr 0 and GroupNorm (no running statistics): the model never changes, so neither does
    # its val AUC; nothing improves after epoch 1 and training stops after `patience` epochs.
    cfg = small_cfg(epochs=10, patience=2, lr=0.0, augment=False)
    cfg.model.norm = "group"
    _, history = train_classifier(binary_data.select("train"), binary_data.select("val"), cfg)
    assert history["stopped_early"] is True
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3]
    assert history["best_epoch"] == 1
    assert len({r["val_auc"] for r in history["epochs"]}) == 1


def test_selection_never_touches_the_test_split(binary_data: PreparedDataset) -> None:
    cfg = small_cfg(epochs=1, max_train_images=40)
    _, history = train_classifier(binary_data.select("train"), binary_data.select("val"), cfg)
    assert set(history["train_splits"]) == {"train"}
    assert set(history["val_splits"]) == {"val"}
    assert history["train_rows"] == 40
    assert history["val_rows"] == 40
    with pytest.raises(ValueError, match="test split"):
        train_classifier(binary_data.select("train"), binary_data.select(["val", "test"]), cfg)
    with pytest.raises(ValueError, match="test split"):
        train_classifier(binary_data.select(["train", "test"]), binary_data.select("val"), cfg)


def test_pos_weight_is_negatives_over_positives(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "imbalanced", {"train": [30, 10], "val": [6, 6]})
    _, history = train_classifier(data.select("train"), data.select("val"), small_cfg(epochs=1))
    assert history["pos_weight"] == pytest.approx([30 / 10])

    three = make_dataset(
        tmp_path / "three", {"train": [12, 6, 2], "val": [2, 2, 2]}, ("a", "b", "c")
    )
    _, history = train_classifier(three.select("train"), three.select("val"), small_cfg(epochs=1))
    assert history["pos_weight"] == pytest.approx([8 / 12, 14 / 6, 18 / 2])


def test_targets_per_task(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "t", {"train": [2, 3, 1]}, ("a", "b", "c"))
    with pytest.raises(ValueError, match="multiclass"):
        resolve_task("binary", data)
    assert resolve_task("auto", data) == "multiclass"
    y, idx, names = targets(data, "multiclass")
    assert names == ["a", "b", "c"] and y.shape == (6, 3)
    assert np.array_equal(y.argmax(1), data.labels) and np.all(y.sum(1) == 1)
    y, _, names = targets(data, "multilabel")
    assert names == ["square", "bar"]
    assert np.array_equal(y, data.findings.astype(np.float32))


def test_a_class_without_examples_is_refused(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "onesided", {"train": [20, 0], "val": [4, 4]})
    with pytest.raises(ValueError, match="no examples of 'abnormal'"):
        train_classifier(data.select("train"), data.select("val"), small_cfg(epochs=1))
    data = make_dataset(tmp_path / "valonesided", {"train": [8, 8], "val": [4, 0]})
    with pytest.raises(ValueError, match="validation"):
        train_classifier(data.select("train"), data.select("val"), small_cfg(epochs=1))


def test_augmentation_keeps_shape_and_range() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 20, 20)
    y = augment_batch(x, 0.3, 5.0, (0.8, 1.0), generator=gen)
    assert y.shape == x.shape
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert not torch.allclose(y, x)
    assert augment_batch(x, 0.0, 0.0, (1.0, 1.0)) is x


def test_flip_actually_flips_and_identity_warp_is_exact() -> None:
    x = torch.rand(4, 1, 16, 16)
    flipped = augment_batch(x, flip_p=1.0, rotate_deg=0.0, crop_scale=(1.0, 1.0))
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    # A tiny rotation with no crop stays close to the input: the warp's geometry is right.
    rotated = augment_batch(x, flip_p=0.0, rotate_deg=1e-4, crop_scale=(1.0, 1.0))
    assert torch.allclose(rotated, x, atol=1e-3)


def test_cli_writes_the_classifier_folder(binary_data: PreparedDataset, tmp_path: Path) -> None:
    out = tmp_path / "cls"
    result = CliRunner().invoke(
        _app(),
        [
            "classifier", "train", str(binary_data.root), "--out", str(out), "--arch", "small",
            "--epochs", "2", "--batch", "16", "--device", "cpu", "--input-size", "20",
            "--threads", "1",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "classifier.pt",
        "config.json",
        "history.json",
        "training.png",
    }
    assert not list(tmp_path.glob(".cls.partial-*"))
    history = json.loads((out / "history.json").read_text())
    assert history["train_splits"] == ["train"] and history["val_splits"] == ["val"]
    assert len(history["epochs"]) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["model"]["arch"] == "small"
    assert config["train"]["model"]["input_size"] == config["train"]["input_size"] == 20
    assert ClassifierTrainConfig.from_dict(config["train"]).model.num_outputs == 1
    model, cfg, meta = load_classifier(out)
    assert cfg.input_size == 20 and meta["task"] == "binary"
    assert meta["class_names"] == ["normal", "abnormal"]
    assert meta["training_data"]["content_hash"] == binary_data.content_hash
    assert "[0, 1]" in meta["input_contract"]
    assert predict_proba(model, binary_data.images[:5]).shape == (5, 1)
    again = CliRunner().invoke(
        _app(), ["classifier", "train", str(binary_data.root), "--out", str(out)]
    )
    assert again.exit_code != 0 and "already exists" in again.output


def test_cli_bad_input_exits_with_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(
        _app(), ["classifier", "train", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]
    )
    assert missing.exit_code != 0 and "not a prepared dataset" in missing.output
    noval = make_dataset(tmp_path / "noval", {"train": [4, 4], "test": [2, 2]})
    result = runner.invoke(
        _app(), ["classifier", "train", str(noval.root), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code != 0 and "no rows in the 'val' split" in result.output
    onesided = make_dataset(tmp_path / "onesided", {"train": [6, 0], "val": [2, 2]})
    result = runner.invoke(
        _app(),
        ["classifier", "train", str(onesided.root), "--out", str(tmp_path / "c"),
         "--arch", "small", "--device", "cpu", "--threads", "1"],
    )  # fmt: skip
    assert result.exit_code != 0 and "no examples of 'abnormal'" in result.output
    assert not (tmp_path / "c").exists()


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """fedspine (test root)."""

    register(app)
    return app
