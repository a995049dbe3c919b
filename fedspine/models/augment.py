"""Adaptive discriminator augmentation (ADA) for one-channel radiographs.

Why: with a few thousand radiographs per site the discriminator memorises the real set and the
generator collapses. ADA (Karras et al. 2020, "Training Generative Adversarial Networks with
Limited Data") shows D every image - real and fake, in the D and G passes - through random
augmentations applied with probability p, and tunes p from how confidently D calls real images
real. This module is fedspine's own implementation of that recipe; no NVIDIA code is used.

Pipeline, in order (`enabled_ops` lists what a config turns on):

- blit: x-flip and rotate-90 (both off by default: they change anatomy, e.g. the side of a
  lateral view), integer translation up to 1/8 of the image with reflect padding. Done as one
  exact pixel gather, so blit never blurs.
- geom: isotropic scale, rotation, anisotropic scale, fractional translation, composed into one
  affine matrix per sample and resampled once with `grid_sample` (bilinear, reflection padding:
  zero padding would draw a new black edge that tells D the image was augmented, which makes the
  augmentation leak into the generator). No anti-aliasing filter: scales stay within about
  2^(±0.6), so aliasing is mild, and plain bilinear keeps double backward (R1) cheap.
- color (one channel): brightness offset, contrast gain, optional luma flip (intensity
  inversion, off by default: MONOCHROME1/2 inversion changes what the image means). Hue and
  saturation do not exist in one channel.
- filter: random gains on four octave bands [0, π/8], [π/8, π/4], [π/4, π/2], [π/2, π],
  built from differences of Gaussian low-pass kernels so the bands sum to an exact identity.
- noise: additive Gaussian noise with a per-sample standard deviation |N(0, 0.1)|.
- cutout: a square of half the image side, at a uniform random centre, set to 0.

Deviations from the paper, and why:

- Rotation: one rotation, uniform in ±`max_rotate_deg` (default 15°), with probability p, and
  the anisotropic scale along a uniformly random axis. The paper draws two rotations of up to
  ±180° around the anisotropic scale; for radiographs a leaked upside-down spine is an
  implausible image, while ±15° stays inside ordinary patient-positioning variation, so even a
  leak yields plausible radiographs. Set `max_rotate_deg = 180` for the paper's range.
- Filter gains are normalised to preserve the expected signal energy, assuming 10/13 of a
  radiograph's energy lies in the lowest octave (mean intensity and smooth anatomy) and the rest
  evenly per octave (a 1/f amplitude spectrum).

Per-sample independence: the output for sample i depends only on input i and on random draws
that do not look at any pixel, so the pipe can sit in front of a per-sample (DP) loss. The pipe
also works inside `torch.func.vmap`: draw the parameters for the batch outside with
`sample_params`, then vmap `apply` over images and parameters together (tested, including
`grad` of an R1 term). Calling `forward` inside vmap is not supported (it draws random numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "bgc": ("blit", "geom", "color"),
    "bgcfnc": ("blit", "geom", "color", "filter", "noise", "cutout"),
}

INT_TRANSLATE_MAX = 0.125  # of the image size, uniform
SCALE_STD = 0.2  # log2 units: lognormal with std 0.2 ln 2
FRAC_TRANSLATE_STD = 0.125  # of the image size, normal
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5  # log2 units
FILTER_GAIN_STD = 1.0  # log2 units
NOISE_STD = 0.1
CUTOUT_SIZE = 0.5  # of the image side
BAND_POWER = (10 / 13, 1 / 13, 1 / 13, 1 / 13)
BAND_CUTOFFS = (math.pi / 8, math.pi / 4, math.pi / 2)


@dataclass
class AugmentConfig:
    """ADA settings. Under DP set `fixed_p`: the adaptive p reads D(real), which is private."""

    preset: str = "bgc"
    xflip: bool = False
    rotate90: bool = False
    rotate: bool = True
    target: float = 0.6
    adjust_kimg: float = 500.0
    interval: int = 4
    fixed_p: float | None = None
    max_rotate_deg: float = 15.0
    luma_flip: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(
                f"AugmentConfig.preset is {self.preset!r}; use one of {sorted(PRESETS)} "
                "('bgc' is the default, 'bgcfnc' the paper's)."
            )
        if not -1.0 <= self.target <= 1.0:
            raise ValueError(
                f"AugmentConfig.target is {self.target}; r_t is a mean sign in [-1, 1], so set a "
                "target inside it (0.6 is the paper's)."
            )
        if self.adjust_kimg <= 0:
            raise ValueError(
                f"AugmentConfig.adjust_kimg is {self.adjust_kimg}; it must be positive (500 is "
                "the paper's)."
            )
        if self.interval < 1:
            raise ValueError(
                f"AugmentConfig.interval is {self.interval}; it must be at least 1 minibatch."
            )
        if self.fixed_p is not None and not 0.0 <= self.fixed_p <= 1.0:
            raise ValueError(
                f"AugmentConfig.fixed_p is {self.fixed_p}; a probability must lie in [0, 1]."
            )
        if not 0.0 <= self.max_rotate_deg <= 180.0:
            raise ValueError(
                f"AugmentConfig.max_rotate_deg is {self.max_rotate_deg}; use a value in "
                "[0, 180] degrees."
            )


class AugmentPipe(torch.nn.Module):
    """Differentiable per-sample augmentation of [N, C, H, W] images in about [-1, 1]."""

    def __init__(self, cfg: AugmentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        start = 0.0 if cfg.fixed_p is None else float(cfg.fixed_p)
        self.register_buffer("p", torch.tensor(start, dtype=torch.float32))
        self.enabled_ops: tuple[str, ...] = _enabled_ops(cfg)
        self.register_buffer("bands", _octave_bands(), persistent=False)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment each sample with probability p per operation; p == 0 returns `images`."""
        _check_images(images)
        if not self.enabled_ops or float(self.p) == 0.0:
            return images
        params = self.sample_params(images.shape, images.device, generator)
        return self.apply(images, params)

    def sample_params(
        self,
        shape: torch.Size | tuple[int, ...],
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Draw every random choice for a batch of `shape`; each tensor's first dim is N.

        Keys: `mask_<op>` (bool: the op ran on that sample) for each enabled op, and the ops'
        parameters (`xflip`, `rotate90`, `translate_int`, `scale_iso`, `rotate`, `scale_aniso`,
        `aniso_axis`, `translate_frac`, `brightness`, `contrast`, `luma_flip`, `filter_gains`,
        `noise_std`, `noise`, `cutout_center`); an op that did not run holds its identity value.
        The filter, as in the paper, draws each of its four band gains with probability p and
        is masked on when any band is. Drawn on the generator's device (default: `device`),
        then moved to `device`; the draws never look at pixels, which keeps samples independent.
        """
        n, c, h, w = shape
        out_device = torch.device(device) if device is not None else self.p.device
        draw_device = generator.device if generator is not None else out_device
        p = self.p.detach().to(draw_device, torch.float32)

        def rand(*size: int) -> Tensor:
            return torch.rand(size, generator=generator, device=draw_device)

        def randn(*size: int) -> Tensor:
            return torch.randn(size, generator=generator, device=draw_device)

        ops = set(self.enabled_ops)
        params: dict[str, Tensor] = {}
        for op in self.enabled_ops:
            if op != "filter":  # the filter draws one mask per band below
                params[f"mask_{op}"] = rand(n) < p
        m = {key.removeprefix("mask_"): mask for key, mask in params.items()}
        if "xflip" in ops:
            params["xflip"] = m["xflip"] & (rand(n) < 0.5)
        if "rotate90" in ops:
            params["rotate90"] = torch.where(m["rotate90"], torch.floor(rand(n) * 4), 0).long()
        if "translate_int" in ops:
            t = (rand(n, 2) * 2 - 1) * INT_TRANSLATE_MAX
            params["translate_int"] = torch.where(m["translate_int"][:, None], t, 0.0)
        if "scale_iso" in ops:
            params["scale_iso"] = torch.where(m["scale_iso"], torch.exp2(randn(n) * SCALE_STD), 1)
        if "rotate" in ops:
            angle = (rand(n) * 2 - 1) * math.radians(self.cfg.max_rotate_deg)
            params["rotate"] = torch.where(m["rotate"], angle, 0.0)
        if "scale_aniso" in ops:
            s = torch.exp2(randn(n) * SCALE_STD)
            params["scale_aniso"] = torch.where(m["scale_aniso"], s, 1.0)
            params["aniso_axis"] = rand(n) * math.pi
        if "translate_frac" in ops:
            t = randn(n, 2) * FRAC_TRANSLATE_STD
            params["translate_frac"] = torch.where(m["translate_frac"][:, None], t, 0.0)
        if "brightness" in ops:
            params["brightness"] = torch.where(m["brightness"], randn(n) * BRIGHTNESS_STD, 0.0)
        if "contrast" in ops:
            gain = torch.exp2(randn(n) * CONTRAST_STD)
            params["contrast"] = torch.where(m["contrast"], gain, 1.0)
        if "luma_flip" in ops:
            flip = m["luma_flip"] & (rand(n) < 0.5)
            params["luma_flip"] = 1.0 - 2.0 * flip.float()
        if "filter" in ops:
            band_on = rand(n, len(BAND_POWER)) < p
            gains = torch.where(band_on, torch.exp2(randn(n, len(BAND_POWER)) * FILTER_GAIN_STD), 1)
            power = torch.tensor(BAND_POWER, device=draw_device)
            gains = gains / (gains.square() * power).sum(dim=1, keepdim=True).sqrt()
            params["mask_filter"] = band_on.any(dim=1)
            params["filter_gains"] = gains
        if "noise" in ops:
            std = randn(n).abs() * NOISE_STD
            params["noise_std"] = torch.where(m["noise"], std, 0.0)
            params["noise"] = randn(n, c, h, w)
        if "cutout" in ops:
            params["cutout_center"] = rand(n, 2)
        return {k: v.to(out_device) for k, v in params.items()}

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Apply drawn parameters; differentiable, per-sample, no data-dependent branches."""
        _check_images(images)
        missing = [f"mask_{op}" for op in self.enabled_ops if f"mask_{op}" not in params]
        if missing:
            raise KeyError(
                f"AugmentPipe.apply: params lack {missing}; draw them with sample_params() of a "
                "pipe with the same AugmentConfig."
            )
        x = images
        ops = set(self.enabled_ops)
        if ops & {"xflip", "rotate90", "translate_int"}:
            x = _blit(x, params)
        geom = [op for op in ("scale_iso", "rotate", "scale_aniso", "translate_frac") if op in ops]
        if geom:
            x = _geom(x, params, geom)
        if ops & {"brightness", "contrast", "luma_flip"}:
            x = _color(x, params)
        if "filter" in ops:
            x = _filter(x, params, self.bands)
        if "noise" in ops:
            std = params["noise_std"].to(x.dtype)
            x = x + std.view(-1, 1, 1, 1) * params["noise"].to(x.dtype)
        if "cutout" in ops:
            x = _cutout(x, params)
        return x


class AdaptiveP:
    """The ADA heuristic r_t = E[sign(D(x_real))] that steers the pipe's p toward `target`.

    Kept apart from the pipe so a DP run can fix p: with `fixed_p` set, nothing derived from
    D(real) is even stored, and p never moves.
    """

    def __init__(self, pipe: AugmentPipe, cfg: AugmentConfig, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"AdaptiveP: batch_size is {batch_size}; it must be at least 1.")
        self.pipe = pipe
        self.cfg = cfg
        self.batch_size = batch_size
        self._sign_sum: Tensor | None = None
        self._count = 0
        self._calls = 0

    @property
    def adjust_step(self) -> float:
        """How far p moves per adjustment: batch * interval / (adjust_kimg * 1000)."""
        return self.batch_size * self.cfg.interval / (self.cfg.adjust_kimg * 1000.0)

    def accumulate(self, real_logits: Tensor) -> None:
        """Add sign(D(real)) of one minibatch (kept on its device: no host sync here)."""
        if self.cfg.fixed_p is not None:
            return
        signs = torch.sign(real_logits.detach().float()).sum()
        self._sign_sum = signs if self._sign_sum is None else self._sign_sum + signs
        self._count += real_logits.numel()
        self._calls += 1

    def maybe_update(self) -> float | None:
        """Every `interval` minibatches move p by ±adjust_step; returns r_t when it did."""
        if self.cfg.fixed_p is not None or self._calls < self.cfg.interval or self._count == 0:
            return None
        r_t = float(self._sign_sum) / self._count
        direction = (r_t > self.cfg.target) - (r_t < self.cfg.target)
        new_p = min(max(float(self.pipe.p) + direction * self.adjust_step, 0.0), 1.0)
        with torch.no_grad():
            self.pipe.p.fill_(new_p)
        self._sign_sum, self._count, self._calls = None, 0, 0
        return r_t

    def state_dict(self) -> dict[str, float | int]:
        """p and the partial r_t statistics, so resume and federation keep ADA's state."""
        return {
            "p": float(self.pipe.p),
            "sign_sum": 0.0 if self._sign_sum is None else float(self._sign_sum),
            "count": self._count,
            "calls": self._calls,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore what `state_dict` returned; sets the pipe's p too (to `fixed_p` if set)."""
        missing = {"p", "sign_sum", "count", "calls"} - set(state)
        if missing:
            raise KeyError(
                f"AdaptiveP.load_state_dict: state lacks {sorted(missing)}; pass a dict made by "
                "AdaptiveP.state_dict()."
            )
        p = float(state["p"])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"AdaptiveP.load_state_dict: p is {p}; it must lie in [0, 1].")
        if self.cfg.fixed_p is not None:
            # The config decides, e.g. for a DP run resumed from a non-DP one's state.
            p, state = float(self.cfg.fixed_p), {"count": 0, "calls": 0, "sign_sum": 0.0}
        with torch.no_grad():
            self.pipe.p.fill_(p)
        self._count = int(state["count"])
        self._calls = int(state["calls"])
        self._sign_sum = (
            torch.tensor(float(state["sign_sum"]), device=self.pipe.p.device)
            if self._calls
            else None
        )


def _enabled_ops(cfg: AugmentConfig) -> tuple[str, ...]:
    groups = PRESETS[cfg.preset]
    ops: list[str] = []
    if "blit" in groups:
        ops += ["xflip"] if cfg.xflip else []
        ops += ["rotate90"] if cfg.rotate90 else []
        ops += ["translate_int"]
    if "geom" in groups:
        ops += ["scale_iso"]
        ops += ["rotate"] if cfg.rotate and cfg.max_rotate_deg > 0 else []
        ops += ["scale_aniso", "translate_frac"]
    if "color" in groups:
        ops += ["brightness", "contrast"]
        ops += ["luma_flip"] if cfg.luma_flip else []
    ops += [g for g in ("filter", "noise", "cutout") if g in groups]
    return tuple(ops)


def _check_images(images: Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(
            f"AugmentPipe expects images shaped [N, C, H, W]; got {tuple(images.shape)}. "
            "Add the batch and channel dims (e.g. x[None, None])."
        )


def _octave_bands() -> Tensor:
    """Four 1-D band-pass kernels (differences of sampled Gaussians) that sum to a delta."""
    sigmas = [math.sqrt(2 * math.log(2)) / wc for wc in BAND_CUTOFFS]  # half gain at cutoff
    radius = math.ceil(3 * max(sigmas))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    lows = []
    for sigma in sigmas:
        g = torch.exp(-0.5 * (taps / sigma) ** 2)
        lows.append(g / g.sum())
    delta = (taps == 0).double()
    bands = [lows[0], lows[1] - lows[0], lows[2] - lows[1], delta - lows[2]]
    return torch.stack(bands).float()


def _reflect(index: Tensor, size: int) -> Tensor:
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - index, index)


def _blit(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """x-flip, rotate-90 and integer translation as one exact gather of source pixels."""
    n, c, h, w = x.shape
    y_out = torch.arange(h, device=x.device).view(1, h, 1).expand(n, h, w)
    x_out = torch.arange(w, device=x.device).view(1, 1, w).expand(n, h, w)
    if "translate_int" in params:
        shift = params["translate_int"]
        tx = torch.round(shift[:, 0] * w).long().view(n, 1, 1)
        ty = torch.round(shift[:, 1] * h).long().view(n, 1, 1)
        y_out, x_out = _reflect(y_out - ty, h), _reflect(x_out - tx, w)
    if "rotate90" in params:
        if h != w:
            raise ValueError(
                f"AugmentPipe: rotate90 needs square images; got {h}x{w}. Turn "
                "AugmentConfig.rotate90 off or resize the images."
            )
        k = params["rotate90"].view(n, 1, 1)
        last = h - 1
        y_src = torch.where(
            k == 1,
            x_out,
            torch.where(k == 2, last - y_out, torch.where(k == 3, last - x_out, y_out)),
        )
        x_src = torch.where(
            k == 1,
            last - y_out,
            torch.where(k == 2, last - x_out, torch.where(k == 3, y_out, x_out)),
        )
        y_out, x_out = y_src, x_src
    if "xflip" in params:
        x_out = torch.where(params["xflip"].view(n, 1, 1), w - 1 - x_out, x_out)
    index = (y_out * w + x_out).reshape(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)


def _geom(x: Tensor, params: dict[str, Tensor], ops: list[str]) -> Tensor:
    """One bilinear resample per sample through the composed inverse affine matrix."""
    n, c, h, w = x.shape
    eye = torch.eye(3, device=x.device).expand(n, 3, 3)
    inv = eye  # maps output pixel coordinates (origin at the centre) to input ones
    if "translate_frac" in params:
        t = params["translate_frac"]
        inv = _translation(-t[:, 0] * w, -t[:, 1] * h) @ inv
    if "rotate" in params:
        inv = _rotation(-params["rotate"]) @ inv
    if "scale_aniso" in params:
        s, axis = params["scale_aniso"], params["aniso_axis"]
        inv = _rotation(axis) @ _scale(1 / s, s) @ _rotation(-axis) @ inv
    if "scale_iso" in params:
        s = params["scale_iso"]
        inv = _scale(1 / s, 1 / s) @ inv
    to_norm = torch.diag(torch.tensor([2 / w, 2 / h, 1.0], device=x.device))
    from_norm = torch.diag(torch.tensor([w / 2, h / 2, 1.0], device=x.device))
    theta = (to_norm @ inv @ from_norm)[:, :2, :].to(x.dtype)
    grid = _sampling_grid(theta, h, w)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    active = torch.stack([params[f"mask_{op}"] for op in ops]).any(dim=0)
    return torch.where(active.view(n, 1, 1, 1), out, x)


def _sampling_grid(theta: Tensor, h: int, w: int) -> Tensor:
    """`affine_grid` (align_corners=False) as a matmul, which vmap batches without a loop."""
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    base = torch.stack(
        [xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w), torch.ones_like(xs).expand(h, w)],
        dim=-1,
    )  # [H, W, 3]
    return torch.einsum("hwk,njk->nhwj", base, theta)


def _translation(tx: Tensor, ty: Tensor) -> Tensor:
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    rows = [torch.stack([one, zero, tx], -1), torch.stack([zero, one, ty], -1)]
    return torch.stack([*rows, torch.stack([zero, zero, one], -1)], -2)


def _rotation(angle: Tensor) -> Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    rows = [torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)]
    return torch.stack([*rows, torch.stack([zero, zero, one], -1)], -2)


def _scale(sx: Tensor, sy: Tensor) -> Tensor:
    one, zero = torch.ones_like(sx), torch.zeros_like(sx)
    rows = [torch.stack([sx, zero, zero], -1), torch.stack([zero, sy, zero], -1)]
    return torch.stack([*rows, torch.stack([zero, zero, one], -1)], -2)


def _color(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """(x + brightness) * contrast * flip, as one per-sample gain and offset."""
    n = x.shape[0]
    ones = torch.ones(n, device=x.device)
    bright = params.get("brightness", ones * 0)
    gain = params.get("contrast", ones) * params.get("luma_flip", ones)
    gain, offset = gain.to(x.dtype).view(n, 1, 1, 1), (bright * gain).to(x.dtype).view(n, 1, 1, 1)
    return x * gain + offset


def _filter(x: Tensor, params: dict[str, Tensor], bands: Tensor) -> Tensor:
    """Separable per-sample filtering as two grouped convolutions (groups = N * C)."""
    n, c, h, w = x.shape
    taps = bands.shape[1]
    radius = taps // 2
    if h <= radius or w <= radius:
        raise ValueError(
            f"AugmentPipe: the filter op needs images larger than {radius} px a side; got "
            f"{h}x{w}. Use the 'bgc' preset for images this small."
        )
    kernel = params["filter_gains"].to(bands.dtype) @ bands  # [N, taps]
    kernel = kernel.to(x.dtype).repeat_interleave(c, dim=0)  # [N * C, taps]
    padded = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    out = F.conv2d(padded, kernel.view(n * c, 1, 1, taps), groups=n * c)
    out = F.conv2d(out, kernel.view(n * c, 1, taps, 1), groups=n * c).reshape(n, c, h, w)
    return torch.where(params["mask_filter"].view(n, 1, 1, 1), out, x)


def _cutout(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    n, _, h, w = x.shape
    center = params["cutout_center"].to(x.dtype)
    ys = ((torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h).view(1, h, 1)
    xs = ((torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w).view(1, 1, w)
    outside = ((xs - center[:, 0].view(n, 1, 1)).abs() >= CUTOUT_SIZE / 2) | (
        (ys - center[:, 1].view(n, 1, 1)).abs() >= CUTOUT_SIZE / 2
    )
    keep = outside | ~params["mask_cutout"].view(n, 1, 1)
    return x * keep.unsqueeze(1).to(x.dtype)
