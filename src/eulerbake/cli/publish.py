"""`eulerbake unpublish TASK…`: remove what a publication created remotely, then forget its receipt.

`doit clean` only forgets receipts (remote things stay); this is the one command that deletes them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.console import Console

from eulerbake.core.errors import EulerbakeError
from eulerbake.core.publication import Publication
from eulerbake.tasks.project import Project


def unpublish_main(project: Project, argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="eulerbake unpublish",
                                     description="Delete each publication's remote resource, then its receipt.")
    parser.add_argument("tasks", nargs="+", metavar="TASK")
    args = parser.parse_args(list(argv))
    console = Console(highlight=False, soft_wrap=True)
    store = project.store
    for task in args.tasks:
        node = project.node(task)
        if not isinstance(node, Publication):
            raise EulerbakeError(f"{task} is a {node.kind}, not a publication",
                                 hint="unpublish names publication tasks; `doit clean TASK` forgets other outputs")
        if not store.has(node):
            console.print(f"{task}: no receipt in the store, nothing to unpublish")
            continue
        node.unpublish(store.path(node))
        store.delete(store.read_meta(store.meta_path(node)))
        console.print(f"{task}: remote resource removed, receipt forgotten")
    return 0
