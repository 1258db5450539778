"""The package's layout is its dependency graph: imports only point down.

    platform.cli -> platform.apps -> platform.control -> platform.jobs -> actors
        -> analysis -> capture, sae, proto, storage -> config, errors

dashboard/ reads storage/ and the configuration only; capture/, sae/, analysis/ and
storage/ never import ray. Checked on the source (every import statement, at module
level or inside a function), so a violation fails here before it hides in a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import featurewatch

PACKAGE = Path(featurewatch.__file__).parent

BOTTOM = {"errors", "config", "data"}
CORE = {"capture", "sae", "proto", "storage"}
# Each room and the rooms it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "data": set(),
    "platform": set(),  # its __init__ only
    "config": {"errors"},
    "proto": {"errors"},
    "sae": {"errors"},
    "capture": {"errors", "proto"},
    "storage": BOTTOM,
    "analysis": BOTTOM | CORE,
    "actors": BOTTOM | CORE | {"analysis"},
    "platform.jobs": BOTTOM | CORE | {"analysis", "actors"},
    "platform.control": BOTTOM | CORE | {"analysis", "actors", "platform.jobs"},
    "platform.apps": BOTTOM | CORE | {"analysis", "actors", "platform.jobs", "platform.control"},
    "dashboard": BOTTOM | {"storage"},
}
ALLOWED["platform.cli"] = set(ALLOWED) - {"platform.cli"}
NO_RAY = {"capture", "sae", "analysis", "storage", "proto", "config", "errors", "dashboard"}


def room(module: str) -> str:
    """'featurewatch.platform.jobs.gather' -> 'platform.jobs'; 'featurewatch.config' -> 'config'."""
    parts = module.split(".")[1:]
    if parts[0] == "platform":
        return ".".join(parts[:2])
    return parts[0]


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1 and not path.name.endswith("_pb2_grpc.py"):
            found.append((".".join(parts), path))
    return found


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    out = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((node.lineno, name))
            if name == "featurewatch":  # `from featurewatch import sae` names a room
                out += [
                    (node.lineno, f"featurewatch.{a.name}")
                    for a in node.names
                    if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file()
                ]
    return out


def violations(checked: list[tuple[str, Path]]) -> list[str]:
    found = []
    for module, path in checked:
        mine = room(module)
        for line, name in imports_of(path, module):
            where = f"{module}:{line}"
            if name.split(".")[0] == "ray" and mine in NO_RAY:
                found.append(f"{where}: {mine}/ imports ray")
            if not name.startswith("featurewatch.") or name.count(".") < 1:
                continue
            target = room(name)
            if target != mine and target not in ALLOWED[mine]:
                found.append(f"{where}: {mine} imports {name} (a room above it)")
    return found


def test_every_module_belongs_to_a_room():
    rooms = {room(m) for m, _ in modules()}
    assert rooms <= set(ALLOWED), rooms - set(ALLOWED)


def test_imports_only_point_down():
    assert violations(modules()) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("featurewatch.storage.x", "from featurewatch.actors import runtime", "storage imports"),
        ("featurewatch.dashboard.x", "import featurewatch.platform.cli", "dashboard imports"),
        ("featurewatch.sae.x", "import ray", "sae/ imports ray"),
        ("featurewatch.analysis.x", "def f():\n    from ray import serve", "analysis/ imports ray"),
        ("featurewatch.actors.x", "from ..platform.jobs import gather", "actors imports"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, module, source, expected):
    """The checker itself: a planted upward import (or ray in a Ray-free room) is found."""
    planted = tmp_path / "featurewatch" / Path(*module.split(".")[1:-1]) / "x.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(source + "\n")
    found = violations([(module, planted)])
    assert len(found) == 1 and expected in found[0], found


def test_imports_are_at_module_level():
    """A module's imports are its dependency graph: none hides inside a function (the CLI
    loads command modules with importlib instead, see platform/cli/__init__.py)."""
    hidden = []
    for module, path in modules():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                hidden += [
                    f"{module}:{node.lineno}"
                    for node in ast.walk(func)
                    if isinstance(node, ast.Import | ast.ImportFrom)
                ]
    assert hidden == []
