"""A federation that a bad reply or a missing site cannot hang or fail (issue 13, items 5 and 7).

Real ClientApps train in process; a wrapper corrupts one site's reply the way a broken or hostile
site could (NaN weights, a reply to another round, a missing tensor, a layout that does not fit
the packed weights). The round goes on with the other sites, the bad one is logged as failed with
the reason, and the average never sees it.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord

from fedspine.federated.client_app import app as client_app
from fedspine.federated.federation import read_rounds, run_federation
from fedspine.federated.grid import InProcessGrid
from fedspine.federated.weights import read_weight_records, weight_records
from tests.federated.test_inprocess import _config, _nodes


def _repack(reply, weights):
    for name, record in weight_records(weights).items():
        reply.content[name] = record


def _nan_weights(reply):
    weights = read_weight_records(reply.content)
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = torch.full_like(weights[key], float("nan"))
    _repack(reply, weights)


def _other_round(reply):
    site = dict(reply.content["site"])
    site["round"] = int(site["round"]) + 7
    reply.content["site"] = ConfigRecord(site)


def _missing_tensor(reply):
    weights = read_weight_records(reply.content)
    weights.pop(next(iter(weights)))
    _repack(reply, weights)


def _tampered_layout(reply):
    """The packed bytes stay; the layout claims a tensor smaller than the one packed."""
    layout = json.loads(reply.content["arrays-layout"]["layout"])
    shape = next(shape for _, _, shape in layout["tensors"] if shape and shape[0] > 0)
    shape[0] -= 1
    reply.content["arrays-layout"] = ConfigRecord({"layout": json.dumps(layout)})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_nan_weights, "NaN or infinite"),
        (_other_round, "answers round 8, not 1"),
        (_missing_tensor, "weight keys differ"),
        (_tampered_layout, "unreadable weights: the layout describes"),
    ],
)
def test_a_corrupt_reply_is_a_failed_site_and_stays_out_of_the_average(
    site_datasets, tmp_path, corrupt, reason
):
    nodes = _nodes(site_datasets, tmp_path)

    def corrupted(message, context):
        reply = client_app(message, context)
        if not reply.has_error():
            corrupt(reply)
        return reply

    nodes[2].app = corrupted
    logs: list[str] = []
    status = run_federation(
        InProcessGrid(nodes), _config(tmp_path, rounds=1, min_sites=2), log=logs.append
    )
    assert status["state"] == "completed"
    (record,) = read_rounds(tmp_path / "out")
    assert sorted(s["site"] for s in record["sites"]) == ["site-0", "site-1"]
    (failure,) = record["failures"]
    assert failure["reason"].startswith("invalid reply: ") and reason in failure["reason"]
    assert any("invalid reply" in line for line in logs)
    from fedspine.training.generate import load_generator

    generator, _ = load_generator(tmp_path / "out" / "generator.pt")
    assert all(bool(torch.isfinite(p).all()) for p in generator.parameters())


def test_too_few_connected_sites_fail_the_round_in_time_not_hang(site_datasets, tmp_path):
    """Flower's FedAvg samples nodes in a loop without a deadline; fedspine waits `site_wait`."""
    import time

    from fedspine.federated.federation import FederationError, read_status

    logs: list[str] = []
    grid = InProcessGrid(_nodes(site_datasets[:1], tmp_path))
    config = _config(tmp_path, rounds=1, min_sites=2, site_wait=0.5)
    start = time.monotonic()
    with pytest.raises(FederationError, match="1 site\\(s\\) connected after waiting 0.5 s"):
        run_federation(grid, config, log=logs.append)
    assert time.monotonic() - start < 30
    assert read_status(tmp_path / "out")["state"] == "failed"
    (record,) = read_rounds(tmp_path / "out")
    assert record["sites"] == [] and "min_sites is 2" in record["failures"][0]["reason"]


@pytest.mark.slow
def test_a_site_missing_since_an_earlier_round_is_named(site_datasets, tmp_path):
    from fedspine.federated.federation import FederationError

    nodes = _nodes(site_datasets[:2], tmp_path)
    run_federation(InProcessGrid(nodes), _config(tmp_path, rounds=1), log=lambda _m: None)
    alone = InProcessGrid(nodes[:1])
    with pytest.raises(FederationError, match="missing since earlier rounds: site-1"):
        run_federation(alone, _config(tmp_path, rounds=2, site_wait=0.3), log=lambda _m: None)


def test_a_message_past_its_deadline_is_refused_before_training():
    from fedspine.federated.site import SiteRefusal, check_not_stale

    check_not_stale(1000.0, 60.0, now=1059.0)
    check_not_stale(1000.0, None, now=10_000.0)
    with pytest.raises(SiteRefusal, match="expired: sent 61 s ago with a deadline of 60 s"):
        check_not_stale(1000.0, 60.0, now=1061.0)


@pytest.mark.slow
def test_round_messages_carry_their_deadline_and_a_stale_one_is_not_trained(
    site_datasets, tmp_path
):
    nodes = _nodes(site_datasets, tmp_path)
    seen = []

    def late(message, context):
        seen.append((message.metadata.group_id, message.metadata.ttl))
        # As if the message had waited in the queue past the round's deadline.
        message.metadata.__dict__["_created_at"] = message.metadata.created_at - 2 * 600
        return client_app(message, context)

    nodes[2].app = late
    config = _config(tmp_path, rounds=1, min_sites=2, round_timeout=600)
    status = run_federation(InProcessGrid(nodes), config, log=lambda _m: None)
    assert status["state"] == "completed"
    assert seen == [("gan-round-1", 600.0)]
    (record,) = read_rounds(tmp_path / "out")
    (failure,) = record["failures"]
    assert failure["reason"].startswith("refused: SiteRefusal: the round's message expired")
    assert not any((tmp_path / "state_2").rglob("*.pt")), "the stale site trained"


def test_the_running_average_equals_fedavg_of_all_replies():
    from fedspine.federated.weights import RunningFedAvg
    from tests.federated.reference import fedavg

    g = torch.Generator().manual_seed(0)
    sds = [
        {
            "x": torch.randn(3, 4, generator=g),
            "h": torch.randn(5, generator=g).to(torch.bfloat16),
            "n": torch.tensor([7]),
        }
        for _ in range(4)
    ]
    counts = [10, 30, 60, 5]
    running = RunningFedAvg()
    for sd, n in zip(sds, counts, strict=True):
        running.add(sd, n)
    ours, reference = running.result(), fedavg(sds, counts)
    assert list(ours) == list(reference)
    for key in reference:
        assert ours[key].dtype == reference[key].dtype
        assert torch.allclose(ours[key].float(), reference[key].float(), atol=1e-6)
    odd = dict(sds[0], n=torch.tensor([8]))
    assert "non-floating tensor n differs" in running.problem(odd)
    with pytest.raises(ValueError, match="differs"):
        running.add(odd, 1)


def test_every_run_config_key_is_declared_by_the_app_bundle():
    """`flwr run` refuses a run config key the bundle's pyproject does not declare."""
    import tomllib

    from fedspine.federated.deploy import bundle_dir
    from fedspine.federated.federation import FederationConfig

    declared = tomllib.loads((bundle_dir() / "pyproject.toml").read_text())
    keys = set(declared["tool"]["flwr"]["app"]["config"])
    assert set(FederationConfig().to_run_config()) <= keys
