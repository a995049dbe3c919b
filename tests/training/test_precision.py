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
