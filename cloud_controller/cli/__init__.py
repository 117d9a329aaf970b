"""Controller commands: `controller`, `packages`, `devices`, `rollout`, `capture` (all but the
first use the API).

One module per command group; `client` holds what they share. Only typer, rich and the standard
library are imported at module level; httpx, SQLAlchemy and uvicorn are imported inside the
commands, so registering them costs a gateway nothing.
"""

from __future__ import annotations

import typer

from edgefleet.cloud_controller.cli.capture import capture_app
from edgefleet.cloud_controller.cli.controller import controller_app
from edgefleet.cloud_controller.cli.devices import devices_app
from edgefleet.cloud_controller.cli.packages import packages_app
from edgefleet.cloud_controller.cli.rollouts import rollout_app


def register(app: typer.Typer) -> None:
    """Add this component's commands to the root app."""
    app.add_typer(controller_app, name="controller")
    app.add_typer(packages_app, name="packages")
    app.add_typer(devices_app, name="devices")
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(capture_app, name="capture")
