"""DP-SGD for the classifier: per-patient rows, step counting, the ledger, the cap, the CLI."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from torch.optim.optimizer import register_optimizer_step_post_hook
from typer.testing import CliRunner

import fedspine.training.classifier_dp as classifier_dp
from fedspine.cli.classifier import register
from fedspine.data.prepared import PreparedDataset, load_prepared, write_prepared
from fedspine.models.classifier import ClassifierConfig, build_classifier, load_classifier
from fedspine.privacy.accounting import Mechanism, epsilon
from fedspine.training.classifier_dp import (
    ClassifierDPConfig,
    epochs_to_steps,
    per_patient_gradients,
    plan_classifier_dp,
    train_classifier_dp_steps,
)
from fedspine.training.clinical import ClinicalLoss, ClinicalPrivacyError, clinical_privacy
from fedspine.training.dp import isolation_violations
from fedspine.training.dp import mechanism as dp_mechanism
from fedspine.training.dp_run import PrivacyCapExceeded
from tests.conftest import home_records, spend

SIZE = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data(tmp_path: Path) -> PreparedDataset:
    return make_dataset(tmp_path / "prepared", {"train": 12, "val": 4, "test": 3})


def make_dataset(root: Path, patients: dict[str, int], seed: int = 0) -> PreparedDataset:
    """Binary data, 1 to 3 images per patient (all of one class); class 1 has a bright square."""
    rng = np.random.default_rng(seed)
    images, files, pids, splits, labels = [], [], [], [], []
    for split, count in patients.items():
        for p in range(count):
            label = p % 2
            for _ in range(1 + p % 3):
                img = rng.normal(70, 20, (SIZE, SIZE))
                if label:
                    y, x = rng.integers(0, SIZE - 5, 2)
                    img[y : y + 5, x : x + 5] += 120
                images.append(np.clip(img, 0, 255).astype(np.uint8))
                files.append(f"img_{len(files):04d}.png")
                pids.append(f"{split}-{p:03d}")
                splits.append(split)
                labels.append(label)
    write_prepared(
        root,
        np.stack(images),
        files,
        pids,
        splits,
        labels,
        np.zeros((len(files), 0), np.uint8),
        [],
        ["normal", "abnormal"],
        [],
        {"source": "test"},
    )
    return load_prepared(root)


def small_model(norm: str = "group", dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier(
        ClassifierConfig(arch="small", norm=norm, input_size=SIZE, num_outputs=1, dropout=dropout)
    )


def patient_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """7 images of 4 patients of 1 to 3 images, interleaved (not grouped by patient)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(7, 1, SIZE, SIZE, generator=gen)
    unit_index = torch.tensor([1, 0, 1, 2, 3, 1, 2])
    t = (unit_index % 2).float()[:, None]
    return x, t, unit_index


def test_per_patient_rows_equal_a_naive_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classifier_dp, "CHUNK_UNITS", 2)  # padding and several chunks
    model = small_model().train()
    x, t, unit_index = patient_batch()
    rows = per_patient_gradients(model, x, t, unit_index)
    for unit in range(4):
        model.zero_grad()
        mine = unit_index == unit
        logits = model(x[mine])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, t[mine], reduction="none"
        )
        loss.mean(dim=1).sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(rows[name][unit], p.grad, rtol=1e-4, atol=1e-6)
    assert rows["out.weight"].abs().sum() > 0


def test_changing_one_patients_image_moves_only_its_row() -> None:
    model = small_model().train()
    x, t, unit_index = patient_batch()

    def rows(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return per_patient_gradients(model, images, t, unit_index)

    gen = torch.Generator().manual_seed(2)
    for perturb in (0, 3, 6):
        assert isolation_violations(rows, x, unit_index, perturb, generator=gen) == []

    def mixing(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return rows(images - images.mean())  # a batch-wide statistic: the check must catch it

    assert isolation_violations(mixing, x, unit_index, 0, generator=gen) != []


def test_batchnorm_is_refused(data: PreparedDataset) -> None:
    model = small_model(norm="batch")
    with pytest.raises(ValueError, match="BatchNorm.*norm='group'"):
        train_classifier_dp_steps(
            model, data, "binary", ClassifierDPConfig(noise_multiplier=1.0), 1, seed=0
        )
    x, t, unit_index = patient_batch()
    with pytest.raises(ValueError, match="BatchNorm"):
        per_patient_gradients(model, x, t, unit_index)


def test_every_step_is_an_optimizer_step_even_an_empty_draw(
    data: PreparedDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    draws: list[int] = []

    class EveryOtherDrawEmpty(classifier_dp.PatientPoissonSampler):
        def __call__(self) -> list[np.ndarray]:
            units = super().__call__()
            draws.append(0 if len(draws) % 2 else len(units))
            return [] if len(draws) % 2 == 0 else units

    monkeypatch.setattr(classifier_dp, "PatientPoissonSampler", EveryOtherDrawEmpty)
    model = small_model(dropout=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    dp = ClassifierDPConfig(noise_multiplier=1.0, clip=0.5, patients_per_step=3, lr=1e-2)
    seen: list[int] = []
    with count_adam_steps() as adam_steps:
        result = train_classifier_dp_steps(
            model, data, "binary", dp, 6, seed=3, progress=seen.append
        )
    assert draws[1::2] == [0, 0, 0]
    assert adam_steps() == result["steps"] == 6 and seen == [1, 2, 3, 4, 5, 6]
    assert result["patients"] == 12 and result["sample_rate"] == pytest.approx(3 / 12)
    assert (result["noise_multiplier"], result["clip"]) == (1.0, 0.5)
    assert not model.training
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_an_empty_draw_still_moves_the_model_by_noise(
    data: PreparedDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classifier_dp.PatientPoissonSampler, "__call__", lambda self: [])
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    with count_adam_steps() as adam_steps:
        result = train_classifier_dp_steps(
            model, data, "binary", ClassifierDPConfig(noise_multiplier=1.0), 2, seed=0
        )
    assert adam_steps() == 2 and np.isnan(result["mean_loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_update_is_clipped_rows_plus_sigma_c_noise() -> None:
    """p.grad after a step is (Σ rows clipped to C + N(0, σ²C²)) / expected patients."""
    from fedspine.training.dp import make_dp_optimizer, privatised_step

    model = small_model().train()
    x, t, unit_index = patient_batch()
    rows = per_patient_gradients(model, x, t, unit_index)
    names = [n for n, _ in model.named_parameters()]
    norms = torch.sqrt(sum(rows[n].flatten(1).square().sum(1) for n in names))
    clip, sigma, expected = 0.01, 2.0, 4
    assert bool((norms > clip).all())  # every row is clipped
    dp_opt = make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected,
    )
    engine = classifier_dp._PerPatientGradients(model, names)
    privatised_step(dp_opt, (r for r, _ in engine.chunks(x, t, unit_index, [])))
    residual = torch.cat(
        [
            (
                p.grad - (rows[n] * (clip / norms).view(-1, *[1] * p.dim())).sum(0) / expected
            ).flatten()
            for n, p in model.named_parameters()
        ]
    )
    assert float(residual.std()) == pytest.approx(sigma * clip / expected, rel=0.02)
    assert abs(float(residual.mean())) < 0.01 * sigma * clip / expected


def test_epochs_convert_to_steps() -> None:
    assert epochs_to_steps(2, 8 / 40) == 10  # 2 epochs * 40 patients / 8 per step
    assert epochs_to_steps(3, 1.0) == 3
    assert epochs_to_steps(1, 0.3) == 4


def test_plan_composes_with_the_ledger_and_refuses_over_the_cap(
    data: PreparedDataset, privacy_home: Path
) -> None:
    fresh = plan_classifier_dp(data, "binary", epochs=2, patients_per_step=4, target_epsilon=4.0)
    assert fresh.patients == 12 and fresh.sample_rate == pytest.approx(4 / 12)
    assert fresh.steps == 6 and fresh.projected_epsilon <= 4.0 + 1e-6
    assert fresh.privacy_home == privacy_home and home_records(privacy_home) == []
    train = data.select("train")
    spend(privacy_home, train.patient_ids, Mechanism(3.0, 0.1, 10, label="gan-discriminator"))
    later = plan_classifier_dp(data, "binary", epochs=2, patients_per_step=4, target_epsilon=4.0)
    assert later.noise_multiplier > fresh.noise_multiplier and later.spent_before > 0
    text = (privacy_home / "ledger.json").read_text()
    with pytest.raises(PrivacyCapExceeded, match="over the cap"):
        plan_classifier_dp(
            data, "binary", epochs=2, patients_per_step=4, noise_multiplier=0.5, max_epsilon=0.5
        )
    assert (privacy_home / "ledger.json").read_text() == text


def test_cli_trains_records_and_composes(
    data: PreparedDataset, tmp_path: Path, privacy_home: Path
) -> None:
    out = tmp_path / "cls"
    with count_adam_steps() as adam_steps:
        result = run_cli(data, out, "--epsilon", "6", "--patients-per-step", "4")
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"classifier.pt", "config.json", "history.json"}
    model, cfg, meta = load_classifier(out)
    record = meta["dp"]
    (entry,) = home_records(privacy_home)
    steps = epochs_to_steps(2, 4 / 12)
    assert entry["steps"] == record["steps"] == adam_steps() == steps
    assert entry["state"] == "settled" and entry["run_id"] == record["run_id"]
    assert entry["label"] == "clinical-classifier" and entry["unit"] == "patient"
    assert entry["notes"]["what"] == "classifier DP-SGD"
    assert entry["noise_multiplier"] == record["noise_multiplier"]
    assert entry["sample_rate"] == record["sample_rate"] == pytest.approx(4 / 12)
    assert record["unit"] == "patient" and "ledger" not in record
    assert "content_hash" not in json.dumps(meta)
    assert record["delta"] == 1e-5  # min(1e-5, 1 / (10 * 12 patients))
    mech = Mechanism(record["noise_multiplier"], record["sample_rate"], record["steps"])
    assert record["epsilon"] == pytest.approx(epsilon([mech], record["delta"], "prv"), rel=1e-6)
    assert 0 < record["epsilon"] <= 6.0 + 0.05
    assert cfg.norm == "group" and not list(model.buffers())
    assert meta["selection_data"] is None and "none" in record["class_weighting"]
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == steps and history["pos_weight"] is None
    assert history["final_val"]["rows"] > 0 and "not_private" in history
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["class_weighting"] is False and config["dp"]["steps"] == steps

    status = clinical_privacy(meta, classifier_public=False, not_private=False)
    assert status.basis == "dp"
    assert ClinicalLoss.from_file(out, ["normal", "abnormal"]).task == "binary"

    # A later DP run on the same patients composes with the classifier's steps.
    from fedspine.privacy.engine import PrivacyEngine

    engine = PrivacyEngine(data.select("train").patient_ids, unit="patient")
    gan = dp_mechanism(1.0, 0.25, 20)
    (prior,) = engine.histories()
    assert prior == [mech.__class__(mech.noise_multiplier, mech.sample_rate, mech.steps,
                                    label="clinical-classifier")]  # fmt: skip
    assert epsilon([*prior, gan], 1e-5, "rdp") > max(
        epsilon([gan], 1e-5, "rdp"), epsilon(prior, 1e-5, "rdp")
    )


@pytest.mark.slow
def test_a_second_dp_classifier_composes_with_the_first(
    data: PreparedDataset, tmp_path: Path, privacy_home: Path
) -> None:
    first = run_cli(data, tmp_path / "cls1", "--epsilon", "6", "--patients-per-step", "4")
    assert first.exit_code == 0, first.output
    record = load_classifier(tmp_path / "cls1")[2]["dp"]
    second = run_cli(data, tmp_path / "cls2", "--epsilon", "6", "--patients-per-step", "4")
    assert second.exit_code == 0, second.output
    meta2 = load_classifier(tmp_path / "cls2")[2]["dp"]
    assert meta2["noise_multiplier"] > record["noise_multiplier"]
    records = home_records(privacy_home)
    assert [r["run_id"] for r in records] == [record["run_id"], meta2["run_id"]]
    assert record["epsilon"] < meta2["data_epsilon_after"] <= 6.0 + 0.05


def test_cli_cap_refusal_writes_nothing(
    data: PreparedDataset, tmp_path: Path, privacy_home: Path
) -> None:
    out = tmp_path / "cls"
    result = run_cli(data, out, "--epsilon", "5", "--max-epsilon", "1")
    assert result.exit_code != 0 and "over the cap" in result.output
    assert not out.exists() and not list(tmp_path.glob(".cls*"))
    assert home_records(privacy_home) == []
    spend(
        privacy_home,
        data.select("train").patient_ids,
        Mechanism(0.8, 0.5, 50, label="gan-discriminator"),
    )
    text = (privacy_home / "ledger.json").read_text()
    again = run_cli(data, out, "--noise-multiplier", "2", "--max-epsilon", "1")
    assert again.exit_code != 0 and "over the cap" in again.output
    assert (privacy_home / "ledger.json").read_text() == text and not out.exists()


def test_cli_refuses_a_delta_above_the_sites(data: PreparedDataset, tmp_path: Path) -> None:
    result = run_cli(data, tmp_path / "c", "--epsilon", "5", "--delta", "0.5")
    assert result.exit_code != 0 and "δ must be in (0, 1e-05]" in result.output
    assert not (tmp_path / "c").exists()


def test_a_non_dp_classifier_is_refused_by_dp_spinegan(
    data: PreparedDataset, tmp_path: Path, privacy_home: Path
) -> None:
    out = tmp_path / "plain"
    result = CliRunner().invoke(
        _app(),
        ["classifier", "train", str(data.root), "--out", str(out), "--arch", "small",
         "--epochs", "1", "--batch", "8", "--device", "cpu", "--threads", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = load_classifier(out)[2]
    assert "dp" not in meta and load_classifier(out)[1].norm == "batch"
    with pytest.raises(ClinicalPrivacyError, match="not trained with differential privacy"):
        clinical_privacy(meta, classifier_public=False, not_private=False)
    assert home_records(privacy_home) == []


def test_cli_refuses_bad_dp_options(
    data: PreparedDataset, tmp_path: Path, privacy_home: Path
) -> None:
    runner = CliRunner()
    base = ["classifier", "train", str(data.root), "--out", str(tmp_path / "c")]
    cases = {
        ("--epsilon", "3"): "only with --dp",
        ("--dp", "--norm", "batch", "--epsilon", "3"): "refuses --norm batch",
        ("--dp",): "exactly one of --epsilon",
        ("--dp", "--epsilon", "3", "--noise-multiplier", "1"): "exactly one of --epsilon",
        ("--dp", "--epsilon", "3", "--max-train-images", "4"): "not supported with --dp",
    }
    for extra, message in cases.items():
        result = runner.invoke(_app(), [*base, *extra])
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
    assert not (tmp_path / "c").exists() and home_records(privacy_home) == []


# --------------------------------------------------------------------------------------------


def run_cli(data: PreparedDataset, out: Path, *dp_args: str):
    return CliRunner().invoke(
        _app(),
        ["classifier", "train", str(data.root), "--out", str(out), "--dp", *dp_args,
         "--arch", "small", "--epochs", "2", "--device", "cpu", "--threads", "1", "--lr", "3e-3"],
    )  # fmt: skip


@contextmanager
def count_adam_steps():
    """Counts real steps of any Adam (the optimizer the DP optimizer wraps)."""
    count = [0]

    def hook(optimizer, args, kwargs) -> None:
        if isinstance(optimizer, torch.optim.Adam):
            count[0] += 1

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield lambda: count[0]
    finally:
        handle.remove()


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """fedspine (test root)."""

    register(app)
    return app
