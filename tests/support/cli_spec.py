"""What the `edgefleet` command line accepts, for tests that check files which call it
(Dockerfile, compose file, systemd units, the README): commands, flags, environment variables.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shlex
from typing import Any

import typer

PREFIXES = {"exec", "sudo", "nohup", "env", "time", "then", "do", "else", "!", "{"}
SEPARATORS = {";", "&&", "||", "|", "&", ">", ">>", "<", "(", ")", "$(", "`"}


def _is_group(cmd: Any) -> bool:
    return hasattr(cmd, "commands")


@functools.cache
def root() -> Any:
    """The root command (typer's own click: its classes are not `click`'s)."""
    from edgefleet.cli import app

    cmd = typer.main.get_command(app)
    assert _is_group(cmd)
    return cmd


def resolve(argv: list[str]) -> tuple[Any, list[str], list[str]]:
    """(the command ``edgefleet ARGV`` runs, its path, the arguments left for it)."""
    cmd = root()
    path: list[str] = []
    rest = list(argv)
    while _is_group(cmd) and rest and not rest[0].startswith("-"):
        sub = cmd.commands.get(rest[0])
        if sub is None:
            break
        path.append(rest.pop(0))
        cmd = sub
    return cmd, path, rest


def known(path: list[str]) -> bool:
    _cmd, got, rest = resolve(path)
    return got == path and not rest


def problems(argv: list[str]) -> list[str]:
    """Why ``edgefleet ARGV`` would be refused: an unknown command or flag, a missing required
    option (values are not checked: they are often shell variables)."""
    cmd, path, rest = resolve(argv)
    where = " ".join(["edgefleet", *path])
    if _is_group(cmd):
        return [f"{where}: no command {rest[:1]} (known: {sorted(cmd.commands)})"]
    opts: dict[str, Any] = {}
    for p in cmd.params:
        for o in [*p.opts, *p.secondary_opts]:
            opts[o] = p
    out = []
    given: set[str] = set()
    for tok in rest:
        if tok.startswith("--"):
            flag = tok.split("=", 1)[0]
            if flag not in opts:
                out.append(f"{where}: no option {flag}")
            else:
                given.add(opts[flag].name or "")
    for p in cmd.params:
        is_option = p.opts[0].startswith("-")
        if is_option and p.required and p.name not in given and not p.envvar:
            out.append(f"{where}: required option {p.opts[0]} missing")
    return out


def commands_in_shell(script: str) -> list[list[str]]:
    """Every ``edgefleet ...`` command line in a shell script (``$(...)`` included)."""
    script = re.sub(r"\\\n", " ", script)
    found: list[list[str]] = []
    for line in script.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()`")
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError:
            continue
        at_start = True  # a command word may come here (line start, after ; && | ( ...)
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok in SEPARATORS:
                at_start = True
            elif at_start and (tok == "edgefleet" or tok.endswith("/bin/edgefleet")):
                j = i + 1
                while j < len(tokens) and tokens[j] not in SEPARATORS:
                    j += 1
                found.append(tokens[i + 1 : j])
                i = j
                continue
            elif at_start and (tok in PREFIXES or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tok)):
                pass  # `exec edgefleet`, `VAR=value edgefleet`: still a command position
            else:
                at_start = False
            i += 1
    return found


@functools.cache
def env_names() -> frozenset[str]:
    """Every EDGEFLEET_* variable a program reads: the controller's settings, the agent's
    config fields, and each command line option's envvar."""
    from edgefleet.agent.config import ENV_PREFIX, AgentConfig
    from edgefleet.cloud_controller.settings import ENV_NAMES

    names = set(ENV_NAMES)
    for f in dataclasses.fields(AgentConfig):
        if f.name == "config_path":
            continue
        names.add(ENV_PREFIX + f.name.upper())
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            for sub in dataclasses.fields(factory):
                names.add(f"{ENV_PREFIX}{f.name}_{sub.name}".upper())

    def walk(cmd: Any) -> None:
        for p in cmd.params:
            env = p.envvar if isinstance(p.envvar, list | tuple) else [p.envvar]
            names.update(e for e in env if e)
        if _is_group(cmd):
            for sub in cmd.commands.values():
                walk(sub)

    walk(root())
    return frozenset(names)


def edgefleet_vars(text: str) -> set[str]:
    """The EDGEFLEET_* names a text uses."""
    return set(re.findall(r"\bEDGEFLEET_[A-Z0-9_]*[A-Z0-9]\b", text))
