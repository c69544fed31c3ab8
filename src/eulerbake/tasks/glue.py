"""Turn a derivation graph into doit tasks: one task per derivation, `uptodate` answered by the store.

A doit user recognises every field: `actions` realise the derivation in the store, `uptodate` asks
the store whether the derivation's key is already there, `file_dep` lists the local files that feed
the key (checked with blake3, see `Blake3Checker`), `task_dep` follows the graph, `clean` removes the
task's store entry. Keys are computed from hashes taken when the tasks are loaded, before anything
runs, and the store re-checks local inputs after a build (doit records file_dep state only after the
action, so an input edited during a build would otherwise be recorded as current).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doit.action import TaskFailed
from doit.dependency import FileChangedChecker

from eulerbake.core import hashing
from eulerbake.core.derivation import Node, walk
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store


class Blake3Checker(FileChangedChecker):  # type: ignore[misc]
    """doit file_dep checker: (mtime, size, blake3); content decides when the mtime moved."""

    def check_modified(self, file_path: str, file_stat: os.stat_result, state: Any) -> bool:
        if not isinstance(state, (list, tuple)) or len(state) != 3:
            return True
        mtime, size, digest = state
        if file_stat.st_mtime == mtime and file_stat.st_size == size:
            return False
        if file_stat.st_size != size:
            return True
        return bool(hashing.hash_file(Path(file_path)) != digest)

    def get_state(self, dep: str, current_state: Any) -> Any:
        st = os.stat(dep)
        if current_state and current_state[0] == st.st_mtime and current_state[1] == st.st_size:
            return None
        return (st.st_mtime, st.st_size, hashing.hash_file(Path(dep)))


# (store root, key) of entries whose target said, in this process, that the resource is gone: the action
# that follows the `uptodate` check republishes without asking the target a second time.
_gone: set[tuple[str, str]] = set()


def in_store(node: Node, store_root: str) -> bool:
    """doit `uptodate`: the output is current exactly when its key is in the store (and, for a
    publication, its target still has the resource). A key that cannot be computed (a tool is missing)
    is "not up to date": the action then fails with the message."""
    store = Store(Path(store_root))
    try:
        if not store.has(node):
            return False
        if node.confirm(store.path(node)):
            return True
        _gone.add((store_root, node.key))
        return False
    except EulerbakeError:
        return False


def _stderr_log(message: str) -> None:
    # stderr is shown live by doit at the default verbosity, stdout is captured.
    import sys

    sys.stderr.write(f"  {message}\n")
    sys.stderr.flush()


def realise_task(node: Node, store_root: str) -> dict[str, Any] | TaskFailed:
    """doit action: realise `node`; a user error fails the task with its message (no traceback)."""
    store = Store(Path(store_root))
    try:
        gone = (store_root, node.key) in _gone
        _gone.discard((store_root, node.key))
        if store.has(node) and (gone or not node.confirm(store.path(node))):
            _stderr_log(f"{node.task_name}: the target no longer has the published resource; publishing again")
            store.delete(store.read_meta(store.meta_path(node)))
        result = store.realise(node, log=_stderr_log)
    except EulerbakeError as err:
        return TaskFailed(str(err))
    return {"path": str(result.path), "built": result.built, "substituted": result.substituted}


def remove_entry(node: Node, store_root: str) -> None:
    """doit `clean`: delete this task's store entry (other entries are untouched)."""
    store = Store(Path(store_root))
    meta = store.meta_path(node)
    if meta.is_file():
        store.delete(store.read_meta(meta))
        print(f"removed {meta.with_suffix('')}")


def task_dict(node: Node, store: Store) -> dict[str, Any]:
    """The doit task dict of one derivation or source.

    Nothing here computes the node's key: doit loads every task of the project on each run, but
    asks `uptodate` only of the tasks it was told to run, so a no-op over the default targets
    hashes only their inputs.
    """
    stage, _, label = node.task_name.partition(":")
    deps = [dep.task_name for dep in node.dependencies()]
    files = sorted({str(path) for path in node.local_files()})
    doc = node.doc or f"build {node.store_name}"
    root = str(store.root)
    args = [node, root]
    return {
        "basename": stage,
        "name": label or None,
        "doc": doc,
        "actions": [(realise_task, [node, root])],
        "uptodate": [(in_store, args)],
        "file_dep": files,
        "task_dep": deps,
        "clean": [(remove_entry, args)],
        "meta": {"node": node, "store_root": root},
    }


def unique_nodes(roots: list[Node]) -> list[Node]:
    """Reachable nodes, dependencies first, one per task name; two keys under one name is an error.

    Keys are compared only when two distinct objects claim the same task name.
    """
    by_name: dict[str, Node] = {}
    for node in walk(roots):
        previous = by_name.setdefault(node.task_name, node)
        if previous is not node and previous.key != node.key:
            raise EulerbakeError(
                f"two different derivations are both named {node.task_name}",
                hint="give each derivation a unique stage:label",
            )
    return list(by_name.values())


def tasks_for(roots: list[Node], store: Store) -> Iterator[dict[str, Any]]:
    """Task dicts for every derivation and source reachable from `roots`, each once."""
    for node in unique_nodes(roots):
        yield task_dict(node, store)


def doit_config(store: Store, default_tasks: list[str]) -> dict[str, Any]:
    """DOIT_CONFIG for a project: sqlite3 dep file in the store, blake3 checker, rich reporter."""
    from eulerbake.tasks.reporter import RichReporter

    store.open_stat_cache()
    return {
        "backend": "sqlite3",
        "dep_file": str(store.root / ".doit.sqlite3"),
        "check_file_uptodate": Blake3Checker,
        "reporter": RichReporter,
        "default_tasks": default_tasks,
        "verbosity": 1,
    }

