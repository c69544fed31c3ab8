"""`eulerbake lock [NAME…] [--arch A] [--update]`: pin exactly the sources what is asked for reaches.

Each NAME is a source's lock id (`amzn-drivers:ena_linux_2.14.1`, or its task `fetch:…`), a task of the
graph (`raw:22.03-LTS-SP4:x86_64`: the sources it reaches), or a name the project's recipes resolve to
targets (a release: its cells, `--arch` picking the arches); no NAME means every target the recipes offer.
The closure is found by walking the nodes from those targets (`eulerbake.core.derivation.walk`) and keeping
the fixed outputs: no key is computed, no unrelated source is downloaded (a DVD ISO no stage uses is not
pinned, whatever its release).

What a project offers, in its recipes package:
- `LOCK_PATH`: the lock file (reviewed in git like flake.lock);
- `pin_requests()`: every source it can pin, as `PinRequest`s (candidate locations whatever the lock says,
  upstream's checksum convention); a source the graph reaches is looked up here by its label (= lock id),
  and one missing from it is pinned from its own URLs;
- `lock_targets(names, arches)` (optional): the targets of the names that are neither a task nor a source
  (e.g. releases), every target when `names` is None.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eulerbake.core.derivation import FixedOutput, Node, walk
from eulerbake.core.errors import EulerbakeError
from eulerbake.fetch.lock import LockFile, PinRequest, pin_source
from eulerbake.tasks.project import Project

Catalogue = Callable[[], list[PinRequest]]
LockTargets = Callable[[Sequence[str] | None, Sequence[str] | None], list[Node]]
FETCH_PREFIX = "fetch:"


def _project_pins(project: Project) -> tuple[Catalogue, Path]:
    """The project's `pin_requests` hook and lock file path, from its recipes package."""
    hook = getattr(project.recipes, "pin_requests", None)
    lock_path = getattr(project.recipes, "LOCK_PATH", None)
    if not callable(hook) or lock_path is None:
        raise EulerbakeError(f"the recipes of {project.root} offer no pin_requests() and LOCK_PATH",
                             hint="define both in recipes/__init__.py to say what `eulerbake lock` can pin, and where")
    return hook, Path(lock_path)


def _lock_targets(project: Project, names: Sequence[str] | None, arches: Sequence[str] | None) -> list[Node]:
    hook: LockTargets | None = getattr(project.recipes, "lock_targets", None)
    if hook is not None:
        return list(hook(names, arches))
    if names or arches:
        raise EulerbakeError(f"not a task or a source label: {', '.join(names or [])}",
                             hint="`eulerbake list --all` shows the tasks; the recipes offer no lock_targets() "
                             "for other names (or --arch)")
    return list(project.targets)


def requests_for(project: Project, names: Sequence[str], arches: Sequence[str] | None,
                 catalogue: list[PinRequest]) -> list[PinRequest]:
    """The pin requests for what `names` (and `arches`) ask for: named sources, then the closure of the targets."""
    by_id = {request.lock_id: request for request in catalogue}
    chosen: dict[str, PinRequest] = {}
    roots: list[Node] = []
    other: list[str] = []
    tasks: dict[str, Node] | None = None
    for name in names:
        lock_id = name.removeprefix(FETCH_PREFIX)  # a source's label is its lock id, its task `fetch:<label>`
        if name in by_id or lock_id in by_id:
            lock_id = name if name in by_id else lock_id
            chosen.setdefault(lock_id, by_id[lock_id])
            continue
        if tasks is None:  # the whole graph's nodes, built but never keyed
            tasks = {node.task_name: node for node in walk(list(project.nodes))}
        if name in tasks:
            roots.append(tasks[name])
        else:
            other.append(name)
    if arches and names and not other:
        raise EulerbakeError("--arch picks the cells of the releases named, and none is named",
                             hint="name a release (e.g. `eulerbake lock 22.03-LTS-SP4 --arch x86_64`) or drop --arch")
    if other or not names:
        try:
            roots += _lock_targets(project, other or None, arches)
        except EulerbakeError as err:
            if not any(name in err.message for name in other):
                raise
            example = f" (e.g. {list(by_id)[-1]})" if by_id else ""
            raise EulerbakeError(f"{err.message}, nor a task of the graph or a source label",
                                 hint=f"{err.hint}; the tasks: `eulerbake list --all`; a source label{example} "
                                 "pins that source alone") from None
    for node in walk(roots):
        if isinstance(node, FixedOutput):
            chosen.setdefault(node.label, by_id.get(node.label) or PinRequest(node.label, node))
    return list(chosen.values())


def _short(digest: str) -> str:
    return digest[:16] + "…" if digest else ""


def _indented(message: str) -> str:
    return message.replace("\n", "\n    ")


def _console(**options: Any) -> Any:
    """A rich console that never folds a line when it is not a terminal (logs, CI, a pipe)."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True, **options)
    if not console.is_terminal:
        console.width = 240
    return console


def lock_main(argv: list[str], project: Project | Path) -> int:
    """`eulerbake lock [NAME…] [--arch A] [--update]`: pin what is asked for into the lock file."""
    from rich.markup import escape
    from rich.table import Table

    parser = argparse.ArgumentParser(
        prog="eulerbake lock",
        description="Download the sources that what is named reaches and that are not pinned yet, check "
        "upstream's .sha256sum, record url/size/sha256/blake3 in the lock file and put each file in the store.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="a release (22.03-LTS-SP4: its cells), a task (raw:22.03-LTS-SP4:x86_64) or a source "
                        "label (amzn-drivers:ena_linux_2.14.1); default: every target")
    parser.add_argument("--arch", action="append", dest="arches", metavar="ARCH",
                        help="the releases' cells on this arch only (repeatable)")
    parser.add_argument("--update", action="store_true", help="re-pin sources that are already pinned")
    args = parser.parse_intermixed_args(argv)  # `lock 22.03-LTS --arch x86_64 amzn-drivers:…` too

    console = _console(stderr=True)
    project = project if isinstance(project, Project) else Project(project)
    catalogue, lock_path = _project_pins(project)
    requests = requests_for(project, args.names, args.arches, catalogue())
    lockfile = LockFile.read(lock_path)
    store = project.store
    shown = lock_path.relative_to(project.root) if lock_path.is_relative_to(project.root) else lock_path

    table = Table(title=f"pins in {shown}", show_edge=False)
    for column in ("source", "status", "size", "sha256"):
        table.add_column(column, no_wrap=True)
    failures: list[str] = []
    for request in requests:
        old = lockfile.get(request.lock_id)
        if old is not None and not args.update:
            table.add_row(escape(request.lock_id), "pinned", str(old.size), _short(old.sha256))
            continue
        console.print(f"[bold]pinning[/] {escape(request.lock_id)}")
        try:
            entry = pin_source(request, store, log=lambda message: console.print(f"  {escape(message)}"))
        except EulerbakeError as err:
            console.print(f"  [red]failed:[/] {escape(_indented(err.message))}")
            failures.append(f"{request.lock_id}: {_indented(err.message)}")
            table.add_row(escape(request.lock_id), "[red]failed[/]", "", "")
            continue
        if old is None:
            status = "[green]new[/]"
        elif old.same_pins(entry):
            status, entry = "unchanged", old  # keep the reviewed entry (and its URL) as it is
        else:
            status = f"[yellow]CHANGED[/] (was {_short(old.sha256)})"
        lockfile.entries[request.lock_id] = entry
        lockfile.write()  # after every pin, so an interrupted run keeps what it did
        table.add_row(escape(request.lock_id), status, str(entry.size), _short(entry.sha256))
    if requests:
        _console().print(table)
    else:
        console.print("nothing to pin: what was named reaches no source")
    if failures:
        raise EulerbakeError(
            f"{len(failures)} of {len(requests)} sources could not be pinned:\n  " + "\n  ".join(failures),
            hint="fix the cause above and run `eulerbake lock` again; what could be pinned is recorded",
        )
    return 0
