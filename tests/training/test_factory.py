"""The trainer factory: every variant is a spec, builds, round-trips its state in main's format,
and refuses a state of another variant."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedspine.models.classifier import ClassifierConfig, build_classifier, save_classifier
from fedspine.training.clinical import ClinicalLoss, ClinicalLossError
from fedspine.training.dp import DPConfig
from fedspine.training.dp_ablation import AblationError, AblationOptions, paper_train_config
from fedspine.training.dp_trainer import dp_train_config
from fedspine.training.factory import (
    DPSGD,
    Ablation,
    NonPrivate,
    PaperScheme,
    TrainerSpec,
    build_trainer,
    rebuild_trainer,
)
from fedspine.training.gan_trainer import GanTrainer
from tests.training import tiny_config

CLASSES = ["class0", "class1"]
PATIENTS = np.repeat(np.arange(12), 2).astype(str)
PRIOR = [0.5, 0.5]

# The top-level keys main's trainers wrote, and those of each variant's own pieces: old
# trainer.pt files must keep loading, so this layout is the contract.
BASE_KEYS = [
    "config",
    "label_prior",
    "G",
    "D",
    "G_ema",
    "opt_G",
    "opt_D",
    "scaler_G",
    "scaler_D",
    "augment_pipe",
    "ada",
    "pl_mean",
    "counters",
    "rng",
]
PIECES = {
    "dp": ["step", "noise_multiplier", "sample_rate", "trainable_d", "augment_views"],
    "clinical": [
        "classifier_sha256",
        "classifier_path",
        "weight",
        "mapping",
        "task",
        "output_names",
        "class_names",
    ],
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clinical(tmp_path, seed=0):
    file = tmp_path / f"clf{seed}.pt"
    if not file.exists():
        cfg = ClassifierConfig(arch="small", num_outputs=1, input_size=16, norm="batch")
        torch.manual_seed(seed)
        meta = {"task": "binary", "class_names": CLASSES, "output_names": [CLASSES[1]]}
        save_classifier(file, build_classifier(cfg), cfg, meta)
    return ClinicalLoss.from_file(file, CLASSES)


def _dp():
    return DPConfig(noise_multiplier=1.0, expected_patients_per_step=4, ada_p=0.2)


def _ablation(scheme):
    sigma = 0.5 if scheme == "noise-only" else None
    options = AblationOptions(scheme, noise_multiplier=sigma, expected_patients_per_step=4)
    return Ablation(scheme, options.dp_config(12), sigma or 0.0, 4 / 12, PATIENTS)


def _variant(name, tmp_path):
    """(spec, config, batch of real data train_step takes, the pieces its state adds)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 16, 16, generator=gen) * 2 - 1
    labels = torch.arange(24) % 2
    minibatch = (images[:8], labels[:8])
    whole = (images, labels)
    dp_config = dp_train_config(tiny_config(), _dp())
    clip = _ablation("clip-only")
    noise = _ablation("noise-only")
    return {
        "cgan": (TrainerSpec(), tiny_config(), minibatch, []),
        "spinegan": (
            TrainerSpec(clinical=_clinical(tmp_path)),
            tiny_config(),
            minibatch,
            ["clinical"],
        ),
        "dp": (TrainerSpec(DPSGD(_dp(), 1.0, 4 / 12, PATIENTS)), dp_config, whole, ["dp"]),
        "dp-spinegan": (
            TrainerSpec(DPSGD(_dp(), 1.0, 4 / 12, PATIENTS), clinical=_clinical(tmp_path)),
            dp_config,
            whole,
            ["dp", "clinical"],
        ),
        "clip-only": (
            TrainerSpec(clip),
            dp_train_config(tiny_config(), clip.dp),
            whole,
            ["dp", "ablation"],
        ),
        "noise-only": (
            TrainerSpec(noise),
            dp_train_config(tiny_config(), noise.dp),
            whole,
            ["dp", "ablation"],
        ),
        "paper": (
            TrainerSpec(PaperScheme()),
            paper_train_config(tiny_config()),
            (images[:1], labels[:1]),
            ["ablation"],
        ),
    }[name]


VARIANTS = ["cgan", "spinegan", "dp", "dp-spinegan", "clip-only", "noise-only", "paper"]


@pytest.mark.parametrize("name", VARIANTS)
def test_each_spec_builds_steps_and_round_trips_its_state(tmp_path, name):
    spec, config, batch, pieces = _variant(name, tmp_path)
    trainer = build_trainer(spec, config, PRIOR)
    assert type(trainer) is GanTrainer
    trainer.train_step(*batch)
    state = copy.deepcopy(trainer.state_dict())
    assert list(state) == BASE_KEYS + pieces
    for piece in pieces:
        if piece in PIECES:
            assert list(state[piece]) == PIECES[piece]

    again = rebuild_trainer(spec, state)
    resumed = again.state_dict()
    assert list(resumed) == list(state)
    assert again.counters() == trainer.counters() == state["counters"]
    for net in ("G", "D", "G_ema"):
        for key, value in state[net].items():
            assert torch.equal(resumed[net][key], value), (net, key)
    for piece in pieces:
        assert str(resumed[piece]) == str(state[piece]), piece
    # The state goes on training: a resumed trainer takes the next step like any other.
    again.train_step(*batch)
    assert again.g_steps == trainer.g_steps + 1


def test_parts_are_read_through_the_trainer(tmp_path):
    spec, config, _, _ = _variant("dp-spinegan", tmp_path)
    trainer = build_trainer(spec, config, PRIOR)
    assert trainer.dp_step is trainer.d_strategy.dp_step
    assert trainer.clinical is spec.clinical
    assert trainer.noise_multiplier == 1.0 and trainer.sample_rate == pytest.approx(4 / 12)
    assert spec.model == "spinegan" and TrainerSpec().model == "cgan"
    with pytest.raises(AttributeError, match="no_such_thing"):
        trainer.no_such_thing  # noqa: B018


@pytest.mark.parametrize(
    ("saved", "target", "error", "match"),
    [
        ("cgan", "dp", ValueError, "not from a DP run"),
        ("cgan", "spinegan", ClinicalLossError, "not from a SpineGAN run"),
        ("dp", "clip-only", AblationError, "DP scheme dpsgd, not clip-only"),
        ("clip-only", "noise-only", AblationError, "DP scheme clip-only, not noise-only"),
        ("cgan", "paper", AblationError, "DP scheme none, not paper"),
        ("noise-only", "dp", ValueError, "σ=0.5"),
    ],
)
def test_a_state_of_another_variant_is_refused(tmp_path, saved, target, error, match):
    spec, config, _, _ = _variant(saved, tmp_path)
    if saved == "cgan" and target in ("dp", "paper"):
        config = _variant(target, tmp_path)[1]  # same network, so only the variant differs
    state = copy.deepcopy(build_trainer(spec, config, PRIOR).state_dict())
    target_spec, target_config, _, _ = _variant(target, tmp_path)
    with pytest.raises(error, match=match):
        build_trainer(target_spec, target_config, PRIOR, state=state)


def test_spinegan_refuses_another_classifier(tmp_path):
    spec, config, _, _ = _variant("spinegan", tmp_path)
    state = copy.deepcopy(build_trainer(spec, config, PRIOR).state_dict())
    other = TrainerSpec(clinical=_clinical(tmp_path, seed=1))
    with pytest.raises(ClinicalLossError, match="same --classifier"):
        rebuild_trainer(other, state)


def test_an_unregistered_d_step_is_refused():
    with pytest.raises(TypeError, match="no D step is registered"):
        build_trainer(TrainerSpec(d_step="plain"), tiny_config(), PRIOR)  # type: ignore[arg-type]
    assert isinstance(TrainerSpec().d_step, NonPrivate)
