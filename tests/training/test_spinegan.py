"""SpineGAN: the clinical loss moves G through a frozen C, never C; its targets, mappings and CLI."""

from __future__ import annotations

import copy
import itertools
import json
import tomllib

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedspine.cli.main import app
from fedspine.data.labels import LESION_CLASSES, LESION_TYPES
from fedspine.models.classifier import ClassifierConfig, build_classifier, save_classifier
from fedspine.privacy.accounting import Mechanism, epsilon
from fedspine.training import config as config_module
from fedspine.training.clinical import (
    DECLARED_PUBLIC,
    NOT_PRIVATE_REASON,
    ClinicalLoss,
    ClinicalLossError,
    ClinicalPrivacyError,
    clinical_privacy,
    clinical_targets,
    file_sha256,
    map_generator_output,
    paper_crop,
)
from fedspine.training.dp import DPConfig
from fedspine.training.dp_trainer import dp_train_config
from fedspine.training.factory import DPSGD, TrainerSpec, build_trainer, rebuild_trainer
from fedspine.training.gan_trainer import GanTrainer
from fedspine.training.generate import load_generator
from tests.training import make_prepared, tiny_config

CLASSES = ["class0", "class1"]
runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _classifier_file(path, task="binary", class_names=CLASSES, output_names=None, seed=0):
    """An untrained small CNN (BatchNorm, so a forgotten train mode would move its buffers)."""
    outputs = output_names or ([class_names[1]] if task == "binary" else list(class_names))
    cfg = ClassifierConfig(arch="small", num_outputs=len(outputs), input_size=16, norm="batch")
    torch.manual_seed(seed)
    model = build_classifier(cfg)
    meta = {"task": task, "class_names": list(class_names), "output_names": list(outputs)}
    return save_classifier(path, model, cfg, meta)


def _clinical(tmp_path, weight=0.1, mapping="default", seed=0):
    file = tmp_path / f"clf{seed}.pt"
    if not file.exists():
        _classifier_file(file, seed=seed)
    return ClinicalLoss.from_file(file, CLASSES, weight=weight, mapping=mapping)


def _spinegan(config, prior, clinical):
    return build_trainer(TrainerSpec(clinical=clinical), config, prior)


def _dp_trainer(config, dpc, prior, patients, sigma, q, clinical=None):
    return build_trainer(
        TrainerSpec(DPSGD(dpc, sigma, q, patients), clinical=clinical), config, prior
    )


def _batch(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 16, 16, generator=gen) * 2 - 1
    return images, torch.arange(n) % 2


def _g_grads(trainer):
    return {n: p.grad.clone() for n, p in trainer.G.named_parameters() if p.grad is not None}


def test_clinical_loss_changes_g_gradients_and_never_c(tmp_path):
    config = tiny_config(pl_weight=0.0)  # no path-length step: the grads left are the main step's
    grads = {}
    for weight in (0.0, 0.1):
        trainer = _spinegan(config, [0.5, 0.5], _clinical(tmp_path, weight=weight))
        trainer.g_step(8)
        grads[weight] = _g_grads(trainer)
    assert grads[0.0].keys() == grads[0.1].keys() and grads[0.0]
    assert any(not torch.allclose(grads[0.0][k], grads[0.1][k]) for k in grads[0.0])

    clinical = _clinical(tmp_path, weight=0.1)
    C = clinical.classifier
    before = copy.deepcopy(C.state_dict())
    trainer = _spinegan(tiny_config(), [0.5, 0.5], clinical)
    images, labels = _batch()
    for _ in range(3):
        metrics = trainer.train_step(images, labels)
    assert set(metrics.extra) == {"loss_clinical", "clinical_bce"}
    assert float(metrics.loss_clinical) == pytest.approx(0.1 * float(metrics.clinical_bce))
    assert float(metrics.clinical_bce) > 0
    for key, value in C.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm buffers included
    assert not C.training
    assert all(not p.requires_grad and p.grad is None for p in C.parameters())
    c_ids = {id(p) for p in C.parameters()}
    for opt in (trainer.opt_G, trainer.opt_D):
        assert not any(id(p) in c_ids for g in opt.param_groups for p in g["params"])


def test_gradients_flow_through_c_into_g(tmp_path):
    trainer = _spinegan(tiny_config(), [0.5, 0.5], _clinical(tmp_path))
    z, c = trainer.sample_latents(6)
    fake = trainer.G.synthesis(trainer.G.mapping(z, trainer._onehot(c)), noise_mode="const")
    loss, bce = trainer.clinical(fake, c)
    assert loss.requires_grad and float(bce.detach()) > 0
    params = list(trainer.G.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert all(p.grad is None for p in trainer.clinical.classifier.parameters())


@pytest.mark.parametrize("dp", [False, True])
def test_with_zero_weight_the_step_equals_the_base_trainers(tmp_path, dp):
    """The copied G step stays in sync with GanTrainer.g_step (path length and ADA included)."""
    images, labels = _batch(24)
    results = []
    for spine in (False, True):
        if dp:
            dpc = DPConfig(noise_multiplier=1.0, expected_patients_per_step=4, ada_p=0.2)
            config = dp_train_config(tiny_config(), dpc)
            patients = np.repeat(np.arange(12), 2).astype(str)
            args = (config, dpc, [0.5, 0.5], patients, 1.0, 4 / 12)
            trainer = (
                _dp_trainer(*args, _clinical(tmp_path, weight=0.0)) if spine else _dp_trainer(*args)
            )
            # DP noise and patient draws come from OS entropy; pin them so both trainers match.
            trainer.noise_gen.manual_seed(0)
            trainer.sampler.rng = np.random.default_rng(0)
            batch = (images, labels)
        else:
            trainer = (
                _spinegan(tiny_config(), [0.5, 0.5], _clinical(tmp_path, weight=0.0))
                if spine
                else GanTrainer(tiny_config(), [0.5, 0.5])
            )
            batch = (images[:8], labels[:8])
        for _ in range(2):
            metrics = trainer.train_step(*batch)
        results.append((trainer.G.state_dict(), float(metrics.loss_g), trainer.g_steps))
    (g_base, loss_base, steps_base), (g_spine, loss_spine, steps_spine) = results
    assert steps_base == steps_spine == 2 and loss_base == loss_spine
    for key, value in g_base.items():
        assert torch.equal(value, g_spine[key]), key


def test_dp_spinegan_steps_and_keeps_c_frozen(tmp_path):
    dpc = DPConfig(noise_multiplier=1.0, expected_patients_per_step=4, ada_p=0.0)
    config = dp_train_config(tiny_config(), dpc)
    patients = np.repeat(np.arange(12), 2).astype(str)
    clinical = _clinical(tmp_path)
    before = copy.deepcopy(clinical.classifier.state_dict())
    trainer = _dp_trainer(config, dpc, [0.5, 0.5], patients, 1.0, 4 / 12, clinical)
    images, labels = _batch(24)
    metrics = trainer.train_step(images, labels)
    assert trainer.dp_step.steps_taken == 1
    assert np.isfinite(float(metrics.loss_clinical)) and float(metrics.loss_clinical) > 0
    assert metrics.loss_d is None  # nothing computed on real data is logged
    for key, value in clinical.classifier.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert trainer.state_dict()["clinical"]["classifier_sha256"] == clinical.sha256


def test_mappings_differ_with_the_documented_shapes_and_ranges():
    x = torch.linspace(-1, 1, 16 * 16).reshape(1, 1, 16, 16).repeat(3, 1, 1, 1)
    default = map_generator_output(x, "default", 16)
    paper = map_generator_output(x, "paper", 16)
    assert default.shape == paper.shape == (3, 1, 16, 16)
    assert float(default.min()) >= 0.0 and float(default.max()) <= 1.0
    assert float(paper.min()) < -0.5  # raw [-1, 1] values, not shifted
    assert not torch.allclose(default, paper)
    assert torch.allclose(default, (x + 1) / 2, atol=1e-6)  # same size: no resize

    # At the paper's 256 px the crop is 16 px per side and lands on DenseNet's 224 px as is.
    big = torch.rand(2, 1, 256, 256) * 2 - 1
    assert paper_crop(256) == 16 and paper_crop(16) == 1
    assert torch.equal(map_generator_output(big, "paper", 224), big[..., 16:240, 16:240])
    d224 = map_generator_output(big, "default", 224)
    assert d224.shape == (2, 1, 224, 224) and float(d224.min()) >= 0.0
    with pytest.raises(ClinicalLossError, match="mapping"):
        map_generator_output(big, "other", 224)


def test_targets_and_class_name_checks(tmp_path):
    task, outputs, table = clinical_targets(
        ["normal", "abnormal"],
        {"task": "binary", "class_names": ["normal", "abnormal"], "output_names": ["abnormal"]},
        1,
    )
    assert task == "binary" and outputs == ["abnormal"]
    assert table.tolist() == [[0.0], [1.0]]
    with pytest.raises(ClinicalLossError, match="trained on classes"):
        clinical_targets(
            ["abnormal", "normal"],
            {"task": "binary", "class_names": ["normal", "abnormal"], "output_names": ["abnormal"]},
            1,
        )
    file = _classifier_file(tmp_path / "c.pt", class_names=["normal", "abnormal"])
    with pytest.raises(ClinicalLossError, match="trained on classes"):
        ClinicalLoss.from_file(file, CLASSES)
    with pytest.raises(ClinicalLossError, match="no task"):
        clinical_targets(CLASSES, {"class_names": CLASSES}, 1)

    lesion_meta = {"task": "multilabel", "output_names": list(LESION_TYPES)}
    task, outputs, table = clinical_targets(list(LESION_CLASSES), lesion_meta, len(LESION_TYPES))
    assert table.shape == (8, 7)
    assert table[LESION_CLASSES.index("No finding")].sum() == 0
    for k, name in enumerate(LESION_CLASSES[1:], start=1):
        assert table[k].sum() == 1 and table[k, LESION_TYPES.index(name)] == 1
    with pytest.raises(ClinicalLossError, match="Fracture"):
        clinical_targets(["No finding", "Fracture"], lesion_meta, len(LESION_TYPES))
    with pytest.raises(ClinicalLossError, match="outputs"):
        clinical_targets(list(LESION_CLASSES), lesion_meta, 3)

    multi = clinical_targets(
        ["a", "b", "c"], {"task": "multiclass", "class_names": ["a", "b", "c"]}, 3
    )
    assert np.array_equal(multi[2], np.eye(3, dtype=np.float32))

    # The loss picks each sample's row: a lesion classifier's target for class k.
    lesion_file = _classifier_file(
        tmp_path / "lesion.pt",
        task="multilabel",
        class_names=list(LESION_CLASSES),
        output_names=list(LESION_TYPES),
    )
    loss = ClinicalLoss.from_file(lesion_file, list(LESION_CLASSES))
    c = torch.tensor([0, 3, 7])
    assert torch.equal(loss.targets[c], torch.from_numpy(table)[c])


def test_privacy_decision():
    with pytest.raises(ClinicalPrivacyError, match="--classifier-public"):
        clinical_privacy({"task": "binary"}, False, False)
    assert clinical_privacy({}, True, False).component == DECLARED_PUBLIC
    assert clinical_privacy({}, False, True).not_private_reason == NOT_PRIVATE_REASON
    dp = clinical_privacy({"dp": {"epsilon": 3.0, "delta": 1e-5}}, False, False)
    assert dp.basis == "dp" and "3.0" in dp.component and dp.not_private_reason is None
    with pytest.raises(ClinicalPrivacyError):
        clinical_privacy({"dp": {"note": "no epsilon"}}, False, False)


def test_resume_is_exact_and_checks_the_classifier(tmp_path):
    images, labels = _batch()
    batches = itertools.repeat((images, labels))
    trainer = _spinegan(tiny_config(seed=2), [0.5, 0.5], _clinical(tmp_path))
    trainer.run(0.016, batches)
    state = copy.deepcopy(trainer.state_dict())
    assert "classifier" not in str(list(state))  # C's weights are not in the snapshot
    assert state["clinical"]["classifier_sha256"] == file_sha256(tmp_path / "clf0.pt")
    trainer.run(0.016, batches)

    again = rebuild_trainer(TrainerSpec(clinical=_clinical(tmp_path)), state)
    again.run(0.016, itertools.repeat((images, labels)))
    for key, value in again.G.state_dict().items():
        assert torch.allclose(value, trainer.G.state_dict()[key], atol=1e-6), key

    with pytest.raises(ClinicalLossError, match="same --classifier"):
        rebuild_trainer(TrainerSpec(clinical=_clinical(tmp_path, seed=1)), state)
    with pytest.raises(ClinicalLossError, match="weight"):
        rebuild_trainer(TrainerSpec(clinical=_clinical(tmp_path, weight=0.05)), state)
    plain = GanTrainer(tiny_config(), [0.5, 0.5]).state_dict()
    with pytest.raises(ClinicalLossError, match="not from a SpineGAN run"):
        _spinegan(tiny_config(), [0.5, 0.5], _clinical(tmp_path)).load_state_dict(plain)


# ------------------------------------------------------------------------------------------------
# The command line.


@pytest.fixture
def tiny_cpu_preset(monkeypatch):
    monkeypatch.setitem(
        config_module.PRESETS,
        "cpu",
        lambda res, nc: tiny_config(resolution=res or 16, num_classes=nc),
    )
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)


@pytest.fixture
def cli_setup(tmp_path, tiny_cpu_preset):
    prepared = make_prepared(tmp_path / "prepared", resolution=16)
    classifier = tmp_path / "clf"
    classifier.mkdir()
    _classifier_file(classifier / "classifier.pt")
    return prepared, classifier


COMMON = ["--preset", "cpu", "--kimg", "0.016", "--device", "cpu"]
DP = ["--dp", "--noise-multiplier", "1.0", "--patients-per-step", "4"]


def _train(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def test_cli_spinegan_run_records_the_model_and_classifier(cli_setup, tmp_path):
    prepared, classifier = cli_setup
    run = tmp_path / "run"
    result = _train(
        prepared, "--out", run, *COMMON, "--model", "spinegan", "--classifier", classifier,
        "--clinical-input", "paper",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["model"] == "spinegan"
    assert cfg["clinical"]["classifier_sha256"] == file_sha256(classifier / "classifier.pt")
    assert cfg["clinical"]["weight"] == 0.1 and cfg["clinical"]["input_mapping"] == "paper"
    _, meta = load_generator(run / "generator.pt")
    assert meta["training"]["model"] == "spinegan"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_clinical"] > 0 for r in records)
    summary = json.loads((run / "privacy.json").read_text())
    assert summary["private"] is False

    # Resume takes the run's classifier and model; another classifier is refused.
    other = _classifier_file(tmp_path / "other.pt", seed=1)
    refused = _train(prepared, "--out", run, "--resume", "--kimg", "0.032", "--classifier", other)
    assert refused.exit_code != 0 and "same --classifier" in refused.output
    resumed = _train(prepared, "--out", run, "--resume", "--kimg", "0.032", "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run / "latest.json").read_text())["cur_nimg"] == 32


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "spinegan"], "needs --classifier"),
        (["--classifier", "{clf}"], "only with --model spinegan"),
        (["--model", "spinegan", "--classifier", "{clf}", "--not-private"], "only applies with --dp"),
        (["--model", "spinegan", "--classifier", "{clf}", "--clinical-input", "x"], "default, paper"),
        (["--model", "spinegan", "--classifier", "{clf}", *DP], "--classifier-public"),
    ],
)  # fmt: skip
def test_cli_refusals_are_one_line_and_write_nothing(
    cli_setup, tmp_path, args, needle, privacy_home
):
    prepared, classifier = cli_setup
    run = tmp_path / "run"
    args = [a.format(clf=classifier) for a in args]
    result = _train(prepared, "--out", run, *COMMON, *args)
    assert result.exit_code != 0
    assert needle in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not run.exists()
    assert not (privacy_home / "ledger.json").exists()


@pytest.mark.parametrize("flag", ["--not-private", "--classifier-public"])
def test_cli_dp_spinegan_privacy_json(cli_setup, tmp_path, flag):
    prepared, classifier = cli_setup
    run = tmp_path / "run"
    args = ["--model", "spinegan", "--classifier", classifier, *DP, flag]
    result = _train(prepared, "--out", run, *COMMON, *args)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "privacy.json").read_text())
    (site,) = summary["sites"].values()
    assert site["epsilon"] > 0 and sum(m["steps"] for m in site["mechanisms"]) == 2
    report = runner.invoke(app, ["privacy", "report", str(run), "--format", "json"])
    assert report.exit_code == 0, report.output
    if flag == "--not-private":
        assert summary["private"] is False
        assert summary["not_private_reasons"] == [NOT_PRIVATE_REASON]
        assert "NOT PRIVATE" in report.output and NOT_PRIVATE_REASON in report.output
    else:
        assert summary["private"] is True and summary["not_private_reasons"] == []
        assert summary["components"]["clinical_classifier"] == DECLARED_PUBLIC
        assert "NOT PRIVATE" not in report.output


@pytest.mark.slow
def test_dp_spinegan_composes_a_classifier_from_another_ingest_and_refuses_one_off_record(
    tmp_path, tiny_cpu_preset, privacy_home, monkeypatch
):
    """The classifier trained on a 32 px preparation of the same patients: its spend is found
    in the ledger, composed into the GAN's ε and under the cap; a classifier whose spend went
    to another privacy home is refused."""
    gan_data = make_prepared(tmp_path / "p16", resolution=16)
    clf_data = make_prepared(tmp_path / "p32", resolution=32)  # the same patients, re-ingested
    classifier_args = ["--dp", "--epsilon", "3", "--patients-per-step", "4", "--arch", "small",
                       "--epochs", "1", "--device", "cpu", "--threads", "1"]  # fmt: skip
    trained = runner.invoke(
        app, ["classifier", "train", str(clf_data), "--out", str(tmp_path / "clf"),
              *classifier_args],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    clf_eps = json.loads((tmp_path / "clf" / "history.json").read_text())  # written, so settled
    assert clf_eps["dp"] is True
    spinegan = ["--model", "spinegan", "--classifier", tmp_path / "clf"]

    run = tmp_path / "run"
    result = _train(gan_data, "--out", run, *COMMON, *DP, *spinegan)
    assert result.exit_code == 0, result.output
    privacy = json.loads((run / "privacy.json").read_text())
    (site,) = privacy["sites"].values()
    labels = [m["label"] for m in site["mechanisms"]]
    assert labels == ["clinical-classifier", "gan-discriminator"]
    classifier_only = epsilon([Mechanism(**_mech(site["mechanisms"][0]))], site["delta"])
    assert privacy["private"] is True and site["epsilon"] > classifier_only

    capped = _train(
        gan_data, "--out", tmp_path / "capped", *COMMON, *DP, *spinegan,
        "--max-epsilon", f"{classifier_only:.3f}",
    )  # fmt: skip
    assert capped.exit_code != 0 and "over the cap" in capped.output

    monkeypatch.setenv("FEDSPINE_PRIVACY_HOME", str(tmp_path / "elsewhere"))
    elsewhere = runner.invoke(
        app, ["classifier", "train", str(clf_data), "--out", str(tmp_path / "clf2"),
              *classifier_args],
    )  # fmt: skip
    assert elsewhere.exit_code == 0, elsewhere.output
    monkeypatch.setenv("FEDSPINE_PRIVACY_HOME", str(privacy_home))
    refused = _train(
        gan_data, "--out", tmp_path / "r2", *COMMON, *DP, "--model", "spinegan",
        "--classifier", tmp_path / "clf2",
    )  # fmt: skip
    assert refused.exit_code != 0 and "holds no mechanism of its run" in refused.output


def _mech(row: dict) -> dict:
    return {k: row[k] for k in ("noise_multiplier", "sample_rate", "steps", "label")}
