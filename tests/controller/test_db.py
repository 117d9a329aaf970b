"""Migrations, URLs and settings."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from edgefleet.cloud_controller import db
from edgefleet.cloud_controller.settings import Settings


def _schema_diff(url: str) -> list[object]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import edgefleet.cloud_controller.models  # noqa: F401  (registers the tables)

    engine = db.make_engine(url)
    db.upgrade(engine)
    db.upgrade(engine)  # idempotent: a restart runs it again
    with engine.connect() as c:
        mine = {t for t in db.Base.metadata.tables if not t.startswith("drift")}
        diff = [
            d
            for d in compare_metadata(MigrationContext.configure(c), db.Base.metadata)
            if any(name in str(d) for name in mine)
        ]
    engine.dispose()
    return diff


def test_migration_matches_the_models_on_sqlite(tmp_path: Path) -> None:
    assert _schema_diff(f"sqlite:///{tmp_path / 'x.db'}") == []


def test_migration_matches_the_models_on_postgres(postgres_url: str) -> None:
    import psycopg

    schema = f"m_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True, connect_timeout=5) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    try:
        assert _schema_diff(f"{postgres_url}?options=-csearch_path%3D{schema}") == []
    finally:
        with psycopg.connect(postgres_url, autocommit=True, connect_timeout=5) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")


def test_urls_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert db.normalize_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert db.normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert db.normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    s = Settings(data_dir=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path / 'controller.db'}"
    assert s.package_dir == tmp_path / "packages"
    assert s.base_url == "http://127.0.0.1:8400"
    monkeypatch.setenv("EDGEFLEET_CONTROLLER_DB", "postgresql://x@y/z")
    monkeypatch.setenv("EDGEFLEET_CONTROLLER_PORT", "9000")
    monkeypatch.setenv("EDGEFLEET_CONTROLLER_TRUSTED_KEYS", "/a.pub:/b.pub")
    e = s.with_env()
    assert e.database_url == "postgresql://x@y/z" and e.port == 9000
    assert e.trusted_keys == (Path("/a.pub"), Path("/b.pub"))


def test_migrations_form_one_line() -> None:
    """One head and no branch: two migrations on the same parent would each run on a fresh
    database but leave an upgraded one in an order nobody tested."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS_DIR))
    scripts = ScriptDirectory.from_config(cfg)
    assert len(scripts.get_heads()) == 1, scripts.get_heads()
    parents = [r.down_revision for r in scripts.walk_revisions()]
    assert len(parents) == len(set(parents)), "two migrations share a parent"
