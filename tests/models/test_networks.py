"""fedspine's StyleGAN2 generator and discriminator: shapes, equivalences and DP properties."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fedspine.models import Discriminator, Generator, NetworkConfig
from fedspine.models.layers import (
    Conv2dLayer,
    FullyConnectedLayer,
    bias_act,
    count_parameters,
    downsample2d,
    lowpass_filter,
    modulated_conv2d,
    upsample2d,
)


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_config(**overrides) -> NetworkConfig:
    values = dict(
        resolution=32, c_dim=2, z_dim=64, w_dim=64, channel_base=1024, channel_max=64, mbstd_group=4
    )
    values.update(overrides)
    return NetworkConfig(**values)


def one_hot(labels: list[int], c_dim: int = 2) -> torch.Tensor:
    return F.one_hot(torch.tensor(labels), c_dim).float()


def set_noise_strengths(G: Generator, value: float) -> None:
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(value)


# --- config and shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [8, 16, 32, 64])
def test_shapes_and_num_ws(resolution: int) -> None:
    torch.manual_seed(0)
    cfg = small_config(resolution=resolution)
    G, D = Generator(cfg), Discriminator(cfg)
    z, c = torch.randn(3, cfg.z_dim), one_hot([0, 1, 1])
    ws = G.mapping(z, c)
    img = G.synthesis(ws)
    k = int(math.log2(resolution))
    assert G.num_ws == cfg.num_ws == 2 * (k - 2) + 2
    convs = sum(type(m).__name__ == "SynthesisLayer" for m in G.modules())
    assert G.num_ws == convs + 1
    assert ws.shape == (3, G.num_ws, cfg.w_dim)
    assert img.shape == (3, 1, resolution, resolution)
    assert torch.isfinite(img).all()
    assert D(img, c).shape == (3, 1)
    assert (G.z_dim, G.c_dim, G.w_dim) == (64, 2, 64)
    assert (G.img_resolution, G.img_channels) == (resolution, 1)


def test_unconditional_networks() -> None:
    cfg = small_config(resolution=16, c_dim=0)
    G, D = Generator(cfg), Discriminator(cfg)
    img = G(torch.randn(2, cfg.z_dim), None)
    assert img.shape == (2, 1, 16, 16)
    assert D(img, None).shape == (2, 1)
    assert D.mapping is None and G.mapping.embed is None
    with pytest.raises(ValueError, match="unconditional"):
        G(torch.randn(2, cfg.z_dim), one_hot([0, 1]))


def test_config_validation_and_channels() -> None:
    cfg = NetworkConfig(resolution=64, channel_base=4096, channel_max=256)
    assert [cfg.channels_at(r) for r in cfg.block_resolutions] == [256, 256, 256, 128, 64]
    assert cfg.num_ws == 10 and NetworkConfig(resolution=256).num_ws == 14
    for bad in (48, 4, 0):
        with pytest.raises(ValueError, match="power of two"):
            NetworkConfig(resolution=bad)
    with pytest.raises(ValueError, match="0 channels"):
        NetworkConfig(resolution=64, channel_base=32)
    with pytest.raises(ValueError, match="c has shape"):
        Generator(small_config(resolution=8))(torch.randn(2, 64), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="img has shape"):
        Discriminator(small_config(resolution=8))(torch.zeros(2, 1, 16, 16), one_hot([0, 1]))


def test_parameter_counts_grow_with_width() -> None:
    narrow = small_config(channel_max=32)
    wide = small_config(channel_max=64)
    for net in (Generator, Discriminator):
        assert 0 < count_parameters(net(narrow)) < count_parameters(net(wide))
    D = Discriminator(small_config(mbstd_group=0))
    assert count_parameters(D) == sum(p.numel() for p in D.parameters())


# --- layers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("lr_multiplier", [1.0, 0.01])
def test_equalised_learning_rate(lr_multiplier: float) -> None:
    torch.manual_seed(0)
    fc = FullyConnectedLayer(256, 128, bias_init=0.5, lr_multiplier=lr_multiplier)
    stored_std = fc.weight.std().item() * lr_multiplier
    assert stored_std == pytest.approx(1.0, abs=0.03)
    assert fc.weight_gain == pytest.approx(lr_multiplier / math.sqrt(256))
    x = torch.randn(5, 256)
    expected = x @ (fc.weight * lr_multiplier / 16.0).t() + 0.5
    torch.testing.assert_close(fc(x), expected, atol=1e-5, rtol=1e-5)
    conv = Conv2dLayer(32, 16, 3)
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.05)
    assert conv.weight_gain == pytest.approx(1 / math.sqrt(32 * 9))
    y = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(conv(y), F.conv2d(y, conv.weight * conv.weight_gain, padding=1))


def test_bias_act_gain_and_clamp() -> None:
    x = torch.tensor([[-1.0, 2.0]])
    out = bias_act(x, torch.tensor([0.0, 1.0]), "lrelu")
    torch.testing.assert_close(out, torch.tensor([[-0.2, 3.0]]) * math.sqrt(2))
    assert bias_act(x * 100, None, "lrelu", clamp=4.0).abs().max().item() == 4.0
    layer = Conv2dLayer(4, 4, 3, activation="lrelu", conv_clamp=0.5)
    assert layer(torch.randn(2, 4, 8, 8) * 50, gain=2.0).abs().max().item() <= 1.0 + 1e-6


def test_fir_resampling_is_centred_and_keeps_the_mean() -> None:
    const = torch.full([1, 3, 8, 8], 2.0)
    torch.testing.assert_close(upsample2d(const)[:, :, 2:-2, 2:-2], torch.full([1, 3, 12, 12], 2.0))
    torch.testing.assert_close(downsample2d(const)[:, :, 1:-1, 1:-1], torch.full([1, 3, 2, 2], 2.0))
    impulse = torch.zeros(1, 1, 8, 8)
    impulse[0, 0, 3, 4] = 1.0
    up = upsample2d(impulse)[0, 0]
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    assert up.sum().item() == pytest.approx(4.0)
    assert ((up * rows).sum() / up.sum()).item() == pytest.approx(2 * 3 + 0.5)
    assert ((up * cols).sum() / up.sum()).item() == pytest.approx(2 * 4 + 0.5)


def test_strided_convolutions_match_the_resampling_filters() -> None:
    """A 3x3 kernel holding only its centre tap must reduce the up / down convolutions to plain
    FIR re-sampling: proves the paddings put every pixel where the filters put it."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    centre = torch.zeros(3, 3, 3, 3)
    centre[torch.arange(3), torch.arange(3), 1, 1] = 1.0
    for fused in (True, False):
        up = modulated_conv2d(x, centre, torch.ones(2, 3), demodulate=False, up=2, fused=fused)
        torch.testing.assert_close(up, upsample2d(x), atol=1e-6, rtol=1e-5)
    for kernel in (1, 3):
        conv = Conv2dLayer(3, 3, kernel, bias=False, down=2)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[torch.arange(3), torch.arange(3), kernel // 2, kernel // 2] = 1.0
            conv.weight.div_(conv.weight_gain)
        torch.testing.assert_close(conv(x), downsample2d(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_matches_per_sample_reference(demodulate: bool) -> None:
    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 5, 8, 8), torch.randn(7, 5, 3, 3), torch.randn(3, 5)
    rows = []
    for i in range(3):
        w = weight * styles[i].reshape(1, 5, 1, 1)
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        rows.append(F.conv2d(x[i : i + 1], w, padding=1))
    expected = torch.cat(rows)
    for fused in (True, False):
        out = modulated_conv2d(x, weight, styles, demodulate=demodulate, fused=fused)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_filter_cache_survives_inference_mode() -> None:
    lowpass_filter.cache_clear()
    with torch.inference_mode():
        f = lowpass_filter(torch.device("cpu"), torch.float32, 1.0)
    assert not f.is_inference()
    assert f.sum().item() == pytest.approx(1.0)
    D = Discriminator(small_config(resolution=16, mbstd_group=0))
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    D(x, one_hot([0, 1])).sum().backward()
    assert x.grad is not None


# --- generator ---------------------------------------------------------------------------------


def test_fused_and_non_fused_paths_agree() -> None:
    torch.manual_seed(1)
    G = Generator(small_config())
    set_noise_strengths(G, 0.3)
    with torch.no_grad():
        for block in G.synthesis.blocks:
            block.torgb.bias.normal_()
    ws = G.mapping(torch.randn(4, 64), one_hot([0, 1, 0, 1]))
    fused = G.synthesis(ws, noise_mode="const", fused_modconv=True)
    non_fused = G.synthesis(ws, noise_mode="const", fused_modconv=False)
    assert fused.abs().max().item() > 0.1
    torch.testing.assert_close(fused, non_fused, atol=1e-4, rtol=1e-4)
    G_non_fused = Generator(small_config(fused_modconv=False))
    G_non_fused.load_state_dict(G.state_dict())
    torch.testing.assert_close(
        G_non_fused.synthesis(ws, noise_mode="const"), fused, atol=1e-4, rtol=1e-4
    )


def test_truncation() -> None:
    torch.manual_seed(0)
    G = Generator(small_config())
    z, c = torch.randn(4, 64), one_hot([0, 1, 0, 1])
    with torch.no_grad():
        G.mapping.w_avg.normal_()
    ws = G.mapping(z, c, truncation_psi=0.0)
    torch.testing.assert_close(ws, G.mapping.w_avg.expand_as(ws))
    plain = G.mapping(z, c)
    cut = G.mapping(z, c, truncation_psi=0.0, truncation_cutoff=3)
    torch.testing.assert_close(cut[:, :3], G.mapping.w_avg.expand(4, 3, -1))
    torch.testing.assert_close(cut[:, 3:], plain[:, 3:])
    half = G.mapping(z, c, truncation_psi=0.5)
    torch.testing.assert_close(half, (plain + G.mapping.w_avg) / 2)


def test_w_avg_moves_only_when_asked() -> None:
    torch.manual_seed(0)
    G = Generator(small_config())
    z, c = torch.randn(8, 64), one_hot([0, 1] * 4)
    before = G.mapping.w_avg.clone()
    G(z, c)
    G.mapping(z, c)
    assert torch.equal(G.mapping.w_avg, before)
    ws = G.mapping(z, c, update_w_avg=True)
    expected = before * 0.995 + ws[:, 0].mean(dim=0).detach() * 0.005
    torch.testing.assert_close(G.mapping.w_avg, expected)
    assert not torch.equal(G.mapping.w_avg, before)
    assert "mapping.w_avg" in G.state_dict()


def test_noise_modes() -> None:
    torch.manual_seed(0)
    G = Generator(small_config())
    set_noise_strengths(G, 0.5)
    ws = G.mapping(torch.randn(2, 64), one_hot([0, 1]))
    assert torch.equal(G.synthesis(ws, noise_mode="const"), G.synthesis(ws, noise_mode="const"))
    assert torch.equal(G.synthesis(ws, noise_mode="none"), G.synthesis(ws, noise_mode="none"))
    assert not torch.equal(
        G.synthesis(ws, noise_mode="random"), G.synthesis(ws, noise_mode="random")
    )
    assert not torch.equal(G.synthesis(ws, noise_mode="const"), G.synthesis(ws, noise_mode="none"))
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, noise_mode="fixed")


def test_labels_condition_both_networks() -> None:
    torch.manual_seed(0)
    cfg = small_config()
    G, D = Generator(cfg), Discriminator(cfg)
    z = torch.randn(2, 64).repeat(2, 1)
    c = one_hot([0, 0, 1, 1])
    img = G(z, c, noise_mode="const")
    assert (img[:2] - img[2:]).abs().max().item() > 1e-3
    same_img = img[:2].detach().repeat(2, 1, 1, 1)
    logits = D(same_img, c)
    assert (logits[:2] - logits[2:]).abs().max().item() > 1e-4


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    for mbstd in (4, 0):
        cfg = small_config(mbstd_group=mbstd)
        G, D = Generator(cfg), Discriminator(cfg)
        c = one_hot([0, 1, 0, 1])
        F.softplus(-D(G(torch.randn(4, 64), c), c)).mean().backward()
        for net in (G, D):
            for name, p in net.named_parameters():
                assert p.grad is not None, f"{type(net).__name__}.{name} got no gradient"
                assert p.grad.abs().max().item() > 0, f"{type(net).__name__}.{name} has zero grad"


@pytest.mark.parametrize("fused", [True, False])
def test_path_length_double_backward_through_synthesis(fused: bool) -> None:
    """Path-length regularisation differentiates d(img . y)/d(ws) again w.r.t. G's weights."""
    torch.manual_seed(0)
    G = Generator(small_config(resolution=16, fused_modconv=fused))
    ws = G.mapping(torch.randn(2, 64), one_hot([0, 1]))
    img = G.synthesis(ws, noise_mode="const")
    (pl_grad,) = torch.autograd.grad((img * torch.randn_like(img)).sum(), ws, create_graph=True)
    pl_grad.square().sum(dim=2).mean(dim=1).sqrt().mean().backward()
    conv_weight = G.synthesis.blocks[1].conv0.weight
    assert conv_weight.grad is not None and conv_weight.grad.abs().max().item() > 0


def test_conv_clamp_bounds_the_generator() -> None:
    torch.manual_seed(0)
    cfg = small_config(conv_clamp=0.01)
    img = Generator(cfg)(torch.randn(2, 64), one_hot([0, 1]))
    assert img.abs().max().item() <= 0.01 * len(cfg.block_resolutions) + 1e-6
    assert img.abs().max().item() > 0


# --- discriminator and DP properties -------------------------------------------------------


def test_minibatch_std_mixes_samples_only_when_on() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    c = one_hot([0, 1, 0, 1])
    x_changed = x.clone()
    x_changed[0] += torch.randn(1, 32, 32)
    mixed = Discriminator(small_config(mbstd_group=4))
    assert mixed.mixes_samples
    delta = (mixed(x, c)[1:] - mixed(x_changed, c)[1:]).abs()
    assert delta.min().item() > 1e-5
    isolated = Discriminator(small_config(mbstd_group=0))
    assert not isolated.mixes_samples
    torch.testing.assert_close(isolated(x, c)[1:], isolated(x_changed, c)[1:], atol=1e-6, rtol=0)
    assert (isolated(x, c)[0] - isolated(x_changed, c)[0]).abs().item() > 1e-5


def test_minibatch_std_groups_any_batch_size() -> None:
    D = Discriminator(small_config(resolution=8, mbstd_group=4))
    for n in (1, 3, 6, 9):
        out = D(torch.randn(n, 1, 8, 8), one_hot([0] * n))
        assert out.shape == (n, 1) and torch.isfinite(out).all()


def test_discriminator_has_no_buffers() -> None:
    for mbstd in (0, 4):
        D = Discriminator(small_config(mbstd_group=mbstd))
        assert list(D.buffers()) == []
    assert len(list(Generator(small_config()).buffers())) > 0


def test_per_sample_gradients_with_r1_match_a_loop() -> None:
    """vmap(grad(loss_i)) with R1 computed by torch.func.grad inside the per-sample loss equals
    a naive per-sample loop with autograd (the DP step's per-sample gradients)."""
    torch.manual_seed(0)
    cfg = small_config(resolution=16, channel_max=32, mapping_layers=1, mbstd_group=0)
    D = Discriminator(cfg)
    gamma = 0.5
    x = torch.randn(3, 1, 16, 16)
    c = one_hot([0, 1, 1])
    params = {name: p.detach() for name, p in D.named_parameters()}

    def logit(p: dict, x_i: torch.Tensor, c_i: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(D, p, (x_i.unsqueeze(0), c_i.unsqueeze(0))).squeeze()

    def loss_i(p: dict, x_i: torch.Tensor, c_i: torch.Tensor) -> torch.Tensor:
        r1_grad = torch.func.grad(lambda xx: logit(p, xx, c_i))(x_i)
        return F.softplus(-logit(p, x_i, c_i)) + gamma / 2 * r1_grad.square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))(params, x, c)

    names = list(params)
    for i in range(3):
        x_i = x[i : i + 1].clone().requires_grad_(True)
        out = D(x_i, c[i : i + 1]).squeeze()
        (r1_grad,) = torch.autograd.grad(out, x_i, create_graph=True)
        loss = F.softplus(-out) + gamma / 2 * r1_grad.square().sum()
        grads = torch.autograd.grad(loss, [dict(D.named_parameters())[n] for n in names])
        for name, g in zip(names, grads, strict=True):
            torch.testing.assert_close(per_sample[name][i], g, atol=1e-5, rtol=1e-4)
    r1_weight = per_sample["from_rgb.weight"]
    assert r1_weight.abs().max().item() > 0
    assert not torch.allclose(r1_weight[0], r1_weight[1])


# --- copies and checkpoints ------------------------------------------------------------------


def test_deepcopy_and_ema_copy_are_independent() -> None:
    torch.manual_seed(0)
    G = Generator(small_config())
    z, c = torch.randn(2, 64), one_hot([0, 1])
    ema = G.copy_for_ema()
    clone = copy.deepcopy(G)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    reference = G(z, c, noise_mode="const")
    torch.testing.assert_close(ema(z, c, noise_mode="const"), reference)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.1)
    assert torch.equal(G(z, c, noise_mode="const"), reference)
    D = Discriminator(small_config())
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(copy.deepcopy(D)(x, c), D(x, c))


def test_state_dict_round_trip() -> None:
    cfg = small_config()
    torch.manual_seed(0)
    G, D = Generator(cfg), Discriminator(cfg)
    G.mapping(torch.randn(8, 64), one_hot([0, 1] * 4), update_w_avg=True)
    torch.manual_seed(1)
    G2, D2 = Generator(cfg), Discriminator(cfg)
    z, c, x = torch.randn(2, 64), one_hot([0, 1]), torch.randn(2, 1, 32, 32)
    assert not torch.allclose(G2(z, c, noise_mode="const"), G(z, c, noise_mode="const"))
    G2.load_state_dict(G.state_dict())
    D2.load_state_dict(D.state_dict())
    torch.testing.assert_close(G2.mapping.w_avg, G.mapping.w_avg)
    assert torch.equal(
        G2(z, c, noise_mode="const", truncation_psi=0.7),
        G(z, c, noise_mode="const", truncation_psi=0.7),
    )
    assert torch.equal(D2(x, c), D(x, c))
