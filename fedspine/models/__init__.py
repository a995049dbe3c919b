"""fedspine's conditional StyleGAN2 networks: `Generator`, `Discriminator` and their config."""

from __future__ import annotations

from fedspine.models.config import NetworkConfig
from fedspine.models.discriminator import Discriminator
from fedspine.models.generator import Generator

__all__ = ["Discriminator", "Generator", "NetworkConfig"]
