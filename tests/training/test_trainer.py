import numpy as np
import pytest
import torch

from fedspine.models.augment import AugmentConfig
from fedspine.training.batches import BatchSampler, TrainingData, empirical_prior, resize_uint8
from fedspine.training.checkpoint import load_checkpoint, save_checkpoint
from fedspine.training.gan_trainer import GanTrainer, ema_beta, lazy_adam
from tests.training import shape_images, tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(n: int = 32, res: int = 16, seed: int = 0) -> TrainingData:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = torch.from_numpy(shape_images(labels, res, rng))[:, None]
    return TrainingData(images=images, labels=torch.from_numpy(labels), class_names=["a", "b"])


def _real_batch(trainer: GanTrainer, data: TrainingData):
    return next(BatchSampler(data, trainer.config.batch, trainer.np_rng))


def test_train_step_changes_networks_and_counters():
    trainer = GanTrainer(tiny_config(), [0.5, 0.5])
    before = {
        name: {k: v.detach().clone() for k, v in net.state_dict().items()}
        for name, net in (("G", trainer.G), ("D", trainer.D), ("G_ema", trainer.G_ema))
    }
    images, labels = _real_batch(trainer, _data())
    m = trainer.train_step(images, labels)
    for name, net in (("G", trainer.G), ("D", trainer.D), ("G_ema", trainer.G_ema)):
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[name][k])]
        assert changed, f"{name} did not change"
    # First step: ema beta is 0, so G_ema equals G exactly.
    for (k, p), q in zip(trainer.G.named_parameters(), trainer.G_ema.parameters(), strict=True):
        assert torch.equal(p, q), k
    assert trainer.cur_nimg == 8 and trainer.g_steps == 1 and trainer.d_steps == 1
    # Lazy regularisers run on step 0 of their interval.
    assert m.loss_r1 is not None and m.loss_pl is not None
    assert float(trainer.pl_mean) > 0
    values = m.as_floats()
    assert all(np.isfinite(v) for v in values.values() if v is not None)

    trainer.train_step(images, labels)
    m3 = trainer.train_step(images, labels)
    assert trainer.cur_nimg == 24 and trainer.d_steps == 3
    assert m3.loss_r1 is not None  # d_steps 2 % 2 == 0
    assert trainer.train_step(images, labels).loss_r1 is None


def test_optimizers_use_the_lazy_regularisation_correction():
    cfg = tiny_config(r1_interval=16, pl_interval=4)
    trainer = GanTrainer(cfg, [0.5, 0.5])
    lr_d, betas_d = lazy_adam(cfg.d_lr, cfg.d_betas, 16)
    lr_g, betas_g = lazy_adam(cfg.g_lr, cfg.g_betas, 4)
    assert trainer.opt_D.param_groups[0]["lr"] == pytest.approx(lr_d)
    assert trainer.opt_D.param_groups[0]["betas"] == pytest.approx(betas_d)
    assert trainer.opt_G.param_groups[0]["lr"] == pytest.approx(lr_g)
    assert trainer.opt_G.param_groups[0]["betas"] == pytest.approx(betas_g)


def test_update_ema_lerps_parameters_and_copies_buffers():
    trainer = GanTrainer(tiny_config(), [0.5, 0.5])
    trainer.cur_nimg = 1000
    with torch.no_grad():
        for p in trainer.G.parameters():
            p.add_(1.0)
        trainer.G.mapping.w_avg.fill_(0.25)
    g = {k: v.clone() for k, v in trainer.G.named_parameters()}
    e = {k: v.clone() for k, v in trainer.G_ema.named_parameters()}
    beta = trainer.update_ema(8)
    assert beta == pytest.approx(ema_beta(8, 1000, trainer.config.ema_kimg, 0.05))
    assert 0 < beta < 1
    for k, p in trainer.G_ema.named_parameters():
        assert torch.allclose(p, g[k] + (e[k] - g[k]) * beta, atol=1e-6), k
    assert torch.equal(
        trainer.G_ema.mapping.w_avg, torch.full_like(trainer.G_ema.mapping.w_avg, 0.25)
    )


class _SpyPipe(torch.nn.Module):
    def __init__(self, pipe):
        super().__init__()
        self.pipe = pipe
        self.calls = []

    @property
    def p(self):
        return self.pipe.p

    def forward(self, images):
        out = self.pipe(images)
        self.calls.append((images, out))
        return out


def test_discriminator_sees_only_augmented_images():
    cfg = tiny_config(augment=AugmentConfig(preset="bgc", fixed_p=1.0))
    trainer = GanTrainer(cfg, [0.5, 0.5])
    assert trainer.ada is None  # fixed p: no controller reads D(real)
    spy = _SpyPipe(trainer.augment_pipe)
    trainer.augment_pipe = spy
    seen = []
    trainer.D.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images, labels = _real_batch(trainer, _data())
    trainer.train_step(images, labels)
    # G main (fake), D main (fake, real), R1 (real).
    assert len(seen) == 4 and len(spy.calls) == 4
    outputs = [out for _, out in spy.calls]
    for x in seen:
        assert any(x is out for out in outputs), "D got an image that did not pass the pipe"
    for inp, out in spy.calls:
        assert not torch.allclose(inp, out), "p = 1 should change every image"
    assert trainer.ada_p == 1.0


def test_adaptive_p_moves_and_is_reported():
    trainer = GanTrainer(tiny_config(), [0.5, 0.5])  # target -1: p can only rise
    data = _data()
    rts = []
    for _ in range(4):
        m = trainer.train_step(*_real_batch(trainer, data))
        rts.append(m.ada_rt)
    assert rts[0] is None and rts[1] is not None  # interval 2
    assert trainer.ada_p > 0
    assert trainer.ada.state_dict()["p"] == pytest.approx(trainer.ada_p)


def test_fake_labels_come_from_the_prior_not_the_real_batch():
    prior = np.array([0.7, 0.2, 0.1])
    trainer = GanTrainer(tiny_config(num_classes=3), prior)
    _, c = trainer.sample_latents(30_000)
    freq = np.bincount(c.numpy(), minlength=3) / 30_000
    assert np.abs(freq - prior).max() < 0.015

    # Real batch all class 2; prior puts no mass on 2: no fake may be class 2.
    trainer = GanTrainer(
        tiny_config(num_classes=3, augment=AugmentConfig(preset="none")), [0.5, 0.5, 0.0]
    )
    fake_c = []

    def hook(module, args):
        if not torch.equal(args[0], real):
            fake_c.append(args[1].argmax(1))

    trainer.D.register_forward_pre_hook(hook)
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    trainer.train_step(real, torch.full([8], 2))
    fake_c = torch.cat(fake_c)
    assert len(fake_c) == 16
    assert not (fake_c == 2).any()
    assert set(fake_c.tolist()) == {0, 1}


def test_label_prior_is_validated():
    with pytest.raises(ValueError, match="label_prior"):
        GanTrainer(tiny_config(), [1.0])
    with pytest.raises(ValueError, match="label_prior"):
        GanTrainer(tiny_config(), [-1.0, 2.0])


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    data = _data()
    cfg = tiny_config()

    def losses_of(trainer, steps):
        sampler = BatchSampler(data, cfg.batch, trainer.np_rng)
        out = []
        for _ in range(steps):
            m = trainer.train_step(*next(sampler))
            out.append(
                (
                    m.loss_g.item(),
                    m.loss_d.item(),
                    m.ada_p,
                    None if m.loss_r1 is None else m.loss_r1.item(),
                )
            )
        return out

    straight = GanTrainer(cfg, data.label_prior())
    reference = losses_of(straight, 6)

    first = GanTrainer(cfg, data.label_prior())
    assert losses_of(first, 3) == reference[:3]  # same seed, same run
    path = save_checkpoint(tmp_path / "s.pt", "trainer", {"trainer": first.state_dict()})
    torch.manual_seed(999)  # disturb every global RNG before resuming
    np.random.seed(999)
    state = load_checkpoint(path, kind="trainer")["trainer"]
    resumed = GanTrainer.from_state_dict(state, device="cpu")
    assert resumed.counters() == first.counters()
    assert resumed.ada_p == first.ada_p > 0
    assert losses_of(resumed, 3) == reference[3:]
    for a, b in zip(
        straight.G_ema.state_dict().values(), resumed.G_ema.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_other_networks():
    a = GanTrainer(tiny_config(), [0.5, 0.5])
    b = GanTrainer(tiny_config(num_classes=3), [0.3, 0.3, 0.4])
    with pytest.raises(ValueError, match="c_dim"):
        b.load_state_dict(a.state_dict())


def test_run_reports_ticks_and_stops_on_request():
    data = _data()
    trainer = GanTrainer(tiny_config(), data.label_prior())
    ticks = []
    result = trainer.run(
        0.04,
        BatchSampler(data, 8, trainer.np_rng),
        on_tick=lambda t, r: ticks.append(r),
        tick_kimg=0.016,
    )
    assert trainer.cur_nimg == 40
    assert [r["cur_nimg"] for r in ticks] == [16, 32, 40]
    assert result == ticks[-1]
    assert {"loss_g", "loss_d", "ada_p", "sec_per_kimg", "kimg", "tick"} <= set(result)
    stopped = []
    trainer.run(
        1.0, BatchSampler(data, 8, trainer.np_rng), on_tick=lambda t, r: stopped.append(r) or True
    )
    assert len(stopped) == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_train(monkeypatch, precision):
    """The mixed-precision paths (autocast, and GradScaler for fp16, which only CUDA runs for
    real), run with CPU autocast: every loss stays finite, both regularisers run, both networks
    learn, weights stay float32 and the scalers' state survives a state_dict round trip."""
    import fedspine.training.gan_trainer as gan_trainer
    from fedspine.training.precision import PrecisionChoice

    half = torch.bfloat16 if precision == "bf16" else torch.float16
    # This CPU may lack bf16 instructions, and fp16 is refused on CPUs: force the choice.
    monkeypatch.setattr(
        gan_trainer, "resolve_precision", lambda mode, device: PrecisionChoice(half, "test")
    )
    data = _data()
    trainer = GanTrainer(tiny_config(mixed_precision=precision), data.label_prior())
    assert trainer.amp_dtype == half
    assert trainer.scaler_D.is_enabled() == (precision == "fp16")
    with trainer._autocast():
        z, c = trainer.sample_latents(2)
        onehot = torch.nn.functional.one_hot(c, 2).float()
        logits = trainer.D(trainer.G(z, onehot), onehot)
    assert logits.dtype == torch.float32  # D's epilogue and logits stay float32
    before_G = [p.detach().clone() for p in trainer.G.parameters()]
    before_D = [p.detach().clone() for p in trainer.D.parameters()]
    batches = BatchSampler(data, 8, trainer.np_rng)
    steps = [trainer.train_step(*next(batches)) for _ in range(6)]
    assert any(m.loss_r1 is not None for m in steps) and any(m.loss_pl is not None for m in steps)
    for m in steps:
        assert all(np.isfinite(v) for v in m.as_floats().values() if v is not None)
        assert m.loss_g.dtype == m.loss_d.dtype == torch.float32
    for net, before in ((trainer.G, before_G), (trainer.D, before_D)):
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
    state = trainer.state_dict()
    again = GanTrainer(tiny_config(mixed_precision=precision), data.label_prior())
    again.load_state_dict(state)
    if precision == "fp16":
        assert again.scaler_G.get_scale() == trainer.scaler_G.get_scale()
        assert again.scaler_D.state_dict() == trainer.scaler_D.state_dict()


def test_fp16_is_refused_on_cpu_and_off_means_float32():
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        GanTrainer(tiny_config(mixed_precision="fp16"), [0.5, 0.5])
    trainer = GanTrainer(tiny_config(mixed_precision="off"), [0.5, 0.5])
    assert trainer.amp_dtype is None and not trainer.scaler_G.is_enabled()


def test_batch_sampler_and_helpers():
    data = _data(n=10)
    rng = np.random.default_rng(0)
    images, labels = next(BatchSampler(data, 64, rng))
    assert images.shape == (64, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert labels.dtype == torch.int64 and set(labels.tolist()) == {0, 1}
    assert np.allclose(empirical_prior(np.array([0, 0, 1, -1]), 3), [2 / 3, 1 / 3, 0])
    x = torch.full([2, 1, 32, 32], 200, dtype=torch.uint8)
    assert (
        resize_uint8(x, 16).shape == (2, 1, 16, 16)
        and int(resize_uint8(x, 64).float().mean()) == 200
    )
