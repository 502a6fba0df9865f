"""The coordinator's Flower ServerApp: load the validated plan from the state folder and run it.

`invcoss-server` writes `plan.json` into the state folder and submits this app with run config
``state-dir="<folder>"``. The app process is started by the SuperLink for one Flower run; everything it must keep
lives in the state folder, so a new Flower run after a coordinator restart continues where the last one stopped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from invcoss_core.common.eventlog import emit_event
from server.codec import FlowerGrid
from server.config import FederationConfig
from server.plan import PlanRunner
from server.state import StateLayout

logger = logging.getLogger(__name__)

STATE_DIR_KEY = "state-dir"

app = ServerApp()


def _configure_logging(layout: StateLayout) -> None:
    layout.logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(layout.logs / "serverapp.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    stream = logging.StreamHandler()
    stream.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("server", "invcoss_core"):
        package_logger = logging.getLogger(name)
        package_logger.setLevel(logging.INFO)
        package_logger.addHandler(handler)
        package_logger.addHandler(stream)
        package_logger.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the stage plan of the state folder named by run config `state-dir`."""
    state_dir = str(context.run_config.get(STATE_DIR_KEY, ""))
    if not state_dir:
        raise RuntimeError("run config 'state-dir' is empty; start runs with `invcoss-server --config ...`")
    layout = StateLayout(Path(state_dir))
    _configure_logging(layout)
    config = FederationConfig.model_validate_json(layout.plan_file.read_text())
    emit_event(layout.events, "serverapp_started", serverapp_pid=os.getpid(), flower_run_id=int(context.run_id))
    state = PlanRunner(config, layout, FlowerGrid(grid, part_bytes=config.superlink.part_bytes)).run()
    emit_event(layout.events, "serverapp_finished", status=state.status)
