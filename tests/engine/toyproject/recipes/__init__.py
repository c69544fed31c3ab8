"""A small project for the engine tests: seven derivations and one source, all local and quick.

graph: template ─┐
       tree ─────┴─ tarball ─ checksum ─┐
       patch file ──────────────────────┴─ combine
       other file ── independent
       seed.bin (FixedOutput) ── seeded
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import blake3
import jinja2

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalFile, LocalTree

HERE = Path(__file__).resolve().parent.parent


def render_template(ctx: BuildContext) -> None:
    template = jinja2.Template(Path(ctx.inputs["template"]).read_text())
    (ctx.out / "motd").write_text(template.render(**ctx.params["vars"]))
    _trace("template")


def copy_tree(ctx: BuildContext) -> None:
    for path in sorted(Path(ctx.inputs["tree"]).rglob("*")):
        target = ctx.out / path.relative_to(ctx.inputs["tree"])
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    if os.environ.get("TOY_EDIT_DURING_BUILD"):  # simulates a user saving an input mid-build
        edited = Path(ctx.inputs["tree"]) / "etc/passwd"
        edited.write_text(edited.read_text() + "edited mid-build\n")
    _trace("tree")


def make_tarball(ctx: BuildContext) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tree_files = sorted(p for p in Path(ctx.inputs["tree"]).rglob("*") if p.is_file())
        files = [Path(ctx.inputs["motd"]) / "motd", *tree_files]
        for path in files:
            info = tarfile.TarInfo(path.name if path.name == "motd" else str(path.relative_to(ctx.inputs["tree"])))
            data = path.read_bytes()
            info.size, info.mtime, info.mode = len(data), ctx.source_date_epoch, 0o644
            tar.addfile(info, io.BytesIO(data))
    # Slow writer: the kill tests interrupt it half-way.
    delay = float(os.environ.get("TOY_SLOW", "0"))
    with (ctx.out / "bundle.tar").open("wb") as f:
        data = buffer.getvalue()
        for start in range(0, len(data), 512):
            f.write(data[start : start + 512])
            if delay:
                f.flush()
                time.sleep(delay)
    _trace("tarball")


def write_checksum(ctx: BuildContext) -> None:
    data = (Path(ctx.inputs["tarball"]) / "bundle.tar").read_bytes()
    (ctx.out / "bundle.tar.b3").write_text(blake3.blake3(data).hexdigest() + "  bundle.tar\n")
    _trace("checksum")


def combine(ctx: BuildContext) -> None:
    checksum = (Path(ctx.inputs["checksum"]) / "bundle.tar.b3").read_text()
    patch = Path(ctx.inputs["patch"]).read_text()
    (ctx.out / "release.txt").write_text(f"{ctx.params['title']}\n{checksum}{patch}")
    _trace("combine")


def independent(ctx: BuildContext) -> None:
    (ctx.out / "other.sha256").write_text(hashlib.sha256(Path(ctx.inputs["other"]).read_bytes()).hexdigest())
    _trace("independent")


def seeded(ctx: BuildContext) -> None:
    (ctx.out / "seed.len").write_text(str(Path(ctx.inputs["seed"]).stat().st_size))
    _trace("seeded")


def fail_loudly(ctx: BuildContext) -> None:
    (ctx.out / "partial").write_text("half")
    raise RuntimeError("this builder always fails")


def _trace(name: str) -> None:
    """Append the builder's name to $TOY_TRACE so tests can see exactly which builders ran."""
    trace = os.environ.get("TOY_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")


def _seed_source() -> FixedOutput:
    pins = HERE / "seed.pins"
    sha256, b3, size = pins.read_text().split() if pins.exists() else ("", "", "-1")
    return FixedOutput("seed.bin", (str(HERE / "seed.bin"),), sha256, b3, int(size), label="toy:seed")


def targets() -> list[Derivation]:
    template = Derivation("template", "toy", render_template, {"template": LocalFile(HERE / "templates/motd.j2")},
                          {"vars": {"greeting": os.environ.get("TOY_GREETING", "hello")}})
    tree = Derivation("tree", "toy", copy_tree, {"tree": LocalTree(HERE / "overlay")})
    tarball = Derivation("tarball", "toy", make_tarball, {"motd": template, "tree": tree})
    checksum = Derivation("checksum", "toy", write_checksum, {"tarball": tarball})
    final = Derivation("combine", "toy", combine, {"checksum": checksum, "patch": LocalFile(HERE / "fix.patch")},
                       {"title": "toy release"})
    other = Derivation("independent", "toy", independent, {"other": LocalFile(HERE / "other.txt")})
    result = [final, other]
    if (HERE / "seed.bin").exists():
        result.append(Derivation("seeded", "toy", seeded, {"seed": _seed_source()}))
    if os.environ.get("TOY_FAIL"):
        result.append(Derivation("broken", "toy", fail_loudly, {"tarball": tarball}))
    return result


def default_targets() -> list[Derivation]:
    return targets()
