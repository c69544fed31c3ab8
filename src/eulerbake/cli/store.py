"""`eulerbake store …`: paths, entries and their manifests, build logs, verify, gc, why-depends, why-rebuilt."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from eulerbake.core.errors import EulerbakeError
from eulerbake.tasks.project import Project
from eulerbake.tools.units import human_size

console = Console(highlight=False, soft_wrap=True)


def _entry_for(project: Project, query: str) -> dict[str, Any]:
    """Find an entry by task name (via the recipes), store path, key prefix or name."""
    if ":" in query and not query.startswith(("/", ".")):
        node = project.node(query)
        meta_file = project.store.meta_path(node)
        if not meta_file.is_file():
            raise EulerbakeError(
                f"{query} is not built yet (would be {project.store.path(node)})",
                hint=f"build it with `doit {query}`",
            )
        return project.store.read_meta(meta_file)
    return project.store.find(query)


def store_main(project: Project, argv: Sequence[str]) -> int:
    """`eulerbake store …`: query and maintain the store."""
    parser = argparse.ArgumentParser(prog="eulerbake store")
    sub = parser.add_subparsers(dest="command", required=True)
    p_path = sub.add_parser("path", help="print the store path of a task's output")
    p_path.add_argument("entry")
    p_path.add_argument("--expected", action="store_true", help="print the path even when it is not built yet")
    p_info = sub.add_parser("info", help="list entries or show one")
    p_info.add_argument("entry", nargs="?")
    p_info.add_argument("--json", action="store_true")
    p_verify = sub.add_parser("verify", help="re-hash entries and report corruption")
    p_verify.add_argument("entries", nargs="*")
    p_verify.add_argument("--repair", action="store_true",
                          help="move corrupted entries, orphans, strays and garbled metadata to store/.corrupt/")
    p_root = sub.add_parser("root", help="pin tasks' entries against gc (store/.roots/), for this or any checkout")
    p_root.add_argument("action", choices=("add", "remove", "list"))
    p_root.add_argument("tasks", nargs="*")
    p_gc = sub.add_parser("gc", help="delete entries that no current recipe reaches")
    p_gc.add_argument("--dry-run", action="store_true")
    p_why = sub.add_parser("why-depends", help="show a dependency chain between two entries")
    p_why.add_argument("start")
    p_why.add_argument("target")
    p_rebuilt = sub.add_parser("why-rebuilt", help="diff a task's manifest against its previous entry")
    p_rebuilt.add_argument("task")
    p_log = sub.add_parser("log", help="show the build log of an entry (or of a task's last failed build)")
    p_log.add_argument("entry")
    args = parser.parse_args(list(argv))
    store = project.store

    if args.command == "path":
        if ":" in args.entry:
            node = project.node(args.entry)
            if not args.expected and not store.has(node):
                console.print(f"{args.entry} is not built yet (it would be {store.path(node)}); "
                              f"build it with `doit {args.entry}`, or pass --expected")
                return 1
            print(store.path(node))
        else:
            print(store.find(args.entry)["path"])
        return 0
    if not store.root.is_dir():
        raise EulerbakeError(f"there is no store at {store.root}",
                             hint="build something first (`doit`), or point EULERBAKE_STORE at the store you mean")
    if args.command == "info":
        if args.entry:
            meta = _entry_for(project, args.entry)
            if args.json:
                print(json.dumps(meta, indent=2, sort_keys=True))
            else:
                _print_entry(meta)
            return 0
        table = Table(show_edge=False)
        for column in ("task", "store path", "size", "built"):
            table.add_column(column)
        for meta in store.entries():
            table.add_row(meta["task"], Path(meta["path"]).name, human_size(meta["output"]["size"]),
                          f"{meta['build_seconds']}s")
        console.print(table)
        return 0
    if args.command == "verify":
        return _verify(project, args.entries, args.repair)
    if args.command == "root":
        return _roots(project, args.action, args.tasks)
    if args.command == "log":
        return _show_log(project, args.entry)
    if args.command == "gc":
        keep: set[str] = set()
        for node in project.nodes:
            try:
                keep.add(node.key)
            except EulerbakeError:  # its key cannot be known here (a tool is missing): keep its task's entries
                keep.update(meta["key"] for meta in store.entries() if meta["task"] == node.task_name)
        doomed = store.gc(keep, dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        for meta in doomed:
            console.print(f"{verb} {meta['path']}")
        freed = sum(meta["output"]["size"] for meta in doomed)
        console.print(f"{verb} {len(doomed)} entries ({human_size(freed)})")
        return 0
    if args.command == "why-depends":
        start, target = (_entry_for(project, query)["key"] for query in (args.start, args.target))
        chain = store.why_depends(start, target)
        if chain is None:
            console.print(f"{args.start} does not depend on {args.target}")
            return 1
        for depth, meta in enumerate(chain):
            branch = "  " * depth + ("└─ " if depth else "")
            console.print(f"{branch}{meta['task']}  [dim]{Path(meta['path']).name}[/]")
        return 0
    if args.command == "why-rebuilt":
        return _why_rebuilt(project, args.task)
    return 2


def _verify(project: Project, queries: list[str], repair: bool) -> int:
    """Re-hash entries; with no names also list what is not a whole entry. Exit 1 when anything is wrong."""
    store = project.store
    entries = [_entry_for(project, q) for q in queries] if queries else store.entries()
    problems = store.verify(entries)
    anomalies = [] if queries else store.anomalies()
    for meta, problem in problems:
        console.print(f"[bold red]CORRUPT[/] {meta['path']}: {problem}")
    for path, problem in anomalies:
        console.print(f"[bold red]BROKEN[/] {path}: {problem}")
    console.print(f"{len(entries)} entries checked, {len(problems)} corrupted, {len(anomalies)} other problems")
    if repair and (problems or anomalies):
        where = store.repair([*(Path(meta["path"]) for meta, _ in problems), *(path for path, _ in anomalies)])
        console.print(f"moved to {where}; the next build makes what is needed again")
        return 0
    return 1 if problems or anomalies else 0


def _roots(project: Project, action: str, tasks: list[str]) -> int:
    """`store root add|remove|list`: files in store/.roots/ naming keys that gc keeps with their closure."""
    roots = project.store.root / ".roots"
    if action == "list":
        for path in sorted(roots.iterdir()):
            console.print(f"{path.name}: {path.read_text().strip()}")
        return 0
    if not tasks:
        raise EulerbakeError(f"`store root {action}` needs task names", hint=f"eulerbake store root {action} TASK")
    for task in tasks:
        node = project.node(task)
        root_file = roots / f"{node.key}-{node.store_name}"
        if action == "add":
            root_file.write_text(node.key + "\n")
            console.print(f"pinned {task} ({root_file.name}) against gc")
        else:
            root_file.unlink(missing_ok=True)
            console.print(f"unpinned {task}")
    return 0


def _print_entry(meta: dict[str, Any]) -> None:
    console.print(f"[bold]{meta['task']}[/]  {meta['path']}")
    console.print(f"  key      {meta['key']}")
    console.print(f"  output   {meta['output']['hash']}  ({human_size(meta['output']['size'])})")
    console.print(f"  kind     {meta.get('kind', '?')}  built in {meta['build_seconds']}s")
    if meta["manifest"].get("builder"):
        console.print(f"  builder  {meta['manifest']['builder']}")
    for tool, version in sorted(meta.get("tools", {}).items()):
        console.print(f"  ran      {tool}: {version}")
    console.print("  manifest (its blake3 is the key):")
    console.print_json(json.dumps(meta["manifest"], sort_keys=True))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {prefix: value}


def _why_rebuilt(project: Project, task: str) -> int:
    node = project.node(task)
    current = _flatten(node.manifest if hasattr(node, "manifest") else {})
    previous = [m for m in project.store.entries() if m["task"] == task and m["key"] != node.key]
    if not previous:
        console.print(f"{task}: no earlier entry in the store to compare with")
        return 1
    latest = max(previous, key=lambda m: m["built_at"])
    old = _flatten(latest["manifest"])
    console.print(f"{task}: {Path(latest['path']).name} → {node.key}-{node.store_name}")
    for field in sorted(set(old) | set(current)):
        if old.get(field) != current.get(field):
            console.print(f"  {field}: [red]{old.get(field)}[/] → [green]{current.get(field)}[/]")
            if field.startswith("inputs.") and field.endswith(".key"):
                upstream = _task_of_input(project, node, field.split(".")[1])
                if upstream:
                    console.print(f"    [dim]an input was rebuilt: eulerbake store why-rebuilt {upstream}[/]")
    return 0


def _task_of_input(project: Project, node: Any, input_name: str) -> str:
    value = getattr(node, "inputs", {}).get(input_name)
    return str(getattr(value, "task_name", ""))


def _show_log(project: Project, query: str) -> int:
    """Print an entry's build log; for a task with no entry, the log of its last failed build."""
    if ":" in query and not query.startswith(("/", ".")):
        node = project.node(query)
        for path in (project.store.log_path(node), project.store.failed_log_path(node)):
            if path.is_file():
                print(path.read_text(), end="")
                return 0
        raise EulerbakeError(f"{query} has no build log (not built here yet)", hint=f"build it with `doit {query}`")
    meta = project.store.find(query)
    log = Path(meta["path"] + ".log")
    if not log.is_file():
        raise EulerbakeError(f"{Path(meta['path']).name} has no build log", hint="entries built before logs were kept "
                             "have none; `doit clean` the task and build it again")
    print(log.read_text(), end="")
    return 0
