"""The settings of ``fedspine evaluate`` and its error: what every evaluation step reads.

``EvaluateConfig`` is written as config.json beside the report, so each number can be traced to
the settings that made it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ProgressFn = Callable[[dict[str, Any]], None]

ARMS = ("TRTR", "TSTR", "mixed")
EXTRACTORS = ("auto", "domain", "inception")
HELDOUT = ("test", "val")
SYNTHETIC_SPLIT = "synthetic"
WORK_DIR = "intermediate"
"""Inside the report folder: the ingested synthetic set, the classifiers, the domain extractor."""
SYNTHETIC_PREPARED = "synthetic_prepared"
PRECISION_K = 3
PAIRS_SHOWN = 8
SAMPLES_PER_CLASS = 8


class EvaluateError(Exception):
    """The inputs cannot be evaluated; the message names the input and what to do."""


@dataclass
class EvaluateConfig:
    """Every setting of an evaluation; written as config.json beside the report.

    ``input_size`` None means the real data's resolution. ``mix_per_class`` None puts every
    synthetic image into the mixed arm; 0 skips that arm. ``extractor`` ``auto`` uses the
    Inception file when ``inception`` is given, else the domain CNN. ``heldout`` names the real
    images that calibrate the memorisation audit: ``test`` (TEST's test split) or ``val``
    (TRAIN's validation split); the generator saw neither. ``max_train_images`` caps every arm's
    training rows and ``max_metric_images`` each image set of the distribution metrics (CPU).
    ``epochs`` and ``patience`` count validation checks, TRTR's epoch length apart, so every arm
    trains for the same optimizer steps. ``judge_seed`` None picks the TRTS judge itself (the
    TRTR classifier when the generator trained against no classifier, else one of another
    seed); a seed given is refused when it would rebuild the generator's own classifier.
    """

    arch: str = "small"
    norm: str = "batch"
    weights: str | None = None
    task: str = "auto"
    epochs: int = 30
    batch: int = 32
    lr: float = 1e-3
    patience: int = 5
    input_size: int | None = None
    seed: int = 0
    mix_per_class: int | None = None
    bootstrap: int = 1000
    extractor: str = "auto"
    inception: str | None = None
    domain_epochs: int = 10
    domain_input_size: int | None = None
    pixel_size: int = 16
    kid_subsets: int = 100
    heldout: str = "test"
    device: str = "auto"
    threads: int = 0
    max_train_images: int | None = None
    max_metric_images: int | None = None
    judge_seed: int | None = None

    def validate(self) -> None:
        """Refuse settings no evaluation can run with; the message names the option."""
        from fedspine.models.classifier import ARCHS, NORMS, TASKS  # torch: not for `--help`

        if self.arch not in ARCHS:
            raise EvaluateError(f"--arch {self.arch!r}: expected one of {ARCHS}")
        if self.norm not in NORMS:
            raise EvaluateError(f"--norm {self.norm!r}: expected one of {NORMS}")
        if self.task not in (*TASKS, "auto"):
            raise EvaluateError(f"--task {self.task!r}: expected auto or one of {TASKS}")
        if self.extractor not in EXTRACTORS:
            raise EvaluateError(f"--extractor {self.extractor!r}: expected one of {EXTRACTORS}")
        if self.extractor == "inception" and not self.inception:
            raise EvaluateError("--extractor inception needs --inception FILE")
        if self.heldout not in HELDOUT:
            raise EvaluateError(f"--heldout {self.heldout!r}: expected one of {HELDOUT}")
        positive = {
            "epochs": self.epochs,
            "bootstrap": self.bootstrap,
            "domain_epochs": self.domain_epochs,
            "pixel_size": self.pixel_size,
            "kid_subsets": self.kid_subsets,
            "patience": self.patience,
        }
        for name, value in positive.items():
            if value < 1:
                raise EvaluateError(f"{name} must be at least 1, got {value}")
        if self.batch < 2:
            raise EvaluateError(f"batch must be at least 2, got {self.batch}")
        if self.mix_per_class is not None and self.mix_per_class < 0:
            raise EvaluateError(f"--mix-per-class must be 0 or more, got {self.mix_per_class}")
        if self.max_train_images is not None and self.max_train_images < 2:
            raise EvaluateError("--max-train-images must be at least 2")
        if self.max_metric_images is not None and self.max_metric_images < PRECISION_K + 1:
            raise EvaluateError(f"--max-metric-images must be at least {PRECISION_K + 1}")
        if self.inception and not Path(self.inception).is_file():
            raise EvaluateError(
                f"{self.inception}: Inception-v3 TorchScript file not found; pass a local copy "
                "(fedspine never downloads weights)"
            )
        if self.weights and not Path(self.weights).is_file():
            raise EvaluateError(f"{self.weights}: no such classifier weights file")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluateConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
