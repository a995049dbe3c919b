"""The classifier networks, their safe save/load, weight import and prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedspine.models.classifier import (
    ClassifierCheckpointError,
    ClassifierConfig,
    build_classifier,
    from_generator_output,
    load_classifier,
    predict_proba,
    save_classifier,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the test machine's cores are shared, and extra threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_small_cnn_size_and_group_norm_has_no_batchnorm() -> None:
    model = build_classifier(ClassifierConfig(arch="small", num_outputs=3, input_size=32))
    params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= params <= 300_000
    assert model(torch.rand(4, 1, 32, 32)).shape == (4, 3)
    grouped = build_classifier(ClassifierConfig(arch="small", norm="group", input_size=32))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in grouped.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in grouped.modules())
    assert not list(grouped.buffers())


def test_densenet121_one_channel_forward_and_group_variant() -> None:
    for norm in ("batch", "group"):
        model = build_classifier(
            ClassifierConfig(arch="densenet121", num_outputs=2, input_size=64, norm=norm)
        )
        assert model.features.conv0.weight.shape[1] == 1
        model.eval()
        with torch.no_grad():
            logits = model(torch.rand(2, 1, 64, 64))
        assert logits.shape == (2, 2) and torch.isfinite(logits).all()
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert has_bn == (norm == "batch")


def test_save_load_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    cfg = ClassifierConfig(arch="small", num_outputs=2, input_size=24, dropout=0.2)
    model = build_classifier(cfg)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # move the BatchNorm running statistics away from their defaults
            model(torch.rand(8, 1, 24, 24) * 0.5 + 0.3)
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32), dtype=np.uint8)
    before = predict_proba(model, images)
    path = save_classifier(tmp_path / "c.pt", model, cfg, {"task": "multiclass"})
    loaded, loaded_cfg, meta = load_classifier(path)
    after = predict_proba(loaded, images)
    assert loaded_cfg == cfg
    assert meta["task"] == "multiclass" and "fedspine_version" in meta
    np.testing.assert_array_equal(before, after)
    assert before.shape == (10, 2) and (before > 0).all() and (before < 1).all()
    np.testing.assert_allclose(predict_proba(loaded, images.astype(np.float32) / 255.0), after)
    assert not list(tmp_path.glob("*.partial"))


def test_metadata_must_be_plain(tmp_path: Path) -> None:
    cfg = ClassifierConfig(arch="small", input_size=16)
    with pytest.raises(ValueError, match="plain JSON"):
        save_classifier(tmp_path / "c.pt", build_classifier(cfg), cfg, {"x": object()})
    assert not (tmp_path / "c.pt").exists()


class _Payload:
    """Any class: unpickling it is what weights_only refuses."""


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    cfg = ClassifierConfig(arch="small", input_size=16)
    model = build_classifier(cfg)
    path = save_classifier(tmp_path / "c.pt", model, cfg, {})
    data = torch.load(path, weights_only=True)
    data["meta"]["extra"] = _Payload()
    torch.save(data, tmp_path / "evil.pt")
    with pytest.raises(ClassifierCheckpointError, match="refused to load"):
        load_classifier(tmp_path / "evil.pt")
    torch.save({"state_dict": model.state_dict(), "x": _Payload()}, tmp_path / "evil_w.pt")
    with pytest.raises(ClassifierCheckpointError, match="refused to load"):
        build_classifier(ClassifierConfig(arch="small", weights_path=str(tmp_path / "evil_w.pt")))


def test_three_channel_weights_load_into_one_channel_model(tmp_path: Path) -> None:
    source = build_classifier(ClassifierConfig(arch="small", num_outputs=1000, input_size=16))
    state = source.state_dict()
    first = "features.s1c1_conv.weight"
    rgb = torch.randn(16, 3, 3, 3)
    state[first] = rgb
    torch.save(state, tmp_path / "rgb.pt")
    cfg = ClassifierConfig(
        arch="small", num_outputs=1, input_size=16, weights_path=str(tmp_path / "rgb.pt")
    )
    model = build_classifier(cfg)
    loaded = model.state_dict()
    torch.testing.assert_close(loaded[first], rgb.sum(dim=1, keepdim=True))
    torch.testing.assert_close(
        loaded["features.s2c1_conv.weight"], state["features.s2c1_conv.weight"]
    )
    assert loaded["out.weight"].shape == (1, 128)  # the 1000-way head is left fresh
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 1)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(4, 1, 3, 3)}, tmp_path / "other.pt")
    cfg = ClassifierConfig(arch="small", weights_path=str(tmp_path / "other.pt"))
    with pytest.raises(ClassifierCheckpointError, match="same architecture"):
        build_classifier(cfg)


def test_torchvision_densenet_keys_map_to_monai() -> None:
    from fedspine.models.classifier import _monai_key

    assert (
        _monai_key("features.denseblock1.denselayer1.norm1.running_mean")
        == "features.denseblock1.denselayer1.layers.norm1.running_mean"
    )
    assert (
        _monai_key("module.features.denseblock4.denselayer16.conv2.weight")
        == "features.denseblock4.denselayer16.layers.conv2.weight"
    )
    assert _monai_key("features.conv0.weight") == "features.conv0.weight"


def test_group_norm_small_cnn_passes_opacus_validation() -> None:
    from opacus.validators import ModuleValidator

    grouped = build_classifier(ClassifierConfig(arch="small", norm="group", input_size=16))
    assert ModuleValidator.validate(grouped, strict=False) == []
    batch = build_classifier(ClassifierConfig(arch="small", norm="batch", input_size=16))
    assert ModuleValidator.validate(batch, strict=False) != []


def test_generator_output_maps_to_the_classifier_contract() -> None:
    g = torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 1, 2, 2).repeat(3, 1, 4, 4).requires_grad_()
    x = from_generator_output(g, 8)
    assert x.shape == (3, 1, 8, 8)
    assert torch.allclose(x, ((g.detach() + 1) / 2).clamp(0, 1))
    x = from_generator_output(g, 4)
    assert x.shape == (3, 1, 4, 4) and x.min() >= 0.0 and x.max() <= 1.0
    x.sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
