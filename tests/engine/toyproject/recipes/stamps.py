"""The stamp stage: its module imports `recipes.helper` (relatively), so the helper's code is in its key."""

from __future__ import annotations

from pathlib import Path

from eulerbake.core.derivation import BuildContext

from .helper import banner


def stamp(ctx: BuildContext) -> None:
    motd = (Path(ctx.inputs["motd"]) / "motd").read_text()
    (ctx.out / "stamp.txt").write_text(banner(ctx.params["title"]) + motd)
    _trace("stamp")


def _trace(name: str) -> None:
    import os

    trace = os.environ.get("TOY_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")
