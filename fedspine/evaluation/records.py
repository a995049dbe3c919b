"""What ``fedspine evaluate`` writes to ``report.json``, as typed records.

Every module that reads an evaluation (the Markdown and HTML renderers, ``reproduce``, the CLI
summary) reads these records instead of string keys, so a renamed key fails in one place. Each
record's ``to_json()`` gives exactly the JSON written today (same keys, same order, same
values) and ``from_json(dict)`` reads it back; a key missing from an older report.json reads as
None, and a key this version does not know is ignored. Settings and a classifier's training
history stay plain dicts: they are owned by ``EvaluateConfig`` and the classifier trainer.
"""

from __future__ import annotations

import json
import math
import os
import types
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Self, Union, get_args, get_origin, get_type_hints

import numpy as np

from fedspine.fileio import EVAL_REPORT_JSON, write_json_atomic


class JsonRecord:
    """A frozen dataclass that reads and writes itself as the JSON object of its fields.

    Nested records, and lists and dicts of records, are converted by their type hints.
    ``OPTIONAL`` names the keys written only when set (None means absent, not null).
    """

    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in field order."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.name in self.OPTIONAL:
                continue
            out[f.name] = _encode(value)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        """Read the record; missing keys read as None, unknown keys are ignored."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = _hints(cls)
        return cls(**{f.name: _decode(hints[f.name], data.get(f.name)) for f in fields(cls)})  # type: ignore[arg-type]


def _encode(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _decode(hint: Any, value: Any) -> Any:
    """``value`` as ``hint`` says: records from dicts, inside lists and dicts too."""
    if value is None:
        return None
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        return _decode(inner[0], value) if len(inner) == 1 else value
    if isinstance(hint, type) and issubclass(hint, JsonRecord):
        return hint.from_json(value) if isinstance(value, dict) else None
    if origin is dict and isinstance(value, dict):
        item = get_args(hint)[1]
        return {k: _decode(item, v) for k, v in value.items()}
    if origin is list and isinstance(value, list):
        item = get_args(hint)[0]
        return [_decode(item, v) for v in value]
    return value


Interval = list[float]
"""A 95 % interval [low, high] as report.json writes it."""


# --- the classifier arms -----------------------------------------------------------------


@dataclass(frozen=True)
class TrainData(JsonRecord):
    """What one arm trained on: real training rows, synthetic rows and their split names."""

    real_train: int | None = None
    synthetic: int | None = None
    splits: list[str] | None = None


@dataclass(frozen=True)
class OutputScore(JsonRecord):
    """One output's test AUC [CI], its Youden threshold (from val) and test sens/spec."""

    auc: float | None = None
    ci: Interval | None = None
    threshold: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    test_positives: int | None = None
    test_negatives: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class ArmRecord(JsonRecord):
    """One classifier arm (TRTR, TSTR, mixed) scored on the real test split.

    ``history`` is the classifier trainer's own record (epochs, best_steps, steps...).
    ``reused_from`` is set when TRTR came from a TRTR cache folder.
    """

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"skipped_outputs", "reused_from", "trained_elsewhere"}
    )

    auc: float | None = None
    ci: Interval | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    threshold: float | None = None
    per_output: dict[str, OutputScore] | None = None
    skipped_outputs: list[Any] | None = None
    output_names: list[str] | None = None
    history: dict[str, Any] | None = None
    seed: int | None = None
    test_images: int | None = None
    test_patients: int | None = None
    classifier_file: str | None = None
    reused_from: str | None = None
    train_data: TrainData | None = None
    trained_elsewhere: dict[str, Any] | None = None
    """A classifier scored, not trained, here (``--compare``): its file, SHA-256, recipe and
    DP record, e.g. the DP-SGD classifier a DP synthetic set is compared against."""


@dataclass(frozen=True)
class UtilityResult(JsonRecord):
    """One arm against TRTR on the same resampled patients (``classification.paired_utility``).

    ``signal_retained`` = (AUC − 0.5) / (TRTR AUC − 0.5); ``per_output`` only when the task has
    several outputs.
    """

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"per_output"})

    auc: float | None = None
    ci: Interval | None = None
    ci_contains_chance: bool | None = None
    reference_auc: float | None = None
    reference_ci: Interval | None = None
    reference_contains_chance: bool | None = None
    signal_retained: float | None = None
    signal_retained_ci: Interval | None = None
    difference: float | None = None
    difference_ci: Interval | None = None
    ratio: float | None = None
    resamples: int | None = None
    verdict: str | None = None
    per_output: dict[str, UtilityResult] | None = None


@dataclass(frozen=True)
class Utility(JsonRecord):
    """Signal retained of every arm but TRTR, and how its intervals were drawn."""

    reference: str | None = None
    chance: float | None = None
    bootstrap: int | None = None
    method: str | None = None
    arms: dict[str, UtilityResult] | None = None


@dataclass(frozen=True)
class Ratios(JsonRecord):
    """Plain AUC ratios, printed only beside signal retained (they credit chance)."""

    tstr_over_trtr: float | None = None
    mixed_over_trtr: float | None = None


@dataclass(frozen=True)
class ClassifierBudget(JsonRecord):
    """The optimizer-step budget every arm shares, set by TRTR's epoch length."""

    batch: int | None = None
    steps_per_check: int | None = None
    max_checks: int | None = None
    max_steps: int | None = None
    patience_checks: int | None = None
    patience_steps: int | None = None
    rule: str | None = None


# --- TRTS: does each synthetic class look like its real class? ----------------------------


@dataclass(frozen=True)
class Judge(JsonRecord):
    """The classifier that scores the synthetic images, and why it is independent."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"test_auc", "classifier_file"})

    classifier: str | None = None
    recipe: dict[str, Any] | None = None
    independence: str | None = None
    test_auc: float | None = None
    classifier_file: str | None = None


@dataclass(frozen=True)
class FidelityScore(JsonRecord):
    """TRTS of one output: AUC [CI] and mean scores, or the reason there is none."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"reason", "mean_score_positive", "mean_score_negative"}
    )

    auc: float | None = None
    ci: Interval | None = None
    reason: str | None = None
    mean_score_positive: float | None = None
    mean_score_negative: float | None = None


@dataclass(frozen=True)
class ClassFidelity(JsonRecord):
    """TRTS: a real-trained judge scored on the synthetic images and their labels."""

    name: str | None = None
    classifier: str | None = None
    judge: Judge | None = None
    images: int | None = None
    auc: float | None = None
    ci: Interval | None = None
    per_output: dict[str, FidelityScore] | None = None


# --- distribution metrics ----------------------------------------------------------------

METRIC_KEYS = ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage", "n_other")


@dataclass(frozen=True)
class MetricRow(JsonRecord):
    """One extractor's comparison of an image set with the real reference.

    A row has either ``reason`` (too few images) or the metrics, never both: the metric keys
    are written exactly when there is no reason, null values included.
    """

    compared: str | None = None
    extractor: str | None = None
    n_real: int | None = None
    reason: str | None = None
    fid: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    density: float | None = None
    coverage: float | None = None
    n_other: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"compared": self.compared, "extractor": self.extractor, "n_real": self.n_real}
        if self.reason is not None:
            out["reason"] = self.reason
        else:
            out.update({key: getattr(self, key) for key in METRIC_KEYS})
        return out


@dataclass(frozen=True)
class Generative(JsonRecord):
    """KID, FID, precision/recall and density/coverage at equal n and class mix."""

    n_real: int | None = None
    n_synthetic: int | None = None
    n_reference: int | None = None
    n_each: int | None = None
    class_counts: dict[str, int] | None = None
    k: int | None = None
    reference: str | None = None
    equal_n: str | None = None
    extractors: list[str] | None = None
    results: list[MetricRow] | None = None


# --- memorisation ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClosestPair(JsonRecord):
    """A synthetic image and its closest real training image."""

    synthetic_file: str | None = None
    train_file: str | None = None
    distance: float | None = None


@dataclass(frozen=True)
class Memorisation(JsonRecord):
    """The pixel-space memorisation audit (``MemorisationResult.summary()`` plus the verdict)."""

    extractor: str | None = None
    n_synthetic: int | None = None
    n_heldout: int | None = None
    median_syn_to_train: float | None = None
    median_syn_to_heldout: float | None = None
    median_heldout_to_train: float | None = None
    min_syn_to_train: float | None = None
    median_ratio_train_over_heldout: float | None = None
    threshold_p1: float | None = None
    threshold_p5: float | None = None
    share_below_p1: float | None = None
    share_below_p5: float | None = None
    share_closer_to_train: float | None = None
    calibration: str | None = None
    extractor_description: str | None = None
    exact_copies: int | None = None
    verdict: str | None = None
    flagged: bool | None = None
    rule: str | None = None
    closest_pairs: list[ClosestPair] | None = None
    heldout: str | None = None


# --- inputs and splits -------------------------------------------------------------------


@dataclass(frozen=True)
class SplitCounts(JsonRecord):
    """Images, patients and class counts of one split."""

    images: int | None = None
    patients: int | None = None
    class_counts: dict[str, int] | None = None


@dataclass(frozen=True)
class DatasetInfo(JsonRecord):
    """A real prepared dataset the evaluation read, and the splits it used."""

    path: str | None = None
    content_hash: str | None = None
    splits: dict[str, SplitCounts] | None = None


@dataclass(frozen=True)
class SyntheticInfo(JsonRecord):
    """The synthetic set: where it came from, and its ``generation.json`` when it has one."""

    kind: str | None = None
    rejected: int | None = None
    path: str | None = None
    content_hash: str | None = None
    images: int | None = None
    resolution: int | None = None
    class_counts: dict[str, int] | None = None
    generation: dict[str, Any] | None = None
    ingested_to: str | None = None


@dataclass(frozen=True)
class Inputs(JsonRecord):
    """The three inputs of an evaluation."""

    synthetic: SyntheticInfo | None = None
    train: DatasetInfo | None = None
    test: DatasetInfo | None = None

    def items(self) -> list[tuple[str, SyntheticInfo | DatasetInfo]]:
        """(name, info) of the inputs present, in report order."""
        found = (("synthetic", self.synthetic), ("train", self.train), ("test", self.test))
        return [(name, info) for name, info in found if info is not None]


@dataclass(frozen=True)
class Selection(JsonRecord):
    """The real validation split every arm selects its epoch and threshold on."""

    dataset: str | None = None
    split: str | None = None
    images: int | None = None
    patients: int | None = None
    use: str | None = None


@dataclass(frozen=True)
class TestSet(JsonRecord):
    """The real test split, used for nothing but the final numbers."""

    __test__ = False  # not a pytest class

    dataset: str | None = None
    split: str | None = None
    images: int | None = None
    patients: int | None = None
    patients_shared_with_train_or_val: int | None = None


@dataclass(frozen=True)
class ReportFiles(JsonRecord):
    """The names of the files in the evaluation folder."""

    markdown: str | None = None
    json: str | None = None
    config: str | None = None
    roc: str | None = None
    samples: str | None = None
    closest_pairs: str | None = None
    intermediate: str | None = None


@dataclass(frozen=True)
class EvaluationRecord(JsonRecord):
    """Everything ``fedspine evaluate`` writes to report.json; ``config`` is
    ``EvaluateConfig.to_dict()``."""

    fedspine_version: str | None = None
    created: str | None = None
    config: dict[str, Any] | None = None
    task: str | None = None
    class_names: list[str] | None = None
    output_names: list[str] | None = None
    inputs: Inputs | None = None
    selection: Selection | None = None
    test_set: TestSet | None = None
    utility: Utility | None = None
    ratios: Ratios | None = None
    classifier_budget: ClassifierBudget | None = None
    arms: dict[str, ArmRecord] | None = None
    class_fidelity: ClassFidelity | None = None
    generative: Generative | None = None
    memorisation: Memorisation | None = None
    files: ReportFiles | None = None


def write_evaluation(folder: str | os.PathLike, record: EvaluationRecord) -> Path:
    """Write ``FOLDER/report.json`` whole or not at all."""
    return write_json_atomic(Path(folder) / EVAL_REPORT_JSON, record.to_json())


def read_evaluation(path: str | os.PathLike) -> EvaluationRecord:
    """Read an evaluation folder's report.json (or the file itself) as a record."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_REPORT_JSON
    return EvaluationRecord.from_json(json.loads(path.read_text()))


def json_ready(value: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays to Python, NaN and infinities to None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_ready(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
