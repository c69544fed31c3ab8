"""Stage `image-modules`: the image's own `/lib/modules/<release>/` and its kernel release, for module checks.

The kernel-module gate checks a module against the kernel it will run on: the image's module tree
carries the real kernel release (the release table's is only expected) and, in its modules, the
symbol CRCs of that build. The root filesystem is found by its contents and read with debugfs, so
the image is never converted or mounted: each partition is copied out as in `raw` (cost follows the data).
"""

from __future__ import annotations

from dataclasses import dataclass

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput
from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import ext4
from eulerbake.fs.partitions import extract_partitions, open_qcow2, pick_root
from eulerbake.linux.depmod import module_releases

TOOLS = ("qemu-img", "sfdisk", "debugfs")


@dataclass(frozen=True)
class Params:
    kernel_release: str = ""  # which /lib/modules/<release>/ to take; "" when the image has exactly one


def build(ctx: BuildContext) -> None:
    """/lib/modules/<release>/ of the image's root filesystem, plus `kernel-release`."""
    params: Params = ctx.params
    epoch = ctx.source_date_epoch
    image, table = open_qcow2(ctx.inputs["qcow2"], ctx.work)
    pieces = extract_partitions(image, table, ctx.work)
    root_part = pick_root(table, lambda part: (pieces[part.number], 0), epoch, ctx.work / "scratch", image.name)
    root = ext4.Ext4Image(pieces[root_part.number], epoch, ctx.work / "scratch")
    releases = module_releases(root)
    wanted = params.kernel_release
    if wanted:
        if wanted not in releases:
            raise EulerbakeError(f"{image.name} has no /lib/modules/{wanted} (it has: {', '.join(releases) or 'none'})",
                                 hint="name one of the image's kernel releases, or leave kernel_release unset")
        release = wanted
    elif len(releases) == 1:
        release = releases[0]
    else:
        raise EulerbakeError(
            f"{image.name} has {len(releases)} kernel module trees ({', '.join(releases) or 'none'}) in /lib/modules",
            hint="name the one to use with kernel_release=...",
        )
    tree = root.realpath(f"/lib/modules/{release}") or root.realpath(f"/usr/lib/modules/{release}")
    assert tree is not None  # module_releases() just listed it
    root.dump_tree(tree, ctx.out / "lib" / "modules")
    (ctx.out / "kernel-release").write_text(release + "\n")
    ctx.log(f"image-modules: {release}")


def image_modules(label: str, qcow2: Derivation | FixedOutput, *, kernel_release: str = "") -> Derivation:
    """Stage `image-modules:<label>`: `lib/modules/<release>/` and `kernel-release` from the qcow2."""
    return Derivation(
        stage="image-modules",
        label=label,
        builder=build,
        inputs={"qcow2": qcow2},
        params=Params(kernel_release=kernel_release or ""),
        tools=TOOLS,
        doc="kernel modules and kernel release of the image (for module compatibility checks)",
    )
