"""Whole-disk images: qcow2 validation, partition tables and sparse byte-range copies.

Everything here works on plain files with userspace tools (qemu-img, sfdisk): no loop devices, no
NBD, no mounting. Byte ranges are moved with qemu-img's `raw` driver (`offset=`/`size=`) so that the
cost follows the data actually allocated in an image, never its virtual size, and outputs stay sparse.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eulerbake.core import hashing
from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.run import run, run_text

SECTOR = 512
MIB = 1024 * 1024
GPT_BACKUP_SECTORS = 33  # backup header (1) + partition entries (32) at the end of a GPT disk
SIZE_UNITS = {"": 1, "K": 1024, "M": MIB, "G": 1024**3, "T": 1024**4}
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int, what: str = "size") -> int:
    """Bytes from `8G`, `512MiB`, `6442450944` (binary units, like qemu-img and resize2fs)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = SIZE_RE.match(str(value))
        if not match:
            raise EulerbakeError(
                f"{what} {value!r} is not a size",
                hint="write it as a number of bytes or with a binary unit, e.g. 8G, 6GiB, 512M",
            )
        size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise EulerbakeError(f"{what} {value!r} must be larger than zero", hint="give a positive size such as 8G")
    return size


def size_argument(size: int) -> str:
    """The shortest way to write `size` as a parameter, rounded up to a MiB: `8G`, `8193M`."""
    mib = -(-size // MIB)
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def format_size(size: int) -> str:
    """`6 GiB`, `300.5 MiB`: sizes in messages, in the units users type."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", MIB), ("KiB", 1024)):
        if size >= factor:
            amount = size / factor
            return f"{amount:.0f} {unit}" if amount == int(amount) else f"{amount:.1f} {unit}"
    return f"{size} bytes"


# -- image files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    format: str
    virtual_size: int
    actual_size: int


def inspect_image(path: Path) -> ImageInfo:
    """Format and sizes of a disk image as qemu-img sees them (format probed, not assumed)."""
    if not path.is_file():
        raise EulerbakeError(f"disk image {path} does not exist", hint="check the path or the stage that makes it")
    proc = run(["qemu-img", "info", "--output=json", path], check=False)
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        raise EulerbakeError(
            f"{path} cannot be opened as a disk image: {reason[-1] if reason else 'qemu-img info failed'}",
            hint="the file is damaged or not a disk image; fetch or build it again",
        )
    info = json.loads(proc.stdout)
    return ImageInfo(path, info["format"], int(info["virtual-size"]), int(info.get("actual-size", 0)))


QCOW2_MAGIC = b"QFI\xfb"


def disk_image_in(given: Path) -> tuple[Path, str] | None:
    """(disk file, "raw" or "qcow2") of a stage output holding disk.raw or exactly one *.qcow2, or of a disk
    image file itself (its format from its magic); None for a directory holding neither."""
    if given.is_dir():
        if (given / "disk.raw").is_file():
            return given / "disk.raw", "raw"
        found = sorted(given.glob("*.qcow2"))
        if len(found) != 1:
            return None
        given = found[0]
    with given.open("rb") as handle:
        return given, "qcow2" if handle.read(4) == QCOW2_MAGIC else "raw"


def validate_qcow2(path: Path) -> ImageInfo:
    """Check that `path` is a complete, consistent qcow2 image; return its info.

    `qemu-img check` walks the cluster tables (metadata only, fast): a download cut short leaves
    tables pointing past the end of the file, which it reports as corruption.
    """
    info = inspect_image(path)
    if info.format == "raw" and not _looks_like_a_disk(path):
        raise EulerbakeError(
            f"{path} is not a disk image: {path.stat().st_size} bytes with no image format, no partition table "
            f"and no filesystem{_text_preview(path)}",
            hint="this is not a disk image: check the mirror / the lock entry (a mirror may have served an error "
            "page; `eulerbake lock --update` pins what it serves now)",
        )
    if info.format != "qcow2":
        raise EulerbakeError(
            f"{path} is not a qcow2 image (qemu-img detects format '{info.format}')",
            hint="give the openEuler .qcow2 cloud image (unpack .qcow2.xz first), or convert it: "
            f"qemu-img convert -O qcow2 {shlex.quote(str(path))} image.qcow2",
        )
    proc = run(["qemu-img", "check", "-f", "qcow2", "--output=json", path], check=False)
    # 0: clean; 3: leaked clusters only (wasted space, data intact). Anything else is damage.
    if proc.returncode in (0, 3):
        return info
    stderr = proc.stderr.decode(errors="replace")
    try:
        corruptions = int(json.loads(proc.stdout).get("corruptions", 0))
    except ValueError:
        corruptions = 0
    file_size = path.stat().st_size
    if "exceeding the end of the file" in stderr or "outside image" in stderr:
        raise EulerbakeError(
            f"{path} is truncated: its qcow2 tables point past the end of the file ({file_size} bytes; "
            f"qemu-img check found {corruptions} corruptions)",
            hint="the download or copy was cut short; fetch the image again and compare its sha256",
        )
    first_error = next((line for line in stderr.splitlines() if "ERROR" in line), stderr.strip()[:200])
    raise EulerbakeError(
        f"{path} is a damaged qcow2 image (qemu-img check exit {proc.returncode}, {corruptions} corruptions: "
        f"{first_error})",
        hint="fetch the image again; `qemu-img check` shows every problem",
    )


def _looks_like_a_disk(path: Path) -> bool:
    """Whether a file qemu-img calls `raw` (its answer for anything it cannot name) could be a disk:
    an MBR signature (dos, or GPT's protective MBR), an ext2/3/4 superblock or an ISO 9660 volume."""
    with path.open("rb") as handle:
        head = handle.read(40 * 1024)
    return head[510:512] == b"\x55\xaa" or head[1080:1082] == b"\x53\xef" or head[32769:32774] == b"CD001"


def _text_preview(path: Path) -> str:
    """`; it starts with 'Not Found'` when the file begins with text (an error page saved as the image)."""
    with path.open("rb") as handle:
        head = handle.read(200)
    text = head.decode("utf-8", errors="replace")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first or sum(char.isprintable() for char in first) < 0.9 * len(first):
        return ""
    return f"; it starts with {first[:60]!r}"


def _image_opts(path: Path, fmt: str, offset: int, size: int) -> str:
    # qemu's raw driver on top of the image's own driver exposes exactly [offset, offset+size).
    for char in ",=":
        if char in str(path):
            raise EulerbakeError(f"image path {path} contains {char!r}", hint="move the image to a plain path")
    return f"driver=raw,offset={offset},size={size},file.driver={fmt},file.file.filename={path}"


def extract_range(image: Path, fmt: str, offset: int, size: int, dest: Path) -> None:
    """Copy bytes [offset, offset+size) of a (qcow2 or raw) image into a new sparse raw file.

    The copy is written with O_DIRECT (`-t none`) where the filesystem allows it: every
    e2fsprogs tool fsyncs the file it opens, so the data has to reach the disk before any
    filesystem work can start, and writing it there directly skips filling the page cache first.
    """
    cmd: list[str | Path] = ["qemu-img", "convert", "-O", "raw", "--image-opts", _image_opts(image, fmt, offset, size)]
    if run([*cmd[:2], "-t", "none", *cmd[2:], dest], check=False).returncode != 0:
        dest.unlink(missing_ok=True)  # e.g. tmpfs on older kernels: no O_DIRECT
        run([*cmd, dest])


def write_range(piece: Path, disk: Path, offset: int) -> None:
    """Write the raw file `piece` into `disk` at `offset` without truncating `disk`.

    The target range must still be zero (a fresh sparse file): zero blocks of `piece` are skipped,
    so the result stays sparse and the cost follows the data in `piece`.
    """
    size = piece.stat().st_size
    if offset + size > disk.stat().st_size:
        raise EulerbakeError(f"{piece.name} ({size} bytes at offset {offset}) does not fit in {disk}")
    target = f"driver=raw,offset={offset},size={size},file.driver=file,file.filename={disk}"
    _image_opts(disk, "file", offset, size)  # same path sanity check
    run(["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", piece, "--target-image-opts", target])


def copy_sparse(src: Path, dest: Path) -> None:
    """Copy a raw file keeping it sparse (holes and zero blocks are not written)."""
    convert(src, "raw", dest, "raw")


def convert(src: Path, src_format: str, dest: Path, dest_format: str) -> None:
    """qemu-img convert between raw and qcow2; zero blocks stay unallocated in either format."""
    run(["qemu-img", "convert", "-f", src_format, "-O", dest_format, src, dest])


def deallocate_zeroes(path: Path, offset: int, length: int) -> None:
    """Punch out the parts of [offset, offset+length) that read as zeros but hold blocks.

    Only ranges the filesystem itself reports as holes (SEEK_HOLE: unwritten or unallocated
    extents) are punched, so the file's contents never change.
    """
    end = offset + length
    fd = os.open(path, os.O_RDONLY)
    try:
        segments = hashing.data_segments(fd, end, offset)
    finally:
        os.close(fd)
    hole_start = offset
    for data_start, data_end in [*segments, (end, end)]:  # the holes are the gaps between data regions
        if data_start > hole_start:
            punch = ["--offset", str(hole_start), "--length", str(data_start - hole_start)]
            run(["fallocate", "--punch-hole", "--keep-size", *punch, path])
        hole_start = data_end


def create_sparse(path: Path, size: int) -> None:
    """A new all-zero file of `size` bytes that occupies no blocks."""
    with path.open("wb") as handle:
        handle.truncate(size)


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


# -- partition tables --------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """One partition as sfdisk describes it; `start` and `size` in sectors."""

    number: int
    start: int
    size: int
    type: str
    uuid: str | None = None
    name: str | None = None
    attrs: str | None = None
    bootable: bool = False

    @property
    def end(self) -> int:
        """First sector after the partition."""
        return self.start + self.size

    def offset(self, sector_size: int = SECTOR) -> int:
        return self.start * sector_size

    def length(self, sector_size: int = SECTOR) -> int:
        return self.size * sector_size


@dataclass(frozen=True)
class PartitionTable:
    label: str  # "dos" or "gpt"
    id: str  # dos: "0x1234abcd"; gpt: disk GUID
    partitions: tuple[Partition, ...]
    sector_size: int = SECTOR
    first_lba: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def partition(self, number: int) -> Partition:
        for part in self.partitions:
            if part.number == number:
                return part
        raise EulerbakeError(f"partition {number} does not exist (have {[p.number for p in self.partitions]})")

    def by_position(self) -> list[Partition]:
        return sorted(self.partitions, key=lambda p: p.start)

    def min_disk_bytes(self) -> int:
        """Smallest disk that holds every partition (and the GPT backup area)."""
        last = max((p.end for p in self.partitions), default=0)
        if self.label == "gpt":
            last += GPT_BACKUP_SECTORS
        return last * self.sector_size

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "id": self.id,
            "sector_size": self.sector_size,
            "first_lba": self.first_lba,
            "partitions": [part.__dict__ for part in self.partitions],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PartitionTable:
        return cls(
            label=data["label"],
            id=data["id"],
            sector_size=data["sector_size"],
            first_lba=data.get("first_lba"),
            partitions=tuple(Partition(**part) for part in data["partitions"]),
        )


def _partition_number(node: str) -> int:
    match = re.search(r"(\d+)$", node)
    if not match:
        raise EulerbakeError(f"sfdisk reported a partition node without a number: {node!r}")
    return int(match.group(1))


def read_partition_table(disk: Path) -> PartitionTable:
    """The partition table of a raw disk file, read with `sfdisk --json`."""
    proc = run(["sfdisk", "--json", disk], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        reason = proc.stderr.decode(errors="replace").strip()
        raise EulerbakeError(
            f"{disk.name} has no partition table ({reason.splitlines()[-1] if reason else 'sfdisk found none'})",
            hint="give a whole-disk image with a dos or GPT partition table, not a bare filesystem image",
        )
    data = json.loads(proc.stdout)["partitiontable"]
    parts = []
    for raw in data.get("partitions", []):
        parts.append(
            Partition(
                number=_partition_number(raw["node"]),
                start=int(raw["start"]),
                size=int(raw["size"]),
                type=str(raw["type"]),
                uuid=raw.get("uuid"),
                name=raw.get("name"),
                attrs=raw.get("attrs"),
                bootable=bool(raw.get("bootable", False)),
            )
        )
    if data["label"] not in ("dos", "gpt"):
        raise EulerbakeError(f"{disk.name} has a '{data['label']}' partition table", hint="use a dos or GPT disk")
    return PartitionTable(
        label=data["label"],
        id=data["id"],
        partitions=tuple(parts),
        sector_size=int(data.get("sectorsize", SECTOR)),
        first_lba=data.get("firstlba"),
    )


def read_image_partition_table(image: Path, fmt: str, virtual_size: int, work: Path) -> PartitionTable:
    """The partition table of a (qcow2) image without converting the whole image.

    Only the first and last MiB are copied into a sparse stand-in of the full size: that is where
    the MBR, the primary GPT and the backup GPT live.
    """
    probe = work / "partition-table-probe.raw"
    create_sparse(probe, virtual_size)
    edge = min(MIB, virtual_size)
    for offset in sorted({0, virtual_size - edge}):
        piece = work / f"partition-table-probe-{offset}.raw"
        extract_range(image, fmt, offset, edge, piece)
        write_range(piece, probe, offset)
        piece.unlink()
    try:
        return read_partition_table(probe)
    except EulerbakeError as err:
        message = f"{image.name} has no partition table (sfdisk finds no dos or GPT label in it)"
        if "no partition table" not in err.message:
            message = err.message.replace(probe.name, image.name)
        raise EulerbakeError(message, hint=err.hint) from None
    finally:
        probe.unlink()


def seeded_guid(seed: bytes) -> str:
    """A version-4-shaped GUID from deterministic seed bytes (uppercase, as sfdisk prints GPT ids)."""
    return str(uuid.UUID(bytes=seed[:16], version=4)).upper()


def seeded_dos_id(seed: bytes) -> str:
    """A non-zero dos disk identifier from deterministic seed bytes."""
    value = int.from_bytes(seed[:4], "big") or 1
    return f"0x{value:08x}"


def with_seeded_ids(table: PartitionTable, seed: bytes) -> PartitionTable:
    """The same table with the disk id and every GPT partition GUID derived from `seed`."""
    if table.label == "dos":
        return replace(table, id=seeded_dos_id(seed))
    parts = tuple(
        replace(part, uuid=seeded_guid(bytes.fromhex(hashing.hash_bytes(seed + f":partition-{part.number}".encode()))))
        for part in table.partitions
    )
    return replace(table, id=seeded_guid(seed), partitions=parts)


def _quote_field(value: str) -> str:
    if '"' in value or "\n" in value:
        raise EulerbakeError(f"partition field {value!r} contains a quote or newline")
    return f'"{value}"'


def sfdisk_script(table: PartitionTable) -> str:
    """An sfdisk script that recreates `table` exactly (explicit starts, sizes and ids)."""
    lines = [f"label: {table.label}", f"label-id: {table.id}", "unit: sectors", f"sector-size: {table.sector_size}"]
    if table.label == "gpt" and table.first_lba is not None:
        lines.append(f"first-lba: {table.first_lba}")
    lines.append("")
    for part in sorted(table.partitions, key=lambda p: p.number):
        fields = [f"start={part.start}", f"size={part.size}", f"type={part.type}"]
        if table.label == "gpt":
            if part.uuid:
                fields.append(f"uuid={part.uuid}")
            if part.name:
                fields.append(f"name={_quote_field(part.name)}")
            if part.attrs:
                fields.append(f"attrs={_quote_field(part.attrs)}")
        elif part.bootable:
            fields.append("bootable")
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def write_partition_table(disk: Path, table: PartitionTable) -> None:
    """Write `table` onto the raw disk file with an sfdisk script; boot code in the MBR is kept."""
    for part in table.partitions:
        if table.label == "dos" and part.number > 4:
            raise EulerbakeError("logical partitions in an extended dos partition are not supported")
    needed = table.min_disk_bytes()
    if disk.stat().st_size < needed:
        raise EulerbakeError(
            f"disk {disk.name} ({format_size(disk.stat().st_size)}) is smaller than its partitions "
            f"({format_size(needed)})"
        )
    # Never wipe: the caller has already placed boot code and partition contents where they belong.
    run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe", "never", "--wipe-partitions", "never", disk],
        input=sfdisk_script(table).encode(),
    )


def verify_partition_table(disk: Path) -> str:
    """`sfdisk --verify` output; raise if sfdisk finds a problem."""
    output = run_text(["sfdisk", "--verify", disk])
    if "No errors detected" not in output:
        raise EulerbakeError(f"sfdisk --verify found problems in {disk.name}:\n{output}")
    return output


def _grow_into_disk(piece: Path, disk: Path, offset: int) -> bool:
    """Turn the file holding the last partition into the disk by inserting `offset` bytes of hole
    before it (FALLOC_FL_INSERT_RANGE: extents move, data is not copied). False where the
    filesystem cannot do that (tmpfs, btrfs) or the offset is not block aligned; nothing changed then.
    """
    if offset == 0 or offset % 4096 or piece.stat().st_dev != disk.parent.stat().st_dev:
        return False
    os.rename(piece, disk)
    proc = run(["fallocate", "--insert-range", "--offset", "0", "--length", str(offset), disk], check=False)
    if proc.returncode != 0:
        os.rename(disk, piece)
        return False
    return True


def assemble_disk(
    disk: Path,
    size: int,
    table: PartitionTable,
    pieces: Mapping[int, Path],
    head: Path | None = None,
    *,
    consume_last_piece: bool = False,
) -> None:
    """Build a sparse raw disk: `head` (boot code area) at 0, the table, then each partition's contents.

    `pieces` maps partition numbers to raw files no larger than their partition; partitions
    without a piece are left zero. With `consume_last_piece`, the piece of the last partition
    becomes the disk file itself where the filesystem allows, saving one copy of its data.
    """
    if size < table.min_disk_bytes():
        raise EulerbakeError(
            f"the disk size {format_size(size)} is smaller than the partitions, which need "
            f"{format_size(table.min_disk_bytes())}",
            hint=f"raise disk_size to at least {size_argument(table.min_disk_bytes())} or lower root_size",
        )
    for number, piece in sorted(pieces.items()):
        part = table.partition(number)
        if piece.stat().st_size > part.length(table.sector_size):
            raise EulerbakeError(
                f"contents of partition {number} ({format_size(piece.stat().st_size)}) exceed the partition "
                f"({format_size(part.length(table.sector_size))})"
            )
    placed: set[int] = set()
    last = table.by_position()[-1] if table.partitions else None
    grow = consume_last_piece and last is not None and last.number in pieces
    if grow and last is not None and _grow_into_disk(pieces[last.number], disk, last.offset(table.sector_size)):
        placed.add(last.number)
    if placed:
        with disk.open("r+b") as handle:
            handle.truncate(size)
    else:
        create_sparse(disk, size)
    if head is not None:
        first = min((p.offset(table.sector_size) for p in table.partitions), default=size)
        if head.stat().st_size > first:
            raise EulerbakeError(f"boot area {head.name} overlaps the first partition")
        write_range(head, disk, 0)
    write_partition_table(disk, table)
    for number, piece in sorted(pieces.items()):
        if number not in placed:
            write_range(piece, disk, table.partition(number).offset(table.sector_size))
    verify_partition_table(disk)
