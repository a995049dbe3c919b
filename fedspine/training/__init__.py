"""fedspine.training: the GAN trainer shared by centralised and federated training.

`GanTrainer` (one training state and its step; every variant is it composed from parts, built
by `build_trainer` from a `TrainerSpec`), `TrainConfig` with `preset_config` (every knob
and the presets), the per-sample losses, safe checkpoints, synthetic dataset generation, and
`fedspine.training.run.train`, one whole run as a library call. The names below load on first
use, so that importing a light submodule (the run's request types, for `--help`) does not import
torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "GanTrainer": "fedspine.training.gan_trainer",
    "StepMetrics": "fedspine.training.gan_trainer",
    "TrainerSpec": "fedspine.training.factory",
    "build_trainer": "fedspine.training.factory",
    "TrainConfig": "fedspine.training.config",
    "preset_config": "fedspine.training.config",
}

__all__ = [
    "GanTrainer",
    "StepMetrics",
    "TrainConfig",
    "TrainerSpec",
    "build_trainer",
    "preset_config",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedspine.training' has no attribute {name!r}")
