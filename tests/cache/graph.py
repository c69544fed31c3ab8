"""A small image-shaped graph for the cache tests: a pinned upstream file, an unpack, a sparse raw disk,
a kernel-module-like tree and an image that needs both.

graph: upstream.qcow2 (FixedOutput) ─ unpack ─ raw (sparse) ─┐
       kmod (a tree: dirs, an executable, a symlink inside) ─┴─ image

Each builder appends its name to $CACHE_TRACE, so a test sees exactly which ones ran.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import blake3

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, Node
from eulerbake.tools.run import run

MiB = 1024 * 1024


def _trace(name: str) -> None:
    trace = os.environ.get("CACHE_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")


def unpack(ctx: BuildContext) -> None:
    data = Path(ctx.inputs["qcow2"]).read_bytes()
    with (ctx.out / "disk.img").open("wb") as f:
        f.truncate(ctx.params["size_mib"] * MiB)
        f.seek(MiB)
        f.write(data)
    _trace("unpack")


def raw(ctx: BuildContext) -> None:
    """A sparse disk: `data_mib` of incompressible data spread over `size_mib`, the rest holes."""
    source = (Path(ctx.inputs["unpack"]) / "disk.img").read_bytes()[MiB:2 * MiB]
    size, data = ctx.params["size_mib"] * MiB, ctx.params["data_mib"] * MiB
    seed = ctx.seed("raw")
    with (ctx.out / "disk.raw").open("wb") as f:
        f.truncate(size)
        pieces = max(1, data // MiB)
        stride = size // pieces
        for index in range(pieces):
            f.seek(index * stride)
            f.write(blake3.blake3(seed + index.to_bytes(4, "big")).digest(length=MiB - 4096) + source[:4096])
    (ctx.out / "layout.txt").write_text(f"size={size}\n")
    _trace("raw")


def kmod(ctx: BuildContext) -> None:
    modules = ctx.out / "lib" / "modules" / ctx.params["release"]
    modules.mkdir(parents=True)
    (modules / "ena.ko").write_bytes(hashlib.sha256(ctx.params["release"].encode()).digest() * 64)
    (ctx.out / "bin").mkdir()
    (ctx.out / "bin" / "modinfo").write_text("#!/bin/sh\necho ena\n")
    os.chmod(ctx.out / "bin" / "modinfo", 0o755)
    os.symlink(f"lib/modules/{ctx.params['release']}/ena.ko", ctx.out / "ena.ko")
    (ctx.out / "empty-dir").mkdir()
    _trace("kmod")


def image(ctx: BuildContext) -> None:
    raw_disk = Path(ctx.inputs["raw"]) / "disk.raw"
    ko = Path(ctx.inputs["kmod"]) / "ena.ko"
    (ctx.out / "image.manifest").write_text(f"raw {raw_disk.stat().st_size}\nena {ko.stat().st_size}\n")
    _trace("image")


def faketool(ctx: BuildContext) -> None:
    (ctx.out / "said.txt").write_bytes(run(["faketool", "say"]).stdout)
    _trace("faketool")


@dataclass
class Graph:
    source: FixedOutput
    unpack: Derivation
    raw: Derivation
    kmod: Derivation
    image: Derivation

    @property
    def nodes(self) -> list[Node]:
        return [self.source, self.unpack, self.raw, self.kmod, self.image]


def upstream_file(directory: Path) -> Path:
    """The 'upstream' qcow2 (made once per test directory): 512 KiB of deterministic bytes."""
    path = directory / "upstream.qcow2"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blake3.blake3(b"upstream").digest(length=512 * 1024))
    return path


def make_graph(upstream: Path, *, size_mib: int = 32, data_mib: int = 2, release: str = "6.1.0-56-amd64") -> Graph:
    """Fresh node objects (keys are computed anew) for the graph above."""
    content = upstream.read_bytes()
    source = FixedOutput("upstream.qcow2", (str(upstream),), hashlib.sha256(content).hexdigest(),
                         blake3.blake3(content).hexdigest(), len(content), label="upstream")
    unpacked = Derivation("unpack", "sample", unpack, {"qcow2": source}, {"size_mib": 8})
    disk = Derivation("raw", "sample", raw, {"unpack": unpacked}, {"size_mib": size_mib, "data_mib": data_mib})
    module = Derivation("kmod", "sample", kmod, {}, {"release": release})
    final = Derivation("image", "sample", image, {"raw": disk, "kmod": module})
    return Graph(source, unpacked, disk, module, final)


def faketool_node(word: str = "hello") -> Derivation:
    return Derivation("faketool", "sample", faketool, {}, {"word": word}, tools=("faketool",))
