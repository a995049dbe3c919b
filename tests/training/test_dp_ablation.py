"""The DP ablation arms: what each scheme does to a gradient, the paper scheme's ε, and that no
ablation run is ever taken for a private one."""

from __future__ import annotations

import copy
import json
import tomllib

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fedspine.cli.main import app
from fedspine.models import Discriminator, NetworkConfig
from fedspine.privacy.accounting import Mechanism, default_delta, epsilon
from fedspine.training import config as config_module
from fedspine.training import dp_ablation
from fedspine.training.dp import flatten_units
from fedspine.training.dp_ablation import (
    AblationDiscriminatorStep,
    AblationError,
    AblationOptions,
    noise_then_clip,
    paper_scheme_epsilon,
    paper_settings_epsilon,
    paper_train_config,
)
from fedspine.training.factory import PaperScheme, TrainerSpec, build_trainer
from tests.training import make_prepared, tiny_config

RES = 16
PRIOR = torch.tensor([0.5, 0.5])
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- the paper's hook: noise, then the whole-model clip ---------------------------------------


def _grad_norm(params) -> float:
    return float(torch.sqrt(sum(p.grad.square().sum() for p in params)))


def test_paper_hook_adds_noise_before_clipping_the_whole_model():
    gen = torch.Generator().manual_seed(0)
    big = nn.Linear(100, 100)  # 10,100 elements: noise alone has norm ~0.02 * sqrt(10100) = 2.0
    params = list(big.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    before_clip = float(noise_then_clip(params, 0.02, 1.5, gen))
    assert before_clip == pytest.approx(0.02 * np.sqrt(10100), rel=0.05), "noise is visible"
    assert _grad_norm(params) == pytest.approx(1.5, rel=1e-4), "and then clipped to 1.5"
    assert all((p.grad != 0).float().mean() > 0.99 for p in params)

    # A large true gradient: noise first, then the clip, so the result never exceeds 1.5
    # (noise added after clipping would give about sqrt(1.5² + 2²) = 2.5).
    for p in params:
        p.grad = torch.full_like(p, 1.0)
    noise_then_clip(params, 0.02, 1.5, gen)
    assert _grad_norm(params) <= 1.5 * (1 + 1e-5)

    # Small enough that the noise is not clipped: each element got N(0, 0.02²).
    small = nn.Linear(20, 20)
    for p in small.parameters():
        p.grad = torch.zeros_like(p)
    noise_then_clip(list(small.parameters()), 0.02, 1.5, gen)
    values = torch.cat([p.grad.flatten() for p in small.parameters()])
    assert float(values.std()) == pytest.approx(0.02, rel=0.15)


def test_paper_update_norm_is_at_most_the_clip():
    model = nn.Linear(50, 50)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = 1e3 * model(torch.ones(4, 50)).square().sum()
    opt.zero_grad()
    loss.backward()
    noise_then_clip(list(model.parameters()), 0.02, 1.5, torch.Generator().manual_seed(1))
    opt.step()
    moved = torch.sqrt(
        sum(
            (p.detach() - b).square().sum() for p, b in zip(model.parameters(), before, strict=True)
        )
    )
    assert 1.4 < float(moved) <= 1.5 * (1 + 1e-5)


def test_paper_trainer_hooks_every_step_of_g_and_d(monkeypatch):
    cfg = paper_train_config(tiny_config(resolution=RES))
    assert cfg.batch == 1 and cfg.network.mbstd_group == 1
    with pytest.raises(AblationError, match="batch 1"):
        build_trainer(TrainerSpec(PaperScheme()), tiny_config(resolution=RES), [0.5, 0.5])
    trainer = build_trainer(TrainerSpec(PaperScheme()), cfg, [0.5, 0.5], device="cpu")
    g_ids = {id(p) for p in trainer.G.parameters()}
    d_ids = {id(p) for p in trainer.D.parameters()}
    seen: list[str] = []
    real_hook = dp_ablation.noise_then_clip

    def spy(params, std, clip, generator=None):
        ids = {id(p) for p in params}
        seen.append("G" if ids == g_ids else "D" if ids == d_ids else "?")
        assert (std, clip) == (0.02, 1.5)
        return real_hook(params, std, clip, generator)

    monkeypatch.setattr(dp_ablation, "noise_then_clip", spy)
    image = torch.rand(1, 1, RES, RES) * 2 - 1
    label = torch.zeros(1, dtype=torch.int64)
    for _ in range(3):
        trainer.train_step(image, label)
    # tiny_config: lazy R1 and path length every 2 steps, each its own optimizer step.
    assert seen.count("G") == trainer.opt_steps["G"] == 3 + 2
    assert seen.count("D") == trainer.opt_steps["D"] == trainer.d_releases == 3 + 2
    assert "?" not in seen

    # The noise RNG is part of the state: a resumed run continues exactly.
    state = copy.deepcopy(trainer.state_dict())
    trainer.train_step(image, label)
    again = build_trainer(TrainerSpec(PaperScheme()), cfg, [0.5, 0.5], device="cpu")
    again.load_state_dict(state)
    again.train_step(image, label)
    for (name, a), b in zip(
        trainer.G.state_dict().items(), again.G.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


# ---- clip-only and noise-only: DP-SGD's step with one imposition removed ----------------------


def _tiny_d() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(
        NetworkConfig(
            resolution=RES,
            c_dim=2,
            channel_base=256,
            channel_max=32,
            z_dim=32,
            w_dim=32,
            mbstd_group=0,
        )
    )


def _step(scheme: str, clip: float, sigma: float = 0.0, expected: int = 4):
    D = _tiny_d()
    opt = torch.optim.SGD(D.parameters(), lr=1.0)
    options = AblationOptions(
        scheme,
        noise_multiplier=sigma or None,
        max_grad_norm=clip,
        expected_patients_per_step=expected,
    )
    gen = torch.Generator().manual_seed(3)

    def make_fakes(n, labels):
        return torch.rand(n, 1, RES, RES, generator=gen) * 2 - 1

    step = AblationDiscriminatorStep(
        D,
        opt,
        None,
        options.dp_config(num_patients=100),
        0.5,
        PRIOR,
        make_fakes,
        scheme=scheme,
        noise_multiplier=sigma,
        generator=torch.Generator().manual_seed(11),
        noise_generator=torch.Generator().manual_seed(5),
    )
    data = torch.Generator().manual_seed(2)
    sizes = [2, 1, 3]
    images = torch.rand(sum(sizes), 1, RES, RES, generator=data) * 2 - 1
    labels = torch.randint(0, 2, (sum(sizes),), generator=data)
    offsets = np.cumsum([0, *sizes])
    _, unit_index = flatten_units([np.arange(offsets[i], offsets[i + 1]) for i in range(3)])
    batch = step.prepare(images, labels, unit_index)
    rows = torch.cat([g.flatten(1) for g in step.per_unit_grads(batch).values()], dim=1)
    return step, D, batch, rows


def _update(step, D, batch) -> torch.Tensor:
    """The gradient the step hands D's optimizer (Opacus leaves it in p.grad), checked to be
    what moved the parameters (SGD, lr 1)."""
    before = torch.cat([p.detach().flatten().clone() for p in D.parameters()])
    step.step_batch(batch)
    grad = torch.cat([p.grad.flatten() for p in D.parameters()])
    moved = before - torch.cat([p.detach().flatten() for p in D.parameters()])
    ulp = torch.finfo(torch.float32).eps * float(before.abs().max())
    assert torch.allclose(moved, grad, rtol=1e-5, atol=4 * ulp)  # rounding of p - lr * grad
    return grad


def test_clip_only_clips_each_patient_and_adds_no_noise():
    step, D, batch, rows = _step("clip-only", clip=1.0)
    norms = rows.norm(dim=1)
    clip = float(norms.median()) / 2  # every patient's row is above it
    step.config.max_grad_norm = clip
    step.dp_optimizer.max_grad_norm = clip
    assert step.non_private and step.noise_std == 0.0 and step.dp_optimizer.noise_multiplier == 0
    expected = (rows * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0) / 4
    update = _update(step, D, batch)
    assert float((update - expected).norm()) <= 1e-5 * float(expected.norm())
    assert float(update.norm()) <= 3 * clip / 4 * (1 + 1e-5)
    assert float(rows.sum(0).norm() / 4) > 1.5 * float(update.norm()), "clipping did bite"
    assert step.steps_taken == 1


def test_noise_only_does_not_clip():
    # Clip scale 1e-3 and σ 1e-3: noise std 1e-6, so the update is the unclipped mean.
    step, D, batch, rows = _step("noise-only", clip=1e-3, sigma=1e-3)
    update = _update(step, D, batch)
    unclipped = rows.sum(0) / 4
    assert torch.allclose(update, unclipped, rtol=1e-3, atol=1e-5)
    assert float(update.norm()) > 100 * 3 * 1e-3 / 4, "far beyond what clipping at C allows"

    # With σ C = 1 the residual is DP-SGD's noise: N(0, (σC)²) / expected patients.
    step, D, batch, rows = _step("noise-only", clip=1.0, sigma=1.0)
    residual = _update(step, D, batch) - rows.sum(0) / 4
    assert float(residual.std()) == pytest.approx(1.0 / 4, rel=0.1)
    assert step.noise_std == 1.0


def test_ablation_options_refuse_what_a_scheme_does_not_take():
    with pytest.raises(AblationError, match="exactly one"):
        AblationOptions("noise-only")
    with pytest.raises(AblationError, match="adds no noise"):
        AblationOptions("clip-only", noise_multiplier=1.0)
    with pytest.raises(AblationError, match="takes no noise"):
        AblationOptions("paper", noise_for_epsilon=10.0)
    with pytest.raises(AblationError, match="--dp"):
        AblationOptions("dpsgd")


# ---- the paper scheme's ε ---------------------------------------------------------------------


def test_paper_scheme_epsilon_is_astronomical_at_the_papers_settings():
    acc = paper_settings_epsilon()
    steps = 8_000_000 + 8_000_000 // 16
    assert (acc.steps, acc.images, acc.unit) == (steps, 3773, "image")
    assert acc.noise_multiplier == pytest.approx(0.02 / 1.5)
    assert acc.sample_rate == pytest.approx(1 / 3773)
    direct = epsilon([Mechanism(0.02 / 1.5, 1 / 3773, steps)], default_delta(3773), acc.accountant)
    assert acc.epsilon == pytest.approx(direct, rel=1e-9)
    assert acc.epsilon > 1e6
    if acc.accountant != "prv":
        assert acc.fallback and "PRV" in acc.fallback
    # Even a few dozen steps on a small site are far from any meaningful ε.
    assert paper_scheme_epsilon(40, 48).epsilon > 1e3


# ---- the command line: every ablation run is marked not private -------------------------------


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(
        config_module.PRESETS,
        "cpu",
        lambda res, nc: tiny_config(resolution=res or RES, num_classes=nc),
    )
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)


@pytest.mark.parametrize(
    ("scheme", "extra"),
    [
        ("clip-only", ["--patients-per-step", "4"]),
        ("noise-only", ["--noise-for-epsilon", "10", "--patients-per-step", "4"]),
        ("paper", []),
    ],
)
def test_every_ablation_run_is_marked_not_private(
    tmp_path, tiny_preset, scheme, extra, privacy_home
):
    from fedspine.reporting.privacy import write_privacy_report as write_report
    from fedspine.training.generate import load_generator

    prepared = make_prepared(tmp_path / "prep", resolution=RES)
    run = tmp_path / "run"
    kimg = "0.008"
    args = ["train", str(prepared), "--out", str(run), "--preset", "cpu", "--kimg", kimg]
    result = runner.invoke(app, [*args, "--device", "cpu", "--dp-scheme", scheme, *extra])
    assert result.exit_code == 0, result.output
    assert "NOT PRIVATE" in result.output

    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["private"] is False and privacy["sites"] == {}
    assert any(scheme in reason for reason in privacy["not_private_reasons"])
    summary = json.loads((run / "ablation.json").read_text())
    assert summary["scheme"] == scheme and summary["private"] is False and summary["complete"]
    assert not (privacy_home / "ledger.json").exists(), "no ledger is written"
    assert tomllib.loads((run / "config.toml").read_text())["dp_scheme"] == scheme
    _, meta = load_generator(run / "generator.pt", device="cpu")
    assert meta["training"]["dp_scheme"] == scheme
    assert "NOT PRIVATE" in write_report(run, "md").read_text()

    if scheme == "paper":
        assert summary["epsilon"] > 1e3 and summary["accounting"]["unit"] == "image"
        assert summary["mechanism"]["d_optimizer_steps"] >= 8  # 8 images at batch 1, + R1 steps
    else:
        assert summary["epsilon"] is None and "∞" in summary["epsilon_text"]
        assert summary["mechanism"]["d_steps"] == 1  # 8 images at the tiny batch of 8
    if scheme == "noise-only":
        assert summary["mechanism"]["noise_multiplier"] > 0
        assert summary["noise_calibration"]["noise_for_epsilon"] == 10.0

    # Resuming needs the same scheme; asking for real DP on it is refused.
    refused = runner.invoke(
        app, ["train", str(prepared), "--out", str(run), "--resume", "--dp", "--epsilon", "5"]
    )
    assert refused.exit_code != 0 and f"--dp-scheme {scheme}" in refused.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dp", "--epsilon", "3", "--dp-scheme", "paper"], "drop --dp"),
        (["--dp-scheme", "clip-only", "--epsilon", "3"], "no ε budget"),
        (["--dp-scheme", "clip-only", "--privacy-home", "h"], "no ε budget"),
        (["--dp-scheme", "paper", "--clip", "2"], "the paper's"),
        (["--dp-scheme", "paper", "--batch", "4"], "batch 1"),
        (["--dp-scheme", "noise-only"], "exactly one of --noise-multiplier"),
        (["--dp-scheme", "clip-only", "--noise-multiplier", "1"], "not with --dp-scheme"),
        (["--dp-scheme", "wild"], "choose one of"),
        (["--clip", "2"], "need --dp"),
        (["--dp", "--epsilon", "3", "--noise-for-epsilon", "3"], "noise-only"),
    ],
)
def test_flag_combinations_that_would_mislead_are_refused(tmp_path, args, needle):
    result = runner.invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code != 0
    assert needle in result.output, result.output
    assert not (tmp_path / "r").exists()
