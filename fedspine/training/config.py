"""Every knob of GAN training in one typed config, and the presets that fill it.

The presets live in one table (:data:`PRESETS`) so the numbers that decide a run can be read
in one place: ``paper`` (the 256 px setting of Schonfeld & Veeravagu), ``auto`` (the published
StyleGAN2-ADA formulas for any resolution on one GPU) and ``cpu`` (narrow networks that learn a
phantom's classes on a laptop in a few kimg).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedspine.models import NetworkConfig
from fedspine.models.augment import AugmentConfig
from fedspine.training.precision import MIXED_PRECISION

DEVICES = ("auto", "cpu", "cuda")
G_TRAINABLE = ("all", "mapping")


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes (the data aside)."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    preset: str = "custom"
    batch: int = 32
    g_lr: float = 0.0025
    d_lr: float = 0.0025
    g_betas: tuple[float, float] = (0.0, 0.99)
    d_betas: tuple[float, float] = (0.0, 0.99)
    adam_eps: float = 1e-8
    r1_gamma: float = 0.0256
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing: float = 0.9
    ema_kimg: float = 10.0
    ema_rampup: float | None = 0.05
    total_kimg: float = 25000.0
    tick_kimg: float = 4.0
    snapshot_kimg: float = 200.0
    seed: int = 0
    device: str = "auto"
    # float32 unless a preset or the user asks: a config saved without this key (older runs)
    # or built without a preset trains in float32.
    mixed_precision: str = "off"
    g_trainable: str = "all"
    """Which of G's parameters its optimizer trains: "all", or "mapping" (the label embedding
    and mapping network; the synthesis network keeps its starting weights). DP fine-tuning
    with part of D frozen trains the mapping only (``dp_train_config``)."""

    def __post_init__(self) -> None:
        self.g_betas = (float(self.g_betas[0]), float(self.g_betas[1]))
        self.d_betas = (float(self.d_betas[0]), float(self.d_betas[1]))
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION}, not {self.mixed_precision!r}"
            )
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be one of {DEVICES} or cuda:N, not {self.device!r}")
        if self.batch < 1 or self.pl_batch_shrink < 1:
            raise ValueError("batch and pl_batch_shrink must be at least 1")
        if self.g_trainable not in G_TRAINABLE:
            raise ValueError(f"g_trainable must be one of {G_TRAINABLE}, not {self.g_trainable!r}")

    @property
    def resolution(self) -> int:
        return int(self.network.resolution)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples kept): safe for weights-only checkpoints and TOML."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        data = dict(data)
        network = _dataclass_from_dict(NetworkConfig, data.pop("network", {}))
        augment = _dataclass_from_dict(AugmentConfig, data.pop("augment", {}))
        cfg = _dataclass_from_dict(cls, data, network=network, augment=augment)
        return cfg


def preset_config(name: str, resolution: int | None, num_classes: int) -> TrainConfig:
    """The preset ``name`` for ``num_classes`` classes at ``resolution`` px (None: its default).

    ``paper`` is fixed at 256 px; ``auto`` needs the resolution (the dataset's); ``cpu`` defaults
    to 32 px and accepts 16-64.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if num_classes < 1:
        raise ValueError("a conditional GAN needs at least one class")
    return PRESETS[name](resolution, num_classes)


def auto_batch(resolution: int, gpus: int = 1) -> int:
    """StyleGAN2-ADA's ``auto`` batch: max(min(gpus * min(4096 // res, 32), 64), gpus)."""
    return max(min(gpus * min(4096 // resolution, 32), 64), gpus)


def auto_r1_gamma(resolution: int, batch: int) -> float:
    """StyleGAN2-ADA's ``auto`` R1 weight: 0.0002 * res^2 / batch."""
    return 0.0002 * resolution**2 / batch


def auto_ema_kimg(batch: int) -> float:
    """StyleGAN2-ADA's ``auto`` EMA half-life: batch * 10 / 32 kimg."""
    return batch * 10 / 32


def write_config_toml(path: str | Path, data: dict[str, Any]) -> Path:
    """Write a nested dict of scalars/lists as TOML (None values become comments)."""
    path = Path(path)
    path.write_text(to_toml(data))
    return path


def read_config_toml(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def to_toml(data: dict[str, Any]) -> str:
    """A minimal TOML writer: top-level scalars first, then one table per nested dict."""
    lines: list[str] = []
    _emit_table(lines, data, prefix=())
    return "\n".join(lines).lstrip("\n") + "\n"


def _paper(resolution: int | None, num_classes: int) -> TrainConfig:
    if resolution not in (None, 256):
        raise ValueError(
            f"the paper preset is 256 px, not {resolution}; use --preset auto for other sizes"
        )
    res, batch = 256, 16
    return TrainConfig(
        preset="paper",
        network=NetworkConfig(
            resolution=res,
            img_channels=1,
            c_dim=num_classes,
            z_dim=512,
            w_dim=512,
            mapping_layers=2,
            channel_base=16384,
            channel_max=512,
            mbstd_group=min(batch, 4),
            mbstd_channels=1,
            fused_modconv="auto",
            conv_clamp=256,
        ),
        augment=AugmentConfig(preset="bgcfnc", target=0.6, adjust_kimg=500.0, interval=4),
        batch=batch,
        g_lr=0.0025,
        d_lr=0.0025,
        r1_gamma=0.8192,
        ema_kimg=5.0,
        ema_rampup=0.05,
        total_kimg=8000.0,
        tick_kimg=4.0,
        snapshot_kimg=200.0,
        mixed_precision="auto",
    )


def _auto(resolution: int | None, num_classes: int) -> TrainConfig:
    if resolution is None:
        raise ValueError("the auto preset needs a resolution (the dataset's)")
    _check_power_of_two(resolution, low=8)
    batch = auto_batch(resolution)
    lr = 0.002 if resolution >= 1024 else 0.0025
    return TrainConfig(
        preset="auto",
        network=NetworkConfig(
            resolution=resolution,
            img_channels=1,
            c_dim=num_classes,
            z_dim=512,
            w_dim=512,
            mapping_layers=2,
            channel_base=32768 if resolution >= 512 else 16384,
            channel_max=512,
            mbstd_group=min(batch, 4),
            mbstd_channels=1,
            fused_modconv="auto",
            conv_clamp=256,
        ),
        augment=AugmentConfig(preset="bgc", target=0.6, adjust_kimg=500.0, interval=4),
        batch=batch,
        g_lr=lr,
        d_lr=lr,
        r1_gamma=auto_r1_gamma(resolution, batch),
        ema_kimg=auto_ema_kimg(batch),
        ema_rampup=0.05,
        total_kimg=25000.0,
        tick_kimg=4.0,
        snapshot_kimg=200.0,
        mixed_precision="auto",
    )


def _cpu(resolution: int | None, num_classes: int) -> TrainConfig:
    res = 32 if resolution is None else resolution
    _check_power_of_two(res, low=16)
    if res > 64:
        raise ValueError(f"the cpu preset is for 16-64 px, not {res}; use --preset auto")
    batch = 32
    wide = res >= 64
    return TrainConfig(
        preset="cpu",
        network=NetworkConfig(
            resolution=res,
            img_channels=1,
            c_dim=num_classes,
            z_dim=128,
            w_dim=128,
            mapping_layers=2,
            channel_base=4096 if wide else 2048,
            channel_max=256 if wide else 128,
            mbstd_group=4,
            mbstd_channels=1,
            # Measured on a 2-core CPU: a training step with the non-fused modulated conv ran
            # 1.37x (32 px) and 1.45x (64 px) as fast as with the fused (grouped) one.
            fused_modconv=False,
            conv_clamp=None,
        ),
        # A phantom site holds hundreds of images, so ADA has to react within a few kimg.
        augment=AugmentConfig(preset="bgc", target=0.6, adjust_kimg=100.0, interval=4),
        batch=batch,
        g_lr=0.0025,
        d_lr=0.0025,
        r1_gamma=auto_r1_gamma(res, batch),
        ema_kimg=auto_ema_kimg(batch),
        ema_rampup=0.05,
        total_kimg=10.0,
        tick_kimg=0.5,
        snapshot_kimg=2.0,
        mixed_precision="off",
    )


PRESETS = {"paper": _paper, "auto": _auto, "cpu": _cpu}


def _check_power_of_two(resolution: int, low: int) -> None:
    if resolution < low or 2 ** int(round(math.log2(resolution))) != resolution:
        raise ValueError(f"resolution must be a power of two >= {low}, not {resolution}")


def _dataclass_from_dict(cls, data: dict[str, Any], **fixed):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s): {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    kwargs.update(fixed)
    return cls(**kwargs)


def _emit_table(lines: list[str], data: dict[str, Any], prefix: tuple[str, ...]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append("")
        lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
    for key, value in scalars.items():
        if value is None:
            lines.append(f"# {_toml_key(key)} is not set")
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables.items():
        _emit_table(lines, value, (*prefix, key))


def _toml_key(key: str) -> str:
    key = str(key)
    if key and all(ch.isalnum() or ch in "_-" for ch in key):
        return key
    return _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        if any(v is None for v in value):
            raise ValueError("TOML arrays cannot hold None")
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Path):
        return _toml_string(str(value))
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
