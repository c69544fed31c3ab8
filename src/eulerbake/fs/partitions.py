"""A disk image's partitions as files: open a qcow2 input, copy each partition out, find the root filesystem.

Shared by the stages that read an image (the raw disk, the image's kernel modules). Each partition is
copied out with `qemu-img convert` so the cost follows the data, not the virtual size (a 40 GiB image
holding a few hundred MiB costs a few hundred MiB), and the root filesystem is found by its contents
(an ext2/3/4 filesystem holding an os-release file), never by a partition number.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import disk, ext4, vfat

ROOT_MARKERS = ("/etc/os-release", "/usr/lib/os-release")


def qcow2_file(path: Path) -> Path:
    """The qcow2 a stage was given: a FixedOutput is the file, a derivation output holds exactly one."""
    if not path.is_dir():
        return path
    found = sorted(path.glob("*.qcow2"))
    if len(found) != 1:
        raise EulerbakeError(
            f"{path} should hold exactly one *.qcow2 image, found {len(found)}",
            hint="give the stage a derivation whose output is a single qcow2, or a FixedOutput",
        )
    return found[0]


def open_qcow2(given: Path, work: Path) -> tuple[Path, disk.PartitionTable]:
    """(the qcow2 file, its partition table) of a stage input, validated; `work` holds the table probe."""
    image = qcow2_file(given)
    info = disk.validate_qcow2(image)
    table = disk.read_image_partition_table(image, "qcow2", info.virtual_size, work)
    if not table.partitions:
        raise EulerbakeError(f"{image.name} has a partition table but no partitions", hint="give a bootable disk image")
    return image, table


def extract_partitions(image: Path, table: disk.PartitionTable, work: Path, fmt: str = "qcow2") -> dict[int, Path]:
    """{partition number: a sparse raw copy of its contents in `work`}."""
    pieces = {}
    for part in table.partitions:
        if table.label == "dos" and part.number > 4:
            raise EulerbakeError(
                f"{image.name} uses logical partitions (partition {part.number})",
                hint="only primary dos partitions and GPT are supported",
            )
        piece = work / f"p{part.number}.img"
        disk.extract_range(image, fmt, part.offset(table.sector_size), part.length(table.sector_size), piece)
        pieces[part.number] = piece
    return pieces


def pick_root(
    table: disk.PartitionTable,
    location: Callable[[disk.Partition], tuple[Path, int]],
    epoch: int,
    scratch: Path,
    name: str,
) -> disk.Partition:
    """The last partition (by position) holding an ext2/3/4 filesystem with an os-release file.

    `location` says where a partition's bytes are: (file, offset), a copied-out piece or the disk itself.
    """
    findings = []
    for part in sorted(table.partitions, key=lambda p: p.start, reverse=True):
        path, offset = location(part)
        if not ext4.is_ext_filesystem(path, offset):
            kind = "FAT" if vfat.is_fat_filesystem(path, offset) else "no ext2/3/4 filesystem"
            findings.append(f"partition {part.number}: {kind}")
            continue
        fs = ext4.Ext4Image(ext4.inside(path, offset), epoch, scratch)
        if any(fs.exists(marker) for marker in ROOT_MARKERS):
            return part
        findings.append(f"partition {part.number}: ext filesystem without /etc/os-release")
    raise EulerbakeError(
        f"{name} has no root filesystem partition (an ext2/3/4 filesystem holding /etc/os-release); found: "
        + ("; ".join(reversed(findings)) or "no partitions"),
        hint="give a Linux cloud image (its root partition is ext2/3/4 and holds /etc/os-release)",
    )


def find_root_partition(raw: Path, *, epoch: int = 0, scratch: Path | None = None) -> disk.Partition:
    """The root partition of a raw disk file, found by its contents (read-only, no copies made)."""
    table = disk.read_partition_table(raw)
    return pick_root(table, lambda part: (raw, part.offset(table.sector_size)), epoch, scratch or raw.parent, raw.name)
