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


# The extra that brings each command group's third-party modules (pyproject's extras).
_GROUP_EXTRAS = {
    "controller": "controller",
    "packages": "controller",
    "devices": "controller",
    "rollout": "controller",
    "drift": "controller",
    "agent": "agent",
    "package": "packager",
    "example-models": "packager",
    "demo": "demo",
}
# A module a command imports, and the extra that installs it (for a command not listed above).
_MODULE_EXTRAS = {
    "fastapi": "controller",
    "starlette": "controller",
    "uvicorn": "controller",
    "sqlalchemy": "controller",
    "alembic": "controller",
    "psycopg": "controller",
    "swagger_ui_bundle": "controller",
    "onnxruntime": "agent",
    "psutil": "agent",
    "paho": "agent",
    "httpx": "agent",
    "prometheus_client": "agent",
    "onnx": "packager",
    "onnxconverter_common": "packager",
    "skl2onnx": "packager",
    "sklearn": "packager",
    "amqtt": "demo",
}


def missing_extra_message(argv: list[str], missing: str) -> str | None:
    """The one line that names the extra to install when module ``missing`` is absent while
    running ``edgefleet ARGV`` (None when no extra brings that module)."""
    top = missing.split(".")[0]
    group = next((a for a in argv if not a.startswith("-")), "")
    extra = _GROUP_EXTRAS.get(group) or _MODULE_EXTRAS.get(top)
    if extra is None or top not in _MODULE_EXTRAS:
        return None
    what = f"edgefleet {group}" if group else "edgefleet"
    return (
        f"{what} needs the '{extra}' extra: pip install 'edgefleet[{extra}]'"
        f" (module {top} is not installed)"
    )


def main(argv: list[str] | None = None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    try:
        app(args=args, standalone_mode=True)
    except ModuleNotFoundError as e:
        line = missing_extra_message(args, e.name or "")
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
