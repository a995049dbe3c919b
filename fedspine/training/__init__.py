"""fedspine.training: the GAN trainer shared by centralised and federated training.

`GanTrainer` (one training state and its step), `TrainConfig` with `preset_config` (every knob
and the presets), the per-sample losses, safe checkpoints and synthetic dataset generation.
"""

from fedspine.training.config import TrainConfig, preset_config
from fedspine.training.gan_trainer import GanTrainer, StepMetrics

__all__ = ["GanTrainer", "StepMetrics", "TrainConfig", "preset_config"]
