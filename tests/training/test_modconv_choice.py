import pytest
import torch

from fedspine.models import Generator, NetworkConfig
from fedspine.training.config import preset_config
from fedspine.training.gan_trainer import GanTrainer
from fedspine.training.modconv_choice import CPU_RULE, choose_modconv_path, time_modconv_paths
from tests.training import tiny_config


def _tiny_network(**overrides) -> NetworkConfig:
    return tiny_config(**overrides).network


def test_explicit_setting_is_kept_and_auto_on_cpu_follows_the_measured_rule():
    G = Generator(_tiny_network())
    cpu = torch.device("cpu")
    assert choose_modconv_path(True, G, cpu, 4).fused is True
    assert choose_modconv_path(False, G, cpu, 4).fused is False
    auto = choose_modconv_path("auto", G, cpu, 4)
    assert auto.fused is False and auto.how == CPU_RULE and auto.seconds == {}
    with pytest.raises(ValueError, match="fused_modconv"):
        choose_modconv_path("fast", G, cpu, 4)


def test_timing_both_paths_leaves_the_generator_and_rng_untouched():
    G = Generator(_tiny_network())
    G.requires_grad_(False)
    params = {k: v.detach().clone() for k, v in G.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = time_modconv_paths(G, torch.device("cpu"), batch=4, repeats=2)
    assert set(seconds) == {"fused", "non_fused"}
    assert all(0 < s < 60 for s in seconds.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, params[k]) for k, v in G.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in G.parameters())


def test_the_trainer_resolves_auto_and_writes_the_choice_into_its_config():
    cfg = tiny_config()
    cfg.network.fused_modconv = "auto"
    trainer = GanTrainer(cfg, [0.5, 0.5])
    assert trainer.config.network.fused_modconv is False
    assert trainer.config.to_dict()["network"]["fused_modconv"] is False
    assert trainer.G.synthesis.fused_modconv is False
    assert trainer.G_ema.synthesis.fused_modconv is False
    assert trainer.modconv_choice.how == CPU_RULE


def test_a_state_from_another_path_loads_but_other_shapes_do_not():
    fused = GanTrainer(tiny_config(), [0.5, 0.5])
    cfg = tiny_config()
    cfg.network.fused_modconv = False
    non_fused = GanTrainer(cfg, [0.5, 0.5])
    non_fused.load_state_dict(fused.state_dict())
    assert non_fused.config.network.fused_modconv is False  # keeps its own path


def test_gpu_presets_measure_and_the_cpu_preset_is_fixed():
    assert preset_config("paper", 256, 2).network.fused_modconv == "auto"
    assert preset_config("auto", 64, 2).network.fused_modconv == "auto"
    assert preset_config("cpu", 32, 2).network.fused_modconv is False
    with pytest.raises(ValueError, match="fused_modconv"):
        NetworkConfig(resolution=16, fused_modconv="sometimes")


def test_an_unresolved_auto_generator_runs_on_cpu_non_fused():
    net = _tiny_network()
    net.fused_modconv = "auto"
    G = Generator(net).eval()
    z = torch.randn([2, net.z_dim])
    c = torch.eye(2)
    auto = G(z, c, noise_mode="const")
    non_fused = G(z, c, noise_mode="const", fused_modconv=False)
    assert torch.equal(auto, non_fused)
