"""Shadow rollouts through the real controller: the CLI's options, the signed desired state's
``shadow`` entry, re-issued without it on promotion, and the evidence in `rollout show`, the
JSON API and the dashboard."""

from __future__ import annotations

import json
from pathlib import Path

from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.models import DesiredState
from edgefleet.wire.mqtt import verify_desired
from edgefleet.wire.shadow import ShadowCounts, ShadowFigures, parse_spec
from tests.controller.conftest import Running
from tests.controller.test_api import presence
from tests.controller.test_cli import run


def _entry(ctl: Running, dev: str) -> dict[str, object]:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    with ctl.client("viewer") as v:
        pem = v.get("/api/v1/keys/controller").json()["pem"].encode()
    with ctl.controller.factory() as s:
        row = s.get(DesiredState, dev)
        assert row is not None
        state = verify_desired(
            row.envelope, [load_pem_public_key(pem)], device_id=dev, last_seq=None
        )  # type: ignore[list-item]
    return dict(state["models"]["iris"])


def _figures(compared: int, agreed: int) -> dict[str, object]:
    return ShadowFigures(
        1, ShadowCounts(compared, agreed), ShadowCounts(compared, agreed), 0.2, 0.2, 0.2, 0.25
    ).to_dict()


def test_shadow_rollout_from_the_cli_to_the_dashboard(
    controller: Running, packages: dict[str, Path]
) -> None:
    assert run(controller, "packages", "upload", str(packages["2.0.0/cpu-x86_64"]))[0] == 0
    for i in (1, 2):
        presence(controller, f"sh-{i}", ["cpu-x86_64"], installed="1.0.0")
    code, out = run(
        controller, "rollout", "create", "iris", "2.0.0", "--device", "sh-1", "--device", "sh-2",
        "--waves", "100", "--shadow", "--shadow-requests", "40", "--shadow-min-agreement",
        "0.95", "--shadow-max-p95-ratio", "1.4", "--shadow-sample", "0.5", "--json",
    )  # fmt: skip
    assert code == 0, out
    ro = json.loads(out)
    rid = ro["id"]
    assert ro["spec"]["shadow"]["requests"] == 40 and ro["spec"]["shadow"]["sample"] == 0.5
    for dev in ("sh-1", "sh-2"):
        spec = parse_spec(_entry(controller, dev)["shadow"])
        assert spec is not None and spec.requests == 40 and spec.sample == 0.5
    svc = controller.controller.rollouts
    svc.on_status([("iris", E.ShadowReport("sh-1", "2.0.0", _figures(50, 50), rid))])
    assert "shadow" in _entry(controller, "sh-2")  # not judged: sh-2 has no figures yet
    svc.on_status([("iris", E.ShadowReport("sh-2", "2.0.0", _figures(41, 40), rid))])
    for dev in ("sh-1", "sh-2"):  # promoted: the same release, without shadow
        entry = _entry(controller, dev)
        assert entry["version"] == "2.0.0" and "shadow" not in entry
    code, out = run(controller, "rollout", "show", rid)
    assert code == 0 and "shadow" in out and "promoted" in out and "sh-2" in out, out
    with controller.client("viewer") as v:
        shown = v.get(f"/api/v1/rollouts/{rid}").json()
        page = v.get("/dashboard/rollouts").text
    (wave,) = shown["shadow"]["waves"]
    assert wave["verdict"] == "promoted" and wave["compared"] == 91 and wave["agreed"] == 90
    assert {d["device_id"]: d["p95_ratio"] for d in shown["shadow"]["devices"]} == {
        "sh-1": 1.25,
        "sh-2": 1.25,
    }
    assert "<h3>shadow</h3>" in page and "promoted" in page
    code, out = run(
        controller, "rollout", "create", "iris", "2.0.0", "--device", "sh-1",
        "--shadow", "--shadow-min-agreement", "2",
    )  # fmt: skip
    assert code != 0 and "min_agreement" in out
