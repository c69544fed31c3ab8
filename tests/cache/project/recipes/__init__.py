"""A project for the end-to-end cache tests: the graph of `tests.cache.graph`, the upstream file at
$CACHE_UPSTREAM."""

from __future__ import annotations

import os
from pathlib import Path

from eulerbake.core.derivation import Node
from tests.cache.graph import make_graph


def targets() -> list[Node]:
    graph = make_graph(Path(os.environ["CACHE_UPSTREAM"]))
    return [graph.raw, graph.kmod, graph.image]


def default_targets() -> list[Node]:
    return [targets()[-1]]
