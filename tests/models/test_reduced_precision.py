"""Layer-limited reduced precision: only the highest-resolution blocks compute in bf16/fp16,
clamped; the mapping, styles, D's epilogue and logits stay float32 (run on CPU, as the GPU
path computes the same casts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedspine.models import Discriminator, Generator, NetworkConfig
from fedspine.models.discriminator import DiscriminatorBlock
from fedspine.models.generator import SynthesisBlock, SynthesisLayer, ToRGBLayer
from fedspine.models.layers import Conv2dLayer, FullyConnectedLayer, modulated_conv2d
from fedspine.models.precision import (
    REDUCED_CLAMP,
    activation_clamp,
    block_dtype,
    reduced_precision,
)

HALVES = [torch.bfloat16, torch.float16]


def _cfg(**overrides) -> NetworkConfig:
    values = dict(
        resolution=32,
        c_dim=2,
        z_dim=16,
        w_dim=16,
        mapping_layers=1,
        channel_base=256,
        channel_max=32,
        mbstd_group=2,
        reduced_precision_resolutions=2,
    )
    values.update(overrides)
    return NetworkConfig(**values)


def _inputs(n: int = 4):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, 16, generator=gen)
    c = F.one_hot(torch.arange(n) % 2, 2).float()
    return z, c


def _record_dtypes(net: torch.nn.Module, kinds: tuple[type, ...]) -> dict[str, torch.dtype]:
    seen: dict[str, torch.dtype] = {}
    for name, module in net.named_modules():
        if isinstance(module, kinds):
            module.register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name, out.dtype)
            )
    return seen


def test_config_picks_the_highest_resolutions_never_below_8_px():
    def reduced(cfg: NetworkConfig) -> list[int]:
        return [r for r in cfg.block_resolutions if cfg.reduced_at(r)]

    assert reduced(NetworkConfig(resolution=256)) == [32, 64, 128, 256]  # NVIDIA's 4
    assert reduced(_cfg(reduced_precision_resolutions=4)) == [8, 16, 32]
    assert reduced(_cfg()) == [16, 32]
    assert reduced(_cfg(reduced_precision_resolutions=0)) == []
    with pytest.raises(ValueError, match="reduced_precision_resolutions"):
        _cfg(reduced_precision_resolutions=-1)
    a = _cfg().__dict__
    b = _cfg(reduced_precision_resolutions=0, fused_modconv=False).__dict__
    assert a != b and NetworkConfig.identity(a) == NetworkConfig.identity(b)


@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("fused", [True, False])
def test_only_the_highest_resolution_blocks_run_reduced(half, fused):
    torch.manual_seed(0)
    cfg = _cfg()
    G, D = Generator(cfg), Discriminator(cfg)
    g_seen = _record_dtypes(G, (SynthesisLayer, ToRGBLayer, FullyConnectedLayer))
    d_seen = _record_dtypes(D, (Conv2dLayer, FullyConnectedLayer))
    z, c = _inputs()
    with reduced_precision(half):
        img = G(z, c, fused_modconv=fused)
        logits = D(img, c)
    assert img.dtype == logits.dtype == torch.float32
    for i, block in enumerate(G.synthesis.blocks):
        want = half if block.resolution in (16, 32) else torch.float32
        prefix = f"synthesis.blocks.{i}"
        assert g_seen[f"{prefix}.conv1"] == want, block.resolution
        assert g_seen[f"{prefix}.torgb"] == want, block.resolution
        # The styles (affine of w) stay float32 in every block.
        assert g_seen[f"{prefix}.conv1.affine"] == torch.float32
        assert g_seen[f"{prefix}.torgb.affine"] == torch.float32
    assert all(dt == torch.float32 for k, dt in g_seen.items() if k.startswith("mapping"))
    # D: from_rgb (32 px) and the blocks reading 32 and 16 px are reduced; 8 px and the
    # epilogue, label mapping and logits are float32.
    assert d_seen["from_rgb"] == half
    for i, block in enumerate(D.blocks):
        res = cfg.resolution >> i
        want = half if res in (16, 32) else torch.float32
        assert block.reduced == (res in (16, 32))
        for part in ("conv0", "conv1", "skip"):
            assert d_seen[f"blocks.{i}.{part}"] == want, (res, part)
    for name, dt in d_seen.items():
        if name.startswith(("epilogue", "mapping")):
            assert dt == torch.float32, name
    logits.float().sum().backward()
    for p in (*G.parameters(), *D.parameters()):
        assert p.dtype == torch.float32
        assert p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())


def test_outside_the_context_everything_is_float32_and_bit_identical():
    torch.manual_seed(0)
    G, D = Generator(_cfg()), Discriminator(_cfg())
    torch.manual_seed(0)
    none = _cfg(reduced_precision_resolutions=0)
    G0, D0 = Generator(none), Discriminator(none)
    z, c = _inputs()
    torch.manual_seed(1)
    a = D(G(z, c), c)
    torch.manual_seed(1)
    with reduced_precision(None):
        b = D(G(z, c), c)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    with reduced_precision(torch.bfloat16):  # a network without reduced blocks: float32
        g0 = D0(G0(z, c), c)
    torch.manual_seed(1)
    assert torch.equal(g0, D(G(z, c), c))
    assert block_dtype(True) == torch.float32
    with reduced_precision(torch.float16):
        assert block_dtype(True) == torch.float16 and block_dtype(False) == torch.float32
    with pytest.raises(ValueError, match="bfloat16 or float16"), reduced_precision(torch.float64):
        pass


def test_modulation_is_float32_and_matches_float32_within_half_precision():
    """The reduced modulated conv computes its (de)modulation in float32: its result is the
    float32 one to bf16/fp16 rounding, on both paths."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 8, 8, generator=gen)
    weight = torch.randn(6, 8, 3, 3, generator=gen)
    styles = torch.randn(3, 8, generator=gen) * 50  # large styles: fp16 must not overflow
    ref = modulated_conv2d(x, weight, styles, fused=True)
    for half, tol in ((torch.bfloat16, 0.05), (torch.float16, 0.01)):
        for fused in (True, False):
            for up in (1, 2):
                out = modulated_conv2d(x.to(half), weight, styles, fused=fused, up=up)
                assert out.dtype == half and torch.isfinite(out).all()
                if up == 1:
                    scale = ref.abs().max()
                    assert (out.float() - ref).abs().max() <= tol * scale, (half, fused)


@pytest.mark.parametrize("conv_clamp", [None, 4.0])
def test_reduced_blocks_clamp_their_activations(conv_clamp):
    """A block pushed to huge activations is clamped in reduced precision (at conv_clamp, or
    REDUCED_CLAMP without one); float32 blocks keep the network's own setting."""
    torch.manual_seed(0)
    cfg = _cfg(conv_clamp=conv_clamp)
    G, D = Generator(cfg), Discriminator(cfg)
    with torch.no_grad():
        for net in (G, D):
            for name, p in net.named_parameters():
                if name.endswith("bias") and "mapping" not in name and "epilogue" not in name:
                    p.fill_(600.0)
    limit = conv_clamp if conv_clamp is not None else REDUCED_CLAMP
    outs: dict[str, tuple[torch.dtype, float]] = {}

    def keep(name):
        return lambda m, a, out: outs.__setitem__(
            name, (out.dtype, float(out.detach().abs().max()))
        )

    for block in G.synthesis.blocks:
        block.conv1.register_forward_hook(keep(f"G{block.resolution}"))
    for i, block in enumerate(D.blocks):
        block.conv0.register_forward_hook(keep(f"D{cfg.resolution >> i}"))
    z, c = _inputs()
    with reduced_precision(torch.float16):
        img = G(z, c)
        logits = D(img.clamp(-1, 1), c)
    assert torch.isfinite(logits).all()
    for name, (dtype, peak) in outs.items():
        res = int(name[1:])
        if res in (16, 32):
            assert dtype == torch.float16 and peak <= limit + 1e-3, (name, peak)
        else:
            assert dtype == torch.float32
            if conv_clamp is None:
                assert peak > REDUCED_CLAMP * 2, (name, peak)  # float32: not clamped
    assert activation_clamp(None, torch.float32) is None
    assert activation_clamp(None, torch.bfloat16) == REDUCED_CLAMP
    assert activation_clamp(8.0, torch.float32) == 8.0


def test_blocks_know_whether_they_run_reduced():
    cfg = _cfg()
    G, D = Generator(cfg), Discriminator(cfg)
    assert [b.reduced for b in G.synthesis.blocks] == [False, False, True, True]
    assert isinstance(G.synthesis.blocks[0], SynthesisBlock)
    assert [b.reduced for b in D.blocks] == [True, True, False]
    assert isinstance(D.blocks[0], DiscriminatorBlock) and D.from_rgb_reduced
