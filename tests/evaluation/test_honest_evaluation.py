"""Evaluation that cannot flatter (issue 17): each case is one the old report would have flattered.

- a chance-level TSTR reads as "no evidence of signal", not as a ratio of 0.6;
- a TRTS judge of the generator's own classifier recipe is refused;
- synthetic and floor rows of the distribution metrics are computed at equal n;
- every arm gets the same optimizer steps, whatever its row count;
- a generator trained on test patients is refused;
- unlabelled rows never enter the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedspine.data.prepared import load_prepared, write_prepared
from fedspine.evaluation.classification import (
    paired_bootstrap_aucs,
    paired_utility,
    signal_retained,
    utility_verdict,
)
from fedspine.evaluation.config import EvaluateError
from fedspine.evaluation.features import PixelExtractor, extract
from fedspine.evaluation.generative import frechet_distance
from fedspine.reporting.evaluation_report import evaluate
from fedspine.training.classifier_trainer import same_recipe
from tests.evaluation.test_report import SIZE, draw, fast_cfg, make_real, write_generated


def _scores(rng, y, strength):
    return y * strength + rng.normal(0, 1, len(y))


def test_chance_level_tstr_reads_as_no_signal():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    groups = np.repeat(np.arange(100), 2)
    trtr = _scores(rng, y, 1.5)  # AUC about 0.85
    tstr = rng.normal(0, 1, len(y))  # no signal at all
    boot = paired_bootstrap_aucs(y, {"TRTR": trtr, "TSTR": tstr}, groups, 500, seed=1)
    from fedspine.evaluation.classification import auc

    a_trtr, a_tstr = auc(y, trtr), auc(y, tstr)
    result = paired_utility(np.array([a_tstr]), np.array([a_trtr]), boot["TSTR"], boot["TRTR"])
    # The old headline, TSTR / TRTR, makes chance look like most of the real data's value.
    assert result["ratio"] > 0.5
    assert result["ci_contains_chance"]
    assert abs(result["signal_retained"]) < 0.25
    lo, hi = result["signal_retained_ci"]
    assert lo < 0 < hi
    assert utility_verdict(result).startswith("no evidence of signal")
    assert result["difference_ci"][1] < 0  # clearly worse than the real data


def test_paired_interval_is_narrower_than_unpaired_and_retained_is_exact():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 150)
    groups = np.arange(300)
    trtr = _scores(rng, y, 1.5)
    tstr = trtr + rng.normal(0, 0.3, len(y))  # nearly the same classifier
    boot = paired_bootstrap_aucs(y, {"TRTR": trtr, "TSTR": tstr}, groups, 400, seed=0)
    from fedspine.evaluation.classification import auc

    a, r = auc(y, tstr), auc(y, trtr)
    result = paired_utility(np.array([a]), np.array([r]), boot["TSTR"], boot["TRTR"])
    assert result["signal_retained"] == pytest.approx((a - 0.5) / (r - 0.5))
    assert not result["ci_contains_chance"]
    assert utility_verdict(result).startswith("signal above chance")
    paired_width = np.diff(result["difference_ci"])[0]
    # Unpaired: TRTR's resamples shuffled against TSTR's, as two independent test sets would be.
    unpaired = boot["TSTR"][:, 0] - rng.permutation(boot["TRTR"][:, 0])
    unpaired_width = np.diff(np.percentile(unpaired, [2.5, 97.5]))[0]
    assert paired_width < 0.5 * unpaired_width
    assert signal_retained(0.7, 0.5) is None


def test_multi_output_utility_reports_each_class_and_the_macro():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 300)
    y = np.eye(3)[labels]
    trtr = y * 2 + rng.normal(0, 1, y.shape)
    tstr = y * np.array([2, 0, 0]) + rng.normal(0, 1, y.shape)  # learnt class 0 only
    boot = paired_bootstrap_aucs(y, {"TRTR": trtr, "TSTR": tstr}, np.arange(300), 300)
    from fedspine.evaluation.classification import auc

    pa = np.array([auc(y[:, k].astype(int), tstr[:, k]) for k in range(3)])
    pr = np.array([auc(y[:, k].astype(int), trtr[:, k]) for k in range(3)])
    macro = paired_utility(pa, pr, boot["TSTR"], boot["TRTR"])
    assert macro["auc"] == pytest.approx(pa.mean())
    first = paired_utility(pa[:1], pr[:1], boot["TSTR"][:, :1], boot["TRTR"][:, :1])
    third = paired_utility(pa[2:], pr[2:], boot["TSTR"][:, 2:], boot["TRTR"][:, 2:])
    assert not first["ci_contains_chance"] and third["ci_contains_chance"]


def test_recipes_missing_a_setting_count_as_the_same_classifier():
    a = {"arch": "small", "norm": "batch", "seed": 0, "input_size": 24, "init": "scratch"}
    assert same_recipe(a, dict(a, dp=False))
    assert not same_recipe(a, dict(a, seed=1))
    assert same_recipe(a, {"seed": 0})  # unsure: assume the same
    assert not same_recipe(a, dict(a, dp=True, arch="densenet121"))


def _with_generation(folder: Path, training: dict, run: Path | None = None) -> None:
    (folder / "generation.json").write_text(
        json.dumps({"training": training, "run": str(run) if run else None})
    )


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("honest")
    real = make_real(root / "real")
    return root, real


def test_spinegan_judge_of_the_clinical_recipe_is_refused_and_another_is_chosen(stand_in):
    root, real = stand_in
    train = real.select("train")
    syn = write_generated(root / "syn", np.asarray(train.images), train.labels, real.class_names)
    clinical = {"arch": "small", "norm": "batch", "seed": 0, "input_size": SIZE}
    clinical |= {"init": "scratch", "dp": False}
    _with_generation(syn, {"model": "spinegan", "clinical": {"classifier_recipe": clinical}})
    with pytest.raises(EvaluateError, match="--judge-seed 0: .*circular"):
        evaluate(syn, root / "real", root / "real", root / "r0", fast_cfg(judge_seed=0))
    assert not (root / "r0").exists()
    report = evaluate(syn, root / "real", root / "real", root / "r1", fast_cfg(mix_per_class=0))
    judge = report["class_fidelity"]["judge"]
    assert judge["recipe"]["seed"] == 1 and not same_recipe(judge["recipe"], clinical)
    assert judge["independence"].startswith("verified")
    assert "seed 1" in report["class_fidelity"]["classifier"]
    md = (root / "r1" / "report.md").read_text()
    assert "independence: verified" in md

    # A cGAN generator trained against no classifier: the TRTR classifier may judge.
    _with_generation(syn, {"model": "cgan", "dp_scheme": "none"})
    report = evaluate(syn, root / "real", root / "real", root / "r2", fast_cfg(mix_per_class=0))
    assert report["class_fidelity"]["classifier"] == "the TRTR arm's classifier"


def test_equal_n_floor_matches_a_same_distribution_synthetic_set(stand_in, tmp_path):
    """Fresh draws of the real distribution must not beat, nor lose to, the floor."""
    root, real = stand_in
    rng = np.random.default_rng(11)
    labels = np.repeat([0, 1], 150)  # class-balanced and far larger than val (20 + 20)
    images = np.stack([draw(rng, int(k)) for k in labels])
    syn = write_generated(tmp_path / "fresh", images, labels, real.class_names)
    report = evaluate(syn, root / "real", root / "real", tmp_path / "r", fast_cfg(mix_per_class=0))
    gen = report["generative"]
    assert gen["n_each"] == 40 and gen["class_counts"] == {"normal": 20, "abnormal": 20}
    rows = {(r["extractor"].split()[0], r["compared"].split()[0]): r for r in gen["results"]}
    for ext in ("fedspine-domain-cnn", "pixels"):
        syn_row, floor = rows[(ext, "synthetic")], rows[(ext, "real")]
        assert syn_row["n_other"] == floor["n_other"] == 40
        assert syn_row["n_real"] == floor["n_real"]
        # Same distribution, same n: the two rows agree within sampling noise (0.83-1.05
        # over three draws of this stand-in), and KID, unbiased, sits near 0 for both.
        assert 0.7 < syn_row["fid"] / floor["fid"] < 1.4
        assert abs(syn_row["kid"]) < 2e-3 and abs(floor["kid"]) < 2e-3
    # What the old rows did: the whole synthetic set (300) and the val floor (40) against all
    # training images. The bias of FID at small n lets a sample of the real distribution "beat"
    # the real floor by a wide margin.
    pixels = PixelExtractor(16)
    ref = extract(pixels, np.asarray(real.select("train").images))
    old_syn = frechet_distance(ref, extract(pixels, images))
    old_floor = frechet_distance(ref, extract(pixels, np.asarray(real.select("val").images)))
    assert old_syn < 0.6 * old_floor
    # Half the training patients fit the domain extractor; the reference is the other half.
    assert gen["n_real"] == 60 and "fitted the domain extractor" in gen["reference"]


def test_every_arm_trains_the_same_optimizer_steps(stand_in, tmp_path):
    root, real = stand_in
    train = real.select("train")
    images = np.concatenate([np.asarray(train.images)] * 3)  # three times TRTR's rows
    labels = np.concatenate([train.labels] * 3)
    syn = write_generated(tmp_path / "triple", images, labels, real.class_names)
    cfg = fast_cfg(epochs=2, patience=5)
    report = evaluate(syn, root / "real", root / "real", tmp_path / "r", cfg)
    budget = report["classifier_budget"]
    assert budget["steps_per_check"] == 120 // 16 + 1 and budget["max_steps"] == 16
    for name, arm in report["arms"].items():
        history = arm["history"]
        assert history["steps_per_epoch"] == budget["steps_per_check"], name
        assert history["steps"] == budget["max_steps"], name
    assert report["arms"]["TSTR"]["history"]["train_rows"] == 360
    assert "16 optimizer steps" in (tmp_path / "r" / "report.md").read_text()


def test_a_generator_trained_on_test_patients_is_refused(stand_in, tmp_path):
    root, real = stand_in
    test = real.select("test")
    # The generator's data: a prepared set whose training rows are the evaluation's test patients.
    leaked = tmp_path / "leaked"
    n = len(test)
    write_prepared(
        leaked,
        np.asarray(test.images),
        [f"l{i}.png" for i in range(n)],
        list(test.patient_ids),
        ["train"] * n,
        test.labels,
        test.findings,
        list(test.finding_names),
        list(real.class_names),
        [],
        {"source": "leak"},
    )
    run = tmp_path / "run"
    run.mkdir()
    digest = load_prepared(leaked).content_hash
    (run / "config.toml").write_text(f'[dataset]\npath = "{leaked}"\ncontent_hash = "{digest}"\n')
    syn = write_generated(tmp_path / "syn", np.asarray(test.images), test.labels, real.class_names)
    _with_generation(syn, {"model": "cgan"}, run)
    with pytest.raises(EvaluateError, match=r"patient\(s\) of its 'test' split .* trained on"):
        evaluate(syn, root / "real", root / "real", tmp_path / "r", fast_cfg())
    assert not (tmp_path / "r").exists()
    # The same generator run on the evaluation's own training split is fine.
    digest = real.content_hash
    (run / "config.toml").write_text(
        f'[dataset]\npath = "{root / "real"}"\ncontent_hash = "{digest}"\n'
    )
    evaluate(
        syn, root / "real", root / "real", tmp_path / "ok", fast_cfg(mix_per_class=0, heldout="val")
    )


def test_unlabelled_rows_stay_out_of_the_reference(tmp_path):
    real = make_real(tmp_path / "real")
    labels = real.labels.copy()
    train_rows = np.flatnonzero(real.splits == "train")
    labels[train_rows[:20]] = -1  # e.g. multi-lesion images the GAN never trained on
    write_prepared(
        tmp_path / "partly",
        np.asarray(real.images),
        list(real.files),
        list(real.patient_ids),
        list(real.splits),
        labels,
        real.findings,
        list(real.finding_names),
        list(real.class_names),
        [],
        {"source": "test"},
    )
    partly = load_prepared(tmp_path / "partly")
    train = partly.select("train")
    syn = write_generated(
        tmp_path / "syn", np.asarray(train.images), train.labels, real.class_names
    )
    report = evaluate(
        syn, tmp_path / "partly", tmp_path / "partly", tmp_path / "r", fast_cfg(mix_per_class=0)
    )
    gen = report["generative"]
    assert "20 unlabelled training rows excluded" in gen["reference"]
    assert gen["n_real"] < 100  # half of the 100 labelled rows, by patient


def test_one_trtr_is_shared_through_the_cache_and_other_settings_are_refused(stand_in, tmp_path):
    root, real = stand_in
    train = real.select("train")
    syn = write_generated(
        tmp_path / "syn", np.asarray(train.images), train.labels, real.class_names
    )
    cache = tmp_path / "trtr"
    events: list[dict] = []
    cfg = fast_cfg(mix_per_class=0)
    first = evaluate(syn, root / "real", root / "real", tmp_path / "a", cfg, trtr_cache=cache)
    assert (cache / "trtr.json").is_file() and not list(tmp_path.glob(".trtr.partial-*"))
    second = evaluate(
        syn,
        root / "real",
        root / "real",
        tmp_path / "b",
        cfg,
        progress=events.append,
        trtr_cache=cache,
    )
    assert any(e.get("event") == "reused" for e in events)
    assert second["arms"]["TRTR"]["auc"] == first["arms"]["TRTR"]["auc"]
    assert second["arms"]["TRTR"]["reused_from"] == str(cache)
    assert (tmp_path / "b" / "intermediate" / "classifiers" / "TRTR.pt").is_file()
    assert second["utility"]["arms"]["TSTR"]["signal_retained"] == pytest.approx(
        first["utility"]["arms"]["TSTR"]["signal_retained"]
    )
    with pytest.raises(EvaluateError, match="other data or settings"):
        evaluate(
            syn,
            root / "real",
            root / "real",
            tmp_path / "c",
            fast_cfg(mix_per_class=0, lr=5e-4),
            trtr_cache=cache,
        )


def test_signal_retained_is_undefined_when_trtr_itself_is_at_chance():
    """A TRTR of 0.52 [0.40, 0.64] would turn a TSTR of 0.56 into 'signal retained 3.0'."""
    rng = np.random.default_rng(9)
    y = np.repeat([0, 1], 30)
    trtr = _scores(rng, y, 0.1)  # barely any signal on 60 images
    tstr = _scores(rng, y, 0.3)
    boot = paired_bootstrap_aucs(y, {"TRTR": trtr, "TSTR": tstr}, np.arange(60), 400)
    from fedspine.evaluation.classification import auc

    a, r = auc(y, tstr), auc(y, trtr)
    result = paired_utility(np.array([a]), np.array([r]), boot["TSTR"], boot["TRTR"])
    assert result["reference_contains_chance"]
    assert result["signal_retained"] is None and result["signal_retained_ci"] is None
    assert "undefined" in utility_verdict(result)


def test_a_dp_classifier_trained_elsewhere_is_scored_as_the_ceiling(stand_in, tmp_path):
    """`--compare`: the DP-SGD classifier at the synthetic set's ε, scored on the same splits,
    with its signal retained against TRTR on the same resampled patients."""
    from fedspine.training.classifier_run import (
        ClassifierDPRequest,
        ClassifierRequest,
        train_classifier_run,
    )

    root, real = stand_in
    train = real.select("train")
    syn = write_generated(
        tmp_path / "syn", np.asarray(train.images), train.labels, real.class_names
    )
    dp = ClassifierDPRequest(target_epsilon=8.0, patients_per_step=16, privacy_home=tmp_path / "h")
    request = ClassifierRequest(
        root / "real",
        tmp_path / "dpc",
        arch="small",
        epochs=1,
        input_size=SIZE,
        device="cpu",
        dp=dp,
    )
    train_classifier_run(request)
    cfg = fast_cfg(mix_per_class=0)
    report = evaluate(
        syn,
        root / "real",
        root / "real",
        tmp_path / "r",
        cfg,
        compare={"DP classifier": tmp_path / "dpc"},
    )
    arm = report["arms"]["DP classifier"]
    assert arm["trained_elsewhere"]["dp"]["epsilon"] <= 8.0 + 1e-6
    assert arm["auc"] is not None and len(arm["ci"]) == 2
    assert "DP classifier" in report["utility"]["arms"]
    assert "signal_retained_ci" in report["utility"]["arms"]["DP classifier"]
    assert "trained_elsewhere" not in report["arms"]["TSTR"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "DP classifier: not trained by this evaluation" in md and "DP-SGD, ε = " in md

    # A classifier of other data could have seen these test patients: refused.
    other = make_real(tmp_path / "other", seed=5)
    assert other.content_hash != real.content_hash
    train_classifier_run(
        ClassifierRequest(
            tmp_path / "other",
            tmp_path / "oc",
            arch="small",
            epochs=1,
            input_size=SIZE,
            device="cpu",
        )
    )
    with pytest.raises(EvaluateError, match="not trained on the 'train' split of this --train"):
        evaluate(
            syn, root / "real", root / "real", tmp_path / "r2", cfg, compare={"x": tmp_path / "oc"}
        )
