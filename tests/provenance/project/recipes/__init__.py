"""The toy project of the engine tests (its wiring copied to `recipes/toy.py` by the fixture) plus two stages.

- `digest:toy` reads `combine:toy`'s release.txt: the patch (`fix.patch`) then reaches two levels down;
- `noisy:toy` (only with TOY_NOISY=random or TOY_NOISY=time) writes a stable file and one that differs
  on every build, on purpose: what `build --check` must catch.
"""

from __future__ import annotations

import os

from eulerbake.core.derivation import Derivation, Node
from eulerbake.core.publication import Publication
from recipes import noisy, toy


def targets() -> list[Node]:
    nodes = toy.targets()
    combine = next(node for node in nodes if node.task_name == "combine:toy")
    nodes.append(Derivation("digest", "toy", noisy.digest_release, {"release": combine}))
    mode = os.environ.get("TOY_NOISY")
    if mode:
        nodes.append(Derivation("noisy", "toy", noisy.noisy_build, {"release": combine}, {"mode": mode}))
    return nodes


def default_targets() -> list[Node]:
    return [node for node in targets() if not isinstance(node, Publication)]
