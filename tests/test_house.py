"""The house: one installed import name, and extras that hold what each component imports.

The wheel is built from a copy of the checkout (tracked and untracked-not-ignored files, links
kept as links), installed into a folder of its own, and imported from a directory where the
checkout is not on ``sys.path``: what a user's ``pip install edgefleet`` gets.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("agent", "packager", "cloud_controller")
# The card's folders at the repository root, and the names they are installed under.
CARD_FOLDERS = (*COMPONENTS, "hardware_profiles")


def _checkout_copy(dest: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        rel = raw.decode()
        src, dst = ROOT / rel, dest / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, not yet in the index
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = _checkout_copy(work / "src")
    out = work / "dist"
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))
    (path,) = out.glob("edgefleet-*.whl")
    return path


def test_wheel_installs_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level_txt = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        declared = z.read(top_level_txt).decode().split()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"edgefleet"}
    assert declared == ["edgefleet"]
    # The card's folders are inside it, with their data.
    for folder in CARD_FOLDERS:
        assert f"edgefleet/{folder}/__init__.py" in names, folder
    assert "edgefleet/hardware_profiles/cpu-x86_64.toml" in names
    assert any(n.startswith("edgefleet/cloud_controller/migrations/versions/") for n in names)
    assert "edgefleet/py.typed" in names


def test_installed_wheel_imports_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    _pip("install", "--no-deps", "--no-compile", "--target", str(target), str(wheel))
    probe = (
        "import importlib, importlib.util, sys\n"
        "import edgefleet.agent.runtime, edgefleet.cloud_controller.app, edgefleet.packager.pipeline\n"
        "import edgefleet.hardware_profiles\n"
        f"assert edgefleet.__file__.startswith({str(target)!r}), edgefleet.__file__\n"
        f"bare = [n for n in {CARD_FOLDERS!r} if importlib.util.find_spec(n) is not None]\n"
        "assert not bare, bare\n"
        "print('ok')\n"
    )
    # The editable install of the checkout is on the venv's path: run isolated from site
    # hooks (-S) with the installed wheel and the venv's third-party packages only.
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join([str(target), *site_packages]),
    }
    r = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


# --- extras hold what each component imports -------------------------------------------------

# Distribution name -> the import name it provides, where they differ.
_IMPORT_NAME = {
    "paho-mqtt": "paho",
    "prometheus-client": "prometheus_client",
    "onnxconverter-common": "onnxconverter_common",
    "scikit-learn": "sklearn",
    "psycopg": "psycopg",
    "sqlalchemy": "sqlalchemy",
    "scikit-image": "skimage",
    "amd-quark": "quark",
    "nats-py": "nats",
}
# Optional parts of a component, each behind its own extra: the component may import them too.
_OPTIONAL_EXTRAS = {"packager": ("zoo", "zoo-vad", "nncf", "quark", "aimet")}
# Needed at run time by a library the component uses, never imported by edgefleet itself.
_RUNTIME_ONLY = {"packager": {"sympy"}, "cloud_controller": {"psycopg"}}


def _dist_name(requirement: str) -> str:
    m = re.match(r"[A-Za-z0-9_.\-]+", requirement)
    assert m, requirement
    return m.group(0).lower()


def _imports(dists: list[str]) -> set[str]:
    return {_IMPORT_NAME.get(d, d.replace("-", "_")) for d in dists}


def _extra(name: str, project: dict[str, object]) -> list[str]:
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict)
    return [_dist_name(r) for r in extras[name] if not r.startswith("edgefleet")]


def _third_party_imports(graph: grimp.ImportGraph, package: str) -> set[str]:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    found: set[str] = set()
    for module in graph.find_descendants(package) | {package}:
        for imported in graph.find_modules_directly_imported_by(module):
            top = imported.split(".")[0]
            if top != "edgefleet" and top not in stdlib:
                found.add(top)
    return found


@pytest.fixture(scope="module")
def project() -> dict[str, object]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # What runs: imports under `if TYPE_CHECKING:` (typeshed's, say) need no distribution.
    # No cache: a cached graph from an earlier checkout would hide what the tree imports now.
    return grimp.build_graph(
        "edgefleet",
        include_external_packages=True,
        exclude_type_checking_imports=True,
        cache_dir=None,
    )


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_extra_holds_what_its_component_imports(
    component: str, project: dict[str, object], graph: grimp.ImportGraph
) -> None:
    core = _imports([_dist_name(r) for r in project["dependencies"]])  # type: ignore[attr-defined]
    extra = _imports(_extra(component.split("_")[-1], project))
    used = _third_party_imports(graph, f"edgefleet.{component}")
    optional = set().union(
        *(_imports(_extra(e, project)) for e in _OPTIONAL_EXTRAS.get(component, ()))
    )
    assert used - core - extra - optional == set(), "imported but not declared"
    assert extra - used - _RUNTIME_ONLY.get(component, set()) == set(), "declared, never imported"


def test_core_needs_only_the_core_dependencies(
    project: dict[str, object], graph: grimp.ImportGraph
) -> None:
    core = _imports([_dist_name(r) for r in project["dependencies"]])  # type: ignore[attr-defined]
    for package in ("edgefleet.wire", "edgefleet.drift", "edgefleet.keys"):
        assert _third_party_imports(graph, package) <= core, package


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle between modules (the agent's admin/runtime, the MQTT link and its port,
    the controller's app/deps had one each): every strongly connected component is one module."""
    graph = grimp.build_graph("edgefleet", exclude_type_checking_imports=True, cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = [stack.pop()]
            while component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert cycles == []
