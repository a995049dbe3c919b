"""Conditional StyleGAN2 ResNet discriminator with projection conditioning.

D has parameters only, no buffers, and no in-place operations, so `torch.func.functional_call`
under `vmap(grad(...))` gives per-sample gradients (R1 included) for DP-SGD. With
`mbstd_group > 0` the minibatch-std layer makes each logit depend on the other samples of its
group: never use it under DP (`Discriminator.mixes_samples` says whether it is on).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedspine.models.config import NetworkConfig
from fedspine.models.layers import Conv2dLayer, FullyConnectedLayer, normalize_2nd_moment
from fedspine.models.precision import block_dtype

MAPPING_LR_MULTIPLIER = 0.01
RESIDUAL_GAIN = math.sqrt(0.5)


class Discriminator(nn.Module):
    """D(img [N, C, R, R], one-hot c [N, c_dim]) -> logits [N, 1]."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.c_dim = cfg.c_dim
        self.img_resolution = cfg.resolution
        self.img_channels = cfg.img_channels
        self.mbstd_group = cfg.mbstd_group
        top = cfg.resolution
        self.from_rgb = Conv2dLayer(
            cfg.img_channels,
            cfg.channels_at(top),
            1,
            activation="lrelu",
            conv_clamp=cfg.conv_clamp,
        )
        self.from_rgb_reduced = cfg.reduced_at(top)
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(
                cfg.channels_at(res),
                cfg.channels_at(res // 2),
                cfg.conv_clamp,
                reduced=cfg.reduced_at(res),
            )
            for res in reversed(cfg.block_resolutions[1:])
        )
        self.cmap_dim = cfg.channels_at(4) if cfg.c_dim > 0 else 0
        self.mapping = (
            LabelMapping(cfg.c_dim, self.cmap_dim, cfg.mapping_layers) if cfg.c_dim > 0 else None
        )
        self.epilogue = DiscriminatorEpilogue(
            cfg.channels_at(4),
            self.cmap_dim,
            cfg.mbstd_group,
            cfg.mbstd_channels,
            cfg.conv_clamp,
        )

    @property
    def mixes_samples(self) -> bool:
        """True when the minibatch-std layer is on: one sample's logit reads the others."""
        return self.mbstd_group > 0

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(img, c)
        x = self.from_rgb(img.to(block_dtype(self.from_rgb_reduced)))
        for block in self.blocks:
            x = block(x)
        # The label mapping, the epilogue and the logits are float32 in every precision mode.
        cmap = self.mapping(c.to(torch.float32)) if self.mapping is not None else None
        return self.epilogue(x.to(torch.float32), cmap)

    def _check_inputs(self, img: torch.Tensor, c: torch.Tensor | None) -> None:
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if img.ndim != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(
                f"discriminator.py: img has shape {tuple(img.shape)}, expected [N, {expected[0]}, "
                f"{expected[1]}, {expected[2]}]"
            )
        if self.c_dim == 0:
            if c is not None and c.numel() != 0:
                raise ValueError(
                    f"discriminator.py: this discriminator is unconditional (c_dim=0) but got c "
                    f"of shape {tuple(c.shape)}; pass c=None"
                )
        elif c is None or c.ndim != 2 or tuple(c.shape) != (img.shape[0], self.c_dim):
            shape = None if c is None else tuple(c.shape)
            raise ValueError(
                f"discriminator.py: c has shape {shape}, expected one-hot float labels "
                f"[{img.shape[0]}, {self.c_dim}]"
            )


class DiscriminatorBlock(nn.Module):
    """Residual block halving the resolution: two 3x3 convs (the second down-sampling) beside a
    1x1 down-sampling skip without bias, both scaled by sqrt(0.5). A `reduced` block computes in
    bf16/fp16 inside :func:`fedspine.models.precision.reduced_precision`."""

    def __init__(
        self,
        channels: int,
        out_channels: int,
        conv_clamp: float | None,
        reduced: bool = False,
    ) -> None:
        super().__init__()
        self.reduced = reduced
        self.conv0 = Conv2dLayer(channels, channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(
            channels, out_channels, 3, activation="lrelu", down=2, conv_clamp=conv_clamp
        )
        self.skip = Conv2dLayer(channels, out_channels, 1, bias=False, down=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(block_dtype(self.reduced))
        y = self.skip(x, gain=RESIDUAL_GAIN)
        x = self.conv1(self.conv0(x), gain=RESIDUAL_GAIN)
        return x + y


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: optional minibatch std, 3x3 conv, FC, output; projection onto cmap if given."""

    def __init__(
        self,
        channels: int,
        cmap_dim: int,
        mbstd_group: int,
        mbstd_channels: int,
        conv_clamp: float | None,
    ) -> None:
        super().__init__()
        self.cmap_dim = cmap_dim
        self.mbstd_group = mbstd_group
        self.mbstd_channels = mbstd_channels
        extra = mbstd_channels if mbstd_group > 0 else 0
        self.conv = Conv2dLayer(
            channels + extra, channels, 3, activation="lrelu", conv_clamp=conv_clamp
        )
        self.fc = FullyConnectedLayer(channels * 4 * 4, channels, activation="lrelu")
        self.out = FullyConnectedLayer(channels, cmap_dim if cmap_dim > 0 else 1)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        if self.mbstd_group > 0:
            x = minibatch_std(x, self.mbstd_group, self.mbstd_channels)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if cmap is not None:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1.0 / math.sqrt(self.cmap_dim))
        return x


class LabelMapping(nn.Module):
    """One-hot label -> cmap: an embedding normalised to unit second moment, then FC layers."""

    def __init__(self, c_dim: int, cmap_dim: int, num_layers: int) -> None:
        super().__init__()
        self.embed = FullyConnectedLayer(c_dim, cmap_dim)
        self.layers = nn.ModuleList(
            FullyConnectedLayer(
                cmap_dim, cmap_dim, activation="lrelu", lr_multiplier=MAPPING_LR_MULTIPLIER
            )
            for _ in range(num_layers)
        )

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = normalize_2nd_moment(self.embed(c))
        for layer in self.layers:
            x = layer(x)
        return x


def minibatch_std(x: torch.Tensor, group_size: int, num_channels: int = 1) -> torch.Tensor:
    """Append `num_channels` feature maps holding the standard deviation over groups of
    consecutive samples (samples g*G .. g*G+G-1 form group g).

    The group is min(group_size, N), reduced until it divides N, so any batch size works.
    """
    n, channels, height, width = x.shape
    if channels % num_channels != 0:
        raise ValueError(
            f"discriminator.py: {channels} channels cannot be split into {num_channels} "
            "minibatch-std groups; choose mbstd_channels dividing the 4x4 channel count"
        )
    group = min(group_size, n)
    while n % group != 0:
        group -= 1
    y = x.reshape(n // group, group, num_channels, channels // num_channels, height, width)
    y = y - y.mean(dim=1, keepdim=True)
    y = (y.square().mean(dim=1) + 1e-8).sqrt()
    y = y.mean(dim=[2, 3, 4])
    y = y.reshape(n // group, 1, num_channels, 1, 1).expand(-1, group, -1, height, width)
    return torch.cat([x, y.reshape(n, num_channels, height, width)], dim=1)
