"""What the HTML page reads: the evaluation, run and release folders, as records and bytes.

Nothing is recomputed (a release's signature and hashes are checked afresh). A file that is
present but unreadable is named in ``problems`` and its part of the page says "not available";
an input folder that is not what it claims raises :class:`HtmlReportError` before any output.
The evaluation is read as an :class:`EvaluationRecord` and the privacy summary as a
:class:`PrivacySummary`; the release's and the federation's files are read as plain JSON.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from fedspine.evaluation.records import EvaluationRecord
from fedspine.fileio import (
    EVAL_CANARY_AUDIT,
    EVAL_CLOSEST_PAIRS,
    EVAL_CONFIG,
    EVAL_REPORT_JSON,
    EVAL_ROC,
    EVAL_SAMPLES,
    FEDERATION_CONFIG,
    FEDERATION_ROUNDS,
    FEDERATION_STATUS,
    FOLDER_CLASSES,
    FOLDER_LABELS,
    PRIVACY_REPORT,
    PRIVACY_REPORT_PLOT,
    PRIVACY_SUMMARY,
    RELEASE_MANIFEST,
    RELEASE_SYNTHETIC_DIR,
    RUN_CONFIG_TOML,
    RUN_GENERATOR,
    STEWARD_CLOSEST_PAIRS,
    STEWARD_MEMBERSHIP,
    STEWARD_MEMORISATION,
)
from fedspine.privacy.signing import verify_release
from fedspine.reporting.privacy_records import PrivacySummary

EVAL_PNGS = {"roc": EVAL_ROC, "samples": EVAL_SAMPLES, "closest_pairs": EVAL_CLOSEST_PAIRS}
CANARY_FILES = (EVAL_CANARY_AUDIT, "audit/canary.json")
SAMPLES_PER_CLASS = 8


class HtmlReportError(Exception):
    """An input folder cannot be reported on; the message names it and says what to do."""


@dataclass
class ReportInputs:
    """Everything the page shows, as read from the output folders (nothing recomputed)."""

    evaluation: Path | None = None
    eval_report: EvaluationRecord | None = None
    eval_config: dict[str, Any] | None = None
    eval_pngs: dict[str, bytes] = field(default_factory=dict)
    run: Path | None = None
    privacy: PrivacySummary | None = None
    privacy_source: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    federation_status: dict[str, Any] | None = None
    federation_config: dict[str, Any] | None = None
    run_config_text: str | None = None
    privacy_plot: bytes | None = None
    run_samples: tuple[str, bytes] | None = None
    release: Path | None = None
    manifest: dict[str, Any] | None = None
    release_privacy: dict[str, Any] | None = None
    release_memorisation: dict[str, Any] | None = None
    membership: dict[str, Any] | None = None
    verification: Any = None
    release_grids: list[tuple[str, bytes, int, int]] = field(default_factory=list)
    release_refused: str | None = None
    steward_pairs: bytes | None = None
    canary: dict[str, Any] | None = None
    canary_source: str = ""
    problems: list[str] = field(default_factory=list)


def load_inputs(
    evaluation: str | os.PathLike | None,
    run: str | os.PathLike | None,
    release: str | os.PathLike | None,
    steward_audit: str | os.PathLike | None,
    release_refused: str | None,
) -> ReportInputs:
    """Read every folder given; raise HtmlReportError for one that is not what it claims."""
    inputs = ReportInputs(release_refused=release_refused)
    if evaluation is not None:
        _load_evaluation(inputs, Path(evaluation))
    if run is not None:
        _load_run(inputs, Path(run))
    if release is not None:
        _load_release(inputs, Path(release))
    if steward_audit is not None:
        folder = _folder(Path(steward_audit), "steward audit", "the --steward-audit folder")
        inputs.steward_pairs = _png(folder / STEWARD_CLOSEST_PAIRS, inputs.problems)
        mem = _json(folder / STEWARD_MEMORISATION, inputs.problems)
        inputs.release_memorisation = mem if isinstance(mem, dict) else None
        membership = _json(folder / STEWARD_MEMBERSHIP, inputs.problems)
        inputs.membership = membership if isinstance(membership, dict) else None
    for folder in (inputs.run, inputs.release, inputs.evaluation):
        if folder is None or inputs.canary is not None:
            continue
        for name in CANARY_FILES:
            data = _json(folder / name, inputs.problems)
            if isinstance(data, dict):
                inputs.canary, inputs.canary_source = data, f"{folder.name}/{name}"
                break
    return inputs


def _load_evaluation(inputs: ReportInputs, folder: Path) -> None:
    folder = _folder(folder, "evaluation", "the --out folder of `fedspine evaluate`")
    path = folder / EVAL_REPORT_JSON
    if not path.is_file():
        raise HtmlReportError(
            f"{path}: missing; pass the folder that `fedspine evaluate --out` wrote"
        )
    report = _json(path, [])
    if not isinstance(report, dict) or "arms" not in report:
        raise HtmlReportError(f"{path}: not an evaluation report of fedspine (no 'arms')")
    record = EvaluationRecord.from_json(report)
    inputs.evaluation, inputs.eval_report = folder, record
    config = _json(folder / EVAL_CONFIG, inputs.problems)
    inputs.eval_config = config if isinstance(config, dict) else record.config
    files = record.files.to_json() if record.files is not None else {}
    for key, default in EVAL_PNGS.items():
        name = str(files.get(key) or default)
        if Path(name).name != name:  # only files inside the folder
            name = default
        png = _png(folder / name, inputs.problems)
        if png is not None:
            inputs.eval_pngs[key] = png


def _load_run(inputs: ReportInputs, folder: Path) -> None:
    folder = _folder(folder, "run", "a training run or federation output folder")
    known = (PRIVACY_SUMMARY, FEDERATION_ROUNDS, FEDERATION_STATUS, RUN_CONFIG_TOML, RUN_GENERATOR)
    if not any((folder / name).exists() for name in known):
        raise HtmlReportError(
            f"{folder}: none of {', '.join(known)}; pass a folder written by `fedspine train` "
            "or by a federation"
        )
    inputs.run = folder
    privacy = _json(folder / PRIVACY_SUMMARY, inputs.problems)
    if isinstance(privacy, dict):
        inputs.privacy = PrivacySummary.from_json(privacy)
        inputs.privacy_source = f"{folder.name}/{PRIVACY_SUMMARY}"
    inputs.rounds = _jsonl(folder / FEDERATION_ROUNDS, inputs.problems)
    status = _json(folder / FEDERATION_STATUS, inputs.problems)
    inputs.federation_status = status if isinstance(status, dict) else None
    fed_config = _json(folder / FEDERATION_CONFIG, inputs.problems)
    inputs.federation_config = fed_config if isinstance(fed_config, dict) else None
    if (folder / RUN_CONFIG_TOML).is_file():
        inputs.run_config_text = (folder / RUN_CONFIG_TOML).read_text(errors="replace")
    inputs.privacy_plot = _png(folder / PRIVACY_REPORT_PLOT, inputs.problems)
    fakes = sorted((folder / "samples").glob("fakes_*.png"))
    if fakes:
        png = _png(fakes[-1], inputs.problems)
        if png is not None:
            inputs.run_samples = (f"samples/{fakes[-1].name}", png)


def _load_release(inputs: ReportInputs, folder: Path) -> None:
    folder = _folder(folder, "release", "a folder written by `fedspine release`")
    path = folder / RELEASE_MANIFEST
    manifest = _json(path, [])
    if not isinstance(manifest, dict):
        raise HtmlReportError(
            f"{path}: missing or unreadable; pass a folder written by `fedspine release`"
        )
    inputs.release, inputs.manifest = folder, manifest
    inputs.verification = verify_release(folder)
    privacy_report = _json(folder / PRIVACY_REPORT, inputs.problems)
    if isinstance(privacy_report, dict):
        inputs.release_privacy = privacy_report
        if inputs.privacy is None and isinstance(privacy_report.get("privacy"), dict):
            inputs.privacy = PrivacySummary.from_json(privacy_report["privacy"])
            inputs.privacy_source = f"{folder.name}/{PRIVACY_REPORT}"
    inputs.release_grids = _class_grids(folder / RELEASE_SYNTHETIC_DIR, inputs.problems)


def _class_grids(folder: Path, problems: list[str]) -> list[tuple[str, bytes, int, int]]:
    """One PNG row of the first released images of each class, in classes.txt order."""
    labels = folder / FOLDER_LABELS
    if not labels.is_file():
        return []
    try:
        with open(labels, newline="") as fh:
            rows = [(r["file"], r["label"]) for r in csv.DictReader(fh)]
    except (OSError, KeyError, csv.Error) as err:
        problems.append(f"{folder.name}/labels.csv: unreadable ({err})")
        return []
    classes_txt = folder / FOLDER_CLASSES
    order = (
        [c.strip() for c in classes_txt.read_text().splitlines() if c.strip()]
        if classes_txt.is_file()
        else []
    )
    order += [label for _, label in rows if label not in order]
    root = folder.resolve()
    grids = []
    for name in order:
        files = [f for f, label in rows if label == name]
        tiles = []
        for rel in files[:SAMPLES_PER_CLASS]:
            path = (folder / rel).resolve()
            if not path.is_relative_to(root):
                problems.append(f"{folder.name}/labels.csv: {rel} lies outside the folder")
                continue
            try:
                with Image.open(path) as im:
                    tiles.append(im.convert("L"))
            except (OSError, UnidentifiedImageError) as err:
                problems.append(f"{folder.name}/{rel}: not a readable image ({err})")
        if tiles:
            grids.append((name, _row_png(tiles), len(tiles), len(files)))
    return grids


def _row_png(tiles: list) -> bytes:
    side = max(t.width for t in tiles)
    cell = min(128, max(64, side))
    gap = 4
    canvas = Image.new("L", (len(tiles) * (cell + gap) - gap, cell), color=255)
    for i, tile in enumerate(tiles):
        resample = Image.NEAREST if cell >= tile.width else Image.LANCZOS
        canvas.paste(tile.resize((cell, cell), resample), (i * (cell + gap), 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _folder(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise HtmlReportError(f"{path}: no such {what} folder; pass {hint}")
    return path


def _json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problems.append(f"{path.parent.name}/{path.name}: not readable JSON ({err})")
        return None


def _jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            problems.append(f"{path.parent.name}/{path.name} line {n}: not JSON ({err})")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _png(path: Path, problems: list[str]) -> bytes | None:
    """The file's bytes if it is a PNG that decodes, else None (and a note unless it's absent)."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise UnidentifiedImageError(f"a {im.format} image, not a PNG")
            im.load()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        problems.append(f"{path.parent.name}/{path.name}: not a readable PNG ({err})")
        return None
    return data


def shows_real_images(inp: ReportInputs) -> bool:
    """Whether the page shows private real images (the samples grid or closest pairs)."""
    return bool({"samples", "closest_pairs"} & set(inp.eval_pngs)) or inp.steward_pairs is not None
