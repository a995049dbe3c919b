"""The DP trainer: D sees only Poisson-sampled patients through the DP step, and counts match."""

from __future__ import annotations

import copy
import itertools
import tomllib

import numpy as np
import pytest
import torch

from fedspine.privacy.accounting import Mechanism, epsilon
from fedspine.training.config import preset_config
from fedspine.training.dp import DPConfig
from fedspine.training.dp_trainer import dp_train_config, planned_d_steps
from fedspine.training.factory import DPSGD, TrainerSpec, build_trainer


def _dp_gan(config, dp, prior, patients, noise_multiplier, sample_rate):
    spec = TrainerSpec(DPSGD(dp, noise_multiplier, sample_rate, patients))
    return build_trainer(spec, config, prior)


def _trainer(seed=0, d_steps_per_g=1):
    dp = DPConfig(
        noise_multiplier=1.0, expected_patients_per_step=4, d_steps_per_g=d_steps_per_g, ada_p=0.2
    )
    config = preset_config("cpu", 16, 2)
    config.batch = 8
    config.seed = seed
    config.device = "cpu"
    config = dp_train_config(config, dp)
    patients = np.repeat(np.arange(12), 2).astype(str)
    trainer = _dp_gan(config, dp, [0.5, 0.5], patients, noise_multiplier=1.0, sample_rate=4 / 12)
    images = torch.randint(0, 255, (24, 1, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 2, (24,))
    return trainer, images, labels


def test_dp_config_removes_mbstd_and_fixes_p():
    dp = DPConfig(target_epsilon=5.0, ada_p=0.1)
    config = dp_train_config(preset_config("cpu", 32, 2), dp)
    assert config.network.mbstd_group == 0
    assert config.augment.fixed_p == 0.1
    assert planned_d_steps(config, dp, 1.0) == int(np.ceil(1000 / config.batch))
    with pytest.raises(ValueError, match="minibatch-std"):
        _dp_gan(preset_config("cpu", 16, 2), dp, [0.5, 0.5], ["a"], 1.0, 0.5)


def test_steps_are_counted_and_nothing_private_is_logged():
    trainer, images, labels = _trainer(d_steps_per_g=2)
    d_before = {k: v.clone() for k, v in trainer.D.state_dict().items()}
    metrics = trainer.train_step(images, labels)
    metrics = trainer.train_step(images, labels)
    assert trainer.dp_step.steps_taken == 4 == trainer.d_steps
    assert trainer.mechanism().steps == 4
    assert metrics.d_real is None and metrics.loss_d is None and metrics.d_fake is None
    assert any(not torch.equal(d_before[k], v) for k, v in trainer.D.state_dict().items())
    assert trainer.ada is None and trainer.ada_p == pytest.approx(0.2)
    eps = epsilon([trainer.mechanism()], 1e-5, "rdp")
    assert eps == pytest.approx(epsilon([Mechanism(1.0, 4 / 12, 4)], 1e-5, "rdp"))


def test_run_loop_resume_continues_counts_with_fresh_noise():
    trainer, images, labels = _trainer(seed=3)
    batches = itertools.repeat((images, labels))
    trainer.run(0.016, batches)
    state = copy.deepcopy(trainer.state_dict())  # state_dict() shares the live tensors
    trainer.run(0.008, batches)
    after = {k: v.clone() for k, v in trainer.D.state_dict().items()}

    again, _, _ = _trainer(seed=3)
    again.load_state_dict(state)
    again.run(0.008, itertools.repeat((images, labels)))
    assert again.dp_step.steps_taken == trainer.dp_step.steps_taken
    assert again.cur_nimg == trainer.cur_nimg
    # Same seed, same state, same data: only the DP noise and the patient draws differ, and
    # they must, or anyone holding the recorded seed could replay the noise.
    assert any(not torch.allclose(v, after[k]) for k, v in again.D.state_dict().items())
    assert all(torch.isfinite(v).all() for v in again.D.state_dict().values())


def test_noise_and_patient_draws_do_not_follow_the_seed():
    a, _, _ = _trainer(seed=5)
    b, _, _ = _trainer(seed=5)
    # The non-private parts still follow the seed: same initial networks and latents.
    for k, v in a.G.state_dict().items():
        assert torch.equal(v, b.G.state_dict()[k]), k
    draws_a = [a.sampler() for _ in range(5)]
    draws_b = [b.sampler() for _ in range(5)]
    assert [len(d) for d in draws_a] != [len(d) for d in draws_b] or any(
        not np.array_equal(np.concatenate(x or [np.zeros(0)]), np.concatenate(y or [np.zeros(0)]))
        for x, y in zip(draws_a, draws_b, strict=True)
    )
    assert not torch.equal(
        torch.randn(8, generator=a.noise_gen), torch.randn(8, generator=b.noise_gen)
    )


@pytest.mark.slow
def test_train_cli_with_dp_records_the_ledger_and_refuses_past_the_cap(tmp_path, privacy_home):
    import json

    from typer.testing import CliRunner

    from fedspine.cli.main import app
    from tests.conftest import home_records
    from tests.federated.conftest import make_site_dataset

    data = make_site_dataset(tmp_path / "prep", n=48, seed=0)
    args = [
        "train",
        str(data),
        "--preset",
        "cpu",
        "--resolution",
        "16",
        "--kimg",
        "0.032",
        "--batch",
        "16",
        "--dp",
        "--epsilon",
        "4",
        "--patients-per-step",
        "4",
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run1")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run1" / "privacy.json").read_text())
    assert summary["private"] is True
    (site,) = summary["sites"].values()
    assert 0 < site["epsilon"] <= 4.0 * 1.01
    assert sum(m["steps"] for m in site["mechanisms"]) == 2  # 32 images / batch 16, 1 D step each
    (record,) = home_records(privacy_home)
    assert record["state"] == "settled" and record["steps"] == 2
    assert record["run_id"] == summary["run_id"]
    assert "run1" not in summary["run_id"]  # random: the folder's name does not leave the site
    assert summary["generator_sha256"] and "hash" not in json.dumps(site)
    # Nothing drawn from private images outside the mechanism: no real grid, no class prior.
    assert not (tmp_path / "run1" / "samples" / "reals.png").exists()
    config = tomllib.loads((tmp_path / "run1" / "config.toml").read_text())
    assert "label_prior" not in config["dataset"]
    # D's loss and logits on private images are not logged, not even as NaN (strict JSON).
    lines = (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in lines]
    assert records and all("loss_d" not in r and "d_real" not in r for r in records)
    assert "D private" in result.output and "D nan" not in result.output

    # A second run on the same data composes with the first; a cap below the total refuses.
    refused = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "run2"), "--max-epsilon", str(site["epsilon"] + 0.5)]
    )
    assert refused.exit_code != 0
    assert "spent" in refused.output and "remains" in refused.output
    assert not (tmp_path / "run2" / "generator.pt").exists()

    report = CliRunner().invoke(app, ["privacy", "report", str(tmp_path / "run1")])
    assert report.exit_code == 0 and "private" in report.output
