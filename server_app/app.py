"""Flower ServerApp: the SPES coordinator's Flower entry point (server_app/coordinator.py runs the rounds)."""

from __future__ import annotations

import shlex

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server_app import config as run_config
from server_app.coordinator import run
from server_app.ray_workers import replace_dead_actors

app = ServerApp()


def overrides_from(run_cfg: dict) -> list[str]:
    """Hydra overrides from the Flower run-config (`overrides` plus `output-dir`)."""
    overrides = shlex.split(str(run_cfg.get("overrides", "")))
    if run_cfg.get("output-dir"):
        overrides.append(f"output_dir={run_cfg['output-dir']}")
    return overrides


@app.main()
def main(grid: Grid, context: Context) -> None:
    replace_dead_actors()  # a Flower simulation only: Flower would keep handing jobs to a dead Ray worker
    run(grid, run_config.load(overrides_from(dict(context.run_config))))
