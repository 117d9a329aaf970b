"""The controller's command line against a real server."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.cloud_controller import rollout_engine as E
from tests.controller.conftest import Running
from tests.controller.test_api import presence


def run(ctl: Running, *args: str, token: str | None = None) -> tuple[int, str]:
    env = {"EDGEFLEET_URL": ctl.url, "EDGEFLEET_TOKEN": token or ctl.admin, "COLUMNS": "200"}
    res = CliRunner().invoke(app, list(args), env=env)
    return res.exit_code, res.output


def test_token_create_writes_a_working_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    res = CliRunner().invoke(
        app, ["controller", "token", "create", "--role", "viewer", "--db", url]
    )
    assert res.exit_code == 0, res.output
    token = res.output.strip().splitlines()[-1]
    assert token.startswith("eft_")
    from edgefleet.cloud_controller import auth, db

    engine = db.make_engine(url)
    with db.session_factory(engine)() as s:
        row = auth.lookup_token(s, token)
        assert row is not None and row.role == "viewer"
    engine.dispose()
    bad = CliRunner().invoke(app, ["controller", "token", "create", "--role", "root", "--db", url])
    assert bad.exit_code == 2 and "invalid_role" in bad.output


def test_packages_devices_and_rollout_commands(
    controller: Running, packages: dict[str, Path]
) -> None:
    code, out = run(controller, "packages", "upload", str(packages["1.0.0/cpu-x86_64"]),
                    str(packages["2.0.0/cpu-x86_64"]))  # fmt: skip
    assert code == 0 and out.count("uploaded:") == 2, out
    code, out = run(controller, "packages", "list", "--json")
    assert code == 0 and {p["version"] for p in json.loads(out)} == {"1.0.0", "2.0.0"}
    code, out = run(controller, "packages", "upload", str(packages["1.0.0/cpu-x86_64"]),
                    token=controller.tokens["viewer"])  # fmt: skip
    assert code == 1 and "403 forbidden" in out
    code, out = run(controller, "devices", "register", "cli-1", "--group", "lab", "--tag", "t")
    assert code == 0 and json.loads(out)["mqtt_username"] == "cli-1"
    for i in range(1, 5):
        presence(controller, f"cli-{i}", ["cpu-x86_64"], installed="1.0.0")
    code, out = run(controller, "devices", "list")
    assert code == 0 and "cli-4" in out and "iris=1.0.0" in out
    code, out = run(controller, "devices", "show", "cli-1")
    assert code == 0 and json.loads(out)["groups"] == ["lab"]
    code, out = run(
        controller, "rollout", "create", "iris", "2.0.0",
        "--device", "cli-1", "--device", "cli-2", "--device", "cli-3", "--device", "cli-4",
        "--waves", "50,100", "--approve-before", "2", "--seed", "4", "--json",
    )  # fmt: skip
    assert code == 0, out
    ro = json.loads(out)
    rid = ro["id"]
    assert ro["wave_sizes"] == [2, 2] and ro["spec"]["approval_waves"] == [1]
    svc = controller.controller.rollouts
    moved = [d for d, p in svc.get_state(rid).devices.items() if p.state == "in_progress"]
    svc.on_status([("iris", E.StatusReport(d, "2.0.0", "COMMITTED")) for d in moved])
    code, out = run(controller, "rollout", "show", rid)
    assert code == 0 and "awaiting_approval" in out and "waiting for approval" in out
    code, out = run(controller, "rollout", "pause", rid)
    assert code == 0 and "(paused)" in out
    assert run(controller, "rollout", "resume", rid)[0] == 0
    code, out = run(controller, "rollout", "approve", rid)
    assert code == 0 and "running" in out
    code, out = run(controller, "rollout", "list")
    assert code == 0 and rid in out
    code, out = run(controller, "rollout", "cancel", rid, "--rollback")
    assert code == 0 and "cancelled" in out
    code, out = run(controller, "rollout", "approve", rid)
    assert code == 1 and "409 finished" in out
    code, out = run(controller, "rollout", "show", rid, "--json")
    shown = json.loads(out)
    assert shown["phase"] == "cancelled" and shown["counts"]["rollback_requested"] == 4
    code, out = run(controller, "controller", "audit", "--json")
    actions = [(e["action"], e["outcome"]) for e in json.loads(out)]
    assert ("POST /api/v1/rollouts/{rollout_id}/{action}", 409) in actions
    assert ("POST /api/v1/rollouts", 201) in actions


def test_unreachable_controller_names_the_reason() -> None:
    res = CliRunner().invoke(
        app, ["devices", "list", "--url", "http://127.0.0.1:9", "--token", "x"]
    )
    assert res.exit_code == 2 and "cannot reach" in res.output
