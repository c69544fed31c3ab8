"""A project: a directory with `recipes/` (the derivation graph) and `dodo.py`, plus its store.

The recipes package must offer `targets()` (every derivation the project knows, used by `doit list`
and `gc`) and `default_targets()` (what a bare `doit` builds).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

from eulerbake.core.derivation import Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store, default_store_root
from eulerbake.store.substituters import CacheSettings, caches_for
from eulerbake.tasks.glue import doit_config, task_dict, unique_nodes


def find_project(start: Path | None = None) -> Path:
    """`EULERBAKE_PROJECT`, or the nearest directory at or above `start` holding `recipes/__init__.py`."""
    env = os.environ.get("EULERBAKE_PROJECT")
    if env:
        return Path(env).absolute()
    here = (start or Path.cwd()).absolute()
    for candidate in (here, *here.parents):
        if (candidate / "recipes" / "__init__.py").is_file():
            return candidate
    raise EulerbakeError(
        f"no eulerbake project found at or above {here}",
        hint="run from the repository root (the directory holding recipes/ and dodo.py) or set EULERBAKE_PROJECT",
    )


@contextmanager
def graph_errors() -> Iterator[None]:
    """A user error while the graph loads (bad lock file, bad recipe parameter) is one message and exit 2.

    doit would print a traceback for any exception raised while it loads tasks; SystemExit passes through.
    """
    try:
        yield
    except EulerbakeError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None


class Project:
    """The recipes of one project directory and the store they build into."""

    def __init__(self, root: Path, store: Store | None = None) -> None:
        self.root = root.absolute()
        with graph_errors():  # a bad [tool.eulerbake] is one message, like a bad recipe
            self.cache_settings = CacheSettings.load(self.root)
            self.store = store or Store(default_store_root(self.root), substituters=caches_for(self.cache_settings))

    @cached_property
    def recipes(self) -> ModuleType:
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        module = importlib.import_module("recipes")
        if not Path(module.__file__ or "").is_relative_to(self.root):
            raise EulerbakeError(f"imported recipes from {module.__file__}, not from {self.root}")
        return module

    @cached_property
    def targets(self) -> list[Node]:
        self.store.open_stat_cache()
        return list(self.recipes.targets())

    @cached_property
    def default_targets(self) -> list[Node]:
        self.store.open_stat_cache()
        return list(self.recipes.default_targets())

    @cached_property
    def nodes(self) -> list[Node]:
        return unique_nodes(self.targets + self.default_targets)

    def node(self, task_name: str) -> Node:
        for node in self.nodes:
            if node.task_name == task_name:
                return node
        raise EulerbakeError(f"no task named {task_name!r}", hint="see `doit list --all` for the task names")

    def doit_config(self) -> dict[str, Any]:
        with graph_errors():
            return doit_config(self.store, [node.task_name for node in self.default_targets])

    def task_dicts(self, requested: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Group tasks (one per stage) first, then one task per node.

        With caches configured and a doit command that runs tasks, the tasks are planned (see
        `tasks.planning`): `requested` are the command line's task names (the eulerbake CLI passes them;
        under plain `doit` they are read from sys.argv).
        """
        with graph_errors():
            yield from self._task_dicts(requested)

    def _task_dicts(self, requested: list[str] | None = None) -> Iterator[dict[str, Any]]:
        dicts = [task_dict(node, self.store) for node in self.nodes]
        if self.store.substituters:
            from eulerbake.tasks import planning

            if requested is None and Path(sys.argv[0]).name in ("doit", "__main__.py") and "doit" in sys.argv[0]:
                requested = planning.requested_tasks(sys.argv[1:])
            if requested is not None:
                dicts = planning.plan_dicts(self, dicts, self.cache_settings, requested)
        stage_docs: dict[str, str] = {}
        for node, entry in zip(self.nodes, dicts, strict=True):
            if entry["basename"] not in stage_docs:
                stage_docs[entry["basename"]] = stage_doc(node, entry["basename"])
        for stage, doc in stage_docs.items():
            yield {"basename": stage, "name": None, "doc": doc}
        yield from dicts


def stage_doc(node: Node, stage: str) -> str:
    """What a stage's group task does (`doit list`): its module's first sentence, not one task's text.

    The module is the builder's (a derivation) or the publisher's (a publication); a stage's module starts
    "Stage `x`: …" (STYLE: one module per stage), which is cut off.
    """
    if node.kind == "fixed-output":
        return "fetch pinned sources (size, sha256 and blake3 verified)"
    owner = getattr(node, "builder", None) or getattr(node, "publisher", None)
    module = sys.modules.get(getattr(owner, "__module__", "") or type(owner).__module__)
    text = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split()) if module is not None else ""
    for prefix in (f"Stage `{stage}`: ", f"Publication `{stage}`: "):
        text = text.removeprefix(prefix)
    sentence = text.split(". ")[0].rstrip(".")
    if not sentence:
        return f"every {stage} task"
    return sentence if len(sentence) <= 110 else sentence[:107].rstrip() + "…"
