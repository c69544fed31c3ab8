"""Builders of the provenance tests' extra stages: one deterministic, one not (on purpose)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from eulerbake.core.derivation import BuildContext

HEADER = b"noisy build, stamp follows:\n"  # 28 bytes, the same in every build


def digest_release(ctx: BuildContext) -> None:
    data = (Path(ctx.inputs["release"]) / "release.txt").read_bytes()
    (ctx.out / "release.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  release.txt\n")


def noisy_build(ctx: BuildContext) -> None:
    """`a-stable.txt` is the same every time; `b-stamp.bin` carries the build's time or random bytes."""
    (ctx.out / "a-stable.txt").write_text("the same every time\n")
    stamp = os.urandom(16) if ctx.params["mode"] == "random" else time.time_ns().to_bytes(8, "big") * 2
    (ctx.out / "b-stamp.bin").write_bytes(HEADER + stamp)
