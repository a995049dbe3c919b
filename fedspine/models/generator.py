"""Conditional StyleGAN2 generator: mapping network (z, c) -> ws and skip-architecture synthesis.

Written from the recipe in the StyleGAN2 / StyleGAN2-ADA papers. The generator owns two kinds of
buffers: `mapping.w_avg` (the running mean of w for truncation, in the state dict) and one fixed
noise image per synthesis layer for `noise_mode="const"`. The noise images are drawn from a fixed
seed and are not in the state dict, so every generator of a given shape has the same ones and
averaging state dicts across sites (FedAvg) never touches them.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fedspine.models.config import NetworkConfig
from fedspine.models.layers import (
    FullyConnectedLayer,
    bias_act,
    modulated_conv2d,
    normalize_2nd_moment,
    upsample2d,
)
from fedspine.models.precision import activation_clamp, block_dtype

W_AVG_BETA = 0.995
MAPPING_LR_MULTIPLIER = 0.01
NOISE_MODES = ("random", "const", "none")
NOISE_CONST_SEED = 0x5EED


class Generator(nn.Module):
    """G(z, c) -> images [N, img_channels, R, R], roughly in [-1, 1] (no output squashing)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = copy.deepcopy(cfg)
        self.z_dim = cfg.z_dim
        self.c_dim = cfg.c_dim
        self.w_dim = cfg.w_dim
        self.img_resolution = cfg.resolution
        self.img_channels = cfg.img_channels
        self.synthesis = SynthesisNetwork(cfg)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(cfg, num_ws=self.num_ws)

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "random",
        update_w_avg: bool = False,
        fused_modconv: bool | None = None,
    ) -> torch.Tensor:
        ws = self.mapping(
            z,
            c,
            truncation_psi=truncation_psi,
            truncation_cutoff=truncation_cutoff,
            update_w_avg=update_w_avg,
        )
        return self.synthesis(ws, noise_mode=noise_mode, fused_modconv=fused_modconv)

    def use_fused_modconv(self, fused: bool) -> None:
        """Fix the modulated-convolution path (a config's "auto" resolved by the trainer)."""
        self.cfg.fused_modconv = bool(fused)
        self.synthesis.fused_modconv = bool(fused)

    def copy_for_ema(self) -> Generator:
        """An independent copy for the exponential moving average: eval mode, no gradients."""
        return copy.deepcopy(self).eval().requires_grad_(False)


class MappingNetwork(nn.Module):
    """(z, one-hot c) -> ws [N, num_ws, w_dim], with a running w_avg for truncation."""

    def __init__(self, cfg: NetworkConfig, num_ws: int, w_avg_beta: float = W_AVG_BETA) -> None:
        super().__init__()
        self.z_dim = cfg.z_dim
        self.c_dim = cfg.c_dim
        self.w_dim = cfg.w_dim
        self.num_ws = num_ws
        self.w_avg_beta = w_avg_beta
        self.embed = FullyConnectedLayer(cfg.c_dim, cfg.w_dim) if cfg.c_dim > 0 else None
        features = [cfg.z_dim + (cfg.w_dim if cfg.c_dim > 0 else 0)]
        features += [cfg.w_dim] * cfg.mapping_layers
        self.layers = nn.ModuleList(
            FullyConnectedLayer(
                f_in, f_out, activation="lrelu", lr_multiplier=MAPPING_LR_MULTIPLIER
            )
            for f_in, f_out in zip(features[:-1], features[1:], strict=True)
        )
        self.register_buffer("w_avg", torch.zeros([cfg.w_dim]))

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        update_w_avg: bool = False,
    ) -> torch.Tensor:
        """Map latents and labels to styles. `update_w_avg=True` (training calls only) moves
        w_avg toward this batch's mean w; truncation pulls the first `truncation_cutoff` ws (all
        when None) toward w_avg: w_avg + psi * (w - w_avg)."""
        _check_latents(z, c, self.z_dim, self.c_dim)
        x = normalize_2nd_moment(z)
        if self.embed is not None:
            y = normalize_2nd_moment(self.embed(c.to(x.dtype)))
            x = torch.cat([x, y], dim=1)
        for layer in self.layers:
            x = layer(x)
        if update_w_avg:
            with torch.no_grad():
                batch_mean = x.detach().mean(dim=0).to(self.w_avg.dtype)
                self.w_avg.copy_(batch_mean.lerp(self.w_avg, self.w_avg_beta))
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1.0:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            w_avg = self.w_avg.to(ws.dtype)
            head = w_avg + (ws[:, :cutoff] - w_avg) * truncation_psi
            ws = torch.cat([head, ws[:, cutoff:]], dim=1)
        return ws


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> images; a learned 4x4 constant, then one block per resolution."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.w_dim = cfg.w_dim
        self.img_resolution = cfg.resolution
        self.img_channels = cfg.img_channels
        self.fused_modconv = cfg.fused_modconv
        blocks = []
        for res in cfg.block_resolutions:
            in_channels = cfg.channels_at(res // 2) if res > 4 else 0
            blocks.append(SynthesisBlock(in_channels, cfg.channels_at(res), res, cfg))
        self.blocks = nn.ModuleList(blocks)
        self.num_ws = sum(block.num_conv for block in self.blocks) + self.blocks[-1].num_torgb
        if self.num_ws != cfg.num_ws:
            raise AssertionError(
                f"generator.py: counted {self.num_ws} ws, config says {cfg.num_ws}"
            )

    def forward(
        self,
        ws: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool | None = None,
    ) -> torch.Tensor:
        """Block b reads ws[idx : idx + num_conv + 1] and idx advances by num_conv, so a block's
        toRGB shares its w with the next block's first conv."""
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(
                f"generator.py: ws has shape {tuple(ws.shape)}, expected "
                f"[N, {self.num_ws}, {self.w_dim}] from G.mapping(z, c)"
            )
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"generator.py: noise_mode {noise_mode!r} is not one of {NOISE_MODES}")
        fused = self.fused_modconv if fused_modconv is None else fused_modconv
        if fused == "auto":
            # Unresolved (a model built outside a trainer): the measured CPU rule, and NVIDIA's
            # inference default elsewhere.
            fused = ws.device.type != "cpu"
        x = img = None
        idx = 0
        for block in self.blocks:
            block_ws = ws.narrow(1, idx, block.num_conv + block.num_torgb)
            x, img = block(x, img, block_ws, noise_mode=noise_mode, fused=fused)
            idx += block.num_conv
        return img


class SynthesisBlock(nn.Module):
    """One resolution: (the 4x4 constant | an up-sampling conv), a conv, and a toRGB whose
    output is added to the up-sampled image of the blocks below.

    `reduced` (from the config's `reduced_precision_resolutions`) marks a block that computes
    in bf16/fp16 inside :func:`fedspine.models.precision.reduced_precision`; its styles and the
    image it adds to stay float32."""

    def __init__(self, in_channels: int, out_channels: int, resolution: int, cfg: NetworkConfig):
        super().__init__()
        self.resolution = resolution
        self.reduced = cfg.reduced_at(resolution)
        self.is_first = in_channels == 0
        if self.is_first:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
            self.conv0 = None
        else:
            self.const = None
            self.conv0 = SynthesisLayer(in_channels, out_channels, resolution, cfg, up=2, index=0)
        self.conv1 = SynthesisLayer(out_channels, out_channels, resolution, cfg, up=1, index=1)
        self.torgb = ToRGBLayer(out_channels, cfg.img_channels, cfg.w_dim, cfg.conv_clamp)
        self.num_conv = 1 if self.is_first else 2
        self.num_torgb = 1

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        noise_mode: str,
        fused: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w_iter = iter(ws.unbind(dim=1))
        dtype = block_dtype(self.reduced)
        if self.const is not None:
            x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused=fused)
        else:
            x = self.conv0(x.to(dtype), next(w_iter), noise_mode=noise_mode, fused=fused)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused=fused)
        y = self.torgb(x, next(w_iter), fused=fused).to(torch.float32)
        img = y if img is None else upsample2d(img) + y
        return x, img


class SynthesisLayer(nn.Module):
    """Modulated, demodulated 3x3 conv (optionally 2x up), per-pixel noise, bias, leaky ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resolution: int,
        cfg: NetworkConfig,
        up: int = 1,
        index: int = 0,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.up = up
        self.conv_clamp = cfg.conv_clamp
        self.affine = FullyConnectedLayer(cfg.w_dim, in_channels, bias_init=1.0)
        shape = [out_channels, in_channels, kernel_size, kernel_size]
        self.weight = nn.Parameter(torch.randn(shape))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        seed = NOISE_CONST_SEED + 16 * resolution + index
        noise = torch.randn([resolution, resolution], generator=torch.Generator().manual_seed(seed))
        self.register_buffer("noise_const", noise, persistent=False)

    def forward(
        self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", fused: bool = True
    ) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=True, up=self.up, fused=fused)
        if noise_mode == "random":
            noise = torch.randn(
                [x.shape[0], 1, self.resolution, self.resolution], device=x.device, dtype=x.dtype
            )
            x = x + noise * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength
        return bias_act(x, self.bias, "lrelu", clamp=activation_clamp(self.conv_clamp, x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, res={self.resolution}, up={self.up}"
        )


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv to image channels, without demodulation, plus bias."""

    def __init__(
        self, in_channels: int, img_channels: int, w_dim: int, conv_clamp: float | None
    ) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn([img_channels, in_channels, 1, 1]))
        self.weight_gain = 1.0 / math.sqrt(in_channels)
        self.bias = nn.Parameter(torch.zeros([img_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused)
        return bias_act(x, self.bias, "linear", clamp=activation_clamp(self.conv_clamp, x.dtype))


def _check_latents(z: torch.Tensor, c: torch.Tensor | None, z_dim: int, c_dim: int) -> None:
    if z.ndim != 2 or z.shape[1] != z_dim:
        raise ValueError(f"generator.py: z has shape {tuple(z.shape)}, expected [N, {z_dim}]")
    if c_dim == 0:
        if c is not None and c.numel() != 0:
            raise ValueError(
                f"generator.py: this generator is unconditional (c_dim=0) but got c of shape "
                f"{tuple(c.shape)}; pass c=None"
            )
        return
    if c is None or c.ndim != 2 or c.shape != (z.shape[0], c_dim):
        shape = None if c is None else tuple(c.shape)
        raise ValueError(
            f"generator.py: c has shape {shape}, expected one-hot float labels "
            f"[{z.shape[0]}, {c_dim}] (torch.nn.functional.one_hot(labels, {c_dim}).float())"
        )
