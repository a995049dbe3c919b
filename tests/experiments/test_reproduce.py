"""`fedspine reproduce`: the plan per budget, a tiny end-to-end run, and resuming it."""

from __future__ import annotations

import json
import shutil

import pytest
import typer
from typer.testing import CliRunner

from fedspine.cli.reproduce import register
from fedspine.experiments.reproduce import (
    BUDGETS,
    PAPER,
    PLAN_FILE,
    SPINEGAN_UNAVAILABLE,
    ReproduceError,
    format_plan,
    get_budget,
    make_plan,
    reproduce,
    spinegan_available,
)

runner = CliRunner()

# Smaller than smoke: 16 px, two GAN steps per arm, two classifier epochs.
TINY = {
    "resolution": 16,
    "kimg": 0.064,
    "lesion_kimg": 0.064,
    "spinegan_kimg": 0.064,
    "dp_kimg": 0.064,
    "dp_epsilons": (10.0,),
    "dp_patients_per_step": 16,
    "per_class": 12,
    "classifier_epochs": 2,
    "classifier_patience": 2,
    "spinegan_classifier_epochs": 1,
    "domain_epochs": 1,
    "bootstrap": 20,
    "kid_subsets": 4,
    "max_metric_images": 64,
    "ingest_workers": 1,
    "threads": 1,
}


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:
        """Keep the app a group so `reproduce` is a subcommand."""

    return app


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_dry_run_prints_the_plan_of_every_budget(budget, tmp_path):
    result = runner.invoke(
        _app(),
        ["reproduce", str(tmp_path), "--out", str(tmp_path / "o"), "--budget", budget, "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    b = BUDGETS[budget]
    text = result.output
    assert f"budget {budget}" in text
    assert f"preset {b.gan_preset}, {b.resolution} px" in text
    assert f"--kimg {b.kimg:g}" in text
    assert f"{b.per_class} synthetic images per class" in text
    for eps in b.dp_epsilons:
        assert f"dp_eps{eps:g}: " in text and f"--epsilon {eps:g}" in text
    assert "cgan: conditional StyleGAN2-ADA on abnormality" in text
    assert not (tmp_path / "o").exists(), "a dry run must not write anything"


def test_full_budget_is_the_papers_configuration(tmp_path):
    b = get_budget("full")
    assert (b.resolution, b.gan_preset, b.kimg) == (256, "paper", 8000.0)
    assert (b.classifier_arch, b.classifier_input_size, b.per_class) == ("densenet121", 224, 1000)
    assert b.lesion_kimg == b.spinegan_kimg == 8000.0
    assert b.dp_epsilons == (1.0, 3.0, 10.0)
    text = format_plan(make_plan(tmp_path, tmp_path / "o", "full"))
    assert "--preset paper --kimg 8000 --resolution 256" in text
    assert "densenet121 at 224 px" in text
    assert "--arch densenet121" in text or SPINEGAN_UNAVAILABLE in text


def test_quick_runs_every_arm_and_smoke_fits_two_cores():
    quick, smoke = get_budget("quick"), get_budget("smoke")
    assert quick.lesion_kimg and quick.spinegan_kimg and quick.dp_epsilons == (1.0, 3.0, 10.0)
    assert smoke.gan_preset == "cpu" and smoke.resolution <= 32 and smoke.threads <= 2
    assert 10.0 in smoke.dp_epsilons
    assert quick.kimg > smoke.kimg


def test_budget_overrides_are_checked():
    b = get_budget("smoke", {"kimg": 0.5, "dp_epsilons": [3, 10]})
    assert b.kimg == 0.5 and b.dp_epsilons == (3.0, 10.0)
    assert BUDGETS["smoke"] is not b and BUDGETS["smoke"].kimg != 0.5, "the table is not edited"
    with pytest.raises(ReproduceError, match="unknown budget field"):
        get_budget("smoke", {"kimgs": 1})
    with pytest.raises(ReproduceError, match="paper preset is 256"):
        get_budget("full", {"resolution": 64})
    with pytest.raises(ReproduceError, match="choose one of"):
        get_budget("huge")


def test_spinegan_probe_matches_the_train_command(tmp_path):
    from fedspine.cli import train

    available, how = spinegan_available()
    assert available == ("spinegan" in getattr(train, "MODELS", ())), how
    plan = make_plan(tmp_path, tmp_path / "o", "quick")
    arm = next(a for a in plan.arms if a.name == "spinegan")
    assert (arm.not_run is None) == available
    if not available:
        assert arm.not_run == SPINEGAN_UNAVAILABLE


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    previous = make_plan(tmp_path, out, "smoke", {"kimg": 0.25})
    (out / PLAN_FILE).write_text(json.dumps(previous.to_dict()))
    with pytest.raises(ReproduceError, match="kimg"):
        reproduce(tmp_path, out, "smoke")
    assert sorted(p.name for p in out.iterdir()) == [PLAN_FILE]


@pytest.mark.slow
def test_tiny_reproduction_writes_the_table_and_resumes(tmp_path):
    from fedspine.data.phantom import write_phantom_sites

    (site,) = write_phantom_sites(tmp_path / "ph", sites=1, images_per_site=120, size=128, seed=0)
    out = tmp_path / "repro"
    messages: list[str] = []
    report = reproduce(site, out, "smoke", TINY, stage=messages.append)

    arms = report["arms"]
    assert arms["cgan"]["status"] == "done", arms["cgan"]
    assert arms["lesion"]["status"] == "done", arms["lesion"]
    assert arms["dp_eps10"]["status"] == "done", arms["dp_eps10"]
    available = spinegan_available()[0]
    assert arms["spinegan"]["status"] == ("done" if available else "not run")
    for name, arm in arms.items():
        folder = out / "arms" / name
        assert (folder / "arm.json").is_file() == (arm["status"] == "done")
    assert not [p for p in (out / "arms").iterdir() if p.name.startswith(".")]

    cgan = arms["cgan"]["evaluation"]
    assert 0.0 <= cgan["trtr"]["auc"] <= 1.0 and 0.0 <= cgan["tstr"]["auc"] <= 1.0
    assert cgan["mixed"] is not None and cgan["gan_metrics"]["fid"] >= 0
    lesion = arms["lesion"]["evaluation"]
    dropped = report["data"]["lesion"]["classes_dropped"]
    assert len(lesion["class_names"]) + len(dropped) == 8 and len(lesion["class_names"]) >= 2
    assert lesion["task"] == ("multiclass" if len(lesion["class_names"]) > 2 else "binary")
    privacy = arms["dp_eps10"]["privacy"]
    assert privacy["private"] is True
    assert 0 < privacy["epsilon"] <= 10.0 * 1.01
    assert not arms["cgan"]["privacy"]["private"]

    md = (out / "reproduce.md").read_text()
    saved = json.loads((out / "reproduce.json").read_text())
    assert saved["table"] == report["table"]
    for published in ("0.856", "0.886", "0.814", "0.830", "0.970", "severely impede"):
        assert published in md
    assert f"{cgan['trtr']['auc']:.3f}" in md and f"{cgan['tstr']['auc']:.3f}" in md
    assert f"{lesion['tstr']['auc']:.3f}" in md
    assert all(name in md for name in dropped)
    assert f"spent ε = {privacy['epsilon']:.2f}" in md
    assert "phantom" in md and "120 images" in md
    if not available:
        assert SPINEGAN_UNAVAILABLE in md
    assert md.count("\n1. **") == 1 and "7. **" in md
    assert saved["table"][0]["paper"] == PAPER["trtr"]
    assert ("means little here" in md) == (cgan["trtr"]["auc"] < 0.6 or lesion["trtr"]["auc"] < 0.6)

    # A rerun skips every complete arm and reproduces the same table.
    stamps = {p.name: (p / "arm.json").stat().st_mtime_ns for p in (out / "arms").iterdir()}
    messages.clear()
    again = reproduce(site, out, "smoke", TINY, stage=messages.append)
    assert again["table"] == report["table"]
    assert "reused arms built earlier" in (out / "reproduce.md").read_text()
    done = [n for n, a in arms.items() if a["status"] == "done"]
    for name in done:
        assert f"{name}: complete from an earlier run, skipped" in messages
    assert not any("training the GAN" in m for m in messages)
    assert stamps == {p.name: (p / "arm.json").stat().st_mtime_ns for p in (out / "arms").iterdir()}

    # An arm interrupted after its GAN finished continues from there.
    lesion_dir = out / "arms" / "lesion"
    partial = out / "arms" / ".lesion.partial"
    lesion_dir.rename(partial)
    (partial / "arm.json").unlink()
    shutil.rmtree(partial / "evaluation")
    messages.clear()
    third = reproduce(site, out, "smoke", TINY, stage=messages.append)
    assert "lesion: GAN trained earlier, reused" in messages
    assert any(m.startswith("lesion: evaluating") for m in messages)
    assert (lesion_dir / "arm.json").is_file() and not partial.exists()
    assert third["arms"]["lesion"]["evaluation"]["tstr"]["auc"] == lesion["tstr"]["auc"]
