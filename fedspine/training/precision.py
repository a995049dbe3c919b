"""Which half precision a GAN trains its forward passes in, per device.

Weights, gradients, optimizer state, R1 and path length stay float32 in every mode. The half
dtype chosen here is not a global autocast: as in NVIDIA's StyleGAN2-ADA, only the blocks of G
and D at the ``NetworkConfig.reduced_precision_resolutions`` highest resolutions (4 by default)
compute in it, with their activations clamped (``conv_clamp``, 256 where the network sets
none); G's mapping and styles, the (de)modulation coefficients, G's image skip path and D's
label mapping, epilogue and logits stay float32 (see :mod:`fedspine.models.precision`). Before
every optimizer step NaN/inf gradients are replaced and counted (``nonfinite_grads`` in the
tick metrics). A config without ``mixed_precision`` (an older run's, or ``TrainConfig()``)
means ``off``; the ``paper`` and ``auto`` presets ask for ``auto``.

- ``off``: float32.
- ``bf16``: bfloat16 autocast. On a CPU it needs bf16 instructions: on this project's 2-core
  CPU (avx512_bf16) a cpu-preset step ran 1.68x (32 px) and 2.02x (64 px) as fast as float32,
  and the same step with oneDNN held to AVX2 ran 17x slower than float32. So a CPU without them
  is refused, with what to do.
- ``fp16``: float16 autocast with loss scaling (GradScaler); CUDA only.
- ``auto``: bf16 on a GPU that has it (fp16 on an older one); float32 on a CPU. On a CPU, bf16
  is faster but learned worse: after 24 kimg of the cpu preset its domain FID was higher in
  both of two seeds (0.081 vs 0.071, 0.107 vs 0.085), so it is only used when asked for.

The CPU speed and FID figures above were measured with the whole networks in bf16, before
reduced precision was limited to the highest-resolution blocks; they have not been re-measured.

The choice depends on the machine, not on the data, so a resumed run on the same machine makes
the same one; the run's config keeps the mode asked for and ``config.toml`` the one used.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch

MIXED_PRECISION = ("auto", "bf16", "fp16", "off")
# /proc/cpuinfo flags of native bf16 arithmetic: x86 (AVX512-BF16, AMX) and aarch64 (BF16).
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class PrecisionChoice:
    """The autocast dtype (None: float32) and why it was chosen."""

    dtype: torch.dtype | None
    how: str

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "off")

    def to_dict(self) -> dict[str, str]:
        return {"used": self.name, "how": self.how}


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """This CPU's bf16 instruction-set flags from /proc/cpuinfo (empty where it cannot tell)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return sorted(flags & CPU_BF16_FLAGS)


def resolve_precision(
    mode: str, device: torch.device, cpu_flags: list[str] | None = None
) -> PrecisionChoice:
    """The autocast dtype for ``mode`` on ``device``; a mode the device cannot run well is a
    ValueError that says what to use instead."""
    if mode not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, not {mode!r}")
    if mode == "off":
        return PrecisionChoice(None, "asked for float32")
    if device.type == "cuda":
        if mode == "fp16":
            return PrecisionChoice(torch.float16, "asked for fp16")
        if mode == "bf16":
            return PrecisionChoice(torch.bfloat16, "asked for bf16")
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice(torch.bfloat16, "auto: this GPU supports bf16")
        return PrecisionChoice(torch.float16, "auto: this GPU has no bf16, fp16 instead")
    if device.type != "cpu":
        if mode == "auto":
            return PrecisionChoice(None, f"auto: float32 on {device.type}")
        raise ValueError(f"mixed_precision {mode!r} is not supported on {device.type}; use off")
    if mode == "fp16":
        raise ValueError(
            "mixed_precision fp16 needs CUDA (its loss scaling is a GPU path; on a CPU it ran "
            "about 10x slower than float32); use bf16 or off on a CPU"
        )
    if mode == "auto":
        return PrecisionChoice(None, "auto: float32 on a CPU (bf16 is faster but learned worse)")
    flags = cpu_bf16_flags() if cpu_flags is None else cpu_flags
    if flags:
        return PrecisionChoice(torch.bfloat16, f"asked for bf16; this CPU has {', '.join(flags)}")
    raise ValueError(
        f"mixed_precision bf16: this CPU ({platform.machine()}) shows no bf16 instructions "
        "(avx512_bf16, amx_bf16 or bf16 in /proc/cpuinfo), and without them a bf16 training "
        "step ran 17x slower than float32; use off"
    )
