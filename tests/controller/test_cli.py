"""The controller's command line against a real server."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.cli.client import Exit
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
    assert res.exit_code == Exit.UNREACHABLE == 4 and "cannot reach" in res.output


def test_scripts_get_distinct_exit_codes_whole_ids_and_no_silent_requests(
    controller: Running, packages: dict[str, Path]
) -> None:
    long_id = "gateway-" + "x" * 70 + "-0001"
    code, _ = run(controller, "packages", "upload", str(packages["2.0.0/cpu-x86_64"]))
    assert code == 0
    code, out = run(controller, "devices", "register", long_id)
    assert code == 0, out
    # registering it again would silently cut off the running device: refused unless asked
    code, out = run(controller, "devices", "register", long_id)
    assert code == Exit.REFUSED and "409 device_exists" in out
    code, out = run(controller, "devices", "register", long_id, "--rotate-credentials")
    assert code == 0 and json.loads(out)["mqtt_password"]
    presence(controller, long_id, ["cpu-x86_64"], installed="1.0.0")
    presence(controller, "gw-2", ["cpu-x86_64"], installed="1.0.0")
    # three waves for two devices: the empty one is not planned
    code, out = run(
        controller, "rollout", "create", "iris", "2.0.0", "--device", long_id,
        "--device", "gw-2", "--waves", "5,25,100", "--seed", "1", "--json",
    )  # fmt: skip
    assert code == 0, out
    ro = json.loads(out)
    assert ro["wave_sizes"] == [1, 1] and ro["waves"] == [5, 25]
    assert ro["spec"]["on_abort"] == "halt" and ro["spec"]["abort_min_finished"] is None
    rid = ro["id"]
    # not a terminal (CliRunner): nothing is cut to the width of one, even without COLUMNS
    res = CliRunner().invoke(
        app, ["devices", "list"], env={"EDGEFLEET_URL": controller.url,
                                       "EDGEFLEET_TOKEN": controller.admin},
    )  # fmt: skip
    assert res.exit_code == 0
    assert any(long_id in ln for ln in res.output.splitlines())  # whole, on one line
    state = controller.controller.rollouts.get_state(rid)
    (moved,) = [d for d, p in state.devices.items() if p.state == "in_progress"]
    line = next(ln for ln in res.output.splitlines() if moved in ln)
    assert "no: iris 1.0.0≠2.0.0 since" in line  # desired vs installed, on the device's line
    code, out = run(controller, "rollout", "list")
    assert code == 0 and rid in out
    # unique prefixes, --json everywhere, an approve with nothing to approve is an error
    code, out = run(controller, "rollout", "show", rid[:6], "--json")
    assert code == 0 and json.loads(out)["id"] == rid
    code, out = run(controller, "rollout", "approve", rid[:6])
    assert code == Exit.REFUSED and "nothing_to_approve" in out
    code, out = run(controller, "rollout", "show", "no-such-rollout")
    assert code == Exit.REFUSED and "404" in out
    # --watch gives up after --watch-timeout with its own code; a bad option is a usage error
    code, out = run(controller, "rollout", "show", rid, "--watch", "--watch-timeout", "0.5")
    assert code == Exit.NOT_FINISHED, out
    code, out = run(controller, "rollout", "abort", rid, "--on-abort", "explode")
    assert code == Exit.USAGE
    code, out = run(controller, "rollout", "abort", rid, "--json")
    assert code == 0 and json.loads(out)["phase"] == "aborted"
    code, out = run(controller, "rollout", "show", rid, "--watch", "--watch-timeout", "5")
    assert code == Exit.FAILED, out
    code, out = run(controller, "rollout", "--help")
    assert "Exit codes" in out and "4 controller unreachable" in out


def test_serve_refuses_a_switch_interval_it_cannot_use(tmp_path: Path) -> None:
    """`EDGEFLEET_CONTROLLER_SWITCH_INTERVAL_MS` (docs/scale.md) is checked before anything
    starts: 0 would make the interpreter refuse it, a huge one starve paho's thread."""
    for bad in ("0", "-1", "500"):
        env = {"EDGEFLEET_CONTROLLER_SWITCH_INTERVAL_MS": bad, "COLUMNS": "200"}
        res = CliRunner().invoke(
            app, ["controller", "serve", "--data-dir", str(tmp_path / "ctl")], env=env
        )
        assert res.exit_code == 2, res.output
        assert "SWITCH_INTERVAL_MS" in res.output and "at most 100" in res.output, res.output
