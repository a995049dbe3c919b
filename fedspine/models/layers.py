"""Equalised-learning-rate building blocks of fedspine's StyleGAN2 networks.

Every trainable weight is stored as N(0, 1) / lr_multiplier and scaled at run time by
lr_multiplier / sqrt(fan_in) (Karras et al.), so Adam moves every layer at the same relative
speed whatever its fan-in. Nothing here registers a buffer: the FIR low-pass filter [1, 3, 3, 1]
is a constant built once per device, dtype and gain in a plain cache. A discriminator made of these
layers therefore has parameters only, which per-sample gradients (torch.func, Opacus) need.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from fedspine.models.precision import activation_clamp

LOWPASS_TAPS = (1.0, 3.0, 3.0, 1.0)
LRELU_SLOPE = 0.2
ACTIVATION_GAINS = {"linear": 1.0, "lrelu": math.sqrt(2.0)}


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate; `bias_init` is the effective initial bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        bias_init: float = 0.0,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        _check_activation(activation)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = (
            nn.Parameter(torch.full([out_features], float(bias_init) / lr_multiplier))
            if bias
            else None
        )
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        b = self.bias * self.bias_gain if self.bias is not None else None
        if self.activation == "linear":
            return F.linear(x, w, b)
        return bias_act(F.linear(x, w), b, self.activation)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Equalised-LR convolution, optionally followed by a 2x FIR-filtered down-sampling.

    `down=2` low-passes the input with [1,3,3,1] and then strides the convolution by two, so the
    output has exactly half the input's size and no aliasing from the stride.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        bias: bool = True,
        activation: str = "linear",
        down: int = 1,
        conv_clamp: float | None = None,
        lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        _check_activation(activation)
        if kernel_size % 2 != 1:
            raise ValueError(f"layers.py: kernel_size {kernel_size} must be odd (1 or 3)")
        if down not in (1, 2):
            raise ValueError(f"layers.py: down={down} is not supported; use 1 or 2")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.down = down
        self.conv_clamp = conv_clamp
        shape = [out_channels, in_channels, kernel_size, kernel_size]
        self.weight = nn.Parameter(torch.randn(shape) / lr_multiplier)
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_channels * kernel_size**2)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight * self.weight_gain
        if self.down == 2:
            x = fir_filter2d(x, pad=self.kernel_size // 2 + 1)
            x = F.conv2d(x, w.to(x.dtype), stride=2)
        else:
            x = F.conv2d(x, w.to(x.dtype), padding=self.kernel_size // 2)
        b = self.bias * self.bias_gain if self.bias is not None else None
        clamp = activation_clamp(self.conv_clamp, x.dtype)
        clamp = clamp * gain if clamp is not None else None
        return bias_act(x, b, self.activation, gain=gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, k={self.kernel_size}, "
            f"activation={self.activation}, down={self.down}"
        )


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    *,
    demodulate: bool = True,
    up: int = 1,
    fused: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution of x [N, I, H, W] with weight [O, I, k, k], styles [N, I].

    Each sample's weights are scaled per input channel by its styles and, with `demodulate`,
    divided per output channel by sqrt(sum w^2 + eps). `fused` runs one grouped convolution with a
    weight per sample (groups = N); otherwise the activations are scaled by the styles, one shared
    convolution runs and the outputs are scaled by the demodulation coefficients. Both compute the
    same function; which is faster depends on device and shape. `up=2` is a stride-2 transposed
    convolution followed by the [1,3,3,1] low-pass filter (output size 2H x 2W).
    """
    n, in_ch, height, width = x.shape
    out_ch, w_in, kh, kw = weight.shape
    if w_in != in_ch or styles.shape != (n, in_ch) or kh != kw or kh % 2 != 1:
        raise ValueError(
            f"layers.py: modulated_conv2d got x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"styles {tuple(styles.shape)}; expected [N,I,H,W], [O,I,k,k] with odd k, [N,I]"
        )
    if up not in (1, 2):
        raise ValueError(f"layers.py: up={up} is not supported; use 1 or 2")
    # Modulation and demodulation are computed in the weights' and styles' own precision
    # (float32); only the convolution itself runs in x's (reduced, in a reduced block).
    dtype = x.dtype
    if demodulate and dtype == torch.float16 and not fused:
        # fp16 activations scaled by raw styles can overflow: divide weight and styles by their
        # largest magnitudes, which demodulation cancels (NVIDIA's pre-normalisation).
        weight = weight / weight.abs().amax(dim=[1, 2, 3], keepdim=True)
        styles = styles / styles.abs().amax(dim=1, keepdim=True)
    dcoefs = None
    if demodulate:
        dcoefs = torch.rsqrt(styles.square() @ weight.square().sum(dim=[2, 3]).t() + eps)
    if fused:
        w = weight.unsqueeze(0) * styles.reshape(n, 1, in_ch, 1, 1)
        if dcoefs is not None:
            w = w * dcoefs.reshape(n, out_ch, 1, 1, 1)
        w = w.to(dtype)
        x = x.reshape(1, n * in_ch, height, width)
        if up == 1:
            x = F.conv2d(x, w.reshape(n * out_ch, in_ch, kh, kw), padding=kh // 2, groups=n)
        else:
            wt = w.transpose(1, 2).reshape(n * in_ch, out_ch, kh, kw).flip([2, 3])
            x = F.conv_transpose2d(x, wt, stride=2, groups=n)
            x = fir_filter2d(x, pad=(5 - kh) // 2, gain=4.0)
        return x.reshape(n, out_ch, x.shape[2], x.shape[3])
    x = x * styles.to(dtype).reshape(n, in_ch, 1, 1)
    weight = weight.to(dtype)
    if up == 1:
        x = F.conv2d(x, weight, padding=kh // 2)
    else:
        x = F.conv_transpose2d(x, weight.transpose(0, 1).flip([2, 3]), stride=2)
        x = fir_filter2d(x, pad=(5 - kh) // 2, gain=4.0)
    if dcoefs is not None:
        x = x * dcoefs.to(dtype).reshape(n, out_ch, 1, 1)
    return x


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    activation: str = "linear",
    *,
    gain: float = 1.0,
    clamp: float | None = None,
) -> torch.Tensor:
    """Add a per-channel bias, apply the activation times its gain (sqrt 2 for lrelu) times `gain`,
    then clamp to [-clamp, clamp] (a guard for half-precision activations)."""
    _check_activation(activation)
    if b is not None:
        x = x + b.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    if activation == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
    total_gain = ACTIVATION_GAINS[activation] * gain
    if total_gain != 1.0:
        x = x * total_gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def upsample2d(x: torch.Tensor) -> torch.Tensor:
    """2x up-sampling: zero insertion and the [1,3,3,1] filter with gain 4 (keeps the mean)."""
    channels = x.shape[1]
    f = lowpass_filter(x.device, x.dtype, 4.0)
    f = f.reshape(1, 1, *f.shape).expand(channels, 1, -1, -1)
    x = F.conv_transpose2d(x, f, stride=2, groups=channels)
    return x[:, :, 1:-1, 1:-1]


def downsample2d(x: torch.Tensor) -> torch.Tensor:
    """2x down-sampling: the [1,3,3,1] low-pass filter, then every second pixel."""
    return fir_filter2d(x, pad=1)[:, :, ::2, ::2]


def fir_filter2d(x: torch.Tensor, pad: int, gain: float = 1.0) -> torch.Tensor:
    """Zero-pad x by `pad` on every side and filter each channel with the 4x4 low-pass filter."""
    channels = x.shape[1]
    f = lowpass_filter(x.device, x.dtype, gain)
    f = f.reshape(1, 1, *f.shape).expand(channels, 1, -1, -1)
    if pad:
        x = F.pad(x, [pad, pad, pad, pad])
    return F.conv2d(x, f, groups=channels)


@functools.cache
def lowpass_filter(device: torch.device, dtype: torch.dtype, gain: float = 1.0) -> torch.Tensor:
    """The separable 4x4 [1,3,3,1] filter, normalised to sum `gain`; cached, never a buffer.

    Built outside inference mode so a first call under torch.inference_mode() does not poison
    later training calls with an inference tensor, and outside torch.func transforms so a first
    call under vmap/grad does not cache a wrapped tensor that escapes its level.
    """
    with torch._C._DisableFuncTorch(), torch.inference_mode(False), torch.no_grad():
        taps = torch.tensor(LOWPASS_TAPS, dtype=torch.float64)
        f = torch.outer(taps, taps)
        f = f * (gain / f.sum())
        return f.to(device=device, dtype=dtype)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of x [N, F] to unit mean square."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATION_GAINS:
        raise ValueError(
            f"layers.py: unknown activation {activation!r}; use one of {sorted(ACTIVATION_GAINS)}"
        )
