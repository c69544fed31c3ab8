"""`eulerbake lock [RELEASE…] [--arch A] [--update]`: pin upstream sources into the project's lock file.

What can be pinned comes from the project's recipes: `recipes.pin_requests(releases, arches)` and
`recipes.LOCK_PATH` (the lock file, reviewed in git like flake.lock).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from eulerbake.core.errors import EulerbakeError
from eulerbake.fetch.lock import LockFile, PinRequest, pin_source
from eulerbake.tasks.project import Project

PinRequests = Callable[[Sequence[str] | None, Sequence[str] | None], list[PinRequest]]


def _project_pins(project: Project) -> tuple[PinRequests, Path]:
    """The project's `pin_requests` hook and lock file path, from its recipes package."""
    hook = getattr(project.recipes, "pin_requests", None)
    lock_path = getattr(project.recipes, "LOCK_PATH", None)
    if not callable(hook) or lock_path is None:
        raise EulerbakeError(f"the recipes of {project.root} offer no pin_requests(releases, arches) and LOCK_PATH",
                             hint="define both in recipes/__init__.py to say what `eulerbake lock` pins, and where")
    return hook, Path(lock_path)


def _short(digest: str) -> str:
    return digest[:16] + "…" if digest else ""


def lock_main(argv: list[str], project: Project | Path) -> int:
    """`eulerbake lock [RELEASE…] [--arch A] [--update]`: pin upstream sources into the lock file."""
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(
        prog="eulerbake lock",
        description="Download what is not pinned yet, check upstream's .sha256sum, record url/size/sha256/blake3 "
        "in recipes/sources.lock and put the file in the store. Without RELEASE: every release, plus the sources "
        "that belong to no release (the ENA driver).",
    )
    parser.add_argument("releases", nargs="*", metavar="RELEASE", help="e.g. 22.03-LTS-SP4 (default: all)")
    parser.add_argument("--arch", action="append", dest="arches", metavar="ARCH", help="x86_64 or aarch64 (repeatable)")
    parser.add_argument("--update", action="store_true", help="re-pin sources that are already pinned")
    args = parser.parse_args(argv)

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    project = project if isinstance(project, Project) else Project(project)
    pin_requests, lock_path = _project_pins(project)
    requests = pin_requests(args.releases or None, args.arches or None)
    lockfile = LockFile.read(lock_path)
    store = project.store
    shown = lock_path.relative_to(project.root) if lock_path.is_relative_to(project.root) else lock_path

    table = Table(title=f"pins in {shown}", show_edge=False)
    for column in ("source", "status", "size", "sha256"):
        table.add_column(column)
    failures: list[str] = []
    for request in requests:
        old = lockfile.get(request.lock_id)
        if old is not None and not args.update:
            table.add_row(request.lock_id, "pinned", str(old.size), _short(old.sha256))
            continue
        console.print(f"[bold]pinning[/] {request.lock_id}")
        try:
            entry = pin_source(request, store, log=lambda message: console.print(f"  {message}"))
        except EulerbakeError as err:
            console.print(f"  [red]failed:[/] {err.message}")
            failures.append(f"{request.lock_id}: {err.message}")
            table.add_row(request.lock_id, "[red]failed[/]", "", "")
            continue
        if old is None:
            status = "[green]new[/]"
        elif old.same_pins(entry):
            status, entry = "unchanged", old  # keep the reviewed entry (and its URL) as it is
        else:
            status = f"[yellow]CHANGED[/] (was {_short(old.sha256)})"
        lockfile.entries[request.lock_id] = entry
        lockfile.write()  # after every pin, so an interrupted run keeps what it did
        table.add_row(request.lock_id, status, str(entry.size), _short(entry.sha256))
    Console(highlight=False).print(table)
    if failures:
        raise EulerbakeError(
            f"{len(failures)} of {len(requests)} sources could not be pinned:\n  " + "\n  ".join(failures),
            hint="fix the cause above and run `eulerbake lock` again; what was pinned is already recorded",
        )
    return 0
