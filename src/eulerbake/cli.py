"""`eulerbake`: doit's commands over the project's derivations, plus store, kmod and lock commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from doit.cmd_base import TaskLoader2
from doit.doit_cmd import DoitMain
from doit.loader import generate_tasks
from rich.console import Console
from rich.table import Table

from eulerbake.errors import EulerbakeError
from eulerbake.project import Project, find_project
from eulerbake.reporter import human_size

console = Console(highlight=False, soft_wrap=True)

USAGE = """\
usage: eulerbake [doit command] [TASK…]       build (default: the sample), as `doit` would
       eulerbake list|info|clean|forget …     doit's own commands over the project's tasks
       eulerbake store path TASK|KEY          print an output's store path
       eulerbake store info [TASK|KEY|PATH]   list entries, or show one entry's manifest and metadata
       eulerbake store verify [ENTRY…]        re-hash entries; report corrupted ones (exit 1)
       eulerbake store gc [--dry-run]         delete entries no current recipe (or store/.roots) reaches
       eulerbake store why-depends A B        show how entry A depends on entry B
       eulerbake store why-rebuilt TASK       diff a task's manifest against its previous store entry
       eulerbake kmod check KO --kernel K     check a kernel module against a kernel (see --help)
       eulerbake lock [RELEASE…]              pin upstream sources into recipes/sources.lock
"""


class ProjectLoader(TaskLoader2):  # type: ignore[misc]
    """doit task loader reading the project's recipes (no dodo.py needed)."""

    def __init__(self, project: Project) -> None:
        super().__init__()
        self.project = project

    def setup(self, opt_values: dict[str, Any]) -> None:
        pass

    def load_doit_config(self) -> dict[str, Any]:
        return self.project.doit_config()

    def load_tasks(self, cmd: Any, pos_args: list[str]) -> list[Any]:
        return list(generate_tasks("eulerbake", self.project.task_dicts(), "eulerbake derivations"))


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


def _store_main(project: Project, argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="eulerbake store")
    sub = parser.add_subparsers(dest="command", required=True)
    p_path = sub.add_parser("path", help="print the store path of a task's output")
    p_path.add_argument("entry")
    p_info = sub.add_parser("info", help="list entries or show one")
    p_info.add_argument("entry", nargs="?")
    p_info.add_argument("--json", action="store_true")
    p_verify = sub.add_parser("verify", help="re-hash entries and report corruption")
    p_verify.add_argument("entries", nargs="*")
    p_gc = sub.add_parser("gc", help="delete entries that no current recipe reaches")
    p_gc.add_argument("--dry-run", action="store_true")
    p_why = sub.add_parser("why-depends", help="show a dependency chain between two entries")
    p_why.add_argument("start")
    p_why.add_argument("target")
    p_rebuilt = sub.add_parser("why-rebuilt", help="diff a task's manifest against its previous entry")
    p_rebuilt.add_argument("task")
    args = parser.parse_args(list(argv))
    store = project.store

    if args.command == "path":
        if ":" in args.entry:
            print(store.path(project.node(args.entry)))
        else:
            print(store.find(args.entry)["path"])
        return 0
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
        entries = [_entry_for(project, q) for q in args.entries] if args.entries else store.entries()
        problems = store.verify(entries)
        for meta, problem in problems:
            console.print(f"[bold red]CORRUPT[/] {meta['path']}: {problem}")
        console.print(f"{len(entries)} entries checked, {len(problems)} corrupted")
        return 1 if problems else 0
    if args.command == "gc":
        keep = {node.key for node in project.nodes}
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


def _print_entry(meta: dict[str, Any]) -> None:
    console.print(f"[bold]{meta['task']}[/]  {meta['path']}")
    console.print(f"  key      {meta['key']}")
    console.print(f"  output   {meta['output']['hash']}  ({human_size(meta['output']['size'])})")
    console.print(f"  builder  {meta['builder']}  built in {meta['build_seconds']}s")
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in ("-h", "--help"):
            print(USAGE)
            return 0
        if args and args[0] == "kmod":
            from eulerbake.kmod_cli import kmod_main

            return kmod_main(args[1:])
        project = Project(find_project())
        if args and args[0] == "store":
            return _store_main(project, args[1:])
        if args and args[0] == "lock":
            from eulerbake.lock import lock_main

            return lock_main(args[1:], project.root)
        config = (str(project.root / "pyproject.toml"),)
        return int(DoitMain(ProjectLoader(project), config_filenames=config).run(args))
    except EulerbakeError as err:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
