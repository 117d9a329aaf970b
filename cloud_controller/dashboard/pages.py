"""Server-rendered dashboard: fleet, rollouts, drift (HTML + inline SVG, no scripts, no CDN).

Pages need a token with the ``read`` permission: ``Authorization: Bearer``, or the
``edgefleet_token`` cookie that the sign-in form (``/dashboard/login``) sets: HttpOnly,
SameSite=Strict, Secure when served over HTTPS. A token never travels in a URL (it would be
kept in browser history, proxy logs and Referer headers); ``/dashboard/logout`` clears it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from html import escape
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.auth import Perm, allowed, lookup_token
from edgefleet.cloud_controller.dashboard import svg
from edgefleet.cloud_controller.deps import controller, session

router = APIRouter(prefix="/dashboard", tags=["dashboard"], include_in_schema=False)
COOKIE = "edgefleet_token"

CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#fafafa;color:#222}
nav{background:#1f2d3d;padding:10px 16px}nav a{color:#fff;margin-right:18px;text-decoration:none}
main{padding:16px}table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:4px 8px;font-size:13px;text-align:left}
.badge{padding:1px 6px;border-radius:3px;color:#fff;font-size:12px}
.ok{background:#2ca02c}.drift,.aborted,.failed,.offline{background:#d62728}
.running,.soaking,.insufficient_data,.no_data,.no_reference,.paused{background:#888}
.succeeded{background:#2ca02c}.degraded,.out_of_sync{background:#ff9f1c}
.in_sync{background:#2ca02c}.rollback_failed{background:#8b0000}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.feature{background:#fff;border:2px solid #ddd;padding:6px}
.feature.drifted{border-color:#d62728}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}
.bar{background:#eee;width:200px;height:12px;display:inline-block}
.bar i{background:#4c78a8;height:12px;display:block}
"""


SIGN_OUT = (
    '<form method="post" action="/dashboard/logout" class="signout">'
    '<button type="submit">Sign out</button></form>'
)


def _page(
    title: str, body: str, *, refresh: int | None = None, signed_in: bool = True
) -> HTMLResponse:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    html = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)} · edgefleet"
        f"</title>{meta}<style>{CSS}</style></head><body><nav>"
        '<a href="/dashboard/">Fleet</a><a href="/dashboard/rollouts">Rollouts</a>'
        f'<a href="/dashboard/drift">Drift</a>{SIGN_OUT if signed_in else ""}</nav>'
        f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )
    return HTMLResponse(html)


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a dashboard path only (never another site)."""
    if value and value.startswith("/dashboard") and not any(c in value for c in "\\\r\n"):
        return value
    return "/dashboard/"


def _sign_in_page(next_path: str, message: str = "", status: int = 401) -> HTMLResponse:
    note = f'<p class="error">{escape(message)}</p>' if message else ""
    body = (
        f"{note}<p>Sign in with an API token that may read (viewer or above; "
        "<code>edgefleet controller token create --role viewer</code>).</p>"
        '<form method="post" action="/dashboard/login">'
        f'<input type="hidden" name="next" value="{escape(next_path)}">'
        '<label>Token <input type="password" name="token" autocomplete="current-password" '
        'required size="50"></label> <button type="submit">Sign in</button></form>'
    )
    resp = _page("Sign in", body, signed_in=False)
    resp.status_code = status
    return resp


def _badge(status: str | None) -> str:
    s = escape(str(status or "-"))
    return f'<span class="badge {s}">{s}</span>'


def _viewer(request: Request) -> Response | None:
    """None when the request carries a token with read permission, else the 401 page."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    token = value.strip() if scheme.lower() == "bearer" else request.cookies.get(COOKIE)
    if token and _reader(request, token):
        return None
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return _sign_in_page(here, "Your session has ended: sign in again." if token else "")


def _reader(request: Request, token: str) -> bool:
    """The token exists, is not revoked and may read; the request's actor is set from it."""
    with controller(request).factory() as s:
        row = lookup_token(s, token)
        if row is not None and allowed(row.role, Perm.READ):
            request.state.actor = f"token:{row.name}#{row.id}"
            return True
    return False


@router.get("/login")
def login_form(request: Request) -> Response:
    """The sign-in form (200; the pages answer it with 401 when not signed in)."""
    return _sign_in_page(_safe_next(request.query_params.get("next")), status=200)


MAX_FORM_BYTES = 4096  # a token and a path: the form is refused beyond this


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the posted token; on success set the HttpOnly, SameSite=Strict cookie and go on."""
    from urllib.parse import parse_qs

    from fastapi.concurrency import run_in_threadpool

    body = await request.body()  # the Guard caps it at max_body_bytes before it is read
    if len(body) > MAX_FORM_BYTES:
        return _sign_in_page("/dashboard/", "The form is too large.", status=413)
    form = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=4)
    token = (form.get("token") or [""])[0].strip()
    next_path = _safe_next((form.get("next") or [""])[0])
    if not token or not await run_in_threadpool(_reader, request, token):
        return _sign_in_page(next_path, "Unknown, revoked or read-less token.")
    resp = RedirectResponse(next_path, status_code=303)
    resp.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/dashboard",
    )
    return resp


@router.post("/logout")
def logout() -> Response:
    """Clear the cookie and show the sign-in form."""
    resp = RedirectResponse("/dashboard/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict")
    return resp


def _ago(dt: datetime | None) -> str:
    if dt is None:
        return "never"
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt
    secs = (datetime.now(UTC) - dt).total_seconds()
    if secs < 120:
        return f"{secs:.0f} s ago"
    if secs < 7200:
        return f"{secs / 60:.0f} min ago"
    return f"{secs / 3600:.1f} h ago"


# --- fleet ------------------------------------------------------------------------------------


def fleet_rows(s: Session) -> list[dict[str, Any]]:
    from edgefleet.cloud_controller.desired import sync_view
    from edgefleet.cloud_controller.devices import list_devices
    from edgefleet.cloud_controller.drift.models import TelemetryRecord
    from edgefleet.cloud_controller.models import DesiredState

    since = datetime.now(UTC) - timedelta(hours=1)
    errs: dict[str, tuple[int, int]] = {}
    for dev_id, req, err in s.execute(
        select(
            TelemetryRecord.device_id,
            func.coalesce(func.sum(TelemetryRecord.requests), 0),
            func.coalesce(func.sum(TelemetryRecord.errors), 0),
        )
        .where(TelemetryRecord.kind == "inference", TelemetryRecord.at >= since)
        .group_by(TelemetryRecord.device_id)
    ):
        errs[dev_id] = (int(req or 0), int(err or 0))
    wanted = {r.device_id: r for r in s.scalars(select(DesiredState))}
    rows = []
    for dev in list_devices(s):
        req, err = errs.get(dev.id, (0, 0))
        rate = err / req if req else None
        sync = sync_view(dev, wanted.get(dev.id))
        health = "offline" if not dev.online else ("degraded" if rate and rate > 0.05 else "ok")
        if health == "ok" and not sync["in_sync"]:
            health = "out_of_sync"  # serving, but not what the controller wants there
        versions = {
            name: (info.get("version") if isinstance(info, dict) else info)
            for name, info in (dev.installed or {}).items()
        }
        rows.append(
            {
                "id": dev.id,
                "online": dev.online,
                "groups": dev.groups or [],
                "versions": versions,
                "requests_1h": req,
                "error_rate_1h": rate,
                "health": health,
                "sync": sync,
                "last_seen": dev.last_seen,
            }
        )
    return rows


@router.get("/", response_class=HTMLResponse)
def fleet(request: Request, s: Session = Depends(session)) -> Response:
    if (denied := _viewer(request)) is not None:
        return denied
    rows = fleet_rows(s)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    def sync_cell(v: dict[str, Any]) -> str:
        if not v["managed"]:
            return "-"
        if v["in_sync"]:
            return _badge("in_sync")
        rows = "<br>".join(
            escape(
                f"{d['model']}: desired {d['desired'] or 'removed'}, installed "
                f"{d['installed'] or 'none'}"
                + (" (local install)" if d.get("local") else "")
                + (" (rollback failed)" if d.get("rollback_failed") else "")
            )
            for d in v["models"]
        )
        since = v["since"]
        when = _ago(datetime.fromisoformat(since)) if since else "-"
        return f"{_badge('out_of_sync')} {rows}<br>since {escape(when)}"

    trs = "".join(
        f"<tr><td>{escape(r['id'])}</td><td>{_badge(r['health'])}</td>"
        f"<td>{escape(', '.join(f'{k} {v}' for k, v in r['versions'].items()) or '-')}</td>"
        f"<td class='sync'>{sync_cell(r['sync'])}</td>"
        f"<td>{escape(', '.join(r['groups']) or '-')}</td><td>{r['requests_1h']}</td>"
        f"<td>{pct(r['error_rate_1h'])}</td>"
        f"<td>{_ago(r['last_seen'])}</td></tr>"
        for r in rows
    )
    online = sum(1 for r in rows if r["online"])
    behind = sum(1 for r in rows if not r["sync"]["in_sync"])
    body = (
        f"<p>{len(rows)} devices, {online} online, {behind} out of sync with their desired "
        "state.</p><table id='devices'><tr><th>device</th>"
        "<th>health</th><th>versions</th><th>in sync</th><th>groups</th><th>requests (1 h)</th>"
        f"<th>errors (1 h)</th><th>last seen</th></tr>{trs}</table>"
    )
    return _page("Fleet", body, refresh=15)


# --- rollouts ---------------------------------------------------------------------------------


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts(request: Request, s: Session = Depends(session)) -> Response:
    if (denied := _viewer(request)) is not None:
        return denied
    from edgefleet.cloud_controller.rollout_views import detail, list_rollouts

    svc = controller(request).rollouts
    parts = []
    live = False
    for r in list_rollouts(s)[:50]:
        state = svc.get_state(r["id"])
        if state is None:
            continue
        d = detail(s, state)
        live = live or d["phase"] in ("running", "soaking")
        waves = []
        for i, pct in enumerate(d["waves"]):
            devs = [x for x in d["devices"] if x.get("wave") == i]
            done = sum(1 for x in devs if str(x.get("state")) == "succeeded")
            frac = done / len(devs) if devs else 0.0
            mark = " (current)" if i == d["wave"] and d["phase"] in ("running", "soaking") else ""
            waves.append(
                f"<tr><td>wave {i + 1}: {pct:g} %{mark}</td><td>{done}/{len(devs)}</td>"
                f'<td><span class="bar"><i style="width:{100 * frac:.0f}%"></i></span></td></tr>'
            )
        states: dict[str, int] = {}
        for x in d["devices"]:
            states[str(x.get("state"))] = states.get(str(x.get("state")), 0) + 1
        evs = "".join(f"<li>{escape(e['message'])}</li>" for e in d["events"][-8:])
        c = d["counts"]
        failed_back = [x for x in d["devices"] if x.get("rollback") == "failed"]
        rb = ""
        if c.get("rollback_requested"):
            rb = f"<p>rolled back {c['rolled_back']}/{c['rollback_requested']}</p>"
        if failed_back:
            rb += (
                f"<p class='rollback-failed'>{_badge('rollback_failed')} "
                f"{len(failed_back)} devices could not go back: "
                + escape(
                    "; ".join(
                        f"{x['device_id']} ({x.get('rollback_reason') or '-'})"
                        for x in failed_back[:20]
                    )
                )
                + "</p>"
            )
        parts.append(
            f"<section class='rollout' id='rollout-{escape(d['id'])}'><h2>{escape(d['model'])} "
            f"{escape(d['version'])} {_badge(d['phase'])}</h2>"
            f"<p>reason: {escape(str(d['reason'] or '-'))}; devices: "
            f"{escape(', '.join(f'{k} {v}' for k, v in sorted(states.items())) or '-')}</p>"
            f"{rb}<table>{''.join(waves)}</table>{_shadow_html(d.get('shadow'))}"
            f"<ul>{evs}</ul></section>"
        )
    body = "".join(parts) or "<p>No rollouts yet.</p>"
    return _page("Rollouts", body, refresh=5 if live else None)


def _shadow_html(sh: dict[str, Any] | None) -> str:
    """A rollout's shadow evidence: per judged wave, then per device (figures only)."""
    if not sh:
        return ""

    def num(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, int | float) else "-"

    head = (
        "<tr><th>wave / device</th><th>compared</th><th>agreement</th><th>serving p95 ms</th>"
        "<th>candidate p95 ms</th><th>p95 ratio</th><th>errors</th><th>verdict</th></tr>"
    )
    rows = [
        f"<tr><td>wave {int(w.get('wave', 0)) + 1}</td><td>{num(w.get('compared'))}</td>"
        f"<td>{num(w.get('agreement'))}</td><td>-</td><td>-</td><td>{num(w.get('p95_ratio'))}"
        f"</td><td>{num(w.get('candidate_errors'))}</td>"
        f"<td>{_badge(str(w.get('verdict')))}</td></tr>"
        for w in sh.get("waves", [])
    ]
    rows += [
        f"<tr><td>{escape(str(x.get('device_id')))}</td><td>{num(x.get('compared'))}</td>"
        f"<td>{num(x.get('agreement'))}</td><td>{num(x.get('serving_p95_ms'))}</td>"
        f"<td>{num(x.get('candidate_p95_ms'))}</td><td>{num(x.get('p95_ratio'))}</td>"
        f"<td>{num(x.get('candidate_errors'))}</td><td></td></tr>"
        for x in sh.get("devices", [])[:100]
    ]
    return f"<h3>shadow</h3><table class='shadow'>{head}{''.join(rows)}</table>"


# --- drift ------------------------------------------------------------------------------------


@router.get("/drift", response_class=HTMLResponse)
def drift_index(request: Request, s: Session = Depends(session)) -> Response:
    if (denied := _viewer(request)) is not None:
        return denied
    from edgefleet.cloud_controller.drift.models import SketchAggregate

    models = sorted(set(s.scalars(select(SketchAggregate.model).distinct())))
    items = "".join(
        f'<li><a href="/dashboard/drift/{escape(m)}">{escape(m)}</a></li>' for m in models
    )
    body = f"<ul>{items}</ul>" if items else "<p>No telemetry sketches yet.</p>"
    return _page("Drift", body)


def _drift_range_line(f: dict[str, Any]) -> str:
    """Out-of-range counts of a feature judged by the range test ('' where it is not)."""
    if f.get("p_range") is None:
        return ""
    bad = int(f.get("nan", 0)) + int(f.get("inf", 0))
    return (
        f"<div class='range'>outside the reference range: {int(f.get('below', 0))} below, "
        f"{int(f.get('above', 0))} above, {bad} NaN/inf of {int(f.get('range_checked', 0))}"
        f"</div>"
    )


def _drift_detects_line(f: dict[str, Any]) -> str:
    """What the reference can detect for this feature at the window's size."""
    d = f.get("detectability")
    if not d:
        return ""
    parts = []
    if d.get("min_shift_std") is not None:
        parts.append(f"a shift of {d['min_shift_std']:.2g} std")
    if d.get("min_out_of_range") is not None:
        parts.append(f"{d['min_out_of_range']:.1%} of values out of range")
    text = " or ".join(parts) if parts else ""
    note = f" ({d['note']})" if d.get("note") else ""
    return (
        f"<div class='detects'>detects with 80 % power at n={int(d.get('n', 0))}: "
        f"{escape(text or '-')}{escape(note)}</div>"
    )


@router.get("/drift/{model}", response_class=HTMLResponse)
def drift_page(
    request: Request,
    model: str,
    device: str | None = None,
    hours: float = 24.0,
    s: Session = Depends(session),
) -> Response:
    if (denied := _viewer(request)) is not None:
        return denied
    from edgefleet.cloud_controller.drift import analysis
    from edgefleet.cloud_controller.drift.api import drift_view

    view = drift_view(s, model, device=device, hours=hours)
    hist = analysis.history(s, model, scope="device" if device else "fleet", key=device or "*")
    where = f"device {device}" if device else "fleet"
    head = (
        f"<p id='status'>{escape(where)}, last {hours:g} h, n={view.get('n', 0)}, versions "
        f"{escape(', '.join(view.get('versions', [])) or '-')}: {_badge(view.get('status'))} "
        f"{escape(str(view.get('reason', '')))}</p>"
        f'<p class="legend"><span style="background:{svg.REFERENCE}"></span>reference'
        f'<span style="background:{svg.LIVE}"></span>live'
        f'<span style="background:{svg.DRIFT}"></span>drifted</p>'
    )
    timeline = svg.timeline(
        [(h["bucket_start"], float(h["max_psi"]), h["status"] == "drift") for h in hist],
        title="max PSI per bucket (red: drift decided)",
    )
    cards = []
    feats = sorted(view.get("features", []), key=lambda f: (not f["drifted"], f["p_adjusted"]))
    for f in feats:
        chart = svg.histogram(
            f.get("reference_counts") or [],
            f.get("live_counts"),
            svg.bin_labels(f.get("edges"), f.get("categories")),
            title=f["name"],
        )
        ks = "-" if f["ks"] is None else f"{f['ks']:.3f}"
        cls = "feature drifted" if f["drifted"] else "feature"
        cards.append(
            f"<div class='{cls}' data-feature='{escape(f['name'])}'>{chart}<div>"
            f"PSI {f['psi']:.3f} · JS {f['js']:.3f} · KS {ks} · p {f['p_adjusted']:.2g}"
            f"</div>{_drift_range_line(f)}{_drift_detects_line(f)}</div>"
        )
    evs = "".join(
        f"<tr><td>{escape(e['at'][:19])}</td><td>{escape(e['scope'])} {escape(e['scope_key'])}"
        f"</td><td>{escape(', '.join(e['features']))}</td><td>{escape(e['webhook']['state'])}"
        f"</td></tr>"
        for e in view.get("events", [])
    )
    warns = "".join(f"<li>{escape(str(w))}</li>" for w in view.get("reference_warnings") or [])
    if warns:
        head += f"<div id='reference-warnings'><b>Reference limits</b><ul>{warns}</ul></div>"
    body = (
        head
        + f"<h2>Statistic over time</h2>{timeline}"
        + f"<h2>Features</h2><div class='grid'>{''.join(cards)}</div>"
        + "<h2>Drift events</h2><table id='events'><tr><th>at</th><th>scope</th>"
        + f"<th>features</th><th>webhook</th></tr>{evs}</table>"
    )
    return _page(f"Drift: {model}", body, refresh=60)


# -- loop iterations (`edgefleet demo --loop` stores one JSON record per iteration) -----------
MAX_LOOP_RECORD_BYTES = 1024 * 1024


def _loop_records(request: Request) -> dict[int, dict[str, Any]]:
    """``<data dir>/loops/<N>.json`` by iteration; a file too large or not JSON is skipped."""
    out: dict[int, dict[str, Any]] = {}
    folder = controller(request).settings.data_dir / "loops"
    if not folder.is_dir():
        return out
    for path in folder.glob("*.json"):
        if not path.stem.isdigit() or path.stat().st_size > MAX_LOOP_RECORD_BYTES:
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("steps"), list):
            out[int(path.stem)] = doc
    return out


@router.get("/loops", response_class=HTMLResponse)
def loops_index(request: Request) -> Response:
    if (denied := _viewer(request)) is not None:
        return denied
    recs = _loop_records(request)
    items = "".join(
        f'<li><a href="/dashboard/loops/{n}">iteration {n}</a>: '
        f"{escape(str(recs[n].get('state', 'running')))}</li>"
        for n in sorted(recs)
    )
    body = (
        f"<ul>{items}</ul>" if items else "<p>No loop iterations yet (edgefleet demo --loop).</p>"
    )
    return _page("Loop iterations", body)


@router.get("/loops/{n}", response_class=HTMLResponse)
def loop_page(request: Request, n: int) -> Response:
    if (denied := _viewer(request)) is not None:
        return denied
    doc = _loop_records(request).get(n)
    if doc is None:
        resp = _page("Loop iteration", f"<p>No loop iteration {n}.</p>")
        resp.status_code = 404
        return resp
    rows = "".join(
        f"<tr><td>{escape(str(st.get('step')))}</td><td>{escape(str(st.get('title')))}</td>"
        f"<td>{escape(str(st.get('at')))}</td><td>{escape(str(st.get('t_s')))}</td>"
        "<td>"
        + "<br>".join(
            f"{escape(str(k))}: {escape(json.dumps(v))}"
            for k, v in dict(st.get("figures") or {}).items()
        )
        + "</td></tr>"
        for st in doc["steps"]
        if isinstance(st, dict)
    )
    summary = (
        f"<p>state after: {escape(str(doc.get('state', 'running')))} · loop "
        f"{escape(str(doc.get('loop_s', '-')))} s · version {escape(str(doc.get('version', '-')))}</p>"
    )
    body = (
        summary + "<table id='steps'><tr><th>step</th><th>what</th><th>at</th><th>t (s)</th>"
        f"<th>figures</th></tr>{rows}</table>"
    )
    return _page(f"Loop iteration {n}", body, refresh=None if "state" in doc else 5)
