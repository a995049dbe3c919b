"""`fedspine reproduce`: the plan per budget, a tiny end-to-end run, and resuming it."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil

import pytest
import typer
from typer.testing import CliRunner

from fedspine.cli.reproduce import register

# The arm stages under the names these tests gave them before reproduce.py was split.
from fedspine.experiments.commands import classifier_args as _classifier_args
from fedspine.experiments.commands import classifier_request as _classifier_request
from fedspine.experiments.commands import train_args as _train_args
from fedspine.experiments.commands import train_request as _train_request
from fedspine.experiments.execute import evaluate_arm as _evaluate
from fedspine.experiments.execute import generate_arm as _generate
from fedspine.experiments.plan import DATA_DIR
from fedspine.experiments.prepare import RunContext as _Context
from fedspine.experiments.reproduce import (
    BUDGETS,
    PAPER,
    PLAN_FILE,
    SPINEGAN_UNAVAILABLE,
    ReproduceError,
    build_record,
    format_plan,
    get_budget,
    make_plan,
    render_markdown,
    reproduce,
    spinegan_available,
)
from fedspine.experiments.reproduce import check_previous as _check_previous
from fedspine.experiments.summaries import summarise_evaluation as _summarise_evaluation
from fedspine.experiments.table import build_table

runner = CliRunner()


def _build_report(ctx, results, seconds):
    """What reproduce.json holds for these arm results."""
    return build_record(ctx, results, seconds).to_json()


def _table(results, data_info):
    """The table's rows as reproduce.json holds them."""
    return [row.to_json() for row in build_table(results, data_info)]


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
    for arm, flag in (("dp_clip_only", "clip-only"), ("dp_noise_only", "noise-only")):
        if b.dp_ablation:
            assert f"{arm}: " in text and f"--dp-scheme {flag}" in text
        else:
            assert f"{arm}: " in text and f"not run: left out of the {budget} budget" in text
    assert ("--dp-scheme paper" in text) == bool(b.paper_dp_kimg)
    if b.dp_spinegan_epsilon and spinegan_available()[0]:
        eps = b.dp_spinegan_classifier_epsilon
        assert f"dp_spinegan: SpineGAN under DP: a DP-SGD clinical classifier (ε = {eps:g})" in text
        assert f"--dp --epsilon {eps:g}" in text
        assert "--model spinegan" in text and f"--dp --epsilon {b.dp_spinegan_epsilon:g}" in text
    else:
        assert (
            "dp_spinegan: " in text and "not run" in text.split("dp_spinegan: ")[1].splitlines()[0]
        )
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


def test_quick_plan_lists_the_ablation_arms_with_rerunnable_commands(tmp_path, monkeypatch):
    from fedspine.cli.main import app

    quick = get_budget("quick")
    assert quick.dp_ablation and quick.paper_dp_kimg == quick.dp_kimg
    assert quick.ablation_noise_epsilon in quick.dp_epsilons
    text = format_plan(make_plan(tmp_path, tmp_path / "o", "quick"))
    commands = {}
    arm = None
    for line in text.splitlines():
        if line.startswith("    - "):
            arm = line.split(":")[0][len("    - ") :]
        elif line.strip().startswith("fedspine train "):
            commands[arm] = shlex.split(line.strip())[2:]
    expected = {
        "dp_clip_only": ["--dp-scheme", "clip-only"],
        "dp_noise_only": ["--dp-scheme", "noise-only", "--noise-for-epsilon", "10"],
        "dp_paper": ["--dp-scheme", "paper"],
    }
    dp10 = commands["dp_eps10"]
    for name, flags in expected.items():
        args = commands[name]
        joined = " ".join(args)
        assert " ".join(flags) in joined, joined
        assert "--dp" not in args and "--privacy-home" not in args and "--epsilon" not in args
        assert args[args.index("--kimg") + 1] == dp10[dp10.index("--kimg") + 1], "same budget"
        assert args[0] == dp10[0], "same data"
        if name != "dp_paper":
            same = args[args.index("--patients-per-step") + 1]
            assert same == dp10[dp10.index("--patients-per-step") + 1]
        # This build's `fedspine train` accepts the command: it gets as far as the data.
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(app, ["train", *args])
        assert result.exit_code != 0 and "not a prepared dataset" in result.output, result.output
    assert "are NOT private" in text


def test_the_dp_spinegan_classifier_spends_part_of_its_total():
    with pytest.raises(ReproduceError, match="classifier ε"):
        get_budget("quick", {"dp_spinegan_epsilon": 2.0, "dp_spinegan_classifier_epsilon": 3.0})
    assert get_budget("quick").dp_spinegan_epsilon == get_budget("full").dp_spinegan_epsilon == 10


def test_the_noise_only_arm_needs_its_reference_dp_arm():
    with pytest.raises(ReproduceError, match="not among dp_epsilons"):
        get_budget("quick", {"dp_epsilons": [1, 3]})
    assert get_budget("quick", {"dp_epsilons": [3], "dp_ablation": False}).dp_epsilons == (3.0,)


def test_an_older_plan_without_the_ablation_settings_is_continued(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    plan = make_plan(tmp_path, out, "smoke")
    older = plan.to_dict()
    for key in ("dp_ablation", "ablation_noise_epsilon", "paper_dp_kimg"):
        older["budget"].pop(key)
    (out / PLAN_FILE).write_text(json.dumps(older))
    _check_previous(plan)  # new settings only add arms: no refusal
    older["budget"]["kimg"] = 99.0
    (out / PLAN_FILE).write_text(json.dumps(older))
    with pytest.raises(ReproduceError, match="kimg"):
        _check_previous(plan)


def _fake_evaluation(auc: float) -> dict:
    return {
        "trtr": {"auc": 0.8, "ci": [0.7, 0.9]},
        "tstr": {"auc": auc, "ci": [auc - 0.1, auc + 0.1]},
        "mixed": None,
        "ratios": {"tstr_over_trtr": auc / 0.8},
        "gan_metrics": {"extractor": "domain CNN", "fid": 12.5, "precision": 0.4, "recall": 0.3},
        "gan_metrics_real_reference": {"fid": 1.0},
        "test_images": 10,
    }


def _fake_ablation(scheme: str, sigma: float = 0.0) -> dict:
    mech = {"sample_rate": 0.1, "d_steps": 63, "noise_scale_c": 1.0, "noise_multiplier": sigma}
    mech["clip_norm"] = 1.0 if scheme == "clip-only" else None
    mech["noise_std"] = sigma
    out = {"format": "fedspine-dp-ablation/1", "scheme": scheme, "private": False}
    out["mechanism"] = mech
    if scheme == "noise-only":
        out["noise_calibration"] = {"noise_for_epsilon": 10.0}
    return out


def test_the_table_gives_each_ablation_arm_its_auc_metrics_and_epsilon(tmp_path):
    from dataclasses import asdict

    from fedspine.training.dp_ablation import paper_scheme_epsilon, paper_settings_epsilon

    accounting = paper_scheme_epsilon(300, 2125)
    paper = paper_settings_epsilon()
    done = {"status": "done", "seconds": {"train": 60.0}}
    results = {
        "dp_eps10": {
            **done,
            "epsilon_target": 10.0,
            "evaluation": _fake_evaluation(0.6),
            "privacy": {
                "private": True,
                "epsilon": 9.87,
                "delta": 1e-5,
                "accountant": "prv",
                "mechanisms": [{"noise_multiplier": 0.75, "sample_rate": 0.1, "steps": 63}],
            },
        },
        "dp_clip_only": {
            **done,
            "evaluation": _fake_evaluation(0.7),
            "privacy": {"private": False},
            "ablation": _fake_ablation("clip-only"),
        },
        "dp_noise_only": {
            **done,
            "evaluation": _fake_evaluation(0.55),
            "privacy": {"private": False},
            "ablation": _fake_ablation("noise-only", sigma=0.75),
        },
        "dp_paper": {
            **done,
            "evaluation": _fake_evaluation(0.52),
            "privacy": {"private": False},
            "ablation": {
                **_fake_ablation("paper"),
                "accounting": asdict(accounting),
                "epsilon_text": accounting.text(),
                "paper_settings": asdict(paper),
            },
        },
    }
    ctx = _Context(plan=make_plan(tmp_path, tmp_path / "o", "quick"), stage=lambda _m: None)
    report = _build_report(ctx, results, 1.0)
    rows = {row["experiment"].split(",")[0]: row for row in report["table"]}
    clip = rows["5. ablation: clipping only (DP-SGD's per-patient clip"]
    noise = rows["5. ablation: noise only (DP-SGD's noise σC"]
    own = next(r for r in report["table"] if r["experiment"].startswith("5. the paper's own"))
    dp10 = rows["5. DP-SGD cGAN"]
    assert clip["ours"].startswith("0.700") and clip["epsilon"] == "∞ (no noise)"
    assert noise["ours"].startswith("0.550") and noise["epsilon"] == "∞ (no clipping)"
    assert "the same σ as the ε = 10 arm" in noise["details"]
    assert own["ours"].startswith("0.520")
    assert float(own["epsilon"].split()[0]) == pytest.approx(accounting.epsilon, rel=0.05)
    assert float(own["epsilon"].split()[0]) > 1e3 and "per image" in own["epsilon"]
    assert f"{paper.epsilon:.3g}" in own["details"] and "paper's own settings" in own["details"]
    assert dp10["epsilon"].startswith("9.87")
    for row in (clip, noise, own):
        assert "FID 12.5" in row["details"] and "NOT private" in row["experiment"]
        assert row["paper"] in (PAPER["dp_ablation"], PAPER["dp_paper"])
    md = render_markdown(report)
    assert "| ε | details |" in md and "None of the ablation rows is private" in md
    assert "`dp_paper`" in md and "ε = ∞, not private" in md

    # A noise-only arm whose σ is not the DP arm's says so.
    results["dp_noise_only"]["ablation"] = _fake_ablation("noise-only", sigma=0.5)
    rows = _build_report(ctx, results, 1.0)["table"]
    noise = next(r for r in rows if r["experiment"].startswith("5. ablation: noise only"))
    assert "NOTE the ε = 10 arm used σ = 0.75" in noise["details"]


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
    # The DP arm's ceiling: a DP-SGD classifier at the same ε, in its own privacy home.
    ceiling = arms["dp_eps10"]["evaluation"]["dp_classifier"]
    assert ceiling["auc"] is not None and len(ceiling["ci"]) == 2
    ceiling_ledger = out / "arms" / "dp_eps10" / "dp_classifier" / "privacy" / "ledger.json"
    assert ceiling_ledger.is_file() and arms["cgan"]["evaluation"]["dp_classifier"] is None
    assert "ceiling: a DP-SGD classifier at the same ε" in " ".join(
        row["details"] for row in report["table"]
    )

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


@pytest.mark.slow
def test_tiny_reproduction_runs_the_dp_ablation_arms(tmp_path):
    from fedspine.data.phantom import write_phantom_sites

    (site,) = write_phantom_sites(tmp_path / "ph", sites=1, images_per_site=120, size=128, seed=0)
    out = tmp_path / "repro"
    overrides = {
        **TINY,
        "lesion_kimg": None,
        "spinegan_kimg": None,
        "dp_ablation": True,
        "paper_dp_kimg": 0.032,
    }
    report = reproduce(site, out, "smoke", overrides)
    arms = report["arms"]
    for name in ("cgan", "dp_eps10", "dp_clip_only", "dp_noise_only", "dp_paper"):
        assert arms[name]["status"] == "done", arms[name]
    for name, scheme in (
        ("dp_clip_only", "clip-only"),
        ("dp_noise_only", "noise-only"),
        ("dp_paper", "paper"),
    ):
        arm = arms[name]
        assert arm["dp_scheme"] == scheme and arm["ablation"]["scheme"] == scheme
        assert arm["privacy"]["private"] is False and arm["privacy"]["not_private_reasons"]
        assert not (out / "arms" / name / "ledger.json").exists()
        assert "--dp" not in arm["train_args"] and f"--dp-scheme {scheme}" in " ".join(
            arm["train_args"]
        )
    dp_sigma = arms["dp_eps10"]["privacy"]["mechanisms"][-1]["noise_multiplier"]
    noise = arms["dp_noise_only"]["ablation"]["mechanism"]
    assert noise["noise_multiplier"] == pytest.approx(dp_sigma, rel=1e-12)
    paper = arms["dp_paper"]["ablation"]
    assert paper["epsilon"] > 1e3 and paper["mechanism"]["batch"] == 1
    md = (out / "reproduce.md").read_text()
    assert "the same σ as the ε = 10 arm" in md and "severely impede" in md
    assert f"{paper['epsilon']:.2g}" in md


@pytest.mark.slow
def test_tiny_reproduction_runs_spinegan_under_dp_with_one_ledger(tmp_path):
    from fedspine.data.phantom import write_phantom_sites
    from fedspine.privacy.accounting import epsilon
    from fedspine.privacy.ledger import PrivacyLedger, mechanisms_of

    if not spinegan_available()[0]:
        pytest.skip(SPINEGAN_UNAVAILABLE)
    (site,) = write_phantom_sites(tmp_path / "ph", sites=1, images_per_site=120, size=128, seed=0)
    out = tmp_path / "repro"
    overrides = {
        **TINY,
        "lesion_kimg": None,
        "spinegan_kimg": None,
        "dp_epsilons": (),
        "dp_spinegan_epsilon": 10.0,
        "dp_spinegan_classifier_epsilon": 2.0,
    }
    report = reproduce(site, out, "smoke", overrides)
    arm = report["arms"]["dp_spinegan"]
    assert arm["status"] == "done", arm
    assert arm["dp_scheme"] == "dpsgd" and arm["kind"] == "dp-spinegan"
    args = " ".join(arm["train_args"])
    assert "--model spinegan" in args and "--dp --epsilon 10" in args
    privacy = arm["privacy"]
    assert privacy["private"] is True and 0 < privacy["epsilon"] <= 10.0 * 1.01
    labels = [m["label"] for m in privacy["mechanisms"]]
    assert labels == ["clinical-classifier", "gan-discriminator"]
    ledger = PrivacyLedger.open(
        out / "arms" / "dp_spinegan" / "privacy" / "ledger.json", create=False
    )
    records = ledger.records()
    assert records[0]["label"] == "clinical-classifier"
    assert epsilon(mechanisms_of(records), privacy["delta"]) == pytest.approx(
        privacy["epsilon"], rel=1e-6
    )
    md = (out / "reproduce.md").read_text()
    assert "SpineGAN under DP" in md and f"spent ε = {privacy['epsilon']:.2f}" in md
    assert "Corrected in the `dp_spinegan` arm" in md
    # Its ceiling: a DP-SGD classifier at the arm's total ε, in a privacy home of its own.
    ceiling = arm["evaluation"]["dp_classifier"]
    assert ceiling["auc"] is not None and len(ceiling["ci"]) == 2
    ceiling_home = out / "arms" / "dp_spinegan" / "dp_classifier" / "privacy" / "ledger.json"
    assert ceiling_home.is_file()
    row = md.split("SpineGAN under DP (DP classifier")[1].split("\n")[0]
    assert "ceiling: a DP-SGD classifier at the same ε" in row


# ---------------------------------------------------------------- seeds and signal retained


LESION_ROW = "3. cGAN (lesion type; the paper's 8 classes): TSTR, one-vs-rest mean AUC"


def _utility(signal: float | None, ci: list[float] | None, contains_chance: bool) -> dict:
    tstr = {
        "auc": 0.5,
        "ci": None,
        "ci_contains_chance": contains_chance,
        "signal_retained": signal,
        "signal_retained_ci": ci,
        "difference": 0.0,
        "difference_ci": None,
        "ratio": None,
        "verdict": "",
    }
    return {
        "reference": "TRTR",
        "chance": 0.5,
        "bootstrap": 20,
        "method": "paired",
        "arms": {"TSTR": tstr},
    }


def _with_signal(auc: float, contains_chance: bool = False) -> dict:
    """A fake evaluation whose signal retained is (auc − 0.5) / (0.8 − 0.5), interval ± 0.2."""
    signal = (auc - 0.5) / 0.3
    ev = _fake_evaluation(auc)
    ev["utility"] = _utility(signal, [signal - 0.2, signal + 0.2], contains_chance)
    return ev


def test_budgets_have_seeds_and_refuse_none():
    assert [BUDGETS[n].seeds for n in ("smoke", "quick", "full")] == [1, 1, 3]
    with pytest.raises(ReproduceError, match="seeds must be at least 1"):
        get_budget("smoke", {"seeds": 0})


def test_seed_replicates_get_their_own_folders_seeds_and_privacy_homes(tmp_path):
    plan = make_plan(tmp_path, tmp_path / "o", "smoke", {"seeds": 3, "seed": 5})
    run = [a for a in plan.arms if not a.not_run]
    first = [a for a in run if a.replicate == 0]
    assert [a.folder for a in first] == [a.name for a in first], "replicate 0 keeps its folder"
    assert {a.seed for a in first} == {5}
    for replicate, seed in ((1, 6), (2, 7)):
        arms = [a for a in run if a.replicate == replicate]
        assert [a.name for a in arms] == [a.name for a in first]
        assert [a.folder for a in arms] == [f"{a.name}-seed{seed}" for a in first]
        assert {a.seed for a in arms} == {seed}
    assert not [a for a in plan.arms if a.not_run and a.replicate], "arms not run appear once"
    assert [a["folder"] for a in plan.to_dict()["arms"]] == [a.folder for a in plan.arms]

    text = format_plan(plan)
    assert "seeds 5, 6, 7" in text and "arms, replicate 3 of 3 (seed 7):" in text
    assert "    - cgan-seed6: " in text
    assert "--out arms/cgan-seed6/run" in text and "--resolution 32 --seed 6" in text
    assert "--privacy-home arms/dp_eps10-seed7/privacy" in text
    assert "--privacy-home arms/dp_eps10/privacy" in text
    assert "spinegan-seed" not in text, "not run in smoke, so no replicates"


def test_the_clinical_classifier_generation_and_evaluation_use_the_replicate_seed(
    tmp_path, monkeypatch
):
    from fedspine.reporting import evaluation_report as evaluation
    from fedspine.training import generate

    plan = make_plan(tmp_path, tmp_path / "o", "quick", {"seeds": 2})
    arm = next(a for a in plan.arms if a.name == "cgan" and a.replicate == 1)
    assert arm.seed == 1
    args = _classifier_args(plan, tmp_path, tmp_path / "cls", arm)
    assert args[args.index("--seed") + 1] == "1"
    seen: dict = {}

    def fake_generate(run, target, per_class, seed, device):
        seen["generate"] = seed

    def fake_evaluate(synthetic, train, test, out, cfg, progress=None, **kwargs):
        seen["evaluate"] = (cfg.seed, kwargs.get("trtr_cache"))

    monkeypatch.setattr(generate, "generate_dataset", fake_generate)
    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    ctx = _Context(plan=plan, stage=lambda _m: None)
    _generate(ctx, arm, tmp_path / "work")
    _evaluate(ctx, arm, tmp_path / "data", tmp_path / "work")
    assert seen["generate"] == 1
    assert seen["evaluate"] == (1, plan.out / DATA_DIR / "trtr" / "abnormality-seed1")


def test_a_rerun_with_more_seeds_continues_the_same_folder(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / PLAN_FILE).write_text(json.dumps(make_plan(tmp_path, out, "smoke").to_dict()))
    _check_previous(make_plan(tmp_path, out, "smoke", {"seeds": 3}))
    with pytest.raises(ReproduceError, match="seed"):
        _check_previous(make_plan(tmp_path, out, "smoke", {"seed": 1}))


def test_the_dry_run_takes_seeds(tmp_path):
    args = ["reproduce", str(tmp_path), "--out", str(tmp_path / "o"), "--dry-run"]
    result = runner.invoke(_app(), [*args, "--seeds", "2"])
    assert result.exit_code == 0, result.output
    assert "cgan-seed1: " in result.output and "seeds 0, 1" in result.output
    result = runner.invoke(_app(), [*args, "--seeds", "0"])
    assert result.exit_code != 0 and "seeds must be at least 1" in result.output


def test_the_report_gives_each_arm_its_spread_across_seeds(tmp_path):
    plan = make_plan(tmp_path, tmp_path / "o", "smoke", {"seeds": 3})
    dp = {
        "epsilon_target": 10.0,
        "privacy": {"private": True, "epsilon": 9.9, "delta": 1e-5, "mechanisms": []},
    }
    done = {"status": "done", "seconds": {"train": 60.0}}
    results = {
        "cgan": {**done, "evaluation": _with_signal(0.6)},
        "dp_eps10": {**done, **dp, "evaluation": _with_signal(0.55)},
        "cgan-seed1": {**done, "evaluation": _with_signal(0.7)},
        "dp_eps10-seed1": {**done, **dp, "evaluation": _with_signal(0.65)},
        "cgan-seed2": {**done, "evaluation": _with_signal(0.8)},
        "dp_eps10-seed2": {"status": "failed", "reason": "`fedspine train` exited 1: boom"},
    }
    ctx = _Context(plan=plan, stage=lambda _m: None)
    report = _build_report(ctx, results, 1.0)
    json.dumps(report)
    cgan = report["seeds"]["cgan"]
    assert cgan["seeds"] == [0, 1, 2] and cgan["folders"] == ["cgan", "cgan-seed1", "cgan-seed2"]
    tstr = cgan["tstr_auc"]
    assert tstr["n"] == 3 and tstr["values"] == pytest.approx([0.6, 0.7, 0.8])
    assert (tstr["mean"], tstr["sd"]) == pytest.approx((0.7, 0.1))
    assert (tstr["min"], tstr["max"]) == pytest.approx((0.6, 0.8))
    signal = cgan["signal_retained"]
    assert signal["mean"] == pytest.approx(2 / 3) and signal["min"] == pytest.approx(1 / 3)
    assert report["seeds"]["dp_eps10"]["tstr_auc"]["seeds"] == [0, 1]
    assert report["arms"]["cgan-seed2"]["evaluation"]["tstr"]["auc"] == 0.8, "every replicate"

    rows = report["table"]
    row = next(r for r in rows if r["experiment"] == "2. cGAN (abnormality): TSTR")
    assert row["ours"] == "0.600 [0.500, 0.700]; mean over 3 seeds 0.700 (0.600–0.800)"
    assert row["signal"] == "0.33 [0.13, 0.53]; mean over 3 seeds 0.67 (0.33–1.00)"
    trtr = rows[0]
    assert trtr["ours"].endswith("mean over 3 seeds 0.800 (0.800–0.800)")
    (dp_row,) = [r for r in rows if r["experiment"].startswith("5. DP-SGD cGAN")]
    assert dp_row["ours"].endswith("mean over 2 of 3 seeds 0.600 (0.550–0.650)")
    md = render_markdown(report)
    assert "mean over 3 seeds 0.700 (0.600–0.800)" in md
    assert "the training-seed variation the intervals do not cover" in md
    assert "seeds 0, 1, 2" in md and "`arms/cgan-seed2/evaluation/report.md`" in md
    assert "target 10 → spent 9.90" in md and md.count("target 10 → spent") == 1

    single = _build_report(
        _Context(plan=make_plan(tmp_path, tmp_path / "o", "smoke"), stage=lambda _m: None),
        {"cgan": results["cgan"]},
        1.0,
    )
    assert "mean over" not in render_markdown(single)
    assert "`--seeds N` trains every arm with N seeds" in render_markdown(single)


def test_the_signal_retained_cell_says_when_tstr_is_at_chance(tmp_path):
    chance = _fake_evaluation(0.52)
    chance["utility"] = _utility(0.05, [-0.31, 0.40], True)
    results = {
        "cgan": {"status": "done", "evaluation": chance},
        "lesion": {"status": "done", "evaluation": _with_signal(0.74)},
        "spinegan": {"status": "done", "evaluation": _fake_evaluation(0.7)},
    }
    rows = {r["experiment"]: r for r in _table(results, {})}
    cgan = rows["2. cGAN (abnormality): TSTR"]
    assert (
        cgan["signal"]
        == "0.05 [−0.31, 0.40]; TSTR's interval contains chance: no evidence of signal"
    )
    assert "TSTR/TRTR 0.650" in cgan["details"]
    assert rows[LESION_ROW]["signal"] == "0.80 [0.60, 1.00]"
    spine = rows["4. SpineGAN (abnormality, clinical loss): TSTR"]
    assert spine["signal"] == "n/a", "an evaluation written before signal retained"
    assert "TSTR/TRTR 0.875" in spine["details"]
    assert rows["1. real classifier (TRTR), normal vs abnormal"]["signal"] == "1 (reference)"
    unbounded = _fake_evaluation(0.7)
    unbounded["utility"] = _utility(0.67, None, False)
    undefined = _fake_evaluation(0.7)
    undefined["utility"] = _utility(None, None, False)
    results["spinegan"]["evaluation"], results["lesion"]["evaluation"] = unbounded, undefined
    rows = {r["experiment"]: r for r in _table(results, {})}
    assert rows["4. SpineGAN (abnormality, clinical loss): TSTR"]["signal"] == (
        "0.67 [interval unbounded]"
    )
    assert rows[LESION_ROW]["signal"] == "n/a (TRTR's own interval contains chance)"

    ctx = _Context(plan=make_plan(tmp_path, tmp_path / "o", "smoke"), stage=lambda _m: None)
    md = render_markdown(_build_report(ctx, results, 1.0))
    assert "| ours: test AUC [95 % CI] | signal retained [95 % CI] | ε | details |" in md
    assert "ours / TRTR" not in md
    assert "0 = chance, 1 = as good as real data" in md
    assert "One TRTR classifier per task and seed is trained once" in md
    assert "retrained with the same seed inside every arm" not in md


def test_the_evaluation_summary_carries_the_utility_block(tmp_path):
    arm = {"auc": 0.7, "ci": [0.6, 0.8], "history": {"best_epoch": 2}}
    report = {
        "task": "binary",
        "class_names": ["normal", "abnormal"],
        "arms": {"TRTR": arm, "TSTR": arm},
        "ratios": {"tstr_over_trtr": 1.0},
        "generative": {"results": []},
        "memorisation": {},
        "test_set": {"images": 10},
    }
    path = tmp_path / "evaluation" / "report.json"
    path.parent.mkdir()
    path.write_text(json.dumps(report))
    assert _summarise_evaluation(path)["utility"] is None, "older reports have none"
    report["utility"] = _utility(0.05, [-0.31, 0.40], True)
    path.write_text(json.dumps(report))
    assert _summarise_evaluation(path)["utility"] == report["utility"]


def test_the_papers_derived_figures_are_marked_and_right():
    for key, value, derived in (
        ("cgan_ratio", 0.814 / 0.856, 0.814 / 0.886),
        ("spinegan_ratio", 0.830 / 0.856, 0.830 / 0.886),
    ):
        text = PAPER[key]
        assert text.startswith(f"{value:.3f} (derived") and f"or {derived:.3f} (derived" in text
        assert "journal TRTR" in text and "preprint TRTR" in text
    assert PAPER["spinegan_ratio"].startswith("0.970") and "0.937" in PAPER["spinegan_ratio"]
    for key, tstr, value in (("cgan_signal", 0.814, "0.882"), ("spinegan_signal", 0.830, "0.927")):
        assert f"{(tstr - 0.5) / (0.856 - 0.5):.3f}" == value
        assert PAPER[key].startswith(f"{value} (derived") and "journal TRTR" in PAPER[key]

    results = {
        "cgan": {"status": "done", "evaluation": _with_signal(0.7)},
        "spinegan": {"status": "done", "evaluation": _with_signal(0.7)},
    }
    rows = {r["experiment"]: r for r in _table(results, {})}
    cgan = rows["2. cGAN (abnormality): TSTR"]
    spine = rows["4. SpineGAN (abnormality, clinical loss): TSTR"]
    assert cgan["paper"] == (
        f"0.814; signal retained {PAPER['cgan_signal']}; TSTR/TRTR {PAPER['cgan_ratio']}"
    )
    assert spine["paper"] == (
        f"0.830; signal retained {PAPER['spinegan_signal']}; TSTR/TRTR {PAPER['spinegan_ratio']}"
    )
    assert "TSTR/TRTR 0.875" in cgan["details"] and "derived" not in cgan["details"]
    not_run = {r["experiment"]: r for r in _table({}, {})}
    assert "0.970" in not_run["4. SpineGAN (abnormality, clinical loss): TSTR"]["paper"]


def test_reproduce_trains_through_the_library_exactly_what_its_commands_say(tmp_path, monkeypatch):
    """Each arm's typed request equals what `fedspine train` / `classifier train` builds from
    the command the plan prints, so the printed commands rerun the same experiment."""
    import fedspine.training.classifier_run as classifier_run
    import fedspine.training.run as run_module
    from fedspine.cli.main import app

    captured: list = []
    monkeypatch.setattr(
        run_module, "train", lambda request, reporter=None: captured.append(request)
    )
    monkeypatch.setattr(
        classifier_run,
        "train_classifier_run",
        lambda request, reporter=None: captured.append(request),
    )
    plan = make_plan(tmp_path, tmp_path / "o", "quick", {"seeds": 2})
    data = tmp_path / "data"
    checked = set()
    for arm in plan.arms:
        if arm.not_run:
            continue
        run = tmp_path / "o" / "arms" / arm.folder / "run"
        captured.clear()
        result = runner.invoke(app, ["train", *_train_args(plan, arm, data, run)])
        assert result.exit_code == 0, result.output
        assert captured == [_train_request(plan, arm, data, run)], arm.folder
        if arm.kind in ("spinegan", "dp-spinegan"):
            out = run.parent / "classifier"
            captured.clear()
            args = ["classifier", "train", *_classifier_args(plan, data, out, arm)]
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
            assert captured == [_classifier_request(plan, data, out, arm)], arm.folder
        checked.add(arm.kind)
    assert checked >= {"cgan", "dp", "clip-only", "noise-only", "paper"}


def test_experiments_import_no_command_line_module():
    """`reproduce` and the demo call the library; the CLI sits above them, never below."""
    import ast
    from pathlib import Path

    import fedspine.experiments as experiments

    for path in Path(experiments.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("fedspine.cli"), f"{path.name} imports {name}"


# ---------------------------------------------------------------- the public checkpoint's arms


def _tiny_run(tmp_path, name: str, public: str | None):
    """A 16 px run of the tiny cpu preset, built for DP fine-tuning, declared public or not."""
    from fedspine.training.run import TrainRequest, train
    from tests.training import make_prepared

    data = make_prepared(tmp_path / f"{name}-data", seed=7)
    run = tmp_path / name
    train(
        TrainRequest(
            data, run, preset="cpu", kimg=0.016, device="cpu", public_data=public, for_dp=True
        )
    )
    return run


@pytest.mark.usefixtures("tiny_cpu_preset")
def test_a_public_run_adds_the_public_arms_and_anything_else_is_refused(tmp_path):
    from fedspine.experiments.public_run import check_public_run, read_public_run

    public = _tiny_run(tmp_path, "public", "test shapes, seed 7")
    args = ["reproduce", str(tmp_path), "--out", str(tmp_path / "o"), "--dry-run"]
    result = runner.invoke(_app(), [*args, "--public-run", str(public)])
    assert result.exit_code == 0, result.output
    text = result.output
    checkpoint = read_public_run(public)
    assert f"public checkpoint: {public}" in text and checkpoint.sha256[:12] in text
    assert "declared public: test shapes, seed 7" in text
    assert "public_only: the public checkpoint's own generator" in text
    for eps in BUDGETS["smoke"].dp_epsilons:
        dp_public = text.split(f"dp_public_eps{eps:g}: ")[1].split("\n    - ")[0]
        assert f"--dp --epsilon {eps:g}" in dp_public and "--dp-trainable-d head" in dp_public
        assert f"--init-from {public}" in dp_public
        assert f"--privacy-home arms/dp_public_eps{eps:g}/privacy" in dp_public
        assert f"ceiling: the DP-SGD classifier at ε = {eps:g} of arms/dp_eps{eps:g}" in dp_public
        embedding = text.split(f"dp_embedding_eps{eps:g}: ")[1].split("\n    - ")[0]
        assert f"fedspine embedding release data/abnormality --epsilon {eps:g}" in embedding
        assert f"--privacy-home arms/dp_embedding_eps{eps:g}/privacy" in embedding
        assert "fedspine embedding fit " in embedding and f"--init-from {public}" in embedding
    assert not (tmp_path / "o").exists()
    without = runner.invoke(_app(), args).output
    assert "public_only" not in without and "dp_public" not in without, "only with --public-run"

    plan = make_plan(tmp_path, tmp_path / "o", "smoke", public_run=public)
    assert plan.to_dict()["public_run"]["sha256"] == checkpoint.sha256
    # A rerun may leave the public arms out, not start them from another checkpoint.
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / PLAN_FILE).write_text(json.dumps(plan.to_dict()))
    _check_previous(make_plan(tmp_path, tmp_path / "o", "smoke"))
    other = dataclasses.replace(checkpoint, sha256="0" * 64)
    with pytest.raises(ReproduceError, match="with the same --public-run"):
        _check_previous(make_plan(tmp_path, tmp_path / "o", "smoke", public_run=other))
    shutil.rmtree(tmp_path / "o")
    # A run not declared public is refused before anything is written or trained.
    private = _tiny_run(tmp_path, "private", None)
    result = runner.invoke(_app(), [*args, "--public-run", str(private)])
    assert result.exit_code != 0 and "not trained on data declared public" in result.output
    with pytest.raises(ReproduceError, match="not trained on data declared public"):
        reproduce(tmp_path, tmp_path / "o", "smoke", TINY, public_run=private)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ReproduceError, match="no such run folder"):
        make_plan(tmp_path, tmp_path / "o", "smoke", public_run=tmp_path / "nothing")
    # Checked again once the data is prepared: of other data, and the budget's networks.
    budget = get_budget("smoke", TINY)
    with pytest.raises(ReproduceError, match="trained on this very dataset"):
        check_public_run(checkpoint, budget, checkpoint.dataset_content_hash, 2)
    with pytest.raises(ReproduceError, match="32 px"):
        check_public_run(checkpoint, get_budget("smoke"), "other", 2)
    with pytest.raises(ReproduceError, match="3"):
        check_public_run(checkpoint, budget, "other", 3)
    check_public_run(checkpoint, budget, "other", 2)


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_cpu_preset")
def test_tiny_reproduction_runs_the_public_arms(tmp_path):
    from fedspine.data.phantom import write_phantom_sites
    from fedspine.experiments.pretrain import PretrainConfig, pretrain

    (site,) = write_phantom_sites(tmp_path / "ph", sites=1, images_per_site=120, size=128, seed=0)
    public = pretrain(
        tmp_path / "public",
        PretrainConfig(images=24, size=64, resolution=16, kimg=0.016, device="cpu"),
    ).out
    out = tmp_path / "repro"
    overrides = {**TINY, "lesion_kimg": None, "spinegan_kimg": None, "embedding_steps": 4}
    messages: list[str] = []
    # `fedspine pretrain`'s OUT stands for its run folder.
    report = reproduce(
        site, out, "smoke", overrides, stage=messages.append, public_run=public.parent
    )
    arms = report["arms"]
    names = ("cgan", "dp_eps10", "public_only", "dp_public_eps10", "dp_embedding_eps10")
    for name in names:
        assert arms[name]["status"] == "done", arms[name]
    assert report["public_run"]["sha256"] and report["public_run"]["path"] == str(public)
    assert report["public_run"]["declaration"].startswith("fedspine phantom simulator")

    only = arms["public_only"]
    assert only["kind"] == "public-only" and only["epsilon_home"] == 0.0
    assert not (out / "arms" / "public_only" / "privacy").exists(), "no private data read"
    assert only["public_run"]["sha256"] == report["public_run"]["sha256"]
    for name, label in (
        ("dp_public_eps10", "gan-discriminator"),
        ("dp_embedding_eps10", "mean-embedding"),
    ):
        arm = arms[name]
        home = out / "arms" / name / "privacy"
        assert (home / "ledger.json").is_file()
        assert 0 < arm["epsilon_home"] <= 10.0 * 1.01, "read back from the arm's own home"
        assert arm["privacy"]["private"] is True
        assert arm["privacy"]["epsilon"] == pytest.approx(arm["epsilon_home"], rel=1e-6)
        assert [m["label"] for m in arm["privacy"]["mechanisms"]] == [label]
        # The ceiling at the same ε: the DP-SGD arm's, scored in this arm's evaluation.
        assert arm["ceiling_shared_with"] == "dp_eps10"
        assert arm["evaluation"]["dp_classifier"]["auc"] is not None
    dp_public = arms["dp_public_eps10"]
    assert "--dp-trainable-d head" in " ".join(dp_public["train_args"])
    assert f"--init-from {public}" in " ".join(dp_public["train_args"])
    assert "fedspine embedding fit" in arms["dp_embedding_eps10"]["commands"][1]
    assert arms["dp_embedding_eps10"]["dp_scheme"] == "dp-mean-embedding"

    rows = report["table"]
    base = arms["public_only"]["evaluation"]["tstr"]["auc"]
    (public_row,) = [r for r in rows if r["experiment"].startswith("6. public checkpoint only")]
    assert public_row["epsilon"] == "0 (public data only)" and "dp_minus_public" not in public_row
    for name, start in (
        ("dp_eps10", "5. DP-SGD cGAN"),
        ("dp_public_eps10", "6. DP-SGD from the public checkpoint"),
        ("dp_embedding_eps10", "6. DP mean embedding"),
    ):
        (row,) = [r for r in rows if r["experiment"].startswith(start)]
        difference = arms[name]["evaluation"]["tstr"]["auc"] - base
        assert float(row["dp_minus_public"].replace("−", "-")) == pytest.approx(
            difference, abs=6e-4
        )
        assert row["epsilon"].startswith(f"{arms[name]['privacy']['epsilon']:.2f}")
    md = (out / "reproduce.md").read_text()
    assert "| DP − public-only |" in md and "What DP contributes is the DP arm minus" in md
    assert report["public_run"]["sha256"][:12] in md

    # A rerun reuses every arm and the public checkpoint's check passes again.
    stamps = {p.name: (p / "arm.json").stat().st_mtime_ns for p in (out / "arms").iterdir()}
    messages.clear()
    again = reproduce(site, out, "smoke", overrides, stage=messages.append, public_run=public)
    assert again["table"] == report["table"]
    for name in names:
        assert f"{name}: complete from an earlier run, skipped" in messages
    assert stamps == {p.name: (p / "arm.json").stat().st_mtime_ns for p in (out / "arms").iterdir()}


def test_the_public_arms_commands_build_the_requests_reproduce_makes(tmp_path, monkeypatch):
    """The printed `fedspine train` of a dp-public arm and `fedspine embedding release|fit` of a
    dp-embedding arm rerun what reproduce calls in the library."""
    import types

    import fedspine.training.mean_embedding as mean_embedding
    import fedspine.training.mean_embedding_fit as mean_embedding_fit
    import fedspine.training.run as run_module
    from fedspine.cli.main import app
    from fedspine.experiments.commands import (
        embedding_features,
        fit_args,
        fit_request,
        release_args,
    )
    from fedspine.experiments.public_run import PublicRun

    public = PublicRun(
        path=tmp_path / "public" / "run",
        checkpoint="snapshots/snapshot_00001.000.pt",
        sha256="ab" * 32,
        declaration="test",
        dataset_content_hash="cd" * 32,
        resolution=32,
        classes=2,
    )
    plan = make_plan(tmp_path, tmp_path / "o", "smoke", {"device": "cpu"}, public_run=public)
    data = tmp_path / "data"
    captured: list = []
    monkeypatch.setattr(
        run_module, "train", lambda request, reporter=None: captured.append(request)
    )
    (arm,) = [a for a in plan.arms if a.kind == "dp-public"]
    run = tmp_path / "o" / "arms" / arm.folder / "run"
    result = runner.invoke(app, ["train", *_train_args(plan, arm, data, run)])
    assert result.exit_code == 0, result.output
    (request,) = captured
    assert request == _train_request(plan, arm, data, run)
    assert request.init_from == public.path and request.dp.trainable_d == "head"

    (arm,) = [a for a in plan.arms if a.kind == "dp-embedding"]
    work = tmp_path / "o" / "arms" / arm.folder
    release = work / "release" / "abnormality.npz"
    released: dict = {}

    def fake_release(prepared, out, **kwargs):
        released.update(prepared=prepared, out=out, **kwargs)
        metadata = {
            "site": "s",
            "class_names": ["a", "b"],
            "feature_map": {"dim": 1},
            "noise_multiplier": 1.0,
            "sensitivity": 1.0,
            "epsilon": 1.0,
            "delta": 1e-5,
            "accountant": "prv",
            "patients": 1,
            "unit": "patient",
        }
        return types.SimpleNamespace(metadata=metadata)

    monkeypatch.setattr(mean_embedding, "release_embedding", fake_release)
    args = release_args(plan, arm, data, release)
    result = runner.invoke(app, ["embedding", "release", *args])
    assert result.exit_code == 0, result.output
    assert (released["prepared"], released["out"]) == (data, release)
    assert released["epsilon"] == arm.epsilon
    assert released["privacy_home"] == work / "privacy"
    # DP-MEPF: pixel features and the public checkpoint's D features, as reproduce releases.
    assert released["features"] == embedding_features(plan, arm) == f"rff+{public.path}"

    fitted: list = []

    def fake_fit(request, progress=None):
        fitted.append(request)
        return types.SimpleNamespace(epsilon={}, distance_start=1.0, distance_end=0.5, steps=1)

    monkeypatch.setattr(mean_embedding_fit, "fit_generator", fake_fit)
    result = runner.invoke(app, ["embedding", "fit", *fit_args(plan, arm, release, work)])
    assert result.exit_code == 0, result.output
    expected = fit_request(plan, arm, release, work)
    got = fitted[0]
    fields = ("out", "steps", "preset", "resolution", "init_from", "seed", "device")
    for field in (*fields, "feature_networks", "g_trainable"):
        assert getattr(got, field) == getattr(expected, field), field
    assert list(got.releases) == list(expected.releases) and expected.steps == 300
