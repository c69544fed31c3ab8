"""Stages that run external commands through `eulerbake.tools.run`, declared in `tools` or not."""

from __future__ import annotations

import os

from eulerbake.core.derivation import BuildContext
from eulerbake.tools.run import run


def use_faketool(ctx: BuildContext) -> None:
    """Runs `faketool` (declared: its version is part of the key); the tests put a fake one on PATH."""
    ctx.log("asking faketool to emit the word")
    emitted = run(["faketool", "emit", ctx.params["word"]]).stdout
    (ctx.out / "emitted.txt").write_bytes(emitted)
    _trace("faketool")


def use_undeclared(ctx: BuildContext) -> None:
    """Runs `sh`, which its stage does not declare: the store must refuse the output."""
    (ctx.out / "said.txt").write_bytes(run(["sh", "-c", "echo undeclared"]).stdout)
    _trace("undeclared")


def _trace(name: str) -> None:
    trace = os.environ.get("TOY_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")
