"""`fedspine pretrain`: a public checkpoint from the phantom simulator (experiments.pretrain)."""

from __future__ import annotations

import json

import pytest

from fedspine.experiments.pretrain import PretrainConfig, pretrain, public_domain
from fedspine.training.checkpoint import load_checkpoint
from fedspine.training.run import DPRequest, TrainRequest, train
from tests.training import make_prepared

pytestmark = pytest.mark.usefixtures("tiny_cpu_preset")


def test_the_public_corpus_is_its_own_domain():
    from fedspine.data.phantom import phantom_site_domains

    public = public_domain(1000, 0.5)
    assert public.abnormal_prevalence == 0.5 and public.name == "public"
    assert all(public.imaging != site.imaging for site in phantom_site_domains(3, 0))
    with pytest.raises(ValueError, match="prevalence"):
        public_domain(1000, 1.0)


def test_pretrain_makes_a_public_checkpoint_a_dp_run_can_start_from(tmp_path):
    config = PretrainConfig(images=24, size=64, resolution=16, kimg=0.016, device="cpu")
    result = pretrain(tmp_path / "public", config)
    latest = json.loads((result.out / "latest.json").read_text())["snapshot"]
    snap = load_checkpoint(result.out / latest, kind="trainer")
    assert snap["dataset"]["public"] == config.declaration()
    assert snap["trainer"]["config"]["network"]["mbstd_group"] == 0  # built for DP fine-tuning
    assert json.loads((tmp_path / "public" / "pretrain.json").read_text())["images"] == 24

    private = make_prepared(tmp_path / "private", resolution=16)
    dp = DPRequest(noise_multiplier=1.0, expected_patients_per_step=8, privacy_home=tmp_path / "h")
    run = tmp_path / "run"
    train(
        TrainRequest(
            private, run, preset="cpu", kimg=0.016, device="cpu", init_from=result.out, dp=dp
        )
    )
    privacy = json.loads((run / "privacy.json").read_text())
    assert "fedspine phantom simulator" in privacy["components"]["pretraining"]

    # Run again: the corpus and the prepared data are kept, the run continues.
    more = pretrain(tmp_path / "public", PretrainConfig(**{**config.__dict__, "kimg": 0.032}))
    assert more.cur_nimg > result.cur_nimg
