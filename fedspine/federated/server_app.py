"""The Flower ServerApp: reads the run config and runs :func:`run_federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedspine.federated.federation import FederationConfig, run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederationConfig.from_run_config(dict(context.run_config))
    run_federation(grid, config)
