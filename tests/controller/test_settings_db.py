"""The database set once: every controller command resolves it the same way, and says which it
used; the start-up line and a missing extra print no secret and no traceback."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.cloud_controller.cli.controller import _banner
from edgefleet.cloud_controller.settings import (
    Settings,
    SettingsError,
    read_data_dir_config,
    redact_url,
    resolve_db,
    write_data_dir_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_flag_then_environment_then_controller_toml_then_sqlite(tmp_path: Path) -> None:
    env = {"EDGEFLEET_CONTROLLER_DB": "postgresql://env/db"}
    assert resolve_db(None, tmp_path, {}) == (
        f"sqlite:///{tmp_path / 'controller.db'}",
        "default (SQLite in the data directory)",
    )
    path = write_data_dir_config(tmp_path, 'postgresql://u:p"w@h/db')
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert read_data_dir_config(tmp_path) == {"db": 'postgresql://u:p"w@h/db'}
    assert resolve_db(None, tmp_path, {}) == ('postgresql://u:p"w@h/db', str(path))
    assert resolve_db(None, tmp_path, env) == ("postgresql://env/db", "EDGEFLEET_CONTROLLER_DB")
    assert resolve_db("sqlite:///x", tmp_path, env) == ("sqlite:///x", "--db")
    path.write_text('db = "x"\nbroker = "y"\n')
    with pytest.raises(SettingsError, match="unknown setting"):
        resolve_db(None, tmp_path, {})


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[str]:
    import psycopg

    name = f"dbonce_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_token_create_without_db_writes_to_the_database_init_set(
    tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The friction of the first run: `token create` without --db wrote a SQLite file while
    the server used PostgreSQL. Now it finds PostgreSQL in the data directory, and says so."""
    import psycopg

    monkeypatch.delenv("EDGEFLEET_CONTROLLER_DB", raising=False)
    data = tmp_path / "ctl"
    res = CliRunner().invoke(
        app, ["controller", "init", "--data-dir", str(data), "--db", pg_database]
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        app, ["controller", "token", "create", "--role", "admin", "--data-dir", str(data)]
    )
    assert res.exit_code == 0, res.output
    token = res.stdout.strip().splitlines()[-1]
    assert token.startswith("eft_")
    assert f"database {pg_database} (from {data / 'controller.toml'})" in res.stderr
    assert not (data / "controller.db").exists()  # no SQLite file on the side
    with psycopg.connect(pg_database) as c:
        row = c.execute("SELECT count(*) FROM api_tokens").fetchone()
    assert row is not None and row[0] == 1


def test_init_refuses_a_database_it_cannot_reach(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        ["controller", "init", "--data-dir", str(tmp_path),
         "--db", "postgresql://edgefleet:s3cret@127.0.0.1:1/none"],
    )  # fmt: skip
    assert res.exit_code == 1 and "db_unreachable" in res.output
    assert "s3cret" not in res.output and not (tmp_path / "controller.toml").exists()


def test_banner_and_redaction_show_no_password() -> None:
    assert redact_url("mqtt://edgefleet-controller:pw@broker:1883") == (
        "mqtt://edgefleet-controller:***@broker:1883"
    )
    assert redact_url("postgresql://u:p@[::1]/db") == "postgresql://u:***@[::1]/db"
    assert redact_url("sqlite:////var/x.db") == "sqlite:////var/x.db"
    s = Settings(db_url="postgresql://u:dbpw@h/db", broker_url="mqtts://c:brokerpw@b:8883")
    line = _banner(s, "--db")
    assert "dbpw" not in line and "brokerpw" not in line
    assert "postgresql://u:***@h/db" in line and "mqtts://c:***@b:8883" in line


def test_a_missing_extra_is_one_line_naming_it() -> None:
    code = (
        "import sys\n"
        "for m in ('fastapi', 'uvicorn', 'sqlalchemy'): sys.modules[m] = None\n"
        "from edgefleet.cli import main\n"
        "main(['controller', 'serve'])\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
        check=False,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: edgefleet controller needs the 'controller' extra: pip install "
        "'edgefleet[controller]' (module uvicorn is not installed)"
    ], res.stderr
