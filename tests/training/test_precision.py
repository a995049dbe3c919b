import numpy as np
import pytest
import torch

from fedspine.training.config import preset_config
from fedspine.training.precision import cpu_bf16_flags, resolve_precision

CPU = torch.device("cpu")
X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\nprocessor\t: 1\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
OLD = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"


def test_cpu_flags_are_read_from_cpuinfo_on_x86_and_arm():
    assert cpu_bf16_flags(X86) == ["avx512_bf16"]
    assert cpu_bf16_flags(ARM) == ["bf16"]
    assert cpu_bf16_flags(OLD) == []
    assert isinstance(cpu_bf16_flags(), list)


def test_cpu_runs_bf16_only_when_asked_and_its_instructions_are_there():
    choice = resolve_precision("bf16", CPU, cpu_flags=["avx512_bf16"])
    assert choice.dtype == torch.bfloat16 and choice.name == "bf16"
    assert "avx512_bf16" in choice.how
    for flags in (["avx512_bf16"], []):
        assert resolve_precision("off", CPU, cpu_flags=flags).dtype is None
        auto = resolve_precision("auto", CPU, cpu_flags=flags)
        assert auto.dtype is None and auto.name == "off" and "learned worse" in auto.how


def test_cpu_without_bf16_instructions_refuses_bf16_and_fp16():
    with pytest.raises(ValueError, match="17x slower.*use off"):
        resolve_precision("bf16", CPU, cpu_flags=[])
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_precision("fp16", CPU, cpu_flags=["amx_bf16"])
    with pytest.raises(ValueError, match="one of"):
        resolve_precision("fp8", CPU, cpu_flags=[])


def test_gpu_presets_pick_precision_by_device_and_the_config_accepts_auto():
    for cfg in (preset_config("paper", 256, 2), preset_config("auto", 64, 2)):
        assert cfg.mixed_precision == "auto"
    with pytest.raises(ValueError, match="mixed_precision"):
        preset_config("cpu", 32, 2).__class__(mixed_precision="fp8")


# ---- layer-limited reduced precision and the float32 default ----------------------------------


def test_a_config_without_the_key_trains_in_float32(tmp_path):
    from fedspine.training.config import TrainConfig, read_config_toml, write_config_toml

    assert TrainConfig().mixed_precision == "off"
    saved = preset_config("cpu", 16, 2).to_dict()
    saved["mixed_precision"] = "bf16"
    assert TrainConfig.from_dict(saved).mixed_precision == "bf16"  # a resumed run keeps it
    del saved["mixed_precision"]  # an older config.json / config.toml
    assert TrainConfig.from_dict(saved).mixed_precision == "off"
    write_config_toml(tmp_path / "config.toml", saved)
    loaded = TrainConfig.from_dict(read_config_toml(tmp_path / "config.toml"))
    assert loaded.mixed_precision == "off"
    assert resolve_precision(loaded.mixed_precision, CPU, cpu_flags=["avx512_bf16"]).dtype is None
    old_network = dict(saved["network"])
    del old_network["reduced_precision_resolutions"]  # a network saved before the knob
    assert TrainConfig.from_dict({**saved, "network": old_network}).network.reduced_at(16)


def test_the_trainer_runs_only_the_highest_blocks_reduced_with_float32_logits(monkeypatch):
    """Through the CPU path (bf16 forced, as on a CPU with bf16 instructions): inside the
    trainer's precision context only the reduced blocks compute in bf16; styles and logits are
    float32, the losses finite, weights float32, and a state from before the knob resumes."""
    import fedspine.training.gan_trainer as gan_trainer
    from fedspine.training.batches import BatchSampler
    from fedspine.training.gan_trainer import GanTrainer
    from fedspine.training.precision import PrecisionChoice
    from tests.training import tiny_config
    from tests.training.test_trainer import _data

    for half in (torch.bfloat16, torch.float16):
        monkeypatch.setattr(
            gan_trainer, "resolve_precision", lambda mode, device, h=half: PrecisionChoice(h, "t")
        )
        data = _data(res=32)
        cfg = tiny_config(resolution=32, mixed_precision="bf16")
        cfg.network.reduced_precision_resolutions = 2
        trainer = GanTrainer(cfg, data.label_prior())
        seen: dict[str, torch.dtype] = {}
        for name, module in (*trainer.G.named_modules(), *trainer.D.named_modules()):
            if name.endswith(("conv1", "affine", "epilogue", "out", "from_rgb")):
                module.register_forward_hook(
                    lambda m, a, out, name=name, seen=seen: seen.__setitem__(name, out.dtype)
                )
        with trainer._autocast():
            z, c = trainer.sample_latents(2)
            onehot = torch.nn.functional.one_hot(c, 2).float()
            logits = trainer.D(trainer.G(z, onehot), onehot)
        assert logits.dtype == torch.float32
        assert seen["synthesis.blocks.3.conv1"] == seen["synthesis.blocks.2.conv1"] == half
        assert seen["synthesis.blocks.1.conv1"] == seen["synthesis.blocks.0.conv1"] == torch.float32
        assert seen["synthesis.blocks.3.conv1.affine"] == torch.float32  # styles
        assert seen["from_rgb"] == seen["blocks.0.conv1"] == half
        assert seen["blocks.2.conv1"] == seen["epilogue"] == seen["epilogue.out"] == torch.float32
        batches = BatchSampler(data, 8, trainer.np_rng)
        for _ in range(4):
            m = trainer.train_step(*next(batches))
            assert all(np.isfinite(v) for v in m.as_floats().values() if v is not None)
        assert all(p.dtype == torch.float32 for p in trainer.D.parameters())
        state = trainer.state_dict()
        del state["config"]["network"]["reduced_precision_resolutions"]
        GanTrainer(cfg, data.label_prior()).load_state_dict(state)
