"""What an idle agent loads: the serving runtime, not the verification stack or other components.

Verification (tar reading, signatures, cryptography's native code: about 8 MB resident) is
imported by the update step that needs it, so an agent with nothing to update stays small
(`python -m bench agent` measures the resident size against its 80 MB goal).
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = "import json, sys\nimport edgefleet.agent.runtime\nprint(json.dumps(sorted(sys.modules)))\n"


def test_agent_runtime_loads_no_verification_stack_and_no_other_component() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    loaded = set(json.loads(out))
    tops = {m.split(".")[0] for m in loaded}
    assert tops.isdisjoint({"cryptography", "tarfile", "fastapi", "sqlalchemy", "onnx", "torch"})
    assert not {
        m for m in loaded if m.startswith(("edgefleet.wire.trust", "edgefleet.wire.package"))
    }
    assert not {
        m for m in loaded if m.startswith(("edgefleet.cloud_controller", "edgefleet.packager"))
    }
    assert "edgefleet.agent.update.worker" in loaded  # the probe did load the agent
