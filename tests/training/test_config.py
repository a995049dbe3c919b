import math
import tomllib

import pytest

from fedspine.training.config import (
    TrainConfig,
    auto_batch,
    preset_config,
    read_config_toml,
    to_toml,
    write_config_toml,
)


def test_paper_preset_matches_the_papers_settings():
    cfg = preset_config("paper", None, num_classes=2)
    net = cfg.network
    assert net.resolution == 256
    assert cfg.batch == 16
    assert cfg.r1_gamma == pytest.approx(0.8192)
    assert net.mapping_layers == 2
    assert net.channel_base == 16384 and net.channel_max == 512  # fmaps 0.5
    assert cfg.g_lr == cfg.d_lr == 0.0025
    assert cfg.ema_kimg == 5 and cfg.ema_rampup == 0.05
    assert cfg.augment.preset == "bgcfnc" and cfg.augment.target == 0.6
    assert net.mbstd_group == 4
    assert cfg.total_kimg == 8000
    assert net.c_dim == 2 and net.img_channels == 1
    assert net.conv_clamp == 256
    assert cfg.r1_interval == 16 and cfg.pl_interval == 4 and cfg.pl_weight == 2
    assert cfg.style_mixing == 0.9


def test_paper_preset_refuses_another_resolution():
    with pytest.raises(ValueError, match="256"):
        preset_config("paper", 128, num_classes=2)


@pytest.mark.parametrize(
    ("res", "batch", "gamma", "ema"),
    [(64, 32, 0.0256, 10.0), (128, 32, 0.1024, 10.0), (256, 16, 0.8192, 5.0)],
)
def test_auto_preset_follows_the_published_table(res, batch, gamma, ema):
    cfg = preset_config("auto", res, num_classes=3)
    assert cfg.batch == batch
    assert cfg.r1_gamma == pytest.approx(gamma)
    assert cfg.ema_kimg == pytest.approx(ema)
    assert cfg.network.channel_base == 16384
    assert cfg.network.mbstd_group == 4
    assert cfg.network.mapping_layers == 2
    assert cfg.g_lr == 0.0025
    assert cfg.network.c_dim == 3


def test_auto_batch_formula_at_other_sizes():
    assert auto_batch(32) == 32
    assert auto_batch(512) == 8
    assert auto_batch(1024) == 4
    assert auto_batch(256, gpus=8) == 64
    cfg = preset_config("auto", 1024, num_classes=2)
    assert cfg.g_lr == 0.002 and cfg.network.channel_base == 32768


def test_cpu_preset_is_narrow_and_small():
    cfg = preset_config("cpu", None, num_classes=2)
    assert cfg.resolution == 32
    assert cfg.network.channel_base <= 4096 and cfg.network.channel_max <= 256
    assert cfg.network.z_dim <= 256 and 16 <= cfg.batch <= 32
    assert cfg.mixed_precision == "off"
    assert cfg.network.fused_modconv is False  # the faster path on CPU
    assert preset_config("cpu", 64, 2).network.channel_max == 256
    with pytest.raises(ValueError):
        preset_config("cpu", 128, 2)


def test_unknown_preset_and_bad_resolution():
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge", 64, 2)
    with pytest.raises(ValueError, match="power of two"):
        preset_config("auto", 48, 2)


def test_betas_are_floats_even_when_given_as_ints():
    cfg = TrainConfig(g_betas=(0, 1), d_betas=[0, 0.99])
    assert all(isinstance(b, float) for b in cfg.g_betas + cfg.d_betas)


def test_config_dict_round_trip():
    cfg = preset_config("cpu", 64, num_classes=4)
    cfg.seed = 7
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_toml_writer_round_trips_through_tomllib(tmp_path):
    cfg = preset_config("auto", 128, num_classes=2)
    data = {
        "title": 'a "quoted"\\ name\nnext',
        "dataset": {"content_hash": "ab" * 32, "class_names": ["normal", "abnormal"]},
        "train": cfg.to_dict(),
        "empty": {},
        "nums": {"inf": math.inf, "big": 10**12, "flag": True},
    }
    path = write_config_toml(tmp_path / "config.toml", data)
    back = read_config_toml(path)
    assert back["title"] == data["title"]
    assert back["dataset"] == data["dataset"]
    assert back["train"]["network"]["channel_base"] == 16384
    assert back["train"]["g_betas"] == [0.0, 0.99]
    assert back["train"]["r1_gamma"] == pytest.approx(cfg.r1_gamma)
    assert back["empty"] == {}
    assert back["nums"] == {"inf": math.inf, "big": 10**12, "flag": True}
    # None has no TOML spelling: it becomes a comment, and the key is absent.
    assert "fixed_p" not in back["train"]["augment"]
    assert "# fixed_p is not set" in path.read_text()
    restored = TrainConfig.from_dict(back["train"])
    assert restored.network == cfg.network and restored.batch == cfg.batch


def test_toml_writer_rejects_unknown_types():
    with pytest.raises(TypeError):
        to_toml({"x": object()})
    assert tomllib.loads(to_toml({"a-b": 1, "c d": 2})) == {"a-b": 1, "c d": 2}
