"""The DP discriminator step: per-patient isolation, exact per-unit gradients, clipping, noise,
step counting, fake labels and patient-level Poisson sampling."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedspine.models import Discriminator, NetworkConfig
from fedspine.models.augment import AugmentConfig, AugmentPipe
from fedspine.privacy.accounting import epsilon
from fedspine.privacy.engine import PrivacyCapExceeded, PrivacyEngine
from fedspine.training.dp import (
    DPConfig,
    DPDiscriminatorStep,
    PatientPoissonSampler,
    flatten_units,
    isolation_violations,
    make_dp_optimizer,
    mechanism,
    plan_noise,
    privatised_step,
)

RES = 16
PRIOR = torch.tensor([0.2, 0.8])


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_d(mbstd_group: int = 0, seed: int = 0) -> Discriminator:
    torch.manual_seed(seed)
    cfg = NetworkConfig(
        resolution=RES,
        c_dim=2,
        channel_base=256,
        channel_max=32,
        z_dim=32,
        w_dim=32,
        mbstd_group=mbstd_group,
    )
    return Discriminator(cfg)


def fake_source(seed: int = 7):
    gen = torch.Generator().manual_seed(seed)

    def make_fakes(n: int, labels: torch.Tensor) -> torch.Tensor:
        assert labels.shape == (n,)
        return torch.rand(n, 1, RES, RES, generator=gen) * 2 - 1

    return make_fakes


def build_step(
    D: Discriminator | None = None,
    *,
    ada_p: float = 0.0,
    sigma: float = 1.0,
    clip: float = 1.0,
    expected: int = 4,
    chunk: int = 16,
    r1_gamma: float = 0.5,
    optimizer: torch.optim.Optimizer | None = None,
    **config,
) -> DPDiscriminatorStep:
    D = D if D is not None else tiny_d()
    pipe = AugmentPipe(AugmentConfig(preset="bgc", fixed_p=ada_p)) if ada_p > 0 else None
    if pipe is not None:
        pipe.p.fill_(ada_p)
    opt = optimizer or torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.99))
    dp = DPConfig(
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_patients_per_step=expected,
        chunk_size=chunk,
        ada_p=ada_p,
        **config,
    )
    return DPDiscriminatorStep(
        D,
        opt,
        pipe,
        dp,
        r1_gamma=r1_gamma,
        label_prior=PRIOR,
        make_fakes=fake_source(),
        generator=torch.Generator().manual_seed(11),
    )


def unit_batch(sizes: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    images = torch.rand(n, 1, RES, RES, generator=gen) * 2 - 1
    labels = torch.randint(0, 2, (n,), generator=gen)
    offsets = np.cumsum([0, *sizes])
    units = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(sizes))]
    _, unit_index = flatten_units(units)
    return images, labels, unit_index


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


# ---- per-unit isolation ----------------------------------------------------------------------


def test_per_unit_rows_are_isolated_between_patients():
    step = build_step(ada_p=0.5)
    images, labels, unit_index = unit_batch([2, 1, 3, 2])
    batch = step.prepare(images, labels, unit_index)

    def rows(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return step.per_unit_grads(dataclasses.replace(batch, real=x))

    for perturb in (0, 2, 4, 7):
        assert isolation_violations(rows, images, unit_index, perturb) == []
    # The check is not vacuous: the perturbed patient's own row does move.
    before = flat(rows(images))
    changed = images.clone()
    changed[4] = -changed[4]
    after = flat(rows(changed))
    moved = (after - before).norm(dim=1) > 1e-4 * before.norm(dim=1).max()
    assert moved.tolist() == [False, False, True, False]


def batch_forward_rows(D: Discriminator, labels: torch.Tensor, unit_index: np.ndarray):
    """Per-unit gradients the way a batch-forward engine (Opacus hooks) sees them: one forward
    over the whole batch, then the gradient of each unit's own loss terms."""
    params = {name: p.detach() for name, p in D.named_parameters()}
    index = torch.as_tensor(unit_index)
    weights = F.one_hot(index, int(index.max()) + 1).T.float()
    c = F.one_hot(labels, 2).float()

    def fn(x: torch.Tensor) -> dict[str, torch.Tensor]:
        def weighted(p, w):
            logits = torch.func.functional_call(D, p, (x, c))[:, 0]
            return (w * F.softplus(-logits)).sum()

        return torch.func.vmap(torch.func.grad(weighted), in_dims=(None, 0))(params, weights)

    return fn


def test_isolation_check_catches_minibatch_std():
    images, labels, unit_index = unit_batch([2, 1, 3, 2])
    with torch.no_grad():  # build the layers' cached constants outside torch.func
        tiny_d()(images[:1], F.one_hot(labels[:1], 2).float())
    clean = batch_forward_rows(tiny_d(mbstd_group=0), labels, unit_index)
    assert isolation_violations(clean, images, unit_index, perturb=0) == []
    mixing = batch_forward_rows(tiny_d(mbstd_group=4), labels, unit_index)
    violations = isolation_violations(mixing, images, unit_index, perturb=0)
    # Image 0 (unit 0) shares a minibatch-std group with images 1-3, i.e. units 0, 1 and 2.
    assert violations == [1, 2]


def test_refuses_mixing_discriminator_and_adaptive_augmentation():
    with pytest.raises(ValueError, match="mixes samples"):
        build_step(tiny_d(mbstd_group=4))
    D = tiny_d()
    opt = torch.optim.Adam(D.parameters())
    adaptive = AugmentPipe(AugmentConfig(preset="bgc"))  # fixed_p None: adaptive
    with pytest.raises(ValueError, match="adaptive"):
        DPDiscriminatorStep(
            D, opt, adaptive, DPConfig(noise_multiplier=1.0), 0.1, PRIOR, fake_source()
        )
    fixed = AugmentPipe(AugmentConfig(preset="bgc", fixed_p=0.3))
    fixed.p.fill_(0.3)
    with pytest.raises(ValueError, match="ada_p"):
        DPDiscriminatorStep(
            D, opt, fixed, DPConfig(noise_multiplier=1.0, ada_p=0.2), 0.1, PRIOR, fake_source()
        )
    with pytest.raises(ValueError, match="plan_noise"):
        DPDiscriminatorStep(D, opt, None, DPConfig(target_epsilon=5.0), 0.1, PRIOR, fake_source())
    other = torch.optim.Adam(tiny_d(seed=1).parameters())
    with pytest.raises(ValueError, match="exactly the discriminator"):
        DPDiscriminatorStep(
            D, other, None, DPConfig(noise_multiplier=1.0), 0.1, PRIOR, fake_source()
        )


def test_adaptive_p_moving_during_training_is_caught():
    step = build_step(ada_p=0.5)
    images, labels, unit_index = unit_batch([1, 2])
    step.augment_pipe.p.fill_(0.6)
    with pytest.raises(RuntimeError, match="moved"):
        step.step(images, labels, unit_index)


# ---- exact per-unit gradients ---------------------------------------------------------------


def naive_unit_grads(step: DPDiscriminatorStep, batch, r1_weight: float) -> torch.Tensor:
    """One unit at a time with plain autograd (create_graph for R1)."""
    D, pipe = step.D, step.augment_pipe
    rows = []
    for u in range(batch.num_units):
        sel = torch.nonzero(batch.unit_index == u).flatten()
        x = batch.real[sel].clone().requires_grad_(True)
        x_aug = pipe.apply(x, {k: v[sel] for k, v in batch.aug_real.items()}) if pipe else x
        real_logits = D(x_aug, batch.real_c[sel])[:, 0]
        (grad_x,) = torch.autograd.grad(real_logits.sum(), x, create_graph=True)
        fake = batch.fake[sel]
        fake = pipe.apply(fake, {k: v[sel] for k, v in batch.aug_fake.items()}) if pipe else fake
        fake_logits = D(fake, batch.fake_c[sel])[:, 0]
        loss = (
            F.softplus(-real_logits).sum()
            + F.softplus(fake_logits).sum()
            + r1_weight * grad_x.square().sum()
        )
        grads = torch.autograd.grad(loss, list(D.parameters()))
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("ada_p", [0.0, 0.5])
def test_vmap_per_unit_grads_equal_naive_loop_with_r1(ada_p):
    step = build_step(ada_p=ada_p, chunk=2, r1_gamma=0.5)
    images, labels, unit_index = unit_batch([1, 3, 2, 1, 3, 2], seed=3)
    batch = step.prepare(images, labels, unit_index)
    got = flat(step.per_unit_grads(batch))
    want = naive_unit_grads(step, batch, r1_weight=0.25)
    assert got.shape == want.shape == (6, sum(p.numel() for p in step.D.parameters()))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    # R1 really is inside: the rows differ from those without it.
    without = naive_unit_grads(step, batch, r1_weight=0.0)
    assert (want - without).abs().max() > 1e-3


def test_lazy_r1_weight_follows_interval():
    step = build_step(r1_gamma=0.4, r1_every_step=False, r1_interval=4)
    weights = []
    for _ in range(5):
        weights.append(step.r1_weight())
        step.steps_taken += 1
    assert weights == pytest.approx([0.8, 0.0, 0.0, 0.0, 0.8])
    assert build_step(r1_gamma=0.4).r1_weight() == pytest.approx(0.2)


# ---- clipping and noise ---------------------------------------------------------------------


def test_clipping_bounds_each_unit_contribution_without_noise():
    D = tiny_d()
    clip, expected = 0.05, 4
    step = build_step(
        D, clip=clip, expected=expected, optimizer=torch.optim.SGD(D.parameters(), lr=0.0)
    )
    step.dp_optimizer.noise_multiplier = 0.0  # σ = 0 only to isolate clipping in this test
    images, labels, unit_index = unit_batch([2, 1, 3])
    batch = step.prepare(images, labels, unit_index)
    rows = flat(step.per_unit_grads(batch))
    norms = rows.norm(dim=1)
    assert (norms > clip).all()  # every unit is clipped in this setting
    step.step_batch(batch)
    summed = torch.cat([p.grad.flatten() for p in D.parameters()]) * expected
    manual = (rows * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0)
    assert torch.allclose(summed, manual, atol=1e-6)
    for u in range(3):  # each unit alone contributes exactly C (its raw norm is above C)
        sel = torch.from_numpy(unit_index == u)
        alone = step.prepare(images[sel], labels[sel], np.zeros(int(sel.sum()), np.int64))
        assert flat(step.per_unit_grads(alone)).norm() > clip
        step.step_batch(alone)
        contribution = torch.cat([p.grad.flatten() for p in D.parameters()]) * expected
        assert clip * 0.999 <= contribution.norm() <= clip * (1 + 1e-5)


def test_noise_std_is_sigma_times_clip_norm():
    D = tiny_d()
    sigma, clip, expected = 2.0, 0.5, 8
    step = build_step(D, sigma=sigma, clip=clip, expected=expected)
    empty = unit_batch([])
    draws = []
    for _ in range(3):  # empty Poisson draws: the update is pure noise
        metrics = step.step(*empty)
        draws.append(torch.cat([p.grad.flatten() for p in D.parameters()]) * expected)
    noise = torch.stack(draws)
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.02)
    assert abs(noise.mean().item()) < 0.02 * sigma * clip
    assert not torch.allclose(noise[0], noise[1])  # fresh noise every step
    assert metrics["dp_noise_std"] == pytest.approx(sigma * clip / expected)
    assert metrics["dp_noisy_grad_norm"].item() == pytest.approx(
        (noise[-1] / expected).norm().item(), rel=1e-5
    )


# ---- counting steps -------------------------------------------------------------------------


def test_accountant_steps_equal_optimizer_steps_including_empty_draws(tmp_path):
    from opacus.accountants import RDPAccountant

    patients = np.repeat(np.arange(12), [1, 2, 3] * 4)
    sampler = PatientPoissonSampler(patients, 0.15, np.random.default_rng(0))
    images = torch.rand(len(patients), 1, RES, RES) * 2 - 1
    labels = torch.randint(0, 2, (len(patients),))
    step = build_step(sigma=1.3, r1_gamma=0.0)
    accountant = RDPAccountant()
    step.dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sampler.sample_rate))
    optimizer_steps = 0
    original = step.dp_optimizer.original_optimizer.step

    def counting_step(*args, **kwargs):
        nonlocal optimizer_steps
        optimizer_steps += 1
        return original(*args, **kwargs)

    step.dp_optimizer.original_optimizer.step = counting_step
    engine = PrivacyEngine(patients.astype(str), unit="patient", home=tmp_path / "home")
    plan = engine.plan(
        steps=8, sample_rate=sampler.sample_rate, noise_multiplier=1.3, clip_norm=1.0, label="d"
    )
    step.reservation = engine.reserve(plan, block=3)
    k, empties, ahead = 8, 0, []
    for i in range(k):
        units = [] if i == 3 else sampler()
        empties += not units
        index, unit_index = flatten_units(units)
        step.step(images[index], labels[index], unit_index)
        # Written ahead: the ledger never holds fewer steps than have run.
        ahead.append(engine.histories()[0][0].steps - step.steps_taken)
    assert empties >= 1 and min(ahead) >= 0
    assert step.steps_taken == k == optimizer_steps
    assert accountant.history == [(1.3, sampler.sample_rate, k)]
    step.reservation.settle()
    assert engine.histories() == [[plan.mechanism(k)]]
    with pytest.raises(PrivacyCapExceeded, match="only 8 were planned"):
        step.reservation.settled = False
        step.reservation.take(1)


# ---- fake labels ------------------------------------------------------------------------------


def test_fake_labels_follow_public_prior_not_real_labels():
    step_a, step_b = build_step(), build_step()
    n = 2000
    unit_index = np.arange(n)
    images = torch.zeros(n, 1, RES, RES)
    zeros, ones = torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64)
    a = step_a.prepare(images, zeros, unit_index)
    b = step_b.prepare(images, ones, unit_index)
    # Same generator seed, opposite real labels: the fake labels do not change at all.
    assert torch.equal(a.fake_labels, b.fake_labels)
    share = a.fake_labels.float().mean().item()
    assert abs(share - 0.8) < 4 * math.sqrt(0.8 * 0.2 / n)
    assert torch.equal(a.fake_c.argmax(1), a.fake_labels)
    assert a.fake.shape == a.real.shape  # one paired fake per real image


# ---- metrics ----------------------------------------------------------------------------------


def test_metrics_hold_no_real_data_statistics_unless_debug_leaks():
    images, labels, unit_index = unit_batch([2, 1])
    private = build_step()
    metrics = private.step(images, labels, unit_index)
    assert set(metrics) == {"dp_steps", "dp_noisy_grad_norm", "dp_noise_std"}
    assert not private.non_private
    D = tiny_d()
    leaky = DPDiscriminatorStep(
        D,
        torch.optim.Adam(D.parameters()),
        None,
        DPConfig(noise_multiplier=1.0),
        0.1,
        PRIOR,
        fake_source(),
        debug_leaks=True,
    )
    metrics = leaky.step(images, labels, unit_index)
    assert leaky.non_private
    assert {"d_real", "d_fake", "loss_d", "r1_penalty"} <= set(metrics)
    assert metrics["debug_images"] == 3 and metrics["debug_units"] == 2


def test_uint8_images_are_scaled_to_minus_one_one():
    step = build_step()
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, RES, RES)
    batch = step.prepare(images, torch.tensor([0, 1]), np.array([0, 1]))
    assert batch.real[0].unique().tolist() == [-1.0]
    assert batch.real[1].unique().tolist() == [1.0]


def test_state_dict_round_trip_resumes_the_draws():
    step = build_step(ada_p=0.5)
    images, labels, unit_index = unit_batch([1, 2])
    step.step(images, labels, unit_index)
    state = step.state_dict()
    first = step.prepare(images, labels, unit_index)
    other = build_step(ada_p=0.5)
    other.load_state_dict(state)
    second = other.prepare(images, labels, unit_index)
    assert other.steps_taken == 1
    assert torch.equal(first.fake_labels, second.fake_labels)
    assert all(torch.equal(first.aug_real[k], second.aug_real[k]) for k in first.aug_real)


# ---- sampling and planning ------------------------------------------------------------------


def test_patient_poisson_sampler_keeps_patients_whole_and_hits_rate():
    patients = np.array(["p3", "p1", "p3", "p2", "p1", "p3", "p4"])
    sampler = PatientPoissonSampler(patients, 0.3, np.random.default_rng(1))
    assert sampler.num_patients == 4
    draws = 3000
    counts = np.zeros(4)
    sizes = []
    for _ in range(draws):
        units = sampler()
        sizes.append(len(units))
        for unit in units:
            ids = set(patients[unit])
            assert len(ids) == 1  # one patient per unit ...
            (pid,) = ids
            assert sorted(unit) == sorted(np.flatnonzero(patients == pid))  # ... all images
            counts[int(pid[1]) - 1] += 1
    assert np.all(np.abs(counts / draws - 0.3) < 4 * math.sqrt(0.3 * 0.7 / draws))
    assert 0 in sizes  # empty draws happen and are returned as []
    capped = PatientPoissonSampler(
        patients, 1.0, np.random.default_rng(2), max_images_per_patient=2
    )
    assert max(len(u) for u in capped()) == 2
    with pytest.raises(ValueError, match="sample_rate"):
        PatientPoissonSampler(patients, 0.0, np.random.default_rng(0))
    rate = PatientPoissonSampler.for_expected(patients, 2, np.random.default_rng(0)).sample_rate
    assert rate == pytest.approx(0.5)


def test_plan_noise_calibrates_sigma_for_target_epsilon():
    dp = DPConfig(target_epsilon=4.0, expected_patients_per_step=32, accountant="rdp")
    sigma, q, delta = plan_noise(dp, num_patients=1000, planned_d_steps=500)
    assert q == pytest.approx(0.032)
    assert delta == pytest.approx(1e-5)
    spent = epsilon([mechanism(sigma, q, 500)], delta, "rdp")
    assert spent <= 4.0
    assert spent > 4.0 * 0.99  # the smallest σ that fits, not a loose one
    assert plan_noise(DPConfig(noise_multiplier=0.9), 100, 10) == (0.9, 0.64, 1e-5)
    assert plan_noise(DPConfig(noise_multiplier=0.9), 20000, 10)[2] == pytest.approx(5e-6)
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig(target_epsilon=1.0, noise_multiplier=1.0)


# ---- non-finite rows ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_row_is_zeroed_before_clipping(bad: float) -> None:
    """A server-crafted D that overflows on one patient must not poison (and so reveal) the
    step: the update equals the update without that row, with the same noise."""

    def update(rows: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        weight = torch.nn.Parameter(torch.zeros(3, 2))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        noise = torch.Generator().manual_seed(7)
        dp = make_dp_optimizer(
            optimizer, noise_multiplier=0.5, max_grad_norm=1.0, expected_batch_size=4,
            generator=noise,
        )  # fmt: skip
        bad_rows = privatised_step(dp, [[r] for r in rows])
        return weight.detach().clone(), bad_rows

    gen = torch.Generator().manual_seed(0)
    clean = [torch.randn(2, 3, 2, generator=gen), torch.randn(3, 3, 2, generator=gen)]
    poisoned_chunk = torch.cat([clean[1][:1], torch.full((1, 3, 2), 0.0), clean[1][1:]])
    poisoned_chunk[1, 2, 1] = bad
    without_row = [clean[0], clean[1]]
    with_row = [clean[0], poisoned_chunk]
    expected, none_bad = update(without_row)
    got, count = update(with_row)
    assert none_bad == 0 and count == 1
    assert torch.isfinite(got).all()
    assert torch.equal(got, expected)


def test_the_dp_step_counts_non_finite_rows_for_the_site_only() -> None:
    step = build_step(r1_gamma=0.0)
    images = torch.rand(4, 1, RES, RES) * 2 - 1
    images[2] = float("inf")
    metrics = step.step(images, torch.tensor([0, 1, 0, 1]), np.array([0, 1, 2, 3]))
    assert step.non_finite_rows == 1
    assert all(torch.isfinite(p).all() for p in step.D.parameters())
    assert not any("finite" in key for key in metrics)
