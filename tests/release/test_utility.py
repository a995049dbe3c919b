"""The release states its utility: TSTR's verdict from a ``fedspine evaluate`` of this generator.

The evaluations here are written directly as records (``write_evaluation`` of an
``EvaluationRecord`` holding a TSTR ``UtilityResult``), not computed: what the release checks is
the record, and its synthetic set's ``generation.json`` is a real one, written by
``generate_dataset`` from the run's generator (so the key that binds it, ``generator_sha256``,
is the one ``fedspine generate`` writes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedspine.evaluation.classification import utility_verdict
from fedspine.evaluation.records import (
    ArmRecord,
    EvaluationRecord,
    Inputs,
    SyntheticInfo,
    Utility,
    UtilityResult,
    write_evaluation,
)
from fedspine.privacy.accounting import epsilon
from fedspine.privacy.signing import make_signing_key, sha256_file, verify_release
from fedspine.release import gate as release_module
from fedspine.release.gate import ReleaseError, make_release
from fedspine.release.utility import (
    UTILITY_CATEGORIES,
    UTILITY_NOT_EVALUATED,
    UTILITY_OUTSIDE_DP,
    read_utility,
)
from fedspine.training.generate import generate_dataset
from tests.release.test_gate import (
    AUDIT_KEYS,
    AUDIT_WORDS,
    CLASSES,
    MECHANISM,
    _keys,
    _make_run,
    _save_generator,
    _spend,
    _write_audit,
)

REFERENCE = {"reference_auc": 0.9712, "reference_ci": [0.9388, 0.9904]}


def _tstr(auc: float, ci: list[float], retained_ci: list[float] | None) -> UtilityResult:
    """A TSTR result as ``paired_utility`` writes it, with the verdict ``evaluate`` adds."""
    fields = {
        "auc": auc,
        "ci": ci,
        "ci_contains_chance": ci[0] <= 0.5 <= ci[1],
        **REFERENCE,
        "reference_contains_chance": False,
        "signal_retained": (auc - 0.5) / (REFERENCE["reference_auc"] - 0.5),
        "signal_retained_ci": retained_ci,
        "difference": auc - REFERENCE["reference_auc"],
        "difference_ci": [-0.3311, -0.1767],
        "ratio": auc / REFERENCE["reference_auc"],
        "resamples": 1000,
    }
    return UtilityResult(**fields, verdict=utility_verdict(fields))


SIGNAL = _tstr(0.7173, [0.6421, 0.7929], [0.2813, 0.6344])


def _figures(result: UtilityResult) -> list[float]:
    """Every number of the evaluation that must stay with the steward."""
    return [
        result.auc,
        *result.ci,
        result.reference_auc,
        *result.reference_ci,
        result.signal_retained,
        *result.signal_retained_ci,
        result.difference,
        *result.difference_ci,
        result.ratio,
    ]


def _write_evaluation(
    folder: Path, generation: dict | None, tstr: UtilityResult | None = SIGNAL
) -> Path:
    """An evaluation folder as ``fedspine evaluate`` leaves it, reduced to what a release reads."""
    record = EvaluationRecord(
        fedspine_version="test",
        task="binary",
        class_names=CLASSES,
        inputs=Inputs(
            synthetic=SyntheticInfo(
                kind="generated folder", path="synthetic", images=2, generation=generation
            )
        ),
        utility=Utility(
            reference="TRTR",
            chance=0.5,
            bootstrap=1000,
            method="paired patient-level bootstrap",
            arms={} if tstr is None else {"TSTR": tstr},
        ),
        arms={"TRTR": ArmRecord(auc=REFERENCE["reference_auc"], ci=REFERENCE["reference_ci"])},
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_evaluation(folder, record)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Audit data, a privacy home, a run, a key, a real generation.json of the run's generator,
    an evaluation of it, and one release made with that evaluation."""
    root = tmp_path_factory.mktemp("utility")
    audit = _write_audit(root / "audit" / "site_1")
    home = root / "privacy-home"
    run = _make_run(root / "run", _spend(home, audit), epsilon([MECHANISM], 1e-5, "prv"))
    key, pub = make_signing_key(root / "keys" / "steward.key")
    synthetic = generate_dataset(run / "generator.pt", root / "synthetic", per_class=1)
    generation = json.loads((synthetic / "generation.json").read_text())
    evaluation = _write_evaluation(root / "evaluation", generation)
    lines: list[str] = []
    release = root / "release"
    result = make_release(
        run,
        release,
        max_epsilon=8.0,
        per_class=5,
        audit_data=[audit],
        signing_key=key,
        steward_audit_dir=root / "steward-audit",
        privacy_homes=[home],
        evaluation=evaluation,
        log=lines.append,
    )
    return {
        "root": root,
        "audit": audit,
        "home": home,
        "run": run,
        "key": key,
        "pub": pub,
        "generation": generation,
        "evaluation": evaluation,
        "release": release,
        "result": result,
        "log": lines,
    }


def _args(world, out: Path, **kwargs) -> dict:
    args = {
        "max_epsilon": 8.0,
        "per_class": 5,
        "audit_data": [world["audit"]],
        "signing_key": world["key"],
        "steward_audit_dir": out.parent.parent / "steward",
        "privacy_homes": [world["home"]],
    }
    return {**args, **kwargs}


def test_the_generation_json_names_the_generator_it_came_from(world):
    assert world["generation"]["generator_sha256"] == sha256_file(world["run"] / "generator.pt")


def test_an_evaluation_of_this_generator_is_stated_and_only_its_category_released(world):
    rel, result = world["release"], world["result"]
    utility = result.utility
    assert utility.evaluated and utility.category == "signal above chance"
    line = utility.console_line(rel)
    assert "TSTR AUC 0.717 [0.642, 0.793]" in line
    assert "TSTR's 95 % interval excludes AUC 0.5" in line
    assert "signal retained 0.46 [0.28, 0.63]" in line
    assert "records only 'signal above chance'" in line
    assert any("checking the evaluation evaluation" in x for x in world["log"])

    sha = sha256_file(rel / "generator.pt")
    report = json.loads((rel / "privacy_report.json").read_text())
    assert report["utility"] == {
        "evaluated": True,
        "arm": "TSTR",
        "category": "signal above chance",
        "generator_sha256": sha,
        "outside_dp": UTILITY_OUTSIDE_DP,
    }
    assert "about 1.6 bits" in UTILITY_OUTSIDE_DP
    assert UTILITY_OUTSIDE_DP in report["release_decision"]["outside_dp_guarantee"]
    manifest = json.loads((rel / "manifest.json").read_text())
    assert "but the utility category of privacy_report.json" in manifest["privacy"]["guarantee"]

    # No figure of the evaluation, in any spelling, in any text file of the release.
    spellings = {f"{v:{f}}" for v in _figures(SIGNAL) for f in ("", ".4f", ".3f", ".2f")}
    for path in (p for p in rel.rglob("*") if p.is_file()):
        if path.suffix not in (".json", ".csv", ".txt"):
            continue
        text = path.read_text()
        for spelled in spellings:
            assert not re.search(rf"(?<![0-9.]){re.escape(spelled)}(?![0-9])", text), (
                path,
                spelled,
            )
        for word in AUDIT_WORDS:
            assert word not in text.lower(), (path, word)
        if path.suffix == ".json":
            assert not _keys(json.loads(text)) & AUDIT_KEYS, path
    # The steward keeps the figures: the audit folder is as without an evaluation.
    assert sorted(p.name for p in result.steward_audit.iterdir()) == [
        "closest_pairs.png",
        "membership.json",
        "memorisation.json",
    ]
    verified = verify_release(rel, world["pub"])
    assert verified.ok, verified.problems


@pytest.mark.parametrize(
    ("tstr", "category", "words"),
    [
        (SIGNAL, "signal above chance", "interval excludes AUC 0.5"),
        (_tstr(0.5561, [0.4502, 0.6623], None), "no evidence of signal", "contains chance"),
        (_tstr(0.4107, [0.3302, 0.4814], None), "worse than chance", "lies below AUC 0.5"),
    ],
)
def test_each_verdict_gives_its_category(world, tmp_path, tstr, category, words):
    evaluation = _write_evaluation(tmp_path / "eval", world["generation"], tstr)
    utility = read_utility(evaluation, world["generation"]["generator_sha256"])
    assert utility.category == category and category in UTILITY_CATEGORIES
    assert words in utility.verdict and words in utility.console_line()
    assert set(utility.report_entry()) == {
        "evaluated",
        "arm",
        "category",
        "generator_sha256",
        "outside_dp",
    }


def _another_generator(world, tmp_path) -> dict:
    other = _save_generator(tmp_path / "other-run", seed=1)
    return {**world["generation"], "generator_sha256": sha256_file(other)}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("another generator", "judged generator"),
        ("no generator named", "names no generator"),
        ("no generation.json", "names no generator"),
        ("no TSTR result", "no TSTR utility result"),
        ("empty folder", "is not an evaluation folder"),
        ("missing folder", "is not an evaluation folder"),
        ("not an evaluation", "records no synthetic input"),
        ("not JSON", "cannot be read"),
    ],
)
def test_a_bad_evaluation_is_refused_before_anything_is_generated_or_written(
    world, tmp_path, monkeypatch, case, message
):
    evaluation = tmp_path / "eval"
    if case == "another generator":
        _write_evaluation(evaluation, _another_generator(world, tmp_path))
    elif case == "no generator named":
        generation = {k: v for k, v in world["generation"].items() if k != "generator_sha256"}
        _write_evaluation(evaluation, generation)
    elif case == "no generation.json":
        _write_evaluation(evaluation, None)
    elif case == "no TSTR result":
        _write_evaluation(evaluation, world["generation"], tstr=None)
    elif case == "empty folder":
        evaluation.mkdir()
    elif case == "not an evaluation":
        evaluation.mkdir()
        (evaluation / "report.json").write_text(json.dumps({"format": "something else"}))
    elif case == "not JSON":
        evaluation.mkdir()
        (evaluation / "report.json").write_text("{not json")

    def no_generation(*_args, **_kwargs):
        raise AssertionError("generated before the evaluation was checked")

    monkeypatch.setattr(release_module, "_write_synthetic", no_generation)
    outdir = tmp_path / "releases"
    outdir.mkdir()
    args = _args(world, outdir / "rel", evaluation=evaluation)
    with pytest.raises(ReleaseError, match=message) as err:
        make_release(world["run"], outdir / "rel", **args)
    assert type(err.value) is ReleaseError
    assert f"--evaluation {evaluation}" in str(err.value)
    assert list(outdir.iterdir()) == [], "a refused release left files behind"
    assert not args["steward_audit_dir"].exists()


def test_without_an_evaluation_the_release_says_utility_was_not_evaluated(world, tmp_path):
    out = tmp_path / "releases" / "rel"
    result = make_release(world["run"], out, **_args(world, out))
    assert not result.utility.evaluated
    line = result.utility.console_line(out)
    assert line.startswith(UTILITY_NOT_EVALUATED)
    assert "fedspine evaluate --synthetic" in line and "--evaluation EVAL" in line
    assert "rel/synthetic" in line
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["utility"] == {"evaluated": False, "statement": UTILITY_NOT_EVALUATED}
    assert UTILITY_OUTSIDE_DP not in report["release_decision"]["outside_dp_guarantee"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["privacy"]["guarantee"].endswith(
        "nothing else in this release is computed from private data"
    )
    assert verify_release(out, world["pub"]).ok


# The command line ----------------------------------------------------------------------------


def _cli_args(world, out: Path, steward: Path) -> list[str]:
    return [
        "make",
        str(world["run"]),
        "--out",
        str(out),
        "--max-epsilon",
        "8",
        "--per-class",
        "5",
        "--audit-data",
        str(world["audit"]),
        "--key",
        str(world["key"]),
        "--audit-dir",
        str(steward),
        "--privacy-home",
        str(world["home"]),
        "--device",
        "cpu",
    ]


def test_cli_states_the_verdict_of_the_evaluation(world, cli, tmp_path):
    out = tmp_path / "rel"
    args = [*_cli_args(world, out, tmp_path / "steward"), "--evaluation", str(world["evaluation"])]
    result = CliRunner().invoke(cli, ["release", *args])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    utility = [
        x for x in lines if x.startswith("utility (from evaluation, on the real test split): ")
    ]
    assert len(utility) == 1, result.output
    assert (
        "TSTR AUC 0.717 [0.642, 0.793]; signal above chance: TSTR's 95 % interval " in (utility[0])
    )
    assert "signal retained 0.46 [0.28, 0.63]" in utility[0]
    assert not any("utility was not evaluated" in x for x in lines)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["utility"]["category"] == "signal above chance"
    verified = CliRunner().invoke(cli, ["verify", str(out), "--public-key", str(world["pub"])])
    assert verified.exit_code == 0, verified.output


def test_cli_without_evaluation_warns_that_utility_was_not_evaluated(world, cli, tmp_path):
    out = tmp_path / "rel"
    result = CliRunner().invoke(cli, ["release", *_cli_args(world, out, tmp_path / "steward")])
    assert result.exit_code == 0, result.output
    warning = [x for x in result.output.splitlines() if x.startswith("warning: utility was not")]
    assert len(warning) == 1, result.output
    assert "a generator at chance carries none" in warning[0]
    assert "fedspine evaluate --synthetic SYNTHETIC" in warning[0]


def test_cli_refuses_an_evaluation_of_another_generator_and_writes_nothing(world, cli, tmp_path):
    evaluation = _write_evaluation(tmp_path / "eval", _another_generator(world, tmp_path))
    outdir = tmp_path / "releases"
    outdir.mkdir()
    args = [
        *_cli_args(world, outdir / "rel", tmp_path / "steward"),
        "--evaluation",
        str(evaluation),
    ]
    result = CliRunner().invoke(cli, ["release", *args])
    assert result.exit_code == 1
    assert "judged generator" in result.output and "not this release's generator.pt" in (
        result.output
    )
    assert list(outdir.iterdir()) == [] and not (tmp_path / "steward").exists()
