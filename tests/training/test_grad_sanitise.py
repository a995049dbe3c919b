"""NaN/inf gradients are replaced before every optimizer step and counted in the tick metrics;
under DP a non-finite per-patient row is zeroed before clipping and the accounting is unchanged."""

from __future__ import annotations

import numpy as np
import torch

from fedspine.training.batches import BatchSampler
from fedspine.training.config import preset_config
from fedspine.training.dp import DPConfig
from fedspine.training.dp_trainer import dp_train_config
from fedspine.training.factory import DPSGD, TrainerSpec, build_trainer
from fedspine.training.gan_trainer import NONFINITE_CLAMP, GanTrainer, sanitise_gradients_
from tests.training import tiny_config
from tests.training.test_trainer import _data


def test_sanitising_replaces_non_finite_values_and_leaves_finite_ones_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2, 2))
    clean_a, clean_b = torch.randn(5, generator=gen), torch.randn(2, 2, generator=gen)
    a.grad, b.grad = clean_a.clone(), clean_b.clone()
    assert not bool(sanitise_gradients_([a, b]))
    assert torch.equal(a.grad, clean_a) and torch.equal(b.grad, clean_b)
    a.grad[1], a.grad[2], b.grad[0, 0] = float("nan"), float("inf"), -float("inf")
    assert bool(sanitise_gradients_([a, b, torch.nn.Parameter(torch.zeros(1))]))
    assert a.grad[1] == 0 and a.grad[2] == NONFINITE_CLAMP and b.grad[0, 0] == -NONFINITE_CLAMP
    assert torch.equal(a.grad[[0, 3, 4]], clean_a[[0, 3, 4]])
    assert not bool(sanitise_gradients_([]))


def test_an_injected_nan_gradient_is_replaced_before_the_step_and_counted():
    data = _data()
    trainer = GanTrainer(tiny_config(), data.label_prior())
    # Every D backward (the D step and its lazy R1 step) gets a NaN in one gradient.
    weight = trainer.D.epilogue.fc.weight
    handle = weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    batches = BatchSampler(data, 8, trainer.np_rng)
    ticks: list[dict] = []
    trainer.run(0.008, batches, on_tick=lambda t, r: ticks.append(r), tick_kimg=0.008)
    assert trainer.d_steps == 1  # a D step and the lazy R1 step (d_steps 0): 2 optimizer steps
    assert ticks[-1]["nonfinite_grads"] == 2
    for net in (trainer.G, trainer.D):
        assert all(torch.isfinite(p).all() for p in net.parameters())
    handle.remove()
    trainer.run(0.008, batches, on_tick=lambda t, r: ticks.append(r), tick_kimg=0.008)
    assert ticks[-1]["nonfinite_grads"] == 0  # counted per tick


def test_sanitising_does_not_change_a_float32_run():
    """A run whose gradients are finite is bit-identical with and without the step hook."""
    data = _data()
    runs = []
    for hooked in (True, False):
        trainer = GanTrainer(tiny_config(), data.label_prior())
        if not hooked:
            for opt in (trainer.opt_G, trainer.opt_D):
                opt._optimizer_step_pre_hooks.clear()
        batches = BatchSampler(data, 8, trainer.np_rng)
        for _ in range(3):
            trainer.train_step(*next(batches))
        runs.append(
            [p.detach().clone() for p in (*trainer.G.parameters(), *trainer.D.parameters())]
        )
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def _dp_trainer():
    dp = DPConfig(noise_multiplier=1.0, expected_patients_per_step=4, ada_p=0.2)
    config = preset_config("cpu", 16, 2)
    config.batch, config.device = 8, "cpu"
    config = dp_train_config(config, dp)
    patients = np.repeat(np.arange(12), 2).astype(str)
    spec = TrainerSpec(DPSGD(dp, 1.0, 4 / 12, patients))
    return build_trainer(spec, config, [0.5, 0.5])


def test_a_dp_step_with_a_nan_row_stays_finite_and_its_accounting_is_unchanged():
    """The sound place under DP is the per-patient row, before clipping: a non-finite row is
    zeroed (refused), so the clipped sum's sensitivity stays C and noise is added as always. The
    step counts once in the accountant, like a clean step; the row count stays at the site."""
    clean, poisoned = _dp_trainer(), _dp_trainer()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1
    labels, units = torch.tensor([0, 1, 0, 1]), np.array([0, 1, 2, 3])
    bad = images.clone()
    bad[2] = float("nan")
    clean.dp_step.step(images, labels, units)
    poisoned.dp_step.step(bad, labels, units)
    assert clean.dp_step.non_finite_rows == 0 and poisoned.dp_step.non_finite_rows == 1
    assert all(torch.isfinite(p).all() for p in poisoned.D.parameters())
    assert poisoned.dp_step.steps_taken == clean.dp_step.steps_taken == 1
    assert poisoned.mechanism() == clean.mechanism()
    # The privatised gradient D stepped on was finite: the trainer's own counter saw nothing.
    assert int(poisoned._nonfinite_steps) == 0
