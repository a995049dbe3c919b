"""The shape of a generator / discriminator pair: :class:`NetworkConfig`.

Its own module so that the networks can import it at load time: ``fedspine.models`` imports the
networks and re-exports this class.
"""

from __future__ import annotations

from dataclasses import dataclass

HOW_IT_COMPUTES = ("fused_modconv", "reduced_precision_resolutions")


@dataclass
class NetworkConfig:
    """Shape of a generator / discriminator pair; both are built from the same config.

    Channels at resolution r are min(channel_base // r, channel_max). `mbstd_group = 0` removes
    the minibatch-std layer from D, which must be off under DP because it mixes samples.
    `c_dim = 0` makes both networks unconditional. `fused_modconv` picks the modulated
    convolution's path (same function, different speed); "auto" lets the trainer measure.
    `reduced_precision_resolutions` is how many of the highest resolutions of both networks
    compute in bf16/fp16 when the trainer runs reduced precision (NVIDIA's `num_fp16_res`; never
    below 8 px, 0: none); like `fused_modconv` it changes how the networks compute, not what
    they are, so it is not part of their identity (see `identity`).
    """

    resolution: int = 64
    img_channels: int = 1
    c_dim: int = 2
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 2
    channel_base: int = 16384
    channel_max: int = 512
    mbstd_group: int = 4
    mbstd_channels: int = 1
    fused_modconv: bool | str = True
    conv_clamp: float | None = None
    reduced_precision_resolutions: int = 4

    def __post_init__(self) -> None:
        r = self.resolution
        if r < 8 or r & (r - 1):
            raise ValueError(
                f"NetworkConfig: resolution {r} is not a power of two >= 8; "
                "use 8, 16, 32, 64, 128, 256 ..."
            )
        if self.fused_modconv not in (True, False, "auto"):
            raise ValueError(
                f'NetworkConfig: fused_modconv must be true, false or "auto", '
                f"got {self.fused_modconv!r}"
            )
        positive = ("img_channels", "z_dim", "w_dim", "mapping_layers", "channel_base")
        for name in (*positive, "channel_max", "mbstd_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"NetworkConfig: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("c_dim", "mbstd_group", "reduced_precision_resolutions"):
            if getattr(self, name) < 0:
                raise ValueError(f"NetworkConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.conv_clamp is not None and self.conv_clamp <= 0:
            raise ValueError(
                f"NetworkConfig: conv_clamp must be > 0 or None, got {self.conv_clamp}"
            )
        for res in self.block_resolutions:
            if self.channels_at(res) < 1:
                raise ValueError(
                    f"NetworkConfig: channel_base {self.channel_base} gives 0 channels at "
                    f"{res} px; raise channel_base to at least {self.resolution}"
                )

    def channels_at(self, res: int) -> int:
        """Feature channels of both networks at resolution `res`."""
        return min(self.channel_base // res, self.channel_max)

    def reduced_at(self, res: int) -> bool:
        """Whether the blocks at resolution `res` (G's block making `res` px, D's block reading
        `res` px) are reduced-precision ones: the `reduced_precision_resolutions` highest,
        never below 8 px (NVIDIA: res >= max(2 ** (log2 R + 1 - n), 8))."""
        n = self.reduced_precision_resolutions
        if n <= 0:
            return False
        lowest = max(2 ** (self.resolution.bit_length() - n), 8)
        return res >= lowest

    @staticmethod
    def identity(data: dict) -> dict:
        """A network config dict without the keys that choose how it computes (the
        modulated-convolution path, the reduced-precision blocks): two configs with the same
        identity build networks with the same parameters and the same function."""
        return {k: v for k, v in data.items() if k not in HOW_IT_COMPUTES}

    @property
    def block_resolutions(self) -> list[int]:
        """Resolutions of the generator's blocks: 4, 8, ..., resolution."""
        return [2**k for k in range(2, self.resolution.bit_length())]

    @property
    def num_ws(self) -> int:
        """Style vectors the synthesis network reads: one per modulated 3x3 conv (1 at 4 px, 2 at
        every higher resolution) plus one for the last toRGB; each other toRGB shares the w of the
        next block's first conv. 2 * log2(resolution) - 2, e.g. 10 at 64 px, 14 at 256 px."""
        return 2 * (self.resolution.bit_length() - 1) - 2
