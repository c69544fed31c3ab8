"""`eulerbake`: doit's commands over the project's nodes, plus store, kmod, lock and unpublish commands."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from doit.cmd_base import TaskLoader2
from doit.doit_cmd import DoitMain
from doit.loader import generate_tasks
from rich.console import Console
from rich.markup import escape

from eulerbake.core.errors import EulerbakeError
from eulerbake.core.publication import OFFLINE_ENV
from eulerbake.tasks.project import Project, find_project

USAGE = """\
usage: eulerbake [--offline] [--push] [doit command] [TASK…]  build (default: the sample), as `doit` would;
                                              --offline trusts publication receipts without asking the target;
                                              --push uploads what was built to the cache afterwards
       eulerbake list|info|clean|forget …     doit's own commands over the project's tasks
       eulerbake store path TASK|KEY          print an output's store path
       eulerbake store info [TASK|KEY|PATH]   list entries, or show one entry's manifest and metadata
       eulerbake store verify [ENTRY…]        re-hash entries; report corrupted ones (exit 1)
       eulerbake store gc [--dry-run]         delete entries no current recipe (or store/.roots) reaches
       eulerbake store why-depends A B        show how entry A depends on entry B
       eulerbake store why-rebuilt TASK       name the manifest fields that changed since the previous entry
       eulerbake store log TASK|KEY           the build log: commands run, tool versions, stderr tails
       eulerbake unpublish TASK               remove a publication's remote resource, then forget its receipt
       eulerbake audit AMI|PATH|FILE|TASK     verify the provenance chain down to the pinned sources (exit 1: fail)
                 [--json] [--trusted-key K]… [--rebuild] [--allow-drift] [--region R] [--endpoint-url URL]
       eulerbake provenance TASK… [--sign-key FILE] [--closure]   print (with a key: sign and store) provenance
       eulerbake build --check [TASK…]        rebuild in a fresh store, compare bit for bit (exit 1: differs)
       eulerbake COMMAND …                    a command the project's recipes add (recipes.COMMANDS)
       eulerbake kmod check KO --kernel K     check a kernel module against a kernel (see --help)
       eulerbake lock [NAME…] [--arch A]      pin the sources of releases, tasks or source labels into the lock file
       eulerbake cache keygen|push|ls|info|verify|gc …   the shared binary cache (see `eulerbake cache -h`)
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
        # A command that runs tasks is planned against the caches; list, info, clean … ask no cache.
        requested = [arg for arg in pos_args if "=" not in arg] if getattr(cmd, "execute_tasks", False) else None
        return list(generate_tasks("eulerbake", self.project.task_dicts(requested), "eulerbake derivations"))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    push = False
    while args[:1] and args[0] in ("--offline", "--push"):
        if args.pop(0) == "--push":
            push = True
        else:
            os.environ[OFFLINE_ENV] = "1"
    try:
        if args and args[0] in ("-h", "--help"):
            print(USAGE)
            return 0
        if args and args[0] == "kmod":
            from eulerbake.cli.kmod import kmod_main

            return kmod_main(args[1:])
        if args and args[0] == "cache":  # keygen needs no project; the others find it themselves
            from eulerbake.cli.cache import cache_main

            return cache_main(args[1:])
        if args and args[0] == "audit":  # an AMI or a file can be audited outside any checkout
            from eulerbake.cli.audit import audit_main

            return audit_main(args[1:])
        project = Project(find_project())
        if args and args[0] == "provenance":
            from eulerbake.cli.audit import provenance_main

            return provenance_main(args[1:], project)
        if args and args[0] == "build":
            if "--check" in args[1:]:
                from eulerbake.cli.audit import build_check_main

                return build_check_main(args[1:], project)
            args = args[1:]  # `eulerbake build TASK…` is `eulerbake TASK…`
        if args and args[0] == "store":
            from eulerbake.cli.store import store_main

            return store_main(project, args[1:])
        if args and args[0] == "lock":
            from eulerbake.cli.lock import lock_main

            return lock_main(args[1:], project)
        commands = getattr(project.recipes, "COMMANDS", {})
        if args and args[0] in commands:  # commands the project's recipes add, e.g. `eulerbake user-data …`
            return int(commands[args[0]](args[1:]))
        if args and args[0] == "unpublish":
            from eulerbake.cli.publish import unpublish_main

            return unpublish_main(project, args[1:])
        config = (str(project.root / "pyproject.toml"),)
        status = int(DoitMain(ProjectLoader(project), config_filenames=config).run(args))
        if push and status == 0:
            from eulerbake.cli.cache import push_after_build
            from eulerbake.tasks.planning import requested_tasks

            return push_after_build(project, requested_tasks(args) or [])
        return status
    except EulerbakeError as err:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
