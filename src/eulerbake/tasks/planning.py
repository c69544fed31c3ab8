"""The planning pass: before anything runs, ask the caches which keys of the requested closure they hold —
all of them in one batch per cache, like Nix's "query missing" — and cut the graph below every hit.

A node is *needed* when a path from a requested node reaches it without passing through an entry that
is already in the local store or held by a cache. Everything below such an entry is *cut*: a cached
`raw` means its qcow2 is neither fetched nor unpacked, and the kernel module it carries is not built.

In doit terms: a hit's (or a present entry's) task loses its `task_dep`, so doit never selects what lies
below it, and every planned task's action realises its node without walking below its inputs (doit has
already run the inputs that are needed). A hit whose entry is refused when fetched (bad signature,
tampered archive, …) is built instead, together with whatever it needs, in the same action.
"""

from __future__ import annotations

import fnmatch
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doit.action import TaskFailed

from eulerbake.core.derivation import Node, walk
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import GC_LOCK, Realised, Store
from eulerbake.store.substituters import Cache, CacheSettings, caches_for

Log = Callable[[str], None]
UNCACHEABLE_KINDS = ("publication",)  # a receipt names a remote resource: confirmed by its target, never shared
# doit commands that run tasks (the others — list, info, clean, forget … — never need a plan).
_RUNNING_COMMANDS = ("run",)
_OTHER_COMMANDS = ("help", "list", "info", "clean", "forget", "ignore", "dumpdb", "strace", "tabcompletion",
                   "reset-dep", "auto")


def _stderr_log(message: str) -> None:
    sys.stderr.write(f"  {message}\n")
    sys.stderr.flush()


@dataclass
class Plan:
    """What a run must do: the closure split into present, substitutable, to build, and cut."""

    closure: list[Node]  # every node reachable from the requested ones, dependencies first
    present: set[str] = field(default_factory=set)  # keys already in the local store
    hits: dict[str, str] = field(default_factory=dict)  # key → URL of the first cache (by priority) holding it
    needed: list[Node] = field(default_factory=list)  # dependencies first: what the run realises
    cut: list[Node] = field(default_factory=list)  # below a present entry or a hit, needed by nothing else
    queried: int = 0  # keys asked of the caches
    seconds: float = 0.0

    @property
    def to_build(self) -> list[Node]:
        return [node for node in self.needed if node.key not in self.present and node.key not in self.hits]

    def summary(self) -> str:
        substitute = sum(1 for node in self.needed if node.key in self.hits)
        return (f"plan: {len(self.closure)} nodes, {len(self.present)} in the store, {substitute} from caches, "
                f"{len(self.to_build)} to build, {len(self.cut)} not needed ({self.queried} keys asked in "
                f"{self.seconds:.2f}s)")


def make_plan(store: Store, roots: Sequence[Node], caches: Sequence[Cache] | None = None,
              log: Log = _stderr_log) -> Plan:
    """Plan the realisation of `roots`: one query per cache for every key missing from the store."""
    started = time.monotonic()
    closure = list(_unique(walk(list(roots))))
    plan = Plan(closure)
    plan.present = {node.key for node in closure if store.has(node)}
    # Ask only about what a run could need: nothing below an entry the store already has.
    candidates = _reachable(roots, stop=plan.present)
    missing = sorted({node.key for node in closure if node.key in candidates and node.key not in plan.present
                      and node.kind not in UNCACHEABLE_KINDS})
    plan.queried = len(missing)
    for cache in store.substituters if caches is None else caches:
        if not missing:
            break
        if not isinstance(cache, Cache):
            continue  # another kind of substituter: asked when its node is realised
        try:
            held = cache.query(missing)
        except EulerbakeError as err:
            log(f"cache {cache.url} is not available ({err.message}); planning without it")
            continue
        for key in held:
            plan.hits.setdefault(key, cache.url)
        missing = [key for key in missing if key not in held]
    needed = _reachable(roots, stop=plan.present | set(plan.hits))
    plan.needed = [node for node in closure if node.key in needed]
    plan.cut = [node for node in closure if node.key not in needed]
    plan.seconds = time.monotonic() - started
    return plan


def _reachable(roots: Sequence[Node], stop: set[str]) -> set[str]:
    """Keys reachable from `roots` without going below a node whose key is in `stop`."""
    found: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.key in found:
            continue
        found.add(node.key)
        if node.key not in stop:
            stack.extend(node.dependencies())
    return found


def _unique(nodes: Iterable[Node]) -> Iterable[Node]:
    seen: set[str] = set()
    for node in nodes:
        if node.key not in seen:
            seen.add(node.key)
            yield node


# -- realising a plan ---------------------------------------------------------------------------------


def substitute(store: Store, node: Node, log: Log) -> bool:
    """Fill `node`'s entry from the store's substituters without realising its inputs; False when none has
    it or every one was refused. The same steps `Store.realise` takes between "not in the store" and "build".
    """
    with store.lock(node.key, on_wait=log):
        if store.has(node):
            return True
        store._discard_leftovers(node)  # the store's own steps, in its own order (see the report's patch)
        return any(store._substitute(substituter, node, log) for substituter in store.substituters)


def realise_node(store: Store, node: Node, log: Log, *, hit: bool) -> Realised:
    """Realise one planned node whose needed inputs are already in the store (the caller holds the gc lock)."""
    if node.kind in UNCACHEABLE_KINDS and store.has(node) and not node.confirm(store.path(node)):
        log(f"{node.task_name}: the target no longer has the published resource; publishing again")
        store.delete(store.read_meta(store.meta_path(node)))
    if hit:
        if substitute(store, node, log):
            return Realised(node, store.path(node), built=False, substituted=True)
        # Refused (the store logged why): build it as if there were no cache, with whatever it needs.
        return store.realise(node, log, set())
    # Its inputs are in the store (doit ran them, or they came before it in the plan): never walk below
    # them, where a cache hit may have cut the graph.
    return store.realise(node, log, {dep.key for dep in node.dependencies()})


def realise(store: Store, roots: Sequence[Node], log: Log = _stderr_log, plan: Plan | None = None
            ) -> dict[str, Realised]:
    """Plan (unless given a plan) and realise `roots` in this process; results by key, dependencies first."""
    plan = plan or make_plan(store, roots, log=log)
    log(plan.summary())
    results: dict[str, Realised] = {}
    with store.lock(GC_LOCK, log, shared=True, waiting="waiting for `eulerbake store gc` to finish"):
        for node in plan.needed:
            results[node.key] = realise_node(store, node, log, hit=node.key in plan.hits)
    return results


# -- the doit side ------------------------------------------------------------------------------------


def realise_task(node: Node, store_root: str, settings: CacheSettings, hit: bool) -> dict[str, Any] | TaskFailed:
    """The doit action of a planned task: realise the node (substitute it when it is a hit)."""
    store = Store(Path(store_root), substituters=caches_for(settings))
    try:
        with store.lock(GC_LOCK, _stderr_log, shared=True, waiting="waiting for `eulerbake store gc` to finish"):
            result = realise_node(store, node, _stderr_log, hit=hit)
    except EulerbakeError as err:
        return TaskFailed(str(err))
    return {"path": str(result.path), "built": result.built, "substituted": result.substituted}


def planned_task_dicts(dicts: Iterable[dict[str, Any]], plan: Plan, settings: CacheSettings) -> list[dict[str, Any]]:
    """The project's doit task dicts with the plan applied: hits and present entries lose their `task_dep`
    (doit does not select what lies below them) and planned tasks realise their node by `realise_task`."""
    planned = {node.key for node in plan.closure}
    out = []
    for entry in dicts:
        node = entry.get("meta", {}).get("node")
        if node is None or node.key not in planned:
            out.append(entry)
            continue
        entry = dict(entry)
        hit = node.key in plan.hits
        if hit or node.key in plan.present:
            entry["task_dep"] = []
        entry["actions"] = [(realise_task, [node, entry["meta"]["store_root"], settings, hit])]
        entry["meta"] = {**entry["meta"], "plan": "substitute" if hit else "present" if node.key in plan.present
                         else "build"}
        out.append(entry)
    return out


def requested_tasks(argv: Sequence[str]) -> list[str] | None:
    """The task names a doit command line asks to run ([] for the default tasks); None when it runs none.

    Parsed with doit's own option parser, so `doit -n 2 raw:sample:x86_64` and `doit run raw` read as doit
    reads them; `name=value` arguments are doit variables, not tasks.
    """
    from doit.cmd_base import DoitCmdBase
    from doit.cmd_run import Run
    from doit.cmdparse import CmdOption, CmdParse

    args = list(argv)
    if args and args[0] in _OTHER_COMMANDS:
        return None
    if args and args[0] in _RUNNING_COMMANDS:
        args = args[1:]
    parser = CmdParse([CmdOption(option) for option in (*DoitCmdBase.base_options, *Run.cmd_options)])
    try:
        _params, positional = parser.parse(args)
    except Exception:  # doit will report the bad command line itself
        return None
    return [arg for arg in positional if "=" not in arg and not arg.startswith("-")]


def select(nodes: Sequence[Node], names: Sequence[str], default: Sequence[str]) -> list[Node]:
    """The nodes doit runs for `names`: task names, stage names (a group task) or patterns; none: `default`."""
    wanted = list(names) or list(default)
    chosen = []
    for node in nodes:
        stage = node.task_name.partition(":")[0]
        if any(name in (node.task_name, stage) or fnmatch.fnmatchcase(node.task_name, name) for name in wanted):
            chosen.append(node)
    return chosen


def project_task_dicts(project: Any, settings: CacheSettings, requested: Sequence[str] | None,
                       log: Log = _stderr_log) -> list[dict[str, Any]]:
    """`Project.task_dicts()` with the plan applied when caches are configured and doit runs tasks.

    `requested`: the task names of the command line (see `requested_tasks`); None for a doit command that
    runs nothing (list, info, clean …), which gets the unplanned tasks and asks no cache.
    """
    return plan_dicts(project, list(project.task_dicts()), settings, requested, log)


def plan_dicts(project: Any, dicts: list[dict[str, Any]], settings: CacheSettings, requested: Sequence[str] | None,
               log: Log = _stderr_log) -> list[dict[str, Any]]:
    """Plan the project's task dicts for the `requested` tasks (what `Project.task_dicts` calls)."""
    if requested is None or not project.store.substituters:
        return dicts
    default = [node.task_name for node in project.default_targets]
    roots = select(project.nodes, requested, default)
    if not roots:
        return dicts
    try:
        plan = make_plan(project.store, roots, log=log)
    except EulerbakeError as err:  # a key that cannot be computed: doit's own tasks report it when they run
        log(f"no plan: {err.message}")
        return dicts
    log(plan.summary())
    return planned_task_dicts(dicts, plan, settings)
