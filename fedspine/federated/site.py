"""What a site does with a train message: the fedspine installed at the site, not the server's code.

The site's facts and the checks on every request live in :mod:`site_config`; this module trains
the GAN's round. The server sends only the round's settings and the global weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from fedspine.federated.classifier_phase import received_clinical_loss
from fedspine.federated.site_config import (
    DEFAULT_MAX_LOCAL_KIMG,
    DEFAULT_MAX_RESOLUTION,
    RoundConfig,
    SiteConfig,
    SiteRefusal,
    check_dp_wanted,
    check_not_stale,
    check_round_limits,
    check_version,
    load_site_data,
    site_seed,
    site_state_file,
)
from fedspine.federated.site_privacy import SitePrivacy
from fedspine.federated.weights import load_trainer_weights, trainer_weights
from fedspine.training.batches import BatchSampler, training_data
from fedspine.training.checkpoint import load_checkpoint, save_checkpoint
from fedspine.training.config import TrainConfig
from fedspine.training.factory import TrainerSpec, build_trainer, rebuild_trainer
from fedspine.training.gan_trainer import configure_cpu

# Re-exported: callers name the site's facts through this module too.
__all__ = [
    "DEFAULT_MAX_LOCAL_KIMG",
    "DEFAULT_MAX_RESOLUTION",
    "RoundConfig",
    "SiteConfig",
    "SiteRefusal",
    "check_not_stale",
    "check_round_limits",
    "check_version",
    "site_state_file",
    "train_round",
]


def train_round(
    site: SiteConfig,
    rc: RoundConfig,
    weights: Mapping[str, torch.Tensor],
    classifier_weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, str]]:
    """Restore the global weights, train ``local_kimg`` on the site's data, return new weights,
    metrics, and the site's name and privacy summary (JSON) for the server.

    Optimizer moments, ADA state, counters and RNGs persist in the site's state folder between
    rounds (keyed by federation name), so a site continues where it left off. A SpineGAN round
    also brings the federation's frozen classifier (``classifier_weights``).
    """
    setup_start = time.perf_counter()
    check_version(rc.fedspine_version)
    check_round_limits(site, rc)
    dataset = load_site_data(site, rc.class_names)
    train = dataset.select("train")
    config_dict = dict(rc.train_config)
    config_dict["seed"] = site_seed(int(config_dict.get("seed", 0)), site.site_name)
    config = TrainConfig.from_dict(config_dict)
    data = training_data(train, resolution=config.network.resolution)
    check_dp_wanted(site, rc.dp)
    clinical = None
    if rc.model == "spinegan":
        clinical = received_clinical_loss(site, rc, classifier_weights, bool(rc.dp))
    elif rc.model != "cgan":
        raise SiteRefusal(f"the server asks for model {rc.model!r}; this site knows cgan, spinegan")

    configure_cpu(site.threads)
    state_file = site_state_file(site, rc.federation)
    state = load_checkpoint(state_file, kind="trainer")["trainer"] if state_file.is_file() else None
    privacy = None
    if rc.dp:
        privacy = SitePrivacy(site, rc, dataset, train)
        trainer = privacy.make_trainer(config, data, state, clinical=clinical)
    elif state is not None:
        trainer = rebuild_trainer(TrainerSpec(clinical=clinical), state)
    else:
        trainer = build_trainer(TrainerSpec(clinical=clinical), config, rc.label_prior)
    load_trainer_weights(trainer, weights)

    if privacy is not None:
        batches = privacy.batches(data, trainer.device)
    else:
        batches = BatchSampler(data, config.batch, trainer.np_rng, device=trainer.device)
    start = time.perf_counter()
    start_nimg = trainer.cur_nimg
    last = trainer.run(rc.local_kimg, batches, tick_kimg=rc.local_kimg)
    seconds = time.perf_counter() - start
    save_checkpoint(
        state_file, "trainer", {"trainer": trainer.state_dict(), "round": rc.server_round}
    )

    metrics = {
        "num-examples": len(train),
        "images-seen": trainer.cur_nimg - start_nimg,
        "d-steps-total": trainer.d_steps,
        "seconds": seconds,
        # Where a round's time goes at the site besides training: loading data and state,
        # building the trainer (setup), writing the local state (save).
        "setup-seconds": start - setup_start,
        "save-seconds": time.perf_counter() - start - seconds,
        "ada-p": trainer.ada_p,
    }
    # Flower's FedAvg wants the same metric keys from every site: absent ones are NaN.
    keys = ("loss_g", "loss_d", "loss_r1", "loss_pl", "d_real", "d_fake")
    if clinical is not None:
        keys += ("loss_clinical", "clinical_bce")
    for key in keys:
        value = last.get(key)
        metrics[key.replace("_", "-")] = float(value) if value is not None else float("nan")
    extra = {"site-name": site.site_name, "federation": rc.federation, "round": rc.server_round}
    if privacy is not None:
        metrics.update(privacy.record_round(trainer))
        extra["privacy"] = privacy.summary_json()
    else:
        metrics.update({"epsilon": -1.0, "delta": 0.0})
    return trainer_weights(trainer), metrics, extra
