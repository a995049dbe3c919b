"""DP fine-tuning of a few of D's parameters (``trainable_d = "head"`` or ``"top:K"``) and
augmentation multiplicity (``augment_views``, issue 15 items 2 and 3): what is frozen stays
bit-identical and outside the noise, every row is still one clipped, isolated patient, nothing
changes at the defaults, and a resume keeps both settings."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedspine.training.dp import (
    DPConfig,
    DPDiscriminatorStep,
    PatientPoissonSampler,
    flatten_units,
    isolation_violations,
    trainable_d_names,
    trainable_fraction,
)
from tests.privacy.test_dp_step import PRIOR, build_step, fake_source, flat, tiny_d, unit_batch


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _split(D, spec):
    chosen = set(trainable_d_names(D, spec))
    return (
        {n: p for n, p in D.named_parameters() if n in chosen},
        {n: p for n, p in D.named_parameters() if n not in chosen},
    )


# ---- which parameters -------------------------------------------------------------------------


def test_top_k_selects_the_epilogue_the_mapping_and_the_lowest_blocks():
    D = tiny_d()  # 16 px: blocks 16->8 (blocks.0) and 8->4 (blocks.1)
    assert len(D.blocks) == 2
    top1 = trainable_d_names(D, "top:1")
    assert top1 and all(n.startswith(("epilogue.", "mapping.")) for n in top1)
    assert any(n.startswith("mapping.") for n in top1)
    top2 = trainable_d_names(D, "top:2")
    assert set(top2) - set(top1) == {
        n for n, _ in D.named_parameters() if n.startswith("blocks.1.")
    }
    assert trainable_d_names(D, "all") == [n for n, _ in D.named_parameters()]
    f1, f2 = trainable_fraction(D, "top:1"), trainable_fraction(D, "top:2")
    assert 0 < f1 < f2 < 1 and trainable_fraction(D, "all") == 1.0
    assert build_step(D, trainable_d="top:2").trainable_fraction == pytest.approx(f2)


def test_head_is_the_label_mapping_and_the_epilogue_output_layer():
    D = tiny_d()
    head = trainable_d_names(D, "head")
    assert head == [
        n for n, _ in D.named_parameters() if n.startswith(("mapping.", "epilogue.out."))
    ]
    assert any(n.startswith("mapping.") for n in head)
    assert {n for n in head if n.startswith("epilogue.")} == {
        "epilogue.out.weight",
        "epilogue.out.bias",
    }
    assert set(head) < set(trainable_d_names(D, "top:1"))  # conv and fc stay frozen
    assert 0 < trainable_fraction(D, "head") < trainable_fraction(D, "top:1")
    assert DPConfig(noise_multiplier=1.0, trainable_d="head").trainable_d == "head"
    step = build_step(D, trainable_d="head")
    assert step.trainable_fraction == pytest.approx(trainable_fraction(D, "head"))


@pytest.mark.parametrize(("resolution", "head_share"), [(32, 0.0415), (64, 0.0402)])
def test_trainable_fraction_at_the_cpu_preset(resolution, head_share):
    from fedspine.models import Discriminator
    from fedspine.training.config import preset_config

    network = dataclasses.replace(preset_config("cpu", resolution, 2).network, mbstd_group=0)
    D = Discriminator(network)
    specs = ["head"] + [f"top:{k}" for k in range(1, len(D.blocks) + 1)]
    fractions = {spec: trainable_fraction(D, spec) for spec in specs}
    total = sum(p.numel() for p in D.parameters())
    print(f"cpu preset, {resolution} px, {total} D parameters:", fractions)
    values = list(fractions.values())
    assert values == sorted(values) and values[0] > 0 and values[-1] < 1
    # The head is a small share of D; top:1 is dominated by the epilogue's fc.
    assert fractions["head"] == pytest.approx(head_share, abs=5e-4)
    assert fractions["head"] < fractions["top:1"] / 8


# ---- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "top:0",
        "top:-1",
        "top:x",
        "top",
        "some",
        "",
        "top:1.5",
        "ALL",
        "HEAD",
        "head:1",
        "top:\u00b2",
    ],
)
def test_a_malformed_trainable_d_is_refused(bad):
    from fedspine.dp_options import trainable_d_problem
    from fedspine.federated.federation_config import dp_fine_tuning_problem

    with pytest.raises(ValueError, match="trainable_d must be 'all', 'head' or 'top:K'"):
        DPConfig(noise_multiplier=1.0, trainable_d=bad)
    # The server's torch-free check reads the forms with the same parser.
    assert dp_fine_tuning_problem(bad, 1, 0.0) == trainable_d_problem(bad) != ""


@pytest.mark.parametrize("good", ["all", "head", "top:1", "top:12"])
def test_the_server_and_the_dp_step_accept_the_same_forms(good):
    from fedspine.federated.federation_config import dp_fine_tuning_problem

    assert dp_fine_tuning_problem(good, 1, 0.0) == ""
    assert DPConfig(noise_multiplier=1.0, trainable_d=good).trainable_d == good


def test_a_k_beyond_the_network_is_refused():
    with pytest.raises(ValueError, match="has 2 blocks, so K runs from 1"):
        build_step(tiny_d(), trainable_d="top:3")


@pytest.mark.parametrize("bad", [0, -1, 33, 2.0, True])
def test_bad_augment_views_are_refused(bad):
    with pytest.raises(ValueError, match="augment_views"):
        DPConfig(noise_multiplier=1.0, augment_views=bad)


def test_views_without_augmentation_are_refused():
    with pytest.raises(ValueError, match="no augmentation is active"):
        build_step(ada_p=0.0, augment_views=2)
    D = tiny_d()
    opt = torch.optim.Adam(D.parameters())
    with pytest.raises(ValueError, match="no augmentation is active"):
        # No pipe at all (ada_p 0): refused the same way.
        DPDiscriminatorStep(
            D,
            opt,
            None,
            DPConfig(noise_multiplier=1.0, augment_views=3),
            0.1,
            PRIOR,
            fake_source(),
        )


def test_the_optimizer_must_hold_exactly_the_selected_parameters():
    D = tiny_d()
    trained, _ = _split(D, "top:1")
    # An optimizer over the selected parameters alone, or over all of D, is fine.
    build_step(D, trainable_d="top:1", optimizer=torch.optim.Adam(trained.values()))
    build_step(D, trainable_d="top:1", optimizer=torch.optim.Adam(D.parameters()))
    # One that misses a selected parameter is refused.
    some = list(trained.values())[1:]
    with pytest.raises(ValueError, match="exactly the discriminator's parameters selected"):
        build_step(D, trainable_d="top:1", optimizer=torch.optim.Adam(some))


@pytest.mark.parametrize(
    ("spec", "g_part"), [("all", "all"), ("head", "mapping"), ("top:1", "mapping")]
)
def test_with_part_of_d_frozen_g_trains_its_mapping_only(spec, g_part):
    """Measured: a fully trained G collapses against a partly frozen D (README)."""
    from fedspine.models import Generator, NetworkConfig
    from fedspine.training.config import TrainConfig
    from fedspine.training.dp_trainer import dp_train_config
    from fedspine.training.gan_trainer import trained_g_parameters

    config = dp_train_config(TrainConfig(), DPConfig(noise_multiplier=1.0, trainable_d=spec))
    assert config.g_trainable == g_part
    G = Generator(NetworkConfig(resolution=16, z_dim=8, w_dim=8, channel_base=64, channel_max=8))
    chosen = {id(p) for p in trained_g_parameters(G, config.g_trainable)}
    mapping = {id(p) for p in G.mapping.parameters()}
    everything = {id(p) for p in G.parameters()}
    assert chosen == (everything if g_part == "all" else mapping) and mapping < everything
    with pytest.raises(ValueError, match="g_trainable"):
        TrainConfig(g_trainable="synthesis")


# ---- frozen stays frozen, the noise lands only on the trained part ----------------------------


@pytest.mark.parametrize("spec", ["head", "top:1", "top:2"])
def test_frozen_parameters_stay_bit_identical_and_trained_ones_move(spec):
    D = tiny_d()
    step = build_step(D, trainable_d=spec, ada_p=0.5, augment_views=2)
    trained, frozen = _split(D, spec)
    before = {n: p.detach().clone() for n, p in D.named_parameters()}
    flags = [p.requires_grad for p in D.parameters()]
    images, labels, unit_index = unit_batch([2, 1, 3])
    for _ in range(3):
        step.step(images, labels, unit_index)
    step.step(*unit_batch([]))  # an empty draw: noise only
    for n in frozen:
        assert torch.equal(D.get_parameter(n), before[n]), n
        assert D.get_parameter(n).grad is None, n
    assert all(not torch.equal(D.get_parameter(n), before[n]) for n in trained)
    assert [p.requires_grad for p in D.parameters()] == flags  # restored after each step
    state = step.dp_optimizer.original_optimizer.state
    assert all(p not in state for p in frozen.values())
    assert all(p in state for p in trained.values())


@pytest.mark.parametrize("spec", ["head", "top:1"])
def test_opacus_params_are_the_selected_set_and_only_they_get_noise(spec):
    D = tiny_d()
    sigma, clip, expected = 2.0, 0.5, 8
    step = build_step(D, trainable_d=spec, sigma=sigma, clip=clip, expected=expected)
    trained, frozen = _split(D, spec)
    from fedspine.training.dp import _trainable

    with _trainable(D, set(trained)):
        assert {id(p) for p in step.dp_optimizer.params} == {id(p) for p in trained.values()}
    draws = []
    for _ in range(3):
        step.step(*unit_batch([]))  # empty draws: the update is pure noise
        assert all(p.grad is None for p in frozen.values())
        draws.append(torch.cat([p.grad.flatten() for p in trained.values()]) * expected)
    noise = torch.stack(draws)
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.03)
    n_trained = sum(p.numel() for p in trained.values())
    assert noise.shape[1] == n_trained < sum(p.numel() for p in D.parameters())


# ---- the rows: isolation, clipping, exactness --------------------------------------------------


@pytest.mark.parametrize(("spec", "views"), [("top:1", 1), ("all", 3), ("top:2", 3), ("head", 2)])
def test_rows_stay_isolated_between_patients(spec, views):
    step = build_step(ada_p=0.5, trainable_d=spec, augment_views=views, chunk=4)
    images, labels, unit_index = unit_batch([2, 1, 3, 2])
    batch = step.prepare(images, labels, unit_index)
    assert batch.views == views

    def rows(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return step.per_unit_grads(dataclasses.replace(batch, real=x))

    for perturb in (0, 2, 4, 7):
        assert isolation_violations(rows, images, unit_index, perturb) == []
    got = rows(images)
    assert list(got) == trainable_d_names(step.D, spec)
    before = flat(got)
    changed = images.clone()
    changed[4] = -changed[4]
    moved = (flat(rows(changed)) - before).norm(dim=1) > 1e-4 * before.norm(dim=1).max()
    assert moved.tolist() == [False, False, True, False]


def test_each_row_is_clipped_to_c_with_several_views():
    D = tiny_d()
    clip, expected = 0.05, 4
    step = build_step(
        D,
        ada_p=0.5,
        augment_views=3,
        clip=clip,
        expected=expected,
        chunk=4,  # 4 // 3 = 1 unit per chunk: several chunks, one noise draw
        optimizer=torch.optim.SGD(D.parameters(), lr=0.0),
    )
    step.dp_optimizer.noise_multiplier = 0.0  # σ = 0 only to isolate clipping in this test
    images, labels, unit_index = unit_batch([2, 1, 3])
    batch = step.prepare(images, labels, unit_index)
    rows = flat(step.per_unit_grads(batch))
    assert rows.shape[0] == 3  # one row per sampled patient, whatever the number of views
    norms = rows.norm(dim=1)
    assert (norms > clip).all()
    step.step_batch(batch)
    summed = torch.cat([p.grad.flatten() for p in D.parameters()]) * expected
    manual = (rows * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0)
    assert torch.allclose(summed, manual, atol=1e-6)
    for u in range(3):
        sel = torch.from_numpy(unit_index == u)
        alone = step.prepare(images[sel], labels[sel], np.zeros(int(sel.sum()), np.int64))
        step.step_batch(alone)
        contribution = torch.cat([p.grad.flatten() for p in D.parameters()]) * expected
        assert contribution.norm() <= clip * (1 + 1e-5)


def _naive_rows(step, batch, r1_weight, names):
    """One unit and one view at a time with plain autograd, averaged over the views."""
    D, pipe = step.D, step.augment_pipe
    params = [D.get_parameter(n) for n in names]
    rows = []
    for u in range(batch.num_units):
        sel = torch.nonzero(batch.unit_index == u).flatten()
        total = None
        for k in range(batch.views):

            def view(aug, k=k, sel=sel):
                if batch.views == 1:
                    return {key: v[sel] for key, v in aug.items()}
                return {key: v[sel, k] for key, v in aug.items()}

            x = batch.real[sel].clone().requires_grad_(True)
            real_logits = D(pipe.apply(x, view(batch.aug_real)), batch.real_c[sel])[:, 0]
            (grad_x,) = torch.autograd.grad(real_logits.sum(), x, create_graph=True)
            fake_logits = D(pipe.apply(batch.fake[sel], view(batch.aug_fake)), batch.fake_c[sel])
            loss = (
                F.softplus(-real_logits).sum()
                + F.softplus(fake_logits[:, 0]).sum()
                + r1_weight * grad_x.square().sum()
            )
            grads = torch.autograd.grad(loss, params)
            row = torch.cat([g.flatten() for g in grads])
            total = row if total is None else total + row
        rows.append(total / batch.views)
    return torch.stack(rows)


@pytest.mark.parametrize(("spec", "views"), [("top:1", 1), ("top:2", 2), ("all", 3), ("head", 1)])
def test_rows_equal_a_naive_loop_over_units_and_views(spec, views):
    step = build_step(ada_p=0.5, trainable_d=spec, augment_views=views, chunk=4, r1_gamma=0.5)
    D = step.D
    D.requires_grad_(True)  # for the naive autograd loop only
    images, labels, unit_index = unit_batch([1, 3, 2, 1], seed=3)
    batch = step.prepare(images, labels, unit_index)
    if views > 1:
        assert all(v.shape[:2] == (images.shape[0], views) for v in batch.aug_real.values())
    got = flat(step.per_unit_grads(batch))
    want = _naive_rows(step, batch, 0.25, trainable_d_names(D, spec))
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_one_view_and_all_parameters_is_the_default_step():
    assert DPConfig(noise_multiplier=1.0).trainable_d == "all"
    assert DPConfig(noise_multiplier=1.0).augment_views == 1
    step = build_step(ada_p=0.5)
    batch = step.prepare(*unit_batch([2, 1, 3]))
    assert batch.views == 1 and all(v.shape[0] == 6 for v in batch.aug_real.values())
    # Two identical views give the rows of one view (the mean of equal terms).
    twice = build_step(ada_p=0.5, augment_views=2)
    double = dataclasses.replace(
        batch,
        views=2,
        aug_real={k: torch.stack([v, v], dim=1) for k, v in batch.aug_real.items()},
        aug_fake={k: torch.stack([v, v], dim=1) for k, v in batch.aug_fake.items()},
    )
    assert torch.allclose(
        flat(twice.per_unit_grads(double)), flat(step.per_unit_grads(batch)), atol=1e-6
    )
    # The rows under top:K are the matching columns of the full rows.
    top = build_step(ada_p=0.5, trainable_d="top:2")
    full = step.per_unit_grads(batch)
    sub = top.per_unit_grads(batch)
    for name, row in sub.items():
        assert torch.allclose(row, full[name], atol=1e-6), name


def test_accountant_steps_equal_optimizer_steps_with_few_parameters_and_views():
    from opacus.accountants import RDPAccountant

    patients = np.repeat(np.arange(12), [1, 2, 3] * 4)
    sampler = PatientPoissonSampler(patients, 0.15, np.random.default_rng(0))
    images = torch.rand(len(patients), 1, 16, 16) * 2 - 1
    labels = torch.randint(0, 2, (len(patients),))
    step = build_step(sigma=1.3, r1_gamma=0.0, ada_p=0.5, trainable_d="top:1", augment_views=2)
    accountant = RDPAccountant()
    step.dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sampler.sample_rate))
    calls = 0
    original = step.dp_optimizer.original_optimizer.step

    def counting_step(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    step.dp_optimizer.original_optimizer.step = counting_step
    k = 5
    for i in range(k):
        units = [] if i == 2 else sampler()
        index, unit_index = flatten_units(units)
        step.step(images[index], labels[index], unit_index)
    assert step.steps_taken == k == calls
    assert accountant.history == [(1.3, sampler.sample_rate, k)]


# ---- the trainer, the CLI and a federation ----------------------------------------------------


def test_the_dp_trainer_freezes_d_and_trains_g_mapping():
    from fedspine.training.config import preset_config
    from fedspine.training.dp_trainer import dp_train_config
    from fedspine.training.factory import DPSGD, TrainerSpec, build_trainer

    dp = DPConfig(
        noise_multiplier=1.0,
        expected_patients_per_step=4,
        ada_p=0.2,
        trainable_d="top:1",
        augment_views=2,
        d_steps_per_g=2,
    )
    config = dp_train_config(preset_config("cpu", 16, 2), dp)
    config.batch, config.device = 8, "cpu"
    patients = np.repeat(np.arange(12), 2).astype(str)
    trainer = build_trainer(TrainerSpec(DPSGD(dp, 1.0, 4 / 12, patients)), config, [0.5, 0.5])
    _, frozen = _split(trainer.D, "top:1")
    d_before = {n: p.detach().clone() for n, p in frozen.items()}
    g_before = {n: p.detach().clone() for n, p in trainer.G.named_parameters()}
    images = torch.randint(0, 255, (24, 1, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 2, (24,))
    trainer.train_step(images, labels)
    assert trainer.dp_step.steps_taken == 2 == trainer.d_steps
    assert all(torch.equal(p, d_before[n]) for n, p in frozen.items())
    moved = {n for n, p in trainer.G.named_parameters() if not torch.equal(p, g_before[n])}
    # D partly frozen: G trains its mapping network, all of it, and nothing else.
    assert moved == {n for n in g_before if n.startswith("mapping.")}


def test_train_help_lists_the_new_options():
    from typer.testing import CliRunner

    from fedspine.cli.main import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--dp-trainable-d" in result.output and "--dp-augment-views" in result.output
    assert "projection head" in re.sub(r"[\s│]+", " ", result.output)


def test_the_cli_accepts_head():
    from fedspine.cli.train import _privacy_options

    options, ablation = _privacy_options(
        True, None, {"--epsilon": 4.0, "--dp-trainable-d": "head", "--ada-p": 0.2}
    )
    assert ablation is None and options["trainable_d"] == "head"


def test_the_cli_refuses_bad_fine_tuning_flags(tmp_path):
    from typer.testing import CliRunner

    from fedspine.cli.main import app

    base = ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--dp", "--epsilon", "4"]
    cases = {
        ("--dp-trainable-d", "top:0"): "--dp-trainable-d",
        ("--dp-augment-views", "2"): "no augmentation is on",
        ("--dp-augment-views", "0"): "choose 1 to 32",
    }
    for flags, message in cases.items():
        result = CliRunner().invoke(app, [*base, *flags])
        assert result.exit_code != 0 and message in result.output, result.output
    # Not without --dp, nor with a non-private ablation scheme.
    result = CliRunner().invoke(
        app, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--dp-trainable-d", "top:1"]
    )
    assert result.exit_code != 0 and "need --dp" in result.output


@pytest.mark.slow
def test_a_tiny_dp_cli_run_with_few_parameters_and_views(tmp_path, privacy_home):
    import json
    import tomllib

    from typer.testing import CliRunner

    from fedspine.cli.main import app
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
        "0.016",
        "--batch",
        "16",
        "--dp",
        "--noise-multiplier",
        "1.0",
        "--patients-per-step",
        "4",
        "--ada-p",
        "0.3",
        "--dp-trainable-d",
        "top:1",
        "--dp-augment-views",
        "2",
        "--out",
        str(tmp_path / "run"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "warning: --dp-trainable-d top:1 without --init-from" in result.output
    shown = r"top:1: \d+\.\d% of D's parameters \(the 4x4 epilogue, the label mapping\)"
    assert re.search(shown, result.output), result.output
    assert "2 augmented view(s)" in result.output
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    dp = config["dp"]
    assert dp["trainable_d"] == "top:1" and dp["augment_views"] == 2
    assert dp["d_steps_per_g"] == 1 and dp["expected_patients_per_step"] == 4
    assert 0 < dp["trainable_fraction"] < 1
    summary = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert summary["private"] is True
    assert "top:1" in summary["components"]["discriminator_parameters"]
    assert "2 per image" in summary["components"]["augmentation_views"]
    (site,) = summary["sites"].values()
    assert sum(m["steps"] for m in site["mechanisms"]) == 1


def test_a_federation_asks_for_them_and_a_site_checks_what_it_is_asked(tmp_path):
    from fedspine import __version__
    from fedspine.data.prepared import load_prepared
    from fedspine.federated.federation_config import FederationConfig, FederationError
    from fedspine.federated.site_config import RoundConfig, SiteConfig, SiteRefusal
    from fedspine.federated.site_privacy import SitePrivacy
    from fedspine.training.config import preset_config
    from tests.federated.conftest import make_site_dataset

    config = FederationConfig(
        dp=True, dp_epsilon=8.0, dp_ada_p=0.2, dp_trainable_d="top:2", dp_augment_views=4
    )
    config.validate()
    request = config.dp_request()
    assert request["trainable-d"] == "top:2" and request["augment-views"] == 4
    again = FederationConfig.from_run_config(config.to_run_config())
    assert (again.dp_trainable_d, again.dp_augment_views) == ("top:2", 4)
    for bad in (
        {"dp_trainable_d": "top:0"},
        {"dp_augment_views": 0},
        {"dp_augment_views": 2, "dp_ada_p": 0.0},
    ):
        with pytest.raises(FederationError, match=r"\[privacy\]"):
            dataclasses.replace(config, **bad).validate()

    data = make_site_dataset(tmp_path / "prep", n=24, seed=0)
    dataset = load_prepared(data)
    train = dataset.select("train")
    site = SiteConfig.from_node_config(
        {"data-path": str(data), "site-name": "a", "privacy-home": str(tmp_path / "home")}
    )

    def round_config(**dp):
        return RoundConfig(
            "fed",
            1,
            0.016,
            {},
            [0.5, 0.5],
            ["normal", "abnormal"],
            __version__,
            dp={**request, **dp},
        )

    privacy = SitePrivacy(site, round_config(), dataset, train)
    assert (privacy.dp.trainable_d, privacy.dp.augment_views) == ("top:2", 4)
    refused = {
        "trainable-d": ["top:x", 3, "top:" + "9" * 40],
        "augment-views": [0, 99, "4", 2.5, True],
    }
    for key, values in refused.items():
        for value in values:
            with pytest.raises(SiteRefusal, match="DP settings are refused"):
                SitePrivacy(site, round_config(**{key: value}), dataset, train)
    with pytest.raises(SiteRefusal, match="needs augmentation"):
        SitePrivacy(site, round_config(**{"ada-p": 0.0}), dataset, train)
    # K is checked against the network before anything is planned or reserved.
    deep = SitePrivacy(site, round_config(**{"trainable-d": "top:3"}), dataset, train)
    with pytest.raises(SiteRefusal, match="D has 2 blocks"):
        deep.make_trainer(preset_config("cpu", 16, 2), None, None)
    # "head" is asked and accepted like top:K.
    head = SitePrivacy(site, round_config(**{"trainable-d": "head"}), dataset, train)
    assert head.dp.trainable_d == "head"
    assert dataclasses.replace(config, dp_trainable_d="head").dp_request()["trainable-d"] == "head"
    dataclasses.replace(config, dp_trainable_d="head").validate()
    # The site's state from earlier rounds trained another part of D: refused before planning.
    earlier = {"dp": {"trainable_d": "top:2", "augment_views": 4, "steps_taken": 0}}
    with pytest.raises(SiteRefusal, match="trainable_d='top:2'"):
        head.make_trainer(preset_config("cpu", 16, 2), None, earlier)
    assert head.reservation is None


def _public_run(tmp_path):
    """A 16 px cpu-preset run on other images, declared public, D built for DP."""
    import json

    from fedspine.training.run import TrainRequest, train
    from tests.federated.conftest import make_site_dataset

    data = make_site_dataset(tmp_path / "public-data", n=40, seed=11, brightness=5.0)
    run = tmp_path / "public"
    train(
        TrainRequest(
            data,
            run,
            preset="cpu",
            resolution=16,
            kimg=0.016,
            snapshot_kimg=0.016,
            device="cpu",
            seed=2,
            public_data="phantom shapes for a test",
            for_dp=True,
        )
    )
    latest = json.loads((run / "latest.json").read_text())["snapshot"]
    return run, run / latest


def _d_weights(snapshot):
    from fedspine.training.checkpoint import load_checkpoint

    return load_checkpoint(snapshot, kind="trainer", map_location="cpu")["trainer"]["D"]


def _g_weights(snapshot):
    from fedspine.training.checkpoint import load_checkpoint

    return load_checkpoint(snapshot, kind="trainer", map_location="cpu")["trainer"]["G"]


@pytest.mark.slow
def test_dp_fine_tuning_from_a_public_checkpoint_keeps_the_frozen_part(tmp_path, privacy_home):
    import json

    from fedspine.models import Discriminator
    from fedspine.training.config import read_config_toml
    from fedspine.training.run import DPRequest, RunReporter, TrainRequest, train
    from tests.federated.conftest import make_site_dataset

    public, snapshot = _public_run(tmp_path)
    data = make_site_dataset(tmp_path / "prep", n=48, seed=0)
    lines: list[str] = []

    class Lines(RunReporter):
        def message(self, text: str) -> None:
            lines.append(text)

    result = train(
        TrainRequest(
            data,
            tmp_path / "run",
            preset="cpu",
            resolution=16,
            kimg=0.032,
            batch=16,
            device="cpu",
            init_from=public,
            dp=DPRequest(
                noise_multiplier=1.0,
                expected_patients_per_step=4,
                ada_p=0.3,
                d_steps_per_g=2,
                trainable_d="top:1",
                augment_views=2,
            ),
        ),
        Lines(),
    )
    assert not any(line.startswith("warning") for line in lines)  # started from public weights
    # With D's body frozen, G trains its mapping only; its synthesis network stays public.
    g_start, g_end = _g_weights(snapshot), _g_weights(result.out / _latest(result.out))
    assert any(name.startswith("synthesis.") for name in g_start)
    for name in g_start:
        same = torch.equal(g_start[name], g_end[name])
        assert same != name.startswith("mapping.") or name.endswith("w_avg"), name
    config = read_config_toml(result.out / "config.toml")["train"]
    assert config["g_trainable"] == "mapping"
    start, end = _d_weights(snapshot), _d_weights(result.out / _latest(result.out))
    D = Discriminator(_network(result.out))
    trained = set(trainable_d_names(D, "top:1"))
    assert trained and len(trained) < len(start)
    for name in start:
        same = torch.equal(start[name], end[name])
        assert same != (name in trained), name
    (site,) = json.loads((result.out / "privacy.json").read_text())["sites"].values()
    assert sum(m["steps"] for m in site["mechanisms"]) == 4  # 2 G steps x 2 D steps


def _latest(run):
    import json

    return json.loads((run / "latest.json").read_text())["snapshot"]


def _network(run):
    from fedspine.models import NetworkConfig
    from fedspine.training.config import read_config_toml

    return NetworkConfig(**read_config_toml(run / "config.toml")["train"]["network"])


@pytest.mark.slow
def test_a_dp_federation_fine_tunes_few_parameters_with_views(tmp_path):
    import json

    from fedspine.federated.client_app import app as client_app
    from fedspine.federated.federation import run_federation
    from fedspine.federated.federation_config import FederationConfig
    from fedspine.federated.grid import InProcessGrid, InProcessNode
    from fedspine.fileio import FEDERATION_CONFIG
    from fedspine.privacy.home import PrivacyHome
    from tests.federated.conftest import make_site_dataset

    public, snapshot = _public_run(tmp_path)
    datasets = [make_site_dataset(tmp_path / f"s{k}", n=40, seed=k) for k in range(2)]
    nodes = [
        InProcessNode(
            node_id=100 + k,
            node_config={
                "data-path": str(data),
                "site-name": f"site-{k}",
                "state-dir": str(tmp_path / f"state{k}"),
                "privacy-home": str(tmp_path / f"home{k}"),
            },
            app=client_app,
        )
        for k, data in enumerate(datasets)
    ]
    config = FederationConfig(
        name="few",
        output_dir=str(tmp_path / "out"),
        rounds=1,
        local_kimg=0.016,
        min_sites=2,
        preset="cpu",
        resolution=16,
        seed=1,
        initial_checkpoint=str(public),
        dp=True,
        dp_epsilon=20.0,
        dp_patients_per_step=4,
        dp_ada_p=0.3,
        dp_trainable_d="top:1",
        dp_augment_views=2,
    )
    status = run_federation(InProcessGrid(nodes), config, log=lambda _m: None)
    assert status["state"] == "completed", status
    start = _d_weights(snapshot)
    for k in range(2):
        (record,) = PrivacyHome(tmp_path / f"home{k}").ledger().records()
        assert record["steps"] >= 1
        (state,) = (tmp_path / f"state{k}").rglob("trainer.pt")
        local = _d_weights(state)
        changed = {name for name in start if not torch.equal(start[name], local[name])}
        assert changed and all(n.startswith(("epilogue.", "mapping.")) for n in changed)
    recorded = json.loads((tmp_path / "out" / FEDERATION_CONFIG).read_text())
    assert recorded["dp_trainable_d"] == "top:1" and recorded["dp_augment_views"] == 2


# ---- resume keeps the part of D and the views ---------------------------------------------------


def _fine_tuning_trainer(trainable_d="top:1", augment_views=2, state=None):
    from fedspine.training.config import preset_config
    from fedspine.training.dp_trainer import dp_train_config
    from fedspine.training.factory import DPSGD, TrainerSpec, build_trainer

    dp = DPConfig(
        noise_multiplier=1.0,
        expected_patients_per_step=4,
        ada_p=0.2,
        trainable_d=trainable_d,
        augment_views=augment_views,
    )
    config = dp_train_config(preset_config("cpu", 16, 2), dp)
    config.batch, config.device = 8, "cpu"
    patients = np.repeat(np.arange(12), 2).astype(str)
    spec = TrainerSpec(DPSGD(dp, 1.0, 4 / 12, patients))
    return build_trainer(spec, config, [0.5, 0.5], state=state)


def test_the_dp_state_records_trainable_d_and_views_and_resume_refuses_others():
    import copy

    trainer = _fine_tuning_trainer("head", 2)
    images = torch.randint(0, 255, (24, 1, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 2, (24,))
    trainer.train_step(images, labels)
    state = copy.deepcopy(trainer.state_dict())
    assert state["dp"]["trainable_d"] == "head" and state["dp"]["augment_views"] == 2

    # The same values resume.
    again = _fine_tuning_trainer("head", 2, state=state)
    assert again.dp_step.steps_taken == trainer.dp_step.steps_taken == 1
    for name, p in again.D.named_parameters():
        assert torch.equal(p, trainer.D.get_parameter(name)), name

    # Other values are refused, before any weight is loaded.
    fresh = _fine_tuning_trainer("top:1", 2)
    before = {n: p.detach().clone() for n, p in fresh.D.named_parameters()}
    with pytest.raises(ValueError, match=r"trainable_d='head'.*asks for 'top:1'"):
        fresh.load_state_dict(state)
    assert all(torch.equal(p, before[n]) for n, p in fresh.D.named_parameters())
    assert fresh.dp_step.steps_taken == 0
    with pytest.raises(ValueError, match="--dp-trainable-d head"):
        _fine_tuning_trainer("all", 2, state=state)
    with pytest.raises(ValueError, match=r"augment_views=2 .*asks for 3"):
        _fine_tuning_trainer("head", 3, state=state)
    with pytest.raises(ValueError, match="--dp-augment-views 2"):
        _fine_tuning_trainer("head", 1, state=state)


def test_a_state_saved_before_they_were_recorded_counts_as_all_and_one_view():
    import copy

    trainer = _fine_tuning_trainer("all", 1)
    state = copy.deepcopy(trainer.state_dict())
    del state["dp"]["trainable_d"], state["dp"]["augment_views"]
    _fine_tuning_trainer("all", 1, state=state)
    with pytest.raises(ValueError, match=r"trainable_d='all'"):
        _fine_tuning_trainer("head", 1, state=state)
    with pytest.raises(ValueError, match=r"augment_views=1 "):
        _fine_tuning_trainer("all", 2, state=state)


@pytest.mark.slow
def test_a_cli_resume_with_another_trainable_d_is_refused(tmp_path, privacy_home):
    import json
    import tomllib

    from typer.testing import CliRunner

    from fedspine.cli.main import app
    from tests.federated.conftest import make_site_dataset

    data = make_site_dataset(tmp_path / "prep", n=48, seed=0)
    out = tmp_path / "run"

    def train(kimg, *flags):
        args = ["train", str(data), "--preset", "cpu", "--resolution", "16", "--kimg", kimg]
        args += ["--batch", "16", "--dp", "--noise-multiplier", "1.0"]
        args += ["--patients-per-step", "4", "--ada-p", "0.3", "--out", str(out), *flags]
        return CliRunner().invoke(app, args)

    result = train("0.016", "--dp-trainable-d", "head")
    assert result.exit_code == 0, result.output
    assert "head: " in result.output and "projection head" in result.output
    dp = tomllib.loads((out / "config.toml").read_text())["dp"]
    assert dp["trainable_d"] == "head" and 0 < dp["trainable_fraction"] < 0.2
    refused = train("0.032", "--resume", "--dp-trainable-d", "top:1")
    assert refused.exit_code != 0
    assert "trained trainable_d='head'" in refused.output, refused.output
    refused = train("0.032", "--resume", "--dp-trainable-d", "head", "--dp-augment-views", "2")
    assert refused.exit_code != 0 and "augment_views=1" in refused.output, refused.output
    resumed = train("0.032", "--resume", "--dp-trainable-d", "head")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed" in resumed.output
    # A run saved when G trained all its parameters under a frozen D cannot go on now.
    from fedspine.training.checkpoint import load_checkpoint, save_checkpoint

    snapshot = out / json.loads((out / "latest.json").read_text())["snapshot"]
    payload = load_checkpoint(snapshot, kind="trainer", map_location="cpu")
    assert payload["trainer"]["config"]["g_trainable"] == "mapping"
    del payload["trainer"]["config"]["g_trainable"]
    save_checkpoint(snapshot, "trainer", payload)
    refused = train("0.048", "--resume", "--dp-trainable-d", "head")
    assert refused.exit_code != 0 and "trained all of G" in refused.output, refused.output
