"""API, CLI and dashboard end to end: a real controller, real HTTP, headless Chromium."""

from __future__ import annotations

import json
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
from tests.support.chromium import Browser, chromium


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


def _sign_in(b: Browser, url: str, token: str, then: str) -> None:
    """Sign in through the dashboard's form, as a person would, and land on ``then``."""
    b.goto(f"{url}{then}")  # not signed in: the page answers with the sign-in form
    b.wait_for("document.querySelector('input[name=token]') !== null")
    b.eval(
        f"document.querySelector('input[name=token]').value = {json.dumps(token)};"
        "document.querySelector('form[action=\"/dashboard/login\"]').submit()"
    )
    # The sign-in form may have been served at ``then`` itself: wait for the form to be gone.
    b.wait_for(
        "document.querySelector('input[name=token]') === null"
        f" && location.pathname + location.search === {json.dumps(then)}"
    )


def test_drift_page_in_headless_chromium(served: Served, tmp_path: Path) -> None:
    with chromium(tmp_path) as b:
        _sign_in(b, served.url, served.viewer, "/dashboard/drift/iris?hours=3")
        dom = b.dom()
        assert "Drift: iris" in dom and 'class="badge drift"' in dom
        assert 'class="feature drifted" data-feature="X[2]"' in dom
        assert dom.count('class="timeline"') == 1 and dom.count('class="alarm"') == 2
        assert "outside the reference range:" in dom and "detects with 80 % power at n=" in dom
        shot = tmp_path / "drift.png"
        b.screenshot(shot, 1280, 1400)
    img = read_png(shot)
    assert count_colour(img, svg.REFERENCE) > 2000  # reference bars drawn
    assert count_colour(img, svg.LIVE) > 2000  # live bars drawn
    assert count_colour(img, svg.DRIFT) > 300  # the drifted feature's frame and alarm dots


def test_sign_in_form_sets_an_httponly_strict_cookie_and_sign_out_clears_it(
    served: Served, tmp_path: Path
) -> None:
    with chromium(tmp_path) as b:
        b.goto(f"{served.url}/dashboard/")
        assert "Sign in" in b.dom() and "3 devices" not in b.dom()
        # a wrong token: the form again, with the reason, and no cookie
        b.eval(
            "document.querySelector('input[name=token]').value = 'eft_wrong';"
            "document.querySelector('form[action=\"/dashboard/login\"]').submit()"
        )
        b.wait_for("document.body.innerText.includes('Unknown, revoked')")
        assert not [c for c in b.cookies() if c["name"] == "edgefleet_token"]
        _sign_in(b, served.url, served.viewer, "/dashboard/")
        dom = b.dom()
        assert "3 devices, 3 online" in dom and "gw-3" in dom and "south" in dom
        assert served.viewer not in b.eval("location.href")  # no token in any URL
        assert b.eval("document.cookie") == ""  # HttpOnly: scripts cannot read it
        (cookie,) = [c for c in b.cookies() if c["name"] == "edgefleet_token"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert cookie["value"] == served.viewer and cookie["path"] == "/dashboard"
        b.goto(f"{served.url}/dashboard/rollouts")  # the cookie carries over
        assert "<h1>Rollouts</h1>" in b.dom()
        b.eval("document.querySelector('form.signout').submit()")
        b.wait_for("location.pathname === '/dashboard/login'")
        assert not [c for c in b.cookies() if c["name"] == "edgefleet_token"]
        b.goto(f"{served.url}/dashboard/rollouts")
        assert "<h1>Sign in</h1>" in b.dom()


def test_dashboard_ignores_a_token_in_the_url(served: Served) -> None:
    denied = httpx.get(served.url + "/dashboard/", params={"token": served.viewer}, timeout=30)
    assert denied.status_code == 401 and 'action="/dashboard/login"' in denied.text
    assert "set-cookie" not in denied.headers
    # the form's target after sign-in is a dashboard path, never another site
    for evil in ("https://evil.example/", "//evil.example/dashboard", "/dashboard\\x"):
        r = httpx.post(
            served.url + "/dashboard/login",
            data={"token": served.viewer, "next": evil},
            timeout=30,
        )
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/", evil
    r = httpx.post(served.url + "/dashboard/login", data={"token": "nope"}, timeout=30)
    assert r.status_code == 401 and "set-cookie" not in r.headers


def test_api_docs_are_served_offline(served: Served) -> None:
    page = httpx.get(served.url + "/docs", timeout=30)
    assert page.status_code == 200
    assert (
        "cdn" not in page.text.lower()
        and "http://" not in page.text.replace(served.url, "")
        and "https://" not in page.text
    )
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = httpx.get(f"{served.url}/docs/assets/{asset}", timeout=30)
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    assert httpx.get(served.url + "/redoc", timeout=30).status_code == 404  # ReDoc needs a CDN


def test_drift_page_shows_range_counts_and_what_the_reference_can_detect(served: Served) -> None:
    page = httpx.get(
        f"{served.url}/dashboard/drift/iris",
        params={"hours": "3"},
        headers={"Authorization": f"Bearer {served.viewer}"},
    )
    assert page.status_code == 200
    assert "outside the reference range: 0 below, " in page.text
    assert page.text.count("detects with 80 % power at n=") == 5  # every feature
    assert page.text.count(" std or ") == 4  # a shift and an out-of-range share: numeric X[*]
    assert "reference-warnings" not in page.text  # iris's 150 rows watch every feature
