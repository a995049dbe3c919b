"""Tests of the ADA augmentation pipe and the adaptive-p heuristic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedspine.models.augment import AdaptiveP, AugmentConfig, AugmentPipe

ALL_OPS = (
    "xflip",
    "rotate90",
    "translate_int",
    "scale_iso",
    "rotate",
    "scale_aniso",
    "translate_frac",
    "brightness",
    "contrast",
    "luma_flip",
    "filter",
    "noise",
    "cutout",
)


def make_pipe(p: float = 0.5, **cfg) -> AugmentPipe:
    pipe = AugmentPipe(AugmentConfig(**cfg))
    pipe.p.fill_(p)
    return pipe


def images(n: int = 8, size: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, generator=g) * 2 - 1).to(dtype)


def seeded(seed: int = 123) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- presets and config ---------------------------------------------------------------------


def test_presets_enable_expected_ops():
    assert make_pipe(preset="none").enabled_ops == ()
    bgc = ("translate_int", "scale_iso", "rotate", "scale_aniso", "translate_frac")
    assert make_pipe(preset="bgc").enabled_ops == (*bgc, "brightness", "contrast")
    assert make_pipe(preset="bgcfnc").enabled_ops == (
        *bgc,
        "brightness",
        "contrast",
        "filter",
        "noise",
        "cutout",
    )
    full = make_pipe(preset="bgcfnc", xflip=True, rotate90=True, luma_flip=True)
    assert full.enabled_ops == ALL_OPS
    assert "rotate" not in make_pipe(rotate=False).enabled_ops
    assert "rotate" not in make_pipe(max_rotate_deg=0.0).enabled_ops


def test_anatomy_changing_ops_are_off_by_default():
    cfg = AugmentConfig()
    assert (cfg.xflip, cfg.rotate90, cfg.luma_flip) == (False, False, False)
    assert cfg.preset == "bgc" and cfg.rotate and cfg.max_rotate_deg < 180
    ops = AugmentPipe(cfg).enabled_ops
    assert not {"xflip", "rotate90", "luma_flip"} & set(ops)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("preset", "bgcx", "preset"),
        ("fixed_p", 1.5, "fixed_p"),
        ("fixed_p", -0.1, "fixed_p"),
        ("interval", 0, "interval"),
        ("adjust_kimg", 0.0, "adjust_kimg"),
        ("target", 2.0, "target"),
        ("max_rotate_deg", 270.0, "max_rotate_deg"),
    ],
)
def test_config_rejects_bad_values(field, value, words):
    with pytest.raises(ValueError, match=words):
        AugmentConfig(**{field: value})


def test_p_buffer_starts_at_zero_or_fixed_p_and_is_saved():
    assert float(AugmentPipe(AugmentConfig()).p) == 0.0
    pipe = AugmentPipe(AugmentConfig(fixed_p=0.3))
    assert float(pipe.p) == pytest.approx(0.3)
    assert set(pipe.state_dict()) == {"p"}
    other = AugmentPipe(AugmentConfig())
    other.load_state_dict(pipe.state_dict())
    assert float(other.p) == pytest.approx(0.3)


# ---- forward: identity, change, shape, determinism -----------------------------------------


@pytest.mark.parametrize("preset", ["none", "bgc", "bgcfnc"])
def test_p_zero_returns_input_unchanged(preset):
    x = images()
    pipe = make_pipe(0.0, preset=preset)
    assert pipe(x, seeded()) is x


def test_preset_none_is_identity_even_at_p_one():
    x = images()
    assert make_pipe(1.0, preset="none")(x) is x


@pytest.mark.parametrize("preset", ["bgc", "bgcfnc"])
def test_p_one_changes_every_image(preset):
    x = images()
    y = make_pipe(1.0, preset=preset)(x, seeded())
    per_sample = (y - x).abs().flatten(1).amax(dim=1)
    assert bool((per_sample > 1e-3).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 5])
def test_shape_and_dtype_are_preserved(dtype, n):
    x = images(n=n, size=24, dtype=dtype)
    y = make_pipe(0.7, preset="bgcfnc", xflip=True, rotate90=True, luma_flip=True)(x, seeded())
    assert y.shape == x.shape and y.dtype == dtype and bool(torch.isfinite(y).all())


def test_seeded_generator_makes_it_deterministic():
    x = images()
    pipe = make_pipe(0.5, preset="bgcfnc")
    a, b = pipe(x, seeded(7)), pipe(x, seeded(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, pipe(x, seeded(8)))


def test_rejects_images_without_batch_and_channel_dims():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        make_pipe(0.5)(torch.zeros(32, 32))


# ---- per-sample independence (needed inside a DP per-sample loss) --------------------------


@pytest.mark.parametrize("preset", ["bgc", "bgcfnc"])
def test_outputs_depend_only_on_their_own_input(preset):
    pipe = make_pipe(0.9, preset=preset, xflip=True, rotate90=True, luma_flip=True)
    x = images(n=6)
    x2 = x.clone()
    x2[0] = torch.rand_like(x2[0]) * 2 - 1
    y, y2 = pipe(x, seeded()), pipe(x2, seeded())
    assert not torch.equal(y[0], y2[0])
    assert torch.equal(y[1:], y2[1:])


def test_no_gradient_flows_between_samples():
    pipe = make_pipe(1.0, preset="bgcfnc", xflip=True, rotate90=True)
    x = images(n=4).requires_grad_(True)
    y = pipe(x, seeded())
    (grad,) = torch.autograd.grad(y[1:].square().sum(), x)
    assert float(grad[0].abs().max()) == 0.0
    assert float(grad[1:].abs().max()) > 0.0


# ---- differentiability, including the double backward of R1 -------------------------------


def test_gradgradcheck_through_blit_geom_color():
    pipe = make_pipe(1.0, preset="bgc", xflip=True, rotate90=True, luma_flip=True)
    x = images(n=2, size=8, dtype=torch.float64).requires_grad_(True)
    params = pipe.sample_params(x.shape, generator=seeded(3))
    assert bool(params["mask_rotate"].all())
    assert torch.autograd.gradcheck(lambda t: pipe.apply(t, params), (x,))
    assert torch.autograd.gradgradcheck(lambda t: pipe.apply(t, params), (x,), fast_mode=True)


def test_gradcheck_through_filter_noise_cutout():
    pipe = make_pipe(1.0, preset="bgcfnc")
    x = images(n=2, size=12, dtype=torch.float64).requires_grad_(True)
    params = pipe.sample_params(x.shape, generator=seeded(4))
    assert bool(params["mask_filter"].all() and params["mask_cutout"].all())
    assert torch.autograd.gradcheck(lambda t: pipe.apply(t, params), (x,), fast_mode=True)


def test_r1_double_backward_reaches_discriminator_weights():
    pipe = make_pipe(1.0, preset="bgcfnc")
    x = images(n=4, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=seeded(1)).requires_grad_()

    def r1(w: torch.Tensor) -> torch.Tensor:
        logits = F.conv2d(pipe(x, seeded(5)), w).tanh().sum()
        (grad_x,) = torch.autograd.grad(logits, x, create_graph=True)
        return grad_x.square().sum()

    r1(weight).backward()
    analytic = weight.grad[0, 0, 1, 1].item()
    eps = 1e-6
    bumped = weight.detach().clone()
    bumped[0, 0, 1, 1] += eps
    lower = weight.detach().clone()
    lower[0, 0, 1, 1] -= eps
    numeric = (r1(bumped).item() - r1(lower).item()) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5)
    assert abs(analytic) > 0


# ---- each op does what it says ---------------------------------------------------------------


def forced(pipe: AugmentPipe, n: int, size: int, on: tuple[str, ...] = (), **overrides):
    """Identity parameters (a p = 0 draw) with chosen ones overridden and ops `on` masked on."""
    off = AugmentPipe(pipe.cfg)
    params = off.sample_params((n, 1, size, size), generator=seeded())
    params.update(overrides)
    for op in (*on, *(key for key in overrides if key in ALL_OPS)):
        params[f"mask_{op}"] = torch.ones(n, dtype=torch.bool)
    return params


@pytest.mark.parametrize("preset", ["bgc", "bgcfnc"])
def test_identity_parameters_reproduce_the_input(preset):
    pipe = make_pipe(0.5, preset=preset, xflip=True, rotate90=True, luma_flip=True)
    x = images(n=3)
    assert torch.equal(pipe.apply(x, forced(pipe, 3, 32)), x)


def test_blit_ops_are_exact_pixel_moves():
    pipe = make_pipe(0.5, xflip=True, rotate90=True)
    x = images(n=4, size=16)
    for k in range(4):
        params = forced(pipe, 4, 16, rotate90=torch.full((4,), k))
        assert torch.equal(pipe.apply(x, params), torch.rot90(x, k, dims=(-2, -1)))
    params = forced(pipe, 4, 16, xflip=torch.ones(4, dtype=torch.bool))
    assert torch.equal(pipe.apply(x, params), x.flip(-1))
    shift = torch.tensor([[2 / 16, -3 / 16]]).repeat(4, 1)  # 2 px right, 3 px up
    y = pipe.apply(x, forced(pipe, 4, 16, translate_int=shift))
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 3), (2, 0)), mode="reflect")[..., 3:, :16]
    assert np.array_equal(y.numpy(), expected)


def test_geom_rotation_by_quarter_turn_matches_rot90():
    pipe = make_pipe(0.5)
    x = images(n=2, size=16)
    for angle, k in ((math.pi / 2, 1), (-math.pi / 2, 3)):
        y = pipe.apply(x, forced(pipe, 2, 16, rotate=torch.full((2,), angle)))
        matches = [
            torch.allclose(y, torch.rot90(x, kk, dims=(-2, -1)), atol=1e-5) for kk in (k, 4 - k)
        ]
        assert any(matches)


def test_geom_fractional_translation_of_whole_pixels_shifts():
    pipe = make_pipe(0.5)
    x = images(n=2, size=16)
    shift = torch.tensor([[1 / 16, 2 / 16]]).repeat(2, 1)  # 1 px right, 2 px down
    y = pipe.apply(x, forced(pipe, 2, 16, translate_frac=shift))
    assert torch.allclose(y[..., 2:, 1:], x[..., :-2, :-1], atol=1e-5)
    flat = pipe.apply(torch.ones(2, 1, 16, 16), forced(pipe, 2, 16, translate_frac=shift))
    assert torch.allclose(flat, torch.ones(2, 1, 16, 16))  # reflection padding: no new black edge


def test_geom_isotropic_scale_keeps_the_centre_and_magnifies():
    pipe = make_pipe(0.5)
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(1, 1, 32, 32).contiguous()
    y = pipe.apply(ramp, forced(pipe, 1, 32, scale_iso=torch.tensor([2.0])))
    slope_in = (ramp[0, 0, 16, 17] - ramp[0, 0, 16, 14]).item()
    slope_out = (y[0, 0, 16, 17] - y[0, 0, 16, 14]).item()
    assert slope_out == pytest.approx(slope_in / 2, rel=1e-4)  # magnified: half the slope
    assert float(y[0, 0, 16, 15:17].mean()) == pytest.approx(
        float(ramp[0, 0, 16, 15:17].mean()), abs=1e-5
    )


def test_color_is_brightness_then_contrast_then_flip():
    pipe = make_pipe(0.5, luma_flip=True)
    x = images(n=2, size=8)
    params = forced(
        pipe,
        2,
        8,
        brightness=torch.tensor([0.1, -0.2]),
        contrast=torch.tensor([2.0, 0.5]),
        luma_flip=torch.tensor([1.0, -1.0]),
    )
    expected = (x + torch.tensor([0.1, -0.2]).view(2, 1, 1, 1)) * torch.tensor([2.0, -0.5]).view(
        2, 1, 1, 1
    )
    assert torch.allclose(pipe.apply(x, params), expected, atol=1e-6)


def test_filter_bands_sum_to_identity_and_gains_reshape_spectrum():
    pipe = make_pipe(0.5, preset="bgcfnc")
    assert torch.allclose(
        pipe.bands.sum(0),
        F.one_hot(torch.tensor(pipe.bands.shape[1] // 2), pipe.bands.shape[1]).float(),
        atol=1e-6,
    )
    x = images(n=1, size=32)
    ones = forced(pipe, 1, 32, on=("filter",), filter_gains=torch.ones(1, 4))
    assert torch.allclose(pipe.apply(x, ones), x, atol=1e-5)
    highs_off = dict(ones)
    highs_off["filter_gains"] = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    smooth = pipe.apply(x, highs_off)

    def roughness(t: torch.Tensor) -> float:
        return float((t[..., 1:] - t[..., :-1]).abs().mean())

    assert roughness(smooth) < 0.3 * roughness(x)


def test_filter_gains_preserve_expected_energy():
    pipe = make_pipe(1.0, preset="bgcfnc")
    gains = pipe.sample_params((512, 1, 16, 16), generator=seeded())["filter_gains"]
    power = torch.tensor([10, 1, 1, 1]) / 13
    assert torch.allclose((gains.square() * power).sum(1), torch.ones(512), atol=1e-5)


def test_cutout_zeroes_a_quarter_of_the_image():
    pipe = make_pipe(0.5, preset="bgcfnc")
    x = torch.ones(1, 1, 32, 32)
    params = forced(pipe, 1, 32, on=("cutout",), cutout_center=torch.tensor([[0.5, 0.5]]))
    y = pipe.apply(x, params)
    assert float((y == 0).float().mean()) == pytest.approx(0.25)
    assert float(y[0, 0, 16, 16]) == 0.0 and float(y[0, 0, 0, 0]) == 1.0


def test_filter_refuses_images_smaller_than_its_kernel():
    with pytest.raises(ValueError, match="filter"):
        make_pipe(1.0, preset="bgcfnc")(torch.zeros(2, 1, 8, 8))


def test_rotate90_refuses_non_square_images():
    with pytest.raises(ValueError, match="square"):
        make_pipe(1.0, rotate90=True)(torch.zeros(2, 1, 16, 24), seeded())


def test_apply_names_missing_params():
    with pytest.raises(KeyError, match="sample_params"):
        make_pipe(1.0).apply(images(n=2), {})


# ---- probabilities -------------------------------------------------------------------------


def test_each_op_runs_on_about_p_of_the_samples():
    pipe = make_pipe(0.5, preset="bgcfnc", xflip=True, rotate90=True, luma_flip=True)
    n = 4000
    params = pipe.sample_params((n, 1, 8, 8), generator=seeded())
    for op in ALL_OPS:
        share = params[f"mask_{op}"].float().mean().item()
        expected = 1 - 0.5**4 if op == "filter" else 0.5  # the filter draws p per band
        assert share == pytest.approx(expected, abs=0.04), op
    noise_hit = params["noise_std"] > 0
    assert torch.equal(noise_hit, params["mask_noise"])


def test_exactly_the_samples_with_no_op_drawn_come_back_unchanged():
    pipe = make_pipe(0.15, preset="bgcfnc")
    x = images(n=400, size=16)
    params = pipe.sample_params(x.shape, generator=seeded())
    any_op = torch.stack([params[f"mask_{op}"] for op in pipe.enabled_ops]).any(dim=0)
    changed = (pipe.apply(x, params) != x).flatten(1).any(dim=1)
    assert torch.equal(changed, any_op)
    assert 0.2 < any_op.float().mean().item() < 0.95  # both kinds are present


def test_rotation_stays_within_max_rotate_deg():
    pipe = make_pipe(1.0, max_rotate_deg=10.0)
    angles = pipe.sample_params((2000, 1, 8, 8), generator=seeded())["rotate"]
    assert float(angles.abs().max()) <= math.radians(10.0)
    assert float(angles.abs().max()) > math.radians(9.0)


# ---- vmap: apply with pre-drawn parameters, per sample --------------------------------------


def test_apply_under_vmap_matches_the_batched_call_including_r1_gradients():
    pipe = make_pipe(0.8, preset="bgcfnc")
    x = images(n=4, size=16)
    params = pipe.sample_params(x.shape, generator=seeded())

    def one(xi, pi):
        return pipe.apply(xi[None], {k: v[None] for k, v in pi.items()})[0]

    assert torch.allclose(torch.func.vmap(one)(x, params), pipe.apply(x, params), atol=1e-4)

    weight = torch.randn(1, 1, 3, 3, generator=seeded(2))

    def r1(w, xi, pi):
        grad_x = torch.func.grad(lambda t: F.conv2d(one(t, pi)[None], w).tanh().sum())(xi)
        return grad_x.square().sum()

    batched = torch.func.vmap(torch.func.grad(r1), in_dims=(None, 0, 0))(weight, x, params)
    loop = torch.stack(
        [torch.func.grad(r1)(weight, x[i], {k: v[i] for k, v in params.items()}) for i in range(4)]
    )
    assert torch.allclose(batched, loop, rtol=1e-4, atol=1e-4 * float(loop.abs().max()))


# ---- AdaptiveP -----------------------------------------------------------------------------


def test_adaptive_p_rises_when_d_is_overconfident():
    cfg = AugmentConfig(interval=4, adjust_kimg=0.5)
    pipe = AugmentPipe(cfg)
    ada = AdaptiveP(pipe, cfg, batch_size=16)
    step = 16 * 4 / 500
    for i in range(4):
        assert ada.maybe_update() is None, i
        ada.accumulate(torch.ones(16, 1))
    assert ada.maybe_update() == pytest.approx(1.0)
    assert float(pipe.p) == pytest.approx(step)
    assert ada.maybe_update() is None  # statistics reset after an update


def test_adaptive_p_falls_and_clamps_at_zero_and_one():
    cfg = AugmentConfig(interval=1, adjust_kimg=0.01, target=0.6)
    pipe = AugmentPipe(cfg)
    ada = AdaptiveP(pipe, cfg, batch_size=4)  # step 0.4
    ada.accumulate(-torch.ones(4))
    assert ada.maybe_update() == pytest.approx(-1.0)
    assert float(pipe.p) == 0.0
    pipe.p.fill_(0.5)
    ada.accumulate(torch.tensor([1.0, -1.0, -1.0, 1.0]))  # r_t = 0 < 0.6
    assert ada.maybe_update() == pytest.approx(0.0)
    assert float(pipe.p) == pytest.approx(0.1)
    for _ in range(5):
        ada.accumulate(torch.ones(4))
        ada.maybe_update()
    assert float(pipe.p) == 1.0


def test_fixed_p_never_changes_and_stores_nothing_from_d():
    cfg = AugmentConfig(fixed_p=0.2, interval=1)
    pipe = AugmentPipe(cfg)
    ada = AdaptiveP(pipe, cfg, batch_size=8)
    for _ in range(10):
        ada.accumulate(torch.ones(8))
        assert ada.maybe_update() is None
    assert float(pipe.p) == pytest.approx(0.2)
    assert ada.state_dict()["count"] == 0 and ada.state_dict()["sign_sum"] == 0.0


def test_adaptive_state_round_trips_mid_interval():
    cfg = AugmentConfig(interval=4, adjust_kimg=1.0)
    pipe = AugmentPipe(cfg)
    ada = AdaptiveP(pipe, cfg, batch_size=8)
    logits = [torch.ones(8), -torch.ones(8), torch.ones(8)]
    for t in logits:
        ada.accumulate(t)
    pipe.p.fill_(0.25)
    state = ada.state_dict()

    resumed_pipe = AugmentPipe(cfg)
    resumed = AdaptiveP(resumed_pipe, cfg, batch_size=8)
    resumed.load_state_dict(state)
    assert float(resumed_pipe.p) == pytest.approx(0.25)
    for a in (ada, resumed):
        a.accumulate(torch.tensor([1.0] * 6 + [-1.0] * 2))
    assert resumed.maybe_update() == pytest.approx(ada.maybe_update())
    assert float(resumed_pipe.p) == pytest.approx(float(pipe.p))


def test_fixed_p_wins_over_a_loaded_adaptive_state():
    adaptive_cfg = AugmentConfig(interval=4)
    adaptive = AdaptiveP(AugmentPipe(adaptive_cfg), adaptive_cfg, batch_size=8)
    adaptive.pipe.p.fill_(0.7)
    adaptive.accumulate(torch.ones(8))
    fixed_cfg = AugmentConfig(fixed_p=0.1)
    fixed = AdaptiveP(AugmentPipe(fixed_cfg), fixed_cfg, batch_size=8)
    fixed.load_state_dict(adaptive.state_dict())
    assert float(fixed.pipe.p) == pytest.approx(0.1)
    assert fixed.state_dict()["count"] == 0


def test_adaptive_p_error_paths():
    cfg = AugmentConfig()
    with pytest.raises(ValueError, match="batch_size"):
        AdaptiveP(AugmentPipe(cfg), cfg, batch_size=0)
    ada = AdaptiveP(AugmentPipe(cfg), cfg, batch_size=4)
    with pytest.raises(KeyError, match="state_dict"):
        ada.load_state_dict({"p": 0.1})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ada.load_state_dict({"p": 1.5, "sign_sum": 0.0, "count": 0, "calls": 0})


# ---- CUDA ----------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_a_cpu_generator():
    pipe = make_pipe(0.7, preset="bgcfnc", xflip=True, rotate90=True, luma_flip=True)
    x = images(n=8)
    y_cpu = pipe(x, seeded())
    pipe_cuda = pipe.cuda()
    x_cuda = x.cuda().requires_grad_(True)
    y_cuda = pipe_cuda(x_cuda, seeded())
    assert y_cuda.device.type == "cuda"
    assert torch.allclose(y_cuda.cpu(), y_cpu, atol=1e-4)
    weight = torch.randn(1, 1, 3, 3, device="cuda", requires_grad=True)
    (grad_x,) = torch.autograd.grad(F.conv2d(y_cuda, weight).sum(), x_cuda, create_graph=True)
    grad_x.square().sum().backward()
    assert bool(torch.isfinite(weight.grad).all())
    y_gen = pipe_cuda(x.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert y_gen.shape == x.shape
