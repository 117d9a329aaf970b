"""The one `edgefleet` command line (top floor: it registers every component's commands).

The core commands (`core_cli`), each component's `cli` and the demo's `command` have a
``register(app)`` function. Those modules import only typer, rich and the standard library at
module level, so that `edgefleet verify` on a gateway never loads the quantization stack or a
web server (tests/e2e/test_root_cli.py checks it).
"""

from __future__ import annotations

import typer

from edgefleet import __version__

app = typer.Typer(
    name="edgefleet",
    help="Package, sign, roll out and serve ONNX models on fleets of IoT gateways.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """edgefleet command line."""


def _register_components() -> None:
    """Add the core commands, every component's commands and the demo to `app`."""
    from edgefleet import core_cli
    from edgefleet.agent import cli as agent_cli
    from edgefleet.cloud_controller import cli as controller_cli
    from edgefleet.cloud_controller.drift import cli as drift_cli
    from edgefleet.demo import command as demo_cli
    from edgefleet.packager import cli as packager_cli

    core_cli.register(app)
    packager_cli.register(app)
    agent_cli.register(app)
    controller_cli.register(app)
    drift_cli.register(app)
    demo_cli.register(app)


_register_components()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
