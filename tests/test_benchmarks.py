"""The prepared GPU benchmark must run when a GPU session gets its few minutes: check it on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_paper_preset_script_runs_on_cpu_and_reports_every_setting(capsys):
    bench = _load("gpu_paper_preset")
    report = bench.main(
        [
            "--device",
            "cpu",
            "--preset",
            "cpu",
            "--resolution",
            "16",
            "--precision",
            "off",
            "--steps",
            "2",
            "--warmup",
            "1",
        ]
    )
    assert set(report["results"]) == {"fused/off", "non-fused/off"}
    for row in report["results"].values():
        assert row["sec_per_kimg"] > 0 and row["finite_losses"] and row["resolution"] == 16
    assert report["fastest"] in report["results"]
    assert "fused_over_non_fused_speed/off" in report["ratios"]
    assert all(row["autocast_dtype"] == "float32" for row in report["results"].values())
    assert report["auto_choice"]["off"]["fused"] is False  # the CPU rule, nothing timed
    assert '"benchmark": "gpu_paper_preset"' in capsys.readouterr().out


def test_gpu_paper_preset_refuses_cuda_without_a_gpu():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    bench = _load("gpu_paper_preset")
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--steps", "1"])


def test_train_throughput_compares_every_setting_in_one_run(capsys):
    bench = _load("train_throughput")
    report = bench.main(["--resolutions", "16", "--steps", "1", "--warmup", "0", "--threads", "1"])
    row = report["results"]["16px"]
    assert {"denormal_on", "denormal_off", "bf16"} <= set(row)
    assert (
        row["ratio_bf16_over_fp32"]
        == row["bf16"]["img_per_sec"] / row["denormal_on"]["img_per_sec"]
    )
    assert row["ratio_on_over_off"] > 0 and isinstance(report["cpu_bf16_flags"], list)
    assert '"benchmark": "train_throughput"' in capsys.readouterr().out


def test_aggregation_memory_compares_both_variants_in_one_run(capsys):
    """The smallest configuration of benchmarks/aggregation_memory.py (issue 13, item 8)."""
    report = _load("aggregation_memory").main(["--sites", "4", "--megabytes", "64"])
    capsys.readouterr()
    assert report["same_average"]
    models = report["models_in_memory"]
    # Four replies held at once (plus the sum) against the sum and one reply.
    assert models["running_sum"] < models["all_replies"] - 0.5, models


@pytest.mark.slow
def test_time_to_quality_runs_quick_and_compares_variants(tmp_path, capsys):
    """benchmarks/time_to_quality.py --quick (issue 18): both variants, every minute mark, an
    evaluation per mark against one shared TRTR, and tuned / today ratios per mark."""
    import math

    minutes = [0.02, 0.04]
    report = _load("time_to_quality").main(
        ["--quick", "--work", str(tmp_path), "--threads", "1", "--minutes"]
        + [str(m) for m in minutes]
        + ["--set", "augment.adjust_kimg=10", "--set", "start_p=0.1", "--heldout-per-site", "6"]
        + ["--candidate", "ema2", "ema_kimg=2", "r1_gamma=0.05"]
        + ["--candidate", "spine", "clinical=0.5"]
    )
    assert '"benchmark": "time_to_quality"' in capsys.readouterr().out
    assert (tmp_path / "results.json").is_file()
    assert report["tuned_changes"]["augment.adjust_kimg"] == 10
    tuned = report["configs"]["tuned/16px"]
    assert tuned["pl_weight"] == 0 and tuned["style_mixing"] == 0 and tuned["start_p"] == 0.1
    assert report["configs"]["today/16px"]["augment"]["adjust_kimg"] == 100
    rows = report["rows"]
    assert {(r["variant"], r["minutes"]) for r in rows} == {
        (v, m) for v in ("today", "tuned", "ema2", "spine") for m in minutes
    }
    ema2 = report["configs"]["ema2/16px"]
    assert ema2["ema_kimg"] == 2 and ema2["r1_gamma"] == 0.05 and ema2["pl_weight"] == 2.0
    # The SpineGAN contender trained its classifier on the train split first, on its own clock,
    # and its generator steps logged the clinical loss.
    assert report["configs"]["spine/16px"]["clinical"] == 0.5 and ema2["clinical"] == 0.0
    from fedspine.models.classifier import load_classifier

    _, _, meta = load_classifier(tmp_path / "runs" / "spine-16px-seed0" / "classifier")
    assert meta["training_data"]["split"] == "train" and meta["selection_data"]["split"] == "val"
    for row in rows:
        spent = row["clinical_classifier_seconds"]
        assert (spent > 0) == (row["variant"] == "spine"), row
        assert row["train_wall_seconds"] >= spent
    for row in rows:
        for key in ("tstr_auc", "trtr_auc", "kimg", "ada_p"):
            assert math.isfinite(row[key]), (key, row)
        assert len(row["tstr_ci"]) == 2 and len(row["trtr_ci"]) == 2
        assert row["kimg"] > 0 and row["train_wall_seconds"] >= row["minutes"] * 60
    assert len({r["trtr_auc"] for r in rows}) == 1  # one TRTR shared by every evaluation
    marks = report["summary"]["16px"]
    assert set(marks) == {f"{m:g}" for m in minutes}
    for entry in marks.values():
        assert {"today", "tuned"} <= set(entry)
        assert "signal_retained_tuned_over_today" in entry  # None where TRTR holds chance
        assert math.isfinite(entry["tstr_over_trtr_tuned_over_today"])
        assert entry["kimg_tuned_over_today"] > 0 and entry["kimg_ema2_over_today"] > 0
    assert report["torch_threads"] == 1 and len(report["load_average_before"]) == 3
    # The held-out population (6 new images per site) joined the test split only.
    from fedspine.data.prepared import load_prepared

    pooled = load_prepared(tmp_path / "phantom-3x40-64px" / "pooled-16-heldout6")
    held = ["-heldout/" in pid for pid in pooled.patient_ids.tolist()]
    assert sum(held) == 18 and set(pooled.splits[held].tolist()) == {"test"}
    assert report["data"]["test_images"]["16px"] == int((pooled.splits == "test").sum())
    assert report["data"]["heldout_per_site"] == 6
    # --reevaluate trains nothing: the saved synthetic sets scored on the sites' own test split.
    again = _load("time_to_quality").main(
        ["--quick", "--work", str(tmp_path), "--threads", "1"]
        + ["--reevaluate", str(tmp_path / "results.json")]
    )
    capsys.readouterr()
    keep = ("variant", "seed", "minutes", "kimg", "train_wall_seconds")
    assert [[r[k] for k in keep] for r in again["rows"]] == [[r[k] for k in keep] for r in rows]
    assert again["data"]["test_images"]["16px"] == report["data"]["test_images"]["16px"] - 18
    assert again["reevaluated"]["from_argv"] == report["argv"]
    assert (tmp_path / "results-reevaluated.json").is_file()
    table = (tmp_path / "report.md").read_text()
    assert table.count("| 16 | ") == 4 * len(minutes) and "signal retained" in table
    assert 'ema2 {"ema_kimg": 2, "r1_gamma": 0.05}' in table


def test_time_to_quality_table_names_only_the_variants_it_ran():
    """``--variants today narrow`` with a ``tuned`` defined but not run: the table's note lists
    the changes of the variants in its rows, not of every one defined."""
    row = {
        "resolution": 64, "minutes": 5.0, "seed": 0, "kimg": 1.0, "tstr_auc": 0.6,
        "tstr_ci": [0.55, 0.65], "trtr_auc": 0.8, "trtr_ci": [0.78, 0.82],
        "signal_retained": 1 / 3, "signal_retained_ci": [0.2, 0.5], "tstr_over_trtr": 0.75,
    }  # fmt: skip
    report = {
        "rows": [row | {"variant": "today"}, row | {"variant": "narrow"}],
        "candidates": {"tuned": {"pl_weight": 0.0}, "narrow": {"network.channel_max": 128}},
        "tuned_changes": {"pl_weight": 0.0},
        "load_average_before": [0.5, 0.5, 0.5],
        "load_average_after": [1.0, 1.0, 1.0],
        "torch_threads": 2,
    }
    table = _load("time_to_quality").markdown(report)
    assert table.count("| 64 | 5 | ") == 2
    assert 'narrow {"network.channel_max": 128}' in table and "tuned" not in table


@pytest.mark.slow
def test_dp_utility_runs_its_gan_arms_quick_pooled_and_federated(tmp_path, capsys):
    """The benchmark's GAN arms at its smallest configuration (issue 15, item 6): DP-SGD from
    scratch and from the public checkpoint with few privatised D parameters, pooled and through
    a real federation, with ε read back from their own privacy homes, the non-private arm at
    ε ∞, and what DP adds over the public checkpoint."""
    import math
    import tomllib

    from fedspine.fileio import file_sha256
    from fedspine.privacy.home import PrivacyHome

    arms = ["public-only", "non-private", "dp-sgd", "dp-sgd-public"]
    report = _load("dp_utility").main(
        ["--quick", "--work", str(tmp_path), "--epsilons", "10", "--arms", *arms]
    )
    capsys.readouterr()
    rows = {(r["mode"], r["arm"]): r for r in report["rows"]}
    assert set(rows) == {(m, a) for m in ("pooled", "federated") for a in arms}
    for mode in ("pooled", "federated"):
        assert rows[(mode, "non-private")]["epsilon"] == math.inf
        for arm in ("dp-sgd", "dp-sgd-public"):
            row = rows[(mode, arm)]
            assert 0 < row["epsilon"] <= 10 + 1e-6 and row["epsilon_target"] == 10, row
            assert math.isfinite(row["tstr_auc"]) and len(row["tstr_ci"]) == 2
            public = rows[(mode, "public-only")]["tstr_auc"]
            assert row["dp_minus_public"] == row["tstr_auc"] - public
    snapshot = json.loads((tmp_path / "public" / "run" / "latest.json").read_text())["snapshot"]
    sha = file_sha256(tmp_path / "public" / "run" / snapshot)
    pooled = tmp_path / "pooled" / "dp-sgd-public-eps10"
    config = tomllib.loads((pooled / "run" / "config.toml").read_text())
    assert config["init_from"]["checkpoint_sha256"] == sha
    assert config["dp"]["trainable_d"] == "top:2" and config["train"]["g_trainable"] == "mapping"
    (record,) = PrivacyHome(pooled / "privacy").ledger().records()
    assert record["notes"]["pretraining"]["checkpoint_sha256"] == sha
    federated = tmp_path / "federated" / "dp-sgd-public-eps10"
    for home in sorted((federated / "privacy").iterdir()):
        notes = [r["notes"].get("pretraining") for r in PrivacyHome(home).ledger().records()]
        assert notes and all(n["checkpoint_sha256"] == sha for n in notes), home
    # DP-SGD from scratch has no public start anywhere in its records.
    scratch = tomllib.loads(
        (tmp_path / "pooled" / "dp-sgd-eps10" / "run" / "config.toml").read_text()
    )
    assert "init_from" not in scratch


@pytest.mark.slow
def test_dp_utility_runs_quick_pooled_and_federated(tmp_path, capsys):
    """benchmarks/dp_utility.py --quick (issue 15, item 6): every asked arm in both modes, ε read
    back from each arm's own privacy home, DP minus public-only, and the report with its plot.
    The GAN arms are left out here (the training and federation tests cover them), but for the
    public route without DP, whose fine-tuning from the checkpoint is the benchmark's own."""
    import json
    import math
    import tomllib

    import numpy as np

    from fedspine.fileio import file_sha256

    arms = ["public-only", "public-embedding", "public-classifier", "dp-embedding", "dp-classifier"]
    report = _load("dp_utility").main(
        ["--quick", "--work", str(tmp_path), "--epsilons", "10", "--arms", *arms]
    )
    printed = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert printed["benchmark"] == "dp_utility" and printed["rows"] == report["rows"]
    rows = {(r["mode"], r["arm"]): r for r in report["rows"]}
    assert set(rows) == {(m, a) for m in ("pooled", "federated") for a in arms}
    for mode in ("pooled", "federated"):
        public, embedding = rows[(mode, "public-only")], rows[(mode, "dp-embedding")]
        assert public["epsilon"] == 0.0 and public["epsilon_target"] is None
        assert 0 < embedding["epsilon"] <= 10 + 1e-6 and embedding["epsilon_target"] == 10
        assert math.isfinite(embedding["tstr_auc"]) and len(embedding["tstr_ci"]) == 2
        assert embedding["dp_minus_public"] == embedding["tstr_auc"] - public["tstr_auc"]
        # The controls see no private image: ε 0, and the release's own fit held fixed.
        fit, alone = rows[(mode, "public-embedding")], rows[(mode, "public-classifier")]
        assert fit["epsilon"] == 0.0 and alone["epsilon"] == 0.0
        assert embedding["dp_minus_public_fit"] == embedding["tstr_auc"] - fit["tstr_auc"]
        assert 0 <= alone["tstr_auc"] <= 1 and alone["trtr_auc"] == embedding["trtr_auc"]
        assert fit["tstr_auc"] == rows[("pooled", "public-embedding")]["tstr_auc"]
    control = tmp_path / "pooled" / "public-embedding"
    assert (
        not (control / "privacy").exists()
        and not (tmp_path / "federated" / "public-embedding" / "run").exists()
    )
    released = np.load(control / "releases" / "public.npz")
    meta = json.loads(str(released["metadata"]))
    assert meta["site"] == "public" and meta["noise_std"] == 0.0 and meta["mechanisms"] == []
    fitted = json.loads((control / "run" / "config.json").read_text())
    assert fitted["feature_map"] == meta["feature_map"]
    corpus = tmp_path / "public" / "prepared"
    trained_on = json.loads(
        (tmp_path / "pooled" / "public-classifier" / "classifier" / "config.json").read_text()
    )
    assert trained_on["data"] == str(corpus) and "dp" not in trained_on
    # The same public generator in both modes; the federated route released once per site.
    assert (
        rows[("pooled", "public-only")]["tstr_auc"]
        == rows[("federated", "public-only")]["tstr_auc"]
    )
    assert len(list((tmp_path / "federated" / "dp-embedding-eps10" / "releases").glob("*"))) == 3
    ceiling = rows[("pooled", "dp-classifier")]
    assert 0 < ceiling["epsilon"] <= 10 + 1e-6 and 0 <= ceiling["tstr_auc"] <= 1
    assert "not measured" in rows[("federated", "dp-classifier")]["note"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == report["rows"]
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "dp-embedding" in html
    assert (tmp_path / "utility_vs_epsilon.png").stat().st_size > 1000
    assert "| pooled | dp-embedding | 0 | 10.000 |" in (tmp_path / "report.md").read_text()
    # A second run reuses every finished arm (row.json) and reports the same.
    again = _load("dp_utility").main(
        ["--quick", "--work", str(tmp_path), "--epsilons", "10", "--arms", *arms]
    )
    assert again["rows"] == report["rows"]
    capsys.readouterr()
    # A held-out test population re-scores every arm and trains none again: no ledger grows.
    ledgers = sorted(tmp_path.rglob("ledger.json"))
    before = [p.read_bytes() for p in ledgers]
    held = _load("dp_utility").main(
        ["--quick", "--work", str(tmp_path), "--epsilons", "10", "--arms", *arms]
        + ["--heldout-per-site", "6"]
    )
    assert ledgers and [p.read_bytes() for p in ledgers] == before
    assert held["test_images"] == report["test_images"] + 18
    assert [(r["mode"], r["arm"], r.get("epsilon")) for r in held["rows"]] == [
        (r["mode"], r["arm"], r.get("epsilon")) for r in report["rows"]
    ]
    assert [r.get("train_seconds") for r in held["rows"]] == [
        r.get("train_seconds") for r in report["rows"]
    ]
    assert (tmp_path / "pooled" / "public-only" / "row-pooled-16-heldout6.json").is_file()
    # Other training settings would pass the cached rows off as theirs: refused, nothing written.
    settings_before = (tmp_path / "settings.json").read_bytes()
    with pytest.raises(SystemExit, match=r"kimg 0\.096 -> 0\.2.*new --work"):
        _load("dp_utility").main(
            ["--quick", "--work", str(tmp_path), "--epsilons", "10", "--kimg", "0.2"]
        )
    assert (tmp_path / "settings.json").read_bytes() == settings_before
    # A second training seed adds cells beside the first seed's, which train nothing again.
    seeded = _load("dp_utility").main(
        ["--quick", "--work", str(tmp_path), "--epsilons", "10", "--modes", "pooled"]
        + ["--arms", "public-only", "dp-classifier", "--heldout-per-site", "6", "--seeds", "2"]
    )
    capsys.readouterr()
    assert [p.read_bytes() for p in ledgers] == before
    assert [(r["arm"], r["seed"]) for r in seeded["rows"]] == [
        ("public-only", 0),
        ("dp-classifier", 0),
        ("public-only", 1),
        ("dp-classifier", 1),
    ]
    first = {r["arm"]: r for r in held["rows"] if r["mode"] == "pooled"}
    assert seeded["rows"][1] == first["dp-classifier"]
    second = seeded["rows"][3]
    assert 0 < second["epsilon"] <= 10 + 1e-6
    assert (tmp_path / "pooled" / "dp-classifier-eps10-seed1" / "privacy").is_dir()
    spread = {c["arm"]: c for c in seeded["across_seeds"]}
    assert set(spread) == {"public-only", "dp-classifier"}
    values = [first["dp-classifier"]["tstr_auc"], second["tstr_auc"]]
    assert spread["dp-classifier"]["seeds"] == [0, 1]
    assert spread["dp-classifier"]["tstr_auc"] == {
        "mean": sum(values) / 2,
        "min": min(values),
        "max": max(values),
    }
    assert "Across training seeds" in (tmp_path / "report.md").read_text()
    # A folder made before a setting existed used what its runs did then (dp-embedding fitted
    # all of G): a run under today's default is refused there.
    settings_file = tmp_path / "settings.json"
    current = settings_file.read_text()
    older = json.loads(current)
    del older["embedding_g"]  # dp-embedding fitted all of G before the setting existed
    settings_file.write_text(json.dumps(older))
    with pytest.raises(SystemExit, match=r"embedding_g 'all' -> 'mapping'"):
        _load("dp_utility").main(["--quick", "--work", str(tmp_path), "--epsilons", "10"])
    assert json.loads(settings_file.read_text()) == older  # refused before writing
    settings_file.write_text(current)
    # The public route without DP: all of G and D fine-tuned from the same checkpoint.
    tuned = _load("dp_utility").main(
        ["--quick", "--work", str(tmp_path), "--epsilons", "10", "--modes", "pooled"]
        + ["--arms", "public-only", "non-private-public", "--heldout-per-site", "6"]
    )
    capsys.readouterr()
    row = tuned["rows"][1]
    assert row["arm"] == "non-private-public" and row["epsilon"] == math.inf
    assert "dp_minus_public" not in row and 0 <= row["tstr_auc"] <= 1
    run = tmp_path / "pooled" / "non-private-public" / "run"
    config = tomllib.loads((run / "config.toml").read_text())
    public = json.loads((tmp_path / "public" / "run" / "latest.json").read_text())["snapshot"]
    sha = file_sha256(tmp_path / "public" / "run" / public)
    assert config["init_from"]["checkpoint_sha256"] == sha and config["init_from"]["epsilon"] == 0
    assert config["train"]["network"]["mbstd_group"] == 0


def test_trtr_stability_trains_each_seed_and_variant_on_the_same_data(tmp_path, capsys):
    """benchmarks/trtr_stability.py --quick: one TRTR classifier per seed and variant, trained
    as `fedspine evaluate` trains it, with what it stopped on, and the spread per variant."""
    import json

    out = _load("trtr_stability").main(
        ["--quick", "--work", str(tmp_path), "--variants", "default", "no-early-stop"]
    )
    assert json.loads(capsys.readouterr().out)["runs"] == out["runs"]
    assert [(r["variant"], r["seed"]) for r in out["runs"]] == [
        ("default", 0), ("default", 1), ("no-early-stop", 0), ("no-early-stop", 1)
    ]  # fmt: skip
    for run in out["runs"]:
        assert 0.0 <= run["auc"] <= 1.0 and 1 <= run["best_check"] <= run["checks_run"]
    # Without early stopping every check of the budget runs.
    assert all(r["checks_run"] == 2 for r in out["runs"] if r["variant"] == "no-early-stop")
    summary = out["summary"]["default"]
    assert summary["min"] <= summary["mean"] <= summary["max"]


@pytest.mark.slow
def test_embedding_ablation_fits_each_variant_on_a_dp_utility_folder(tmp_path, capsys):
    """benchmarks/embedding_ablation.py on dp_utility --quick's folder: every variant fitted with
    the same loop and evaluated; its targets are what the variant says, and nothing is spent
    from any ledger (the noise is the benchmark's own)."""
    from fedspine.privacy.accounting import calibrate_noise

    _load("dp_utility").main(
        ["--quick", "--work", str(tmp_path), "--epsilons", "10", "--modes", "pooled"]
        + ["--arms", "public-only", "--embedding-features", "rff+public"]
    )
    capsys.readouterr()
    variants = ["release", "no-noise", "classless", "public", "last-block"]
    out = _load("embedding_ablation").main(
        ["--work", str(tmp_path), "--variants", *variants, "--steps", "2"]
    )
    rows = {r["variant"]: r for r in out["rows"]}
    assert list(rows) == variants
    for row in rows.values():
        assert 0 <= row["tstr_auc"] <= 1 and row["trtr_auc"] == rows["release"]["trtr_auc"]
    assert rows["no-noise"]["cosine_to_private"] == pytest.approx(1.0)
    truth = rows["no-noise"]["class_difference_private"]
    assert rows["no-noise"]["class_difference_targets"] == pytest.approx(truth)
    assert rows["classless"]["class_difference_targets"] == 0.0
    assert rows["classless"]["cosine_to_private"] is None
    assert rows["release"]["noise_multiplier"] == calibrate_noise(10.0, 1e-5, 1.0, 1, "prv")
    assert rows["release"]["noise_std"] == pytest.approx(
        rows["release"]["noise_multiplier"] * 2**0.5
    )
    assert rows["public"]["cosine_to_private"] != pytest.approx(1.0)
    assert rows["last-block"]["dim"] < rows["release"]["dim"]
    assert rows["last-block"]["kappa"] == 0.5
    assert not list((tmp_path / "ablation").rglob("ledger.json"))
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == out["rows"]
    # Finished variants are read back, not fitted again.
    ablation = ["--work", str(tmp_path), "--variants", "classless", "release"]
    again = _load("embedding_ablation").main([*ablation, "--steps", "2"])
    assert again["rows"] == [rows["classless"], rows["release"]]
    # Another ε is another cell (its folder is named by it), fitted afresh.
    other_eps = _load("embedding_ablation").main([*ablation, "--steps", "2", "--epsilon", "1"])
    assert other_eps["rows"][0] == rows["classless"]
    assert other_eps["rows"][1]["noise_multiplier"] > rows["release"]["noise_multiplier"]
    assert len(list((tmp_path / "ablation").glob("release-2steps-eps*"))) == 2
    # A folder whose release used other features is refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "settings.json").write_text(json.dumps({"embedding_features": "rff"}))
    with pytest.raises(SystemExit, match="rff\\+public"):
        _load("embedding_ablation").main(["--work", str(other)])
