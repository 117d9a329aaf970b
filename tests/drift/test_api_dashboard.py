"""API, CLI and dashboard end to end: a real controller, real HTTP, headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from edgefleet.cloud_controller import devices
from edgefleet.cloud_controller.dashboard import svg
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.drift import analysis
from edgefleet.cloud_controller.drift.ingest import ingest_batch
from tests.drift.conftest import Served, inference_record, iris, sketch_record
from tests.drift.png import count_colour, read_png
from tests.support.services import require


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    srv = Served(tmp_path_factory.mktemp("drift-ctl"))
    ref, x, y = iris()
    now = datetime.now(UTC)
    shifted = x.copy()
    shifted[:, 2] += 1.2
    rng = np.random.default_rng(3)
    with transaction(srv.factory) as s:
        analysis.register_reference(s, "iris", "1.0.0", ref)
        for d, g in (("gw-1", "north"), ("gw-2", "north"), ("gw-3", "south")):
            devices.set_labels(s, d, groups=[g])
            devices.get_or_create(s, d).online = True
        msgs = []
        for h in range(5, 0, -1):  # closed hourly buckets, the last two drifted
            at = now - timedelta(hours=h)
            for d in ("gw-1", "gw-2", "gw-3"):
                idx = rng.integers(0, 150, 150)
                xs = shifted[idx] if h <= 2 else x[idx]
                msgs.append(
                    (
                        d,
                        {
                            "records": [
                                sketch_record(xs, y[idx], at=at),
                                inference_record(np.full(50, 3.0), at=at),
                            ]
                        },
                    )
                )
        ingest_batch(s, msgs, now=now)
    yield srv
    srv.stop()


def _get(srv: Served, path: str, token: str | None = None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(srv.url + path, headers=headers, params=params, timeout=30)


def test_api_drift_per_feature_history_and_events(served: Served) -> None:
    assert _get(served, "/api/v1/drift/iris").status_code == 401
    doc = _get(served, "/api/v1/drift/iris", served.viewer, hours="3").json()
    assert doc["status"] == "drift" and "X[2]" in doc["drifted_features"]
    f2 = next(f for f in doc["features"] if f["name"] == "X[2]")
    assert f2["reference_counts"] == next(
        f["counts"] for f in iris()[0]["features"] if f["name"] == "X[2]"
    )
    assert sum(f2["live_counts"]) == doc["n"]
    # X[2] moved by 1.2 beyond its training maximum: counted and judged by the range test
    assert f2["above"] > 0 and f2["p_range"] is not None and f2["range_checked"] == doc["n"]
    assert f2["reference_range"]["max"] == pytest.approx(6.9, abs=1e-5)
    det = f2["detectability"]
    assert det["n"] > 0 and 0 < det["min_shift_std"] < 2 and 0 < det["min_out_of_range"] < 0.1
    assert doc["reference_warnings"] == []
    hist = _get(served, "/api/v1/drift/iris/history", served.viewer).json()["buckets"]
    assert [b["status"] for b in hist] == ["ok", "ok", "ok", "drift", "drift"]
    events = _get(served, "/api/v1/drift/iris/events", served.viewer).json()["events"]
    assert {(e["scope"], e["scope_key"]) for e in events} >= {("fleet", "*"), ("group", "north")}
    dev = _get(served, "/api/v1/drift/iris", served.viewer, device="gw-3", hours="3").json()
    assert dev["scope"] == "device" and dev["n"] == 450  # the 3 hourly buckets overlapping 3 h
    bad = _get(served, "/api/v1/drift/iris", served.viewer, scope="planet")
    assert bad.status_code == 422 and "scope" in bad.json()["detail"]["message"]


def test_api_settings_need_operate_and_are_validated(served: Served) -> None:
    url = served.url + "/api/v1/drift/iris/settings"
    r = httpx.put(
        url,
        json={"config": {"alpha": 0.02}},
        headers={"Authorization": f"Bearer {served.viewer}"},
        timeout=30,
    )
    assert r.status_code == 403
    admin = {"Authorization": f"Bearer {served.admin}"}
    r = httpx.put(url, json={"config": {"alpha": 2}}, headers=admin, timeout=30)
    assert r.status_code == 422 and "alpha" in r.json()["detail"]["message"]
    r = httpx.put(
        url, json={"config": {"alpha": 0.01}, "scopes": ["fleet"]}, headers=admin, timeout=30
    )
    assert r.status_code == 200 and r.json()["scopes"] == ["fleet"]
    assert r.json()["config"]["alpha"] == 0.01


def test_cli_drift_show_json_and_table(served: Served) -> None:
    from edgefleet.cloud_controller.drift.cli import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "drift",
            "show",
            "iris",
            "--hours",
            "3",
            "--json",
            "--url",
            served.url,
            "--token",
            served.viewer,
        ],
    )
    assert res.exit_code == 3, res.output
    assert json.loads(res.output)["drifted_features"][0] == "X[2]"
    res = runner.invoke(
        app,
        [
            "drift",
            "show",
            "iris",
            "--device",
            "gw-1",
            "--hours",
            "3",
            "--url",
            served.url,
            "--token",
            served.viewer,
        ],
    )
    assert res.exit_code == 3 and "X[2]" in res.output and "device gw-1" in res.output
    assert "0/450" in res.output and "σ" in res.output and "outside: live values" in res.output
    res = runner.invoke(app, ["drift", "show", "iris", "--url", served.url, "--token", "nope"])
    assert res.exit_code == 1 and "invalid_token" in res.output
    # a model nobody packaged or reported, and a window finer than a bucket: refused, not "ok"
    auth = ["--url", served.url, "--token", served.viewer]
    res = runner.invoke(app, ["drift", "show", "irsi", *auth])
    assert res.exit_code == 1 and "unknown_model" in res.output, res.output
    res = runner.invoke(app, ["drift", "show", "iris", "--hours", "0.25", *auth])
    assert res.exit_code == 1 and "window_shorter_than_bucket" in res.output, res.output


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    require(exe is not None, "chromium is not installed (apt-get install chromium)")
    assert exe is not None
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={tmp / 'chromium'}",
        "--hide-scrollbars",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


def test_drift_page_in_headless_chromium(served: Served, tmp_path: Path) -> None:
    url = f"{served.url}/dashboard/drift/iris?hours=3&token={served.viewer}"
    dom = _chromium(["--dump-dom", url], tmp_path).stdout
    assert "Drift: iris" in dom and 'class="badge drift"' in dom
    assert 'class="feature drifted" data-feature="X[2]"' in dom
    assert dom.count('class="timeline"') == 1 and dom.count('class="alarm"') == 2
    assert "outside the reference range:" in dom and "detects with 80 % power at n=" in dom
    shot = tmp_path / "drift.png"
    _chromium([f"--screenshot={shot}", "--window-size=1280,1400", url], tmp_path)
    img = read_png(shot)
    assert count_colour(img, svg.REFERENCE) > 2000  # reference bars drawn
    assert count_colour(img, svg.LIVE) > 2000  # live bars drawn
    assert count_colour(img, svg.DRIFT) > 300  # the drifted feature's frame and alarm dots


def test_fleet_and_rollouts_pages_in_headless_chromium(served: Served, tmp_path: Path) -> None:
    dom = _chromium(["--dump-dom", f"{served.url}/dashboard/?token={served.viewer}"], tmp_path)
    assert "3 devices, 3 online" in dom.stdout
    assert "gw-3" in dom.stdout and "south" in dom.stdout
    dom = _chromium(
        ["--dump-dom", f"{served.url}/dashboard/rollouts?token={served.viewer}"], tmp_path
    )
    assert "Rollouts" in dom.stdout
    denied = httpx.get(served.url + "/dashboard/", timeout=30)
    assert denied.status_code == 401 and "viewer token" in denied.text


def test_drift_page_shows_range_counts_and_what_the_reference_can_detect(served: Served) -> None:
    page = httpx.get(
        f"{served.url}/dashboard/drift/iris", params={"hours": "3", "token": served.viewer}
    )
    assert page.status_code == 200
    assert "outside the reference range: 0 below, " in page.text
    assert page.text.count("detects with 80 % power at n=") == 5  # every feature
    assert page.text.count(" std or ") == 4  # a shift and an out-of-range share: numeric X[*]
    assert "reference-warnings" not in page.text  # iris's 150 rows watch every feature
