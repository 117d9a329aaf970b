"""Embedded MQTT broker for the demo and tests: amqtt (pure Python) or Mosquitto when asked.

Either broker runs as a child process on a free loopback port. The child dies with its parent
(``PR_SET_PDEATHSIG`` on Linux, `edgefleet.harness.die_with_parent`) and `EmbeddedBroker.stop()`
terminates, then kills, it, so no broker outlives the demo, whatever way it exits. The tests'
Mosquitto (`tests.support.services`) is this broker too.

Run the amqtt child directly with ``python -m edgefleet.devbroker --port P``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgefleet.harness import HarnessError, die_with_parent, free_port, terminate, wait_listening

BrokerKind = Literal["amqtt", "mosquitto"]
BROKER_KINDS: tuple[BrokerKind, ...] = ("amqtt", "mosquitto")


class BrokerError(HarnessError):
    """The broker could not be started; the message says why."""


def mosquitto_config(
    workdir: Path,
    host: str,
    port: int,
    *,
    passwords: Mapping[str, str] | None = None,
    acl: str | None = None,
    password_file: str | None = None,
) -> Path:
    """Write a Mosquitto config (and hashed password / ACL files) into ``workdir``.

    ``passwords`` are plaintext (hashed here with ``mosquitto_passwd``); ``password_file`` is
    the text of an already hashed file, e.g. from `cloud_controller.auth.mosquitto_passwords`.
    """
    lines = [
        f"listener {port} {host}",
        "persistence false",
        "max_queued_messages 100000",
        "max_inflight_messages 100",
        f"log_dest file {workdir / 'broker.log'}",
        "log_type error",
        "log_type warning",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Mosquitto run as root drops to user "mosquitto", who cannot read our 0600 files.
        lines.append("user root")
    if password_file is not None:
        pwfile = workdir / "passwd"
        pwfile.write_text(password_file)
        pwfile.chmod(0o600)
        lines += ["allow_anonymous false", f"password_file {pwfile}"]
    elif passwords:
        pwfile = workdir / "passwd"
        pwfile.write_text("".join(f"{u}:{p}\n" for u, p in passwords.items()))
        pwfile.chmod(0o600)
        exe = shutil.which("mosquitto_passwd")
        if exe is None:
            raise BrokerError("mosquitto_passwd not found: cannot hash the broker's passwords")
        subprocess.run([exe, "-U", str(pwfile)], check=True, timeout=60)
        lines += ["allow_anonymous false", f"password_file {pwfile}"]
    else:
        lines.append("allow_anonymous true")
    if acl is not None:
        aclfile = workdir / "acl"
        aclfile.write_text(acl)
        aclfile.chmod(0o600)
        lines.append(f"acl_file {aclfile}")
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


@dataclass
class EmbeddedBroker:
    """A broker child process; `url` is what clients connect to."""

    kind: BrokerKind
    host: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    passwords: Mapping[str, str] | None = None
    acl: str | None = None
    password_file: str | None = None
    startup_timeout: float = 20.0
    _argv: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.out"

    def start(self) -> EmbeddedBroker:
        """Start (or restart after `stop`) on the same port with the same config."""
        if self.process is not None and self.process.poll() is None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self._argv:
            self._argv = self._command()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        try:
            wait_listening(
                self.host,
                self.port,
                self.process,
                timeout=self.startup_timeout,
                log=self.log_path,
                name="broker",
            )
        except HarnessError as e:
            self.stop()
            raise BrokerError(str(e)) from e
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _command(self) -> list[str]:
        if self.kind == "mosquitto":
            exe = shutil.which("mosquitto") or (
                "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
            )
            if exe is None:
                raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
            conf = mosquitto_config(
                self.workdir,
                self.host,
                self.port,
                passwords=self.passwords,
                acl=self.acl,
                password_file=self.password_file,
            )
            return [exe, "-c", str(conf)]
        if self.kind == "amqtt":
            if self.passwords or self.acl or self.password_file:
                raise BrokerError("the amqtt broker runs anonymous only; use --broker mosquitto")
            return [
                sys.executable,
                "-m",
                "edgefleet.devbroker",
                "--host",
                self.host,
                "--port",
                str(self.port),
            ]
        raise BrokerError(f"unknown broker kind {self.kind!r}; choose one of {BROKER_KINDS}")


def embedded_broker(
    kind: BrokerKind,
    workdir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    passwords: Mapping[str, str] | None = None,
    acl: str | None = None,
) -> EmbeddedBroker:
    """An unstarted broker of ``kind``; use as a context manager or call `start()`."""
    if kind not in BROKER_KINDS:
        raise BrokerError(f"unknown broker kind {kind!r}; choose one of {BROKER_KINDS}")
    return EmbeddedBroker(
        kind=kind,
        host=host,
        port=port if port is not None else free_port(host),
        workdir=workdir,
        passwords=passwords,
        acl=acl,
    )


def amqtt_config(host: str, port: int) -> dict[str, object]:
    """amqtt broker config: one TCP listener, anonymous, no $SYS chatter, quiet logs."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def run_amqtt(host: str, port: int) -> None:
    """Run an amqtt broker in this process until SIGTERM/SIGINT."""
    import asyncio
    import logging

    from amqtt.broker import Broker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    async def _main() -> None:
        broker = Broker(amqtt_config(host, port))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await broker.start()
        await stop.wait()
        await broker.shutdown()

    asyncio.run(_main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the embedded amqtt broker.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    run_amqtt(args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
