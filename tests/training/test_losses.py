import math

import pytest
import torch
import torch.nn.functional as F

from fedspine.models import Discriminator, NetworkConfig
from fedspine.models.augment import AugmentConfig, AugmentPipe
from fedspine.training import losses
from fedspine.training.gan_trainer import ema_beta, lazy_adam


def _tiny_d(mbstd_group: int = 0) -> Discriminator:
    torch.manual_seed(0)
    cfg = NetworkConfig(
        resolution=16, c_dim=2, z_dim=8, w_dim=8, mapping_layers=1, channel_base=128,
        channel_max=16, mbstd_group=mbstd_group,
    )  # fmt: skip
    return Discriminator(cfg)


def test_logistic_losses_match_their_formulas():
    real = torch.tensor([[2.0], [-1.0]])
    fake = torch.tensor([[0.5], [-3.0]])
    expected_d = [math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.5)),
                  math.log1p(math.exp(1.0)) + math.log1p(math.exp(-3.0))]  # fmt: skip
    assert losses.d_logistic(real, fake).tolist() == pytest.approx(expected_d)
    assert losses.g_logistic_ns(fake).tolist() == pytest.approx(
        [math.log1p(math.exp(-0.5)), math.log1p(math.exp(3.0))]
    )


def test_r1_equals_a_per_sample_gradient_norm_loop():
    D = _tiny_d()
    x = torch.randn(4, 1, 16, 16)
    c = F.one_hot(torch.tensor([0, 1, 1, 0]), 2).float()
    penalty, logits = losses.r1_penalty(D, x, c)
    assert penalty.shape == (4,) and logits.shape == (4, 1)
    for i in range(4):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(D(xi, c[i : i + 1]).sum(), xi)
        assert penalty[i].item() == pytest.approx(g.square().sum().item(), rel=1e-4)
    # The penalty keeps its graph, so it trains D.
    penalty.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters())


def test_r1_gradient_flows_through_the_augmentation():
    D = _tiny_d()
    pipe = AugmentPipe(AugmentConfig(preset="bgc", fixed_p=1.0))
    x = torch.randn(3, 1, 16, 16)
    c = F.one_hot(torch.tensor([0, 1, 0]), 2).float()
    params = pipe.sample_params(x.shape, generator=torch.Generator().manual_seed(3))
    penalty, _ = losses.r1_penalty(D, x, c, augment=lambda t: pipe.apply(t, params))
    plain, _ = losses.r1_penalty(D, x, c)
    assert not torch.allclose(penalty, plain)  # the augmentation is inside the gradient
    for i in range(3):
        xi = x[i : i + 1].clone().requires_grad_(True)
        pi = {k: v[i : i + 1] for k, v in params.items()}
        (g,) = torch.autograd.grad(D(pipe.apply(xi, pi), c[i : i + 1]).sum(), xi)
        assert penalty[i].item() == pytest.approx(g.square().sum().item(), rel=1e-4)


def test_path_length_matches_the_jacobian_of_a_linear_map():
    torch.manual_seed(0)
    n, num_ws, w_dim, h = 3, 4, 5, 6
    M = torch.randn(w_dim, h * h)
    ws = torch.randn(n, num_ws, w_dim, requires_grad=True)
    images = (ws.sum(1) @ M).reshape(n, 1, h, h)
    lengths = losses.path_length(images, ws, generator=torch.Generator().manual_seed(5))
    y = torch.randn([n, 1, h, h], generator=torch.Generator().manual_seed(5)) / h
    # d(sum img * y)/d ws[:, l] = M y for every layer l, so the length is ||M y||.
    expected = (y.reshape(n, -1) @ M.T).norm(dim=1)
    assert torch.allclose(lengths, expected, rtol=1e-5)


def test_path_length_penalty_updates_the_running_mean():
    lengths = torch.tensor([1.0, 3.0])
    penalty, mean = losses.path_length_penalty(lengths, torch.tensor(0.0), decay=0.01)
    assert mean.item() == pytest.approx(0.02)
    assert penalty.tolist() == pytest.approx([(1 - 0.02) ** 2, (3 - 0.02) ** 2])


def test_lazy_adam_correction():
    lr, betas = lazy_adam(0.0025, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.0025 * 16 / 17)
    assert betas == pytest.approx((0.0, 0.99 ** (16 / 17)))
    assert betas[1] == pytest.approx(0.9905855, abs=1e-6)
    lr4, betas4 = lazy_adam(0.0025, (0.0, 0.99), 4)
    assert lr4 == pytest.approx(0.002) and betas4[1] == pytest.approx(0.99**0.8)
    assert all(isinstance(b, float) for b in betas)
    assert lazy_adam(0.001, (0, 0.9), None) == (0.001, (0.0, 0.9))
    # Floats are what torch 2.13 accepts.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr, betas=betas)


def test_ema_beta_and_rampup():
    assert ema_beta(32, 0, 10.0, 0.05) == 0.0  # G_ema starts as a copy of G
    assert ema_beta(32, 1_000_000, 10.0, 0.05) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta(32, 100_000, 10.0, 0.05) == pytest.approx(0.5 ** (32 / 5_000))
    assert ema_beta(32, 100_000, 10.0, None) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta(16, 0, 5.0, None) == pytest.approx(0.5 ** (16 / 5_000))
