"""Stage `raw`: shrink an openEuler qcow2's root filesystem, lay overlays on it, apply image hygiene and
write the sparse raw disk an AMI is made from. No NBD, no loop devices, no mounting.

`raw:<release>:<arch>` validates the qcow2, copies each partition out (cost follows the data, not
the 40 GiB virtual size), finds the root filesystem by its contents, e2fsck + resize2fs it to
`root_size`, injects overlay trees (files with owner/mode, module indexes refreshed with
depmod), applies hygiene (`hygiene.py`), and assembles the sparse `disk.raw` with a partition table
whose ids come from the derivation key. One stage, so the image data is written once: the root
partition's copy becomes the disk file itself (a separate cached shrink would have to be copied again
for every overlay change, which costs about as much as redoing it).

`disk_size` may be `auto`: the smallest disk holding the partitions before the root, the shrunk root and
(GPT) the backup table, rounded up to a GiB — 8 GiB for the stock layouts with a 6 GiB root. It needs the
image's partition table, known only at build time, so the parameter (and the key) stays "auto" and the
builder resolves it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import disk, ext4
from eulerbake.fs.bootfs import boot_filesystems
from eulerbake.fs.partitions import extract_partitions, open_qcow2, pick_root
from eulerbake.linux.depmod import kernel_releases_touched, module_releases, refresh_module_indexes

from recipes.stages import hygiene as image_hygiene
from recipes.stages.hygiene import apply_hygiene, selinux_enabled

ATTRS_FILE = ".eulerbake-attrs"  # optional per-overlay manifest: "<mode> <uid> <gid> <path>" lines
SERIAL_CONSOLES = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}
TOOLS = (
    "qemu-img", "sfdisk", "fallocate",  # partitions out, the disk assembled (fs.disk)
    "e2fsck", "resize2fs", "tune2fs", "dumpe2fs", "debugfs",  # the root filesystem shrunk and edited (fs.ext4)
    "mdir", "mcopy", "fsck.fat",  # grub.cfg on the EFI system partition (fs.vfat)
    "depmod",  # module indexes for the modules an overlay installs
)  # fmt: skip


AUTO = "auto"
GIB = 1024**3


@dataclass(frozen=True)
class Params:
    disk_size: int | str  # bytes, a whole number of MiB; or "auto", resolved from the image's partition table
    root_size: int  # bytes, a whole number of MiB
    hygiene: tuple[str, ...]  # the hygiene items applied (stages/hygiene.py ITEMS, in that order)
    arch: str
    serial_console: str
    overlays: tuple[str, ...]  # input names of the overlay trees, in the order they are laid on


# -- shrink --------------------------------------------------------------------------------------


def auto_disk_size(shrunk: disk.PartitionTable) -> int:
    """disk_size `auto`: the end of the last partition (+ the GPT backup), rounded up to a GiB."""
    return -(-shrunk.min_disk_bytes() // GIB) * GIB


def _shrunk_table(table: disk.PartitionTable, image_name: str, root_size: int, disk_size: int | str,
                  ) -> tuple[disk.PartitionTable, int]:
    """The partition table with its last partition (the root, checked later) cut to `root_size`, and the disk size."""
    last = table.by_position()[-1]
    parts = tuple(
        replace(part, size=root_size // table.sector_size) if part.number == last.number else part
        for part in table.partitions
    )
    shrunk = replace(table, partitions=parts)
    if disk_size == AUTO:
        return shrunk, auto_disk_size(shrunk)
    disk_size, needed = int(disk_size), shrunk.min_disk_bytes()
    if disk_size < needed:
        root_start = last.offset(table.sector_size)
        backup = " and the GPT backup table" if table.label == "gpt" else ""
        raise EulerbakeError(
            f"disk_size {disk.size_argument(disk_size)} is too small for {image_name}: its root partition starts "
            f"at {disk.size_argument(root_start)}, so with a {disk.size_argument(root_size)} root{backup} the disk "
            f"needs at least {-(-needed // disk.MIB)} MiB",
            hint=f'set disk_size to "auto" (here {disk.size_argument(auto_disk_size(shrunk))}) or to at least '
            f"{disk.size_argument(needed)}, or lower root_size (see `eulerbake config show`)",
        )
    return shrunk, disk_size


def shrink_root(piece: Path, root_size: int, *, epoch: int, image_name: str, log: Callable[[str], None]) -> None:
    """e2fsck + resize2fs the root filesystem copy `piece` to exactly `root_size` bytes."""
    ext4.check(piece, epoch, repair=True)
    before = ext4.info(piece)
    needed = ext4.minimum_size(piece)
    if needed > root_size:
        raise EulerbakeError(
            f"the root filesystem of {image_name} does not fit the requested root size {disk.format_size(root_size)}: "
            f"it needs at least {disk.format_size(needed)} (resize2fs -P); {disk.format_size(before.used_bytes)} "
            f"of its {disk.format_size(before.size)} are in use, metadata included",
            hint=f"set root_size to at least {disk.size_argument(needed)}",
        )
    log(f"raw: root filesystem {disk.format_size(before.size)} -> {disk.format_size(root_size)}")
    ext4.resize(piece, root_size, epoch)  # checked read-only with e2fsck once all changes are made


def _mib_multiple(value: str | int, what: str) -> int:
    size = disk.parse_size(value, what)
    if size % disk.MIB:
        raise EulerbakeError(
            f"{what} {value!r} is not a whole number of MiB", hint="partitions are 1 MiB aligned; use e.g. 6G or 6144M"
        )
    return size


# -- overlays ------------------------------------------------------------------------------------


def read_attrs_manifest(overlay: Path) -> dict[str, ext4.FileAttrs]:
    """Modes and owners a checkout cannot carry, from `<overlay>/.eulerbake-attrs` if present.

    Each line: `<octal mode> <uid> <gid> <path relative to the overlay>`; `#` starts a comment.
    """
    manifest = overlay / ATTRS_FILE
    if not manifest.is_file():
        return {}
    attrs = {}
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split(None, 3)
        try:
            mode, uid, gid, path = int(fields[0], 8), int(fields[1]), int(fields[2]), fields[3].strip("/")
        except (IndexError, ValueError):
            raise EulerbakeError(
                f"{manifest}:{number}: cannot parse {line!r}",
                hint="write '<octal mode> <uid> <gid> <path>', e.g. '0440 0 0 etc/sudoers.d/cloud'",
            ) from None
        if not (overlay / path).exists() and not (overlay / path).is_symlink():
            raise EulerbakeError(f"{manifest}:{number}: {path} is not in the overlay", hint="fix the path or the line")
        attrs[path] = ext4.FileAttrs(mode, uid, gid)
    return attrs


# -- the stage -----------------------------------------------------------------------------------


def build(ctx: BuildContext) -> None:
    """Partitions out of the qcow2, root shrunk, overlays + hygiene applied, the sparse raw disk made."""
    params: Params = ctx.params
    epoch = ctx.source_date_epoch
    image, table = open_qcow2(ctx.inputs["qcow2"], ctx.work)
    shrunk, disk_size = _shrunk_table(table, image.name, params.root_size, params.disk_size)
    if params.disk_size == AUTO:
        ctx.log(f"raw: disk_size auto = {disk.format_size(disk_size)}")
    new_table = disk.with_seeded_ids(shrunk, ctx.seed("partition-table"))
    pieces = extract_partitions(image, table, ctx.work)
    scratch = ctx.work / "scratch"
    root_number = pick_root(table, lambda part: (pieces[part.number], 0), epoch, scratch, image.name).number
    last = table.by_position()[-1]
    if root_number != last.number:
        raise EulerbakeError(
            f"the root filesystem is on partition {root_number}, but partition {last.number} comes after it",
            hint="only images whose root partition is the last one can be shrunk",
        )
    shrink_root(pieces[root_number], params.root_size, epoch=epoch, image_name=image.name, log=ctx.log)
    head = ctx.work / "head.img"
    disk.extract_range(image, "qcow2", 0, table.by_position()[0].offset(table.sector_size), head)

    root = ext4.Ext4Image(pieces[root_number], epoch, scratch)
    releases = module_releases(root)
    written: list[str] = []
    for name in params.overlays:
        overlay = ctx.inputs[name]
        written += ext4.inject_tree(root, overlay, attrs=read_attrs_manifest(overlay), skip={ATTRS_FILE})
    for release in kernel_releases_touched(written):
        if release not in releases:
            raise EulerbakeError(
                f"an overlay installs kernel modules for {release}, but the image's kernel modules are for "
                f"{', '.join(releases) or 'no kernel at all'}",
                hint="build the module against the image's kernel (its release is in the image-modules stage output)",
            )
        indexes = refresh_module_indexes(root, release, ctx.work)
        ctx.log(f"raw: depmod {release}: {len(indexes)} module index file(s) rewritten")
    ctx.log(f"raw: {len(written)} overlay file(s) injected")

    boots = boot_filesystems(pieces, root_number, epoch, scratch)
    if params.hygiene:
        for change in apply_hygiene(root, boots, serial_console=params.serial_console, items=params.hygiene):
            ctx.log(f"raw: {change}")
    if (written or params.hygiene) and selinux_enabled(root):
        # New files have no SELinux label; a relabel on first boot gives them the policy's.
        root.write_file("/.autorelabel", b"", ext4.FileAttrs(0o644))

    ext4.check(pieces[root_number], epoch, repair=False)
    for boot in boots:
        boot.check()
    # The root piece is this build's own copy: it becomes disk.raw itself instead of being copied again.
    disk.assemble_disk(ctx.out / "disk.raw", disk_size, new_table, pieces, head=head, consume_last_piece=True)
    description = {"table": new_table.to_json(), "root": root_number, "disk_size": disk_size,
                   "source": image.name}
    (ctx.out / "disk.json").write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def hygiene_items(hygiene: bool | Sequence[str]) -> tuple[str, ...]:
    """The hygiene items to apply, in their order: all of them (True), none (False) or the ones named."""
    if isinstance(hygiene, bool):
        return image_hygiene.ITEMS if hygiene else ()
    if unknown := sorted(set(hygiene) - set(image_hygiene.ITEMS)):
        raise EulerbakeError(f"unknown hygiene item(s) {', '.join(unknown)}",
                             hint=f"the items are {', '.join(image_hygiene.ITEMS)}")
    return tuple(item for item in image_hygiene.ITEMS if item in hygiene)


def raw(
    label: str,
    qcow2: Derivation | FixedOutput,
    overlays: Sequence[Derivation | LocalTree],
    *,
    disk_size: str | int = AUTO,
    root_size: str | int = "6G",
    hygiene: bool | Sequence[str] = True,
    arch: str,
) -> Derivation:
    """Stage `raw:<label>`: the sparse `disk.raw` (overlays injected, hygiene applied).

    `disk_size` is a size or "auto"; `hygiene` is True (every item), False (none) or the items to apply.
    """
    if arch not in SERIAL_CONSOLES:
        raise EulerbakeError(f"unknown architecture {arch!r}", hint=f"use one of {sorted(SERIAL_CONSOLES)}")
    root = _mib_multiple(root_size, "root_size")
    size: int | str = AUTO if disk_size == AUTO else _mib_multiple(disk_size, "disk_size")
    if isinstance(size, int) and size < root:
        raise EulerbakeError(
            f"disk_size {disk_size} is smaller than root_size {root_size}",
            hint='the disk holds the root partition and the partitions before it; make it larger, or "auto"',
        )
    items = hygiene_items(hygiene)
    inputs: dict[str, Derivation | LocalTree | FixedOutput] = {"qcow2": qcow2}
    names = []
    for index, overlay in enumerate(overlays):
        if not isinstance(overlay, (Derivation, LocalTree)):
            raise EulerbakeError(f"overlay {overlay!r} is neither a derivation nor a LocalTree")
        name = f"overlay-{index:02d}"
        inputs[name] = overlay
        names.append(name)
    if not items:
        cleaned = ""
    elif items == image_hygiene.ITEMS:
        cleaned = ", hygiene"
    else:
        cleaned = f", hygiene: {' '.join(items)}"
    return Derivation(
        stage="raw",
        label=label,
        builder=build,
        inputs=inputs,
        params=Params(disk_size=size, root_size=root, hygiene=items, arch=arch,
                      serial_console=SERIAL_CONSOLES[arch], overlays=tuple(names)),
        tools=TOOLS,
        doc=f"sparse raw disk ({disk_size}, root {root_size}) with {len(names)} overlay(s){cleaned}",
    )
