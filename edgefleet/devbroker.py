"""Embedded MQTT broker for the demo and tests: amqtt (pure Python) or Mosquitto when asked.

Either broker runs as a child process on a free loopback port. The child dies with its parent
(``PR_SET_PDEATHSIG`` on Linux) and `EmbeddedBroker.stop()` terminates, then kills, it, so no
broker outlives the demo, whatever way it exits.

Run the amqtt child directly with ``python -m edgefleet.devbroker --port P``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

BrokerKind = Literal["amqtt", "mosquitto"]
BROKER_KINDS: tuple[BrokerKind, ...] = ("amqtt", "mosquitto")


class BrokerError(RuntimeError):
    """The broker could not be started; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child get SIGTERM when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None

    # Resolved here, in the parent: between fork and exec the child only makes the call (no
    # dlopen, whose loader lock another thread of the parent may have held at fork time).
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    sigterm = int(signal.SIGTERM)

    def _set() -> None:
        prctl(1, sigterm)  # PR_SET_PDEATHSIG

    return _set


def terminate(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: the process is gone when this returns."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def wait_listening(
    host: str, port: int, process: subprocess.Popen[bytes], timeout: float, log: Path
) -> None:
    """Return once ``host:port`` accepts connections; raise if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BrokerError(f"broker exited with {process.returncode} before listening: {tail}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerError(f"broker not listening on {host}:{port} after {timeout:.0f}s")


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
            wait_listening(self.host, self.port, self.process, self.startup_timeout, self.log_path)
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
