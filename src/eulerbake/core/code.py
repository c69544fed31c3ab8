"""Which source files a builder's output depends on: its module and the project modules it imports.

A key covers the builder's own module and, transitively, every module of the same project (the
engine, `eulerbake.*`, and the builder's own top-level package, e.g. `recipes.*`) that it imports, found
by reading the import statements, never listed by hand. So a change in the sample wiring does not
rebuild a release stage that never imports it, and a change in `tools/run.py` (say, the clean
environment) rebuilds every stage whose code reaches it. Imports inside functions count too.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

from eulerbake.core import hashing
from eulerbake.core.errors import EulerbakeError

# Not part of any key, and their imports not followed: failure messages never reach an output (a failed
# build commits nothing), and the node model itself (how keys are made, BuildContext) is versioned by
# `ENGINE_ABI` in core/derivation.py, bumped whenever a change there could change a builder's output; the
# tool → package table only names packages in messages (tool versions are in each key's `tools`).
NEUTRAL_MODULES = frozenset({"eulerbake.core.errors", "eulerbake.core.derivation", "eulerbake.core.code",
                             "eulerbake.core.publication", "eulerbake.tools.packages"})
_IMPORT_RE = re.compile(
    r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import[ \t]+(?:\(([^)]*)\)|([^\n#]*))|import[ \t]+([\w., \t]+))", re.M
)


@cache
def _package_dir(top: str) -> Path | None:
    """The directory of top-level package `top` (found once; submodules are then plain path joins)."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def module_file(name: str) -> Path | None:
    """The source file of module `name` (under a package found on sys.path), or None."""
    top, _, rest = name.partition(".")
    folder = _package_dir(top)
    if folder is None:
        return None
    base = folder.joinpath(*rest.split(".")) if rest else folder
    for candidate in (base.with_suffix(".py") if rest else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _is_module(name: str) -> bool:
    return module_file(name) is not None


def imported_modules(source: str, roots: frozenset[str], package: str) -> set[str]:
    """Modules under `roots` that `source` (of a module in `package`) imports, anywhere in the file."""
    found: set[str] = set()
    for match in _IMPORT_RE.finditer(source):
        base, parenthesised, names, plain = match.groups()
        names = re.sub(r"#[^\n]*", "", parenthesised) if parenthesised is not None else names
        if plain is not None:
            candidates = [part.split()[0] for part in plain.split(",") if part.strip()]
        else:
            if base.startswith("."):  # relative import
                dots = len(base) - len(base.lstrip("."))
                anchor = package.rsplit(".", dots - 1)[0] if dots > 1 else package
                base = f"{anchor}.{base.lstrip('.')}".rstrip(".")
            candidates = [base]
            for name in (names or "").split(","):
                leaf = name.strip().split(" ")[0]
                if leaf and leaf != "*" and _is_module(f"{base}.{leaf}"):
                    candidates.append(f"{base}.{leaf}")
            if len(candidates) > 1 and module_file(base) and module_file(base).name == "__init__.py":  # type: ignore[union-attr]
                candidates.remove(base)  # `from pkg import mod`: the module, not the package's __init__
        found.update(c for c in candidates if c.split(".")[0] in roots)
    return found


@cache
def _closure(module: str, roots: frozenset[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    stack = [module]
    while stack:
        name = stack.pop()
        if name in seen or (name in NEUTRAL_MODULES and name != module):
            continue
        path = module_file(name)
        if path is None:
            continue
        seen.add(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        stack.extend(imported_modules(path.read_text(), roots, package) - seen)
    return tuple(sorted(seen))


def code_identity(module: str) -> dict[str, str]:
    """{module name: blake3 of its source} for `module` and the project modules it imports, transitively."""
    roots = frozenset({"eulerbake", module.split(".")[0]})
    if module_file(module) is None:
        raise EulerbakeError(f"cannot find the source of module {module}", hint="builders must live in .py modules")
    result = {}
    for name in _closure(module, roots):
        path = module_file(name)
        assert path is not None
        result[name] = hashing.hash_file(path)
    return result
