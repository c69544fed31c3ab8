"""`eulerbake unpublish TASK…`: remove what a publication created remotely, then forget its receipt.

`doit clean` only forgets receipts (remote things stay); this is the one command that deletes them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from eulerbake.core.errors import EulerbakeError
from eulerbake.core.publication import OFFLINE_ENV, Publication, offline
from eulerbake.tasks.project import Project


def unpublish_main(project: Project, argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="eulerbake unpublish",
                                     description="Delete each publication's remote resource, then its receipt.")
    parser.add_argument("tasks", nargs="+", metavar="TASK")
    args = parser.parse_args(list(argv))
    if offline():  # unpublishing is talking to the target: offline mode forbids exactly that
        raise EulerbakeError("unpublish removes remote resources, which offline mode never contacts; nothing was done",
                             hint=f"run it without --offline (and with {OFFLINE_ENV} unset)")
    console = Console(highlight=False, soft_wrap=True)
    store = project.store
    nodes: list[Publication] = []
    for task in args.tasks:  # every name is checked before anything remote is removed
        node = project.node(task)
        if not isinstance(node, Publication):
            raise EulerbakeError(f"{task} is a {node.kind}, not a publication",
                                 hint="unpublish names publication tasks; `doit clean TASK` forgets other outputs")
        nodes.append(node)
    for node in nodes:
        task = node.task_name
        if not store.has(node):
            older = [Path(meta["path"]).name for meta in store.entries() if meta["task"] == task]
            if older:  # published under an earlier key (other inputs or target): not what the recipes name now
                console.print(f"{task}: no receipt for its current key, nothing unpublished; the store also holds "
                              f"{len(older)} receipt(s) of earlier keys, left alone: {', '.join(sorted(older))}")
            else:
                console.print(f"{task}: no receipt in the store, nothing to unpublish")
            continue
        node.unpublish(store.path(node))
        store.delete(store.read_meta(store.meta_path(node)))
        console.print(f"{task}: remote resource removed, receipt forgotten")
    return 0
