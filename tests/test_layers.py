"""The engine's layers: no import circle, and no module-level import from a lower floor to a higher one.

Floors from the ground up: core, tools, store and fs, fetch, linux and provenance, tasks, cli. An import inside a
function (a lazy import, e.g. a tool version probed only when a key is computed) is not a layering edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "src" / "eulerbake"
FLOORS = {"core": 0, "tools": 1, "store": 2, "fs": 2, "fetch": 3, "linux": 3, "provenance": 3, "tasks": 4, "cli": 5}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Engine modules imported at module level (TYPE_CHECKING blocks excluded)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
    return {name for name in found if name.startswith("eulerbake.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in ENGINE.rglob("*.py")}
    return {name: {dep for dep in _top_level_imports(path) if dep in modules and dep != name}
            for name, path in modules.items()}


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 2 else None


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, "import circle: " + " → ".join([*stack, name, dep])
            if dep not in state:
                visit(dep, [*stack, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_import_from_a_lower_floor_to_a_higher_one() -> None:
    wrong = []
    for name, deps in _graph().items():
        here = _floor(name)
        for dep in deps:
            there = _floor(dep)
            if here is not None and there is not None and there > here:
                wrong.append(f"{name} (floor {here}) imports {dep} (floor {there})")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_engine_package_has_a_floor() -> None:
    packages = {path.name for path in ENGINE.iterdir() if path.is_dir() and (path / "__init__.py").is_file()}
    assert packages <= set(FLOORS), f"give {sorted(packages - set(FLOORS))} a floor in FLOORS"
