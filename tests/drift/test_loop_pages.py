"""`/dashboard/loops` and `/dashboard/loops/N`: the record `edgefleet demo --loop` writes per
iteration, on a real controller over HTTP; signed-in like every page, and a broken or
oversized record is skipped, never rendered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.drift.conftest import Served


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Served]:
    srv = Served(tmp_path / "ctl")
    yield srv
    srv.stop()


def test_loop_pages_list_the_steps_signed_in_only(served: Served) -> None:
    folder = served.ctl.settings.data_dir / "loops"
    folder.mkdir(parents=True)
    doc = {
        "iteration": 1,
        "state": "normal",
        "loop_s": 101.5,
        "version": "1.2.0",
        "steps": [
            {"step": 3, "title": "drift announced", "at": "2026-11-28T23:00:00+00:00",
             "t_s": 12.0, "figures": {"shift_to_event_s": 9.5, "note": "<b>x</b>"}},
        ],
    }  # fmt: skip
    (folder / "1.json").write_text(json.dumps(doc))
    (folder / "2.json").write_text("{not json")
    (folder / "3.json").write_text(json.dumps({**doc, "pad": "x" * (1024 * 1024)}))
    auth = {"Authorization": f"Bearer {served.viewer}"}
    assert httpx.get(f"{served.url}/dashboard/loops/1", timeout=10).status_code == 401
    index = httpx.get(f"{served.url}/dashboard/loops", headers=auth, timeout=10)
    assert index.status_code == 200
    assert 'href="/dashboard/loops/1"' in index.text
    assert "/dashboard/loops/2" not in index.text and "/dashboard/loops/3" not in index.text
    page = httpx.get(f"{served.url}/dashboard/loops/1", headers=auth, timeout=10)
    assert page.status_code == 200
    assert "drift announced" in page.text and "shift_to_event_s: 9.5" in page.text
    assert "state after: normal" in page.text and "<b>x</b>" not in page.text  # escaped
    for n in (2, 3, 9):
        assert (
            httpx.get(f"{served.url}/dashboard/loops/{n}", headers=auth, timeout=10).status_code
            == 404
        )
