"""One bad reply fails a site, not the run (issue 13, item 7).

Real ClientApps train in process; a wrapper corrupts one site's reply the way a broken or hostile
site could (NaN weights, a reply to another round, a missing tensor). The round goes on with the
other sites, the bad one is logged as failed with the reason, and the average never sees it.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedspine.federated.client_app import app as client_app
from fedspine.federated.federation import read_rounds, run_federation
from fedspine.federated.grid import InProcessGrid
from tests.federated.test_inprocess import _config, _nodes


def _nan_weights(reply):
    weights = reply.content["arrays"].to_torch_state_dict()
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = torch.full_like(weights[key], float("nan"))
    reply.content["arrays"] = ArrayRecord(weights)


def _other_round(reply):
    site = dict(reply.content["site"])
    site["round"] = int(site["round"]) + 7
    reply.content["site"] = ConfigRecord(site)


def _missing_tensor(reply):
    weights = reply.content["arrays"].to_torch_state_dict()
    weights.pop(next(iter(weights)))
    reply.content["arrays"] = ArrayRecord(weights)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_nan_weights, "NaN or infinite"),
        (_other_round, "answers round 8, not 1"),
        (_missing_tensor, "weight keys differ"),
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
