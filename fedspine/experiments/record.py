"""``reproduce.json`` as typed records: what the renderer of ``reproduce.md`` reads.

Each record's ``to_json()`` gives the JSON ``reproduce`` has always written (same keys, same
order) and ``from_json()`` reads it back, so ``reproduce.md`` can be rendered again from the
file alone. Each arm's own record (``arm.json``: its evaluation summary, privacy, ablation) and
the per-arm seed statistics stay plain dicts: they are copied into the file as the arm wrote
them, and a table cell reads them through :mod:`fedspine.experiments.table`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedspine.experiments.budgets import ReproduceBudget
from fedspine.experiments.summaries import plain

RECORD_FORMAT = "fedspine-reproduce/2"


@dataclass(frozen=True)
class TableRow:
    """One row of the table: the paper's published value beside ours, and the ε it has."""

    experiment: str
    paper: str
    ours: str
    signal: str
    details: str
    epsilon: str = ""
    dp_minus_public: str = ""
    """A DP arm's TSTR AUC minus the public-only arm's: what the private data added to the
    public checkpoint (empty without a public-only arm)."""

    def to_json(self) -> dict[str, str]:
        """The row's cells; ``dp_minus_public`` only where it has one, so a reproduction
        without a public checkpoint writes the rows it always wrote."""
        values = {
            "experiment": self.experiment,
            "paper": self.paper,
            "ours": self.ours,
            "signal": self.signal,
            "epsilon": self.epsilon,
            "details": self.details,
        }
        if self.dp_minus_public:
            values["dp_minus_public"] = self.dp_minus_public
        return values

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> TableRow:
        return cls(**{k: values.get(k, "") for k in _ROW_KEYS})


_ROW_KEYS = ("experiment", "paper", "ours", "signal", "details", "epsilon", "dp_minus_public")


@dataclass(frozen=True)
class ErrorNote:
    """One of the paper's seven errors and what this reproduction did about it."""

    error: str
    here: str

    def to_json(self) -> dict[str, str]:
        return {"error": self.error, "here": self.here}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ErrorNote:
        return cls(error=values["error"], here=values["here"])


@dataclass(frozen=True)
class DataSection:
    """The source and the two prepared datasets (``abnormality``, ``lesion``) as ingested."""

    root: str
    kind: str
    abnormality: dict[str, Any]
    lesion: dict[str, Any]

    @property
    def phantom(self) -> bool:
        return self.kind.startswith("phantom")

    def schema(self, name: str) -> dict[str, Any]:
        """The ingest summary of ``abnormality`` or ``lesion``."""
        return self.abnormality if name == "abnormality" else self.lesion

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "kind": self.kind,
            "abnormality": self.abnormality,
            "lesion": self.lesion,
        }

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> DataSection:
        return cls(
            root=values["root"],
            kind=values["kind"],
            abnormality=dict(values.get("abnormality") or {}),
            lesion=dict(values.get("lesion") or {}),
        )


@dataclass(frozen=True)
class ReproduceRecord:
    """Everything ``reproduce.json`` holds.

    ``arms`` maps each arm folder (replicates included) to its record; ``seeds`` maps each arm
    name to its replicates and the spread of each metric across them; ``paper`` is the paper's
    published numbers (:data:`fedspine.experiments.paper.PAPER`).
    """

    fedspine_version: str
    created: str
    seconds: float
    budget: ReproduceBudget
    spinegan_available: bool
    spinegan_how: str
    data: DataSection
    table: tuple[TableRow, ...]
    paper: dict[str, str]
    errors: tuple[ErrorNote, ...]
    arms: dict[str, dict[str, Any]]
    seeds: dict[str, dict[str, Any]]
    inception: str | None = None
    classifier_weights: str | None = None
    public_run: dict[str, Any] | None = None
    """The public checkpoint of the public arms (path, SHA-256, declaration), None without."""
    format: str = field(default=RECORD_FORMAT)

    @property
    def reused_arms(self) -> bool:
        """Whether this invocation found some arms complete from an earlier one."""
        return any(a.get("skipped_this_time") for a in self.arms.values())

    def to_json(self) -> dict[str, Any]:
        return plain(
            {
                "format": self.format,
                "fedspine_version": self.fedspine_version,
                "created": self.created,
                "seconds": self.seconds,
                "budget": self.budget.to_json(),
                "spinegan_available": {
                    "available": self.spinegan_available,
                    "how": self.spinegan_how,
                },
                "data": self.data.to_json(),
                "table": [row.to_json() for row in self.table],
                "paper": self.paper,
                "errors": [e.to_json() for e in self.errors],
                "arms": self.arms,
                "seeds": self.seeds,
                "options": {
                    "inception": self.inception,
                    "classifier_weights": self.classifier_weights,
                },
                # Only with a public checkpoint: without one the file is as it always was.
                **({"public_run": self.public_run} if self.public_run else {}),
            }
        )

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ReproduceRecord:
        spinegan = values.get("spinegan_available") or {}
        options = values.get("options") or {}
        return cls(
            format=values.get("format", RECORD_FORMAT),
            fedspine_version=values["fedspine_version"],
            created=values["created"],
            seconds=values["seconds"],
            budget=ReproduceBudget.from_json(values["budget"]),
            spinegan_available=bool(spinegan.get("available")),
            spinegan_how=spinegan.get("how", ""),
            data=DataSection.from_json(values["data"]),
            table=tuple(TableRow.from_json(r) for r in values["table"]),
            paper=dict(values["paper"]),
            errors=tuple(ErrorNote.from_json(e) for e in values["errors"]),
            arms={k: dict(v) for k, v in values["arms"].items()},
            seeds={k: dict(v) for k, v in (values.get("seeds") or {}).items()},
            inception=options.get("inception"),
            classifier_weights=options.get("classifier_weights"),
            public_run=values.get("public_run"),
        )
