"""Small raw disks for the publication tests, made with real tools, and the nodes built from them.

A test disk is what the raw stage makes, in miniature: a sparse file with a real partition table
(sfdisk; dos for x86_64, GPT with an ESP for aarch64), real filesystems holding a few MiB of random data
(mkfs.ext4 -d, mkfs.vfat), some data blocks that are explicitly all zeros (allocated, not holes: EBS
direct must skip them) and a data region that starts off a block boundary. `raw_node` wraps one as a
Derivation whose output is the raw stage's shape (disk.raw + disk.json) without depending on that stage.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, Derivation, LocalFile
from eulerbake.core.publication import Publication
from eulerbake.tools.run import run, run_text
from recipes.publish.aws import ami

MIB = 1 << 20
BLOCK = 524288
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
REGION = "us-east-1"


@dataclass(frozen=True)
class RawDisk:
    path: Path
    arch: str
    table: dict[str, Any]  # disk.json's "table", as the raw stage writes it
    root: int

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def make_disk(path: Path, *, label: str, arch: str, size_mib: int = 96, seed: int = 1, files: int = 0,
              payload_mib: float = 5.0) -> RawDisk:
    """A sparse `size_mib` disk: boot/ESP partition + ext4 root with random data, zero blocks and an odd tail.

    `files` adds that many small files (1-64 KiB, a root filesystem's shape) to the root besides one
    `payload_mib` file.
    """
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size_mib * MIB)
    boot_type, root_type = ("83", "83") if label == "dos" else (ESP, LINUX)
    script = (f"label: {label}\n"
              f"start=2048, size={24 * 2048}, type={boot_type}{', bootable' if label == 'dos' else ''}\n"
              f"start={26 * 2048}, size={(size_mib - 26 - 10) * 2048}, type={root_type}\n")
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path)], input=script.encode())
    tree = path.parent / f"{path.stem}-root"
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "os-release").write_text('NAME="openEuler"\nID="openEuler"\nVERSION_ID="24.03"\n')
    (tree / "payload.bin").write_bytes(rng.randbytes(int(payload_mib * MIB) + 12345))
    for number in range(files):
        folder = tree / "usr" / f"d{number % 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{number}").write_bytes(rng.randbytes(rng.randint(1024, 64 * 1024)))
    if label == "dos":
        run(["mkfs.ext4", "-q", "-F", "-E", f"offset={MIB}", "-L", "boot", str(path), f"{24 * 1024}k"])
    else:
        run(["mkfs.vfat", "-n", "EFI", "--offset=2048", str(path), str(24 * 1024)])
    root_bytes = (size_mib - 26 - 10) * MIB
    run(["mkfs.ext4", "-q", "-F", "-E", f"offset={26 * MIB}", "-d", str(tree), "-L", "root", str(path),
         f"{root_bytes // 1024}k"])
    with path.open("r+b") as f:  # after the root: allocated zeros (skipped), then data off a block boundary
        f.seek((size_mib - 8) * MIB)
        f.write(bytes(MIB))
        f.seek((size_mib - 5) * MIB + 777)
        f.write(rng.randbytes(300_000))
    listed = json.loads(run_text(["sfdisk", "--json", str(path)]))["partitiontable"]
    table = {"label": listed["label"], "id": listed.get("id"), "sector_size": listed.get("sectorsize", 512),
             "first_lba": listed.get("firstlba"),
             "partitions": [{"number": number, "start": part["start"], "size": part["size"], "type": part["type"],
                             "uuid": part.get("uuid"), "name": part.get("name"), "attrs": None,
                             "bootable": bool(part.get("bootable"))}
                            for number, part in enumerate(listed["partitions"], start=1)]}
    return RawDisk(path, arch, table, root=2)


def make_garbage(path: Path, *, size_mib: int = 64) -> RawDisk:
    """Random bytes in a sparse file, no partition table: what VM Import refuses."""
    with path.open("wb") as f:
        f.truncate(size_mib * MIB)
        f.seek(4 * MIB)
        f.write(random.Random(7).randbytes(2 * MIB))
    table = {"label": "dos", "id": "0x0", "sector_size": 512, "first_lba": None, "partitions": []}
    return RawDisk(path, "x86_64", table, root=1)


def sparse_copy(source: Path, dest: Path) -> None:
    """Copy keeping the holes: only the data regions are read and written."""
    with source.open("rb") as src, dest.open("wb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        for start, end in hashing.data_segments(src.fileno(), size):
            for offset in range(start, end, 4 * MIB):
                os.pwrite(dst.fileno(), os.pread(src.fileno(), min(4 * MIB, end - offset), offset), offset)


def build_test_raw(ctx: BuildContext) -> None:
    """The raw stage's output shape from a test disk: disk.raw (sparse) + disk.json."""
    sparse_copy(ctx.inputs["disk"], ctx.out / "disk.raw")
    description = {"table": ctx.params["table"], "root": ctx.params["root"],
                   "disk_size": (ctx.out / "disk.raw").stat().st_size, "source": ctx.params["source"]}
    (ctx.out / "disk.json").write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def raw_node(disk: RawDisk, label: str = "") -> Derivation:
    return Derivation(stage="test-raw", label=label or f"test:{disk.arch}", builder=build_test_raw,
                      inputs={"disk": LocalFile(disk.path)},
                      params={"table": disk.table, "root": disk.root, "source": disk.path.name})


def ami_node(raw: Derivation, endpoint: str, arch: str, **overrides: Any) -> Publication:
    """The AMI publication the tests use: quick polls, few workers unless a test asks for more."""
    settings: dict[str, Any] = {"region": REGION, "endpoint_url": endpoint, "name": f"eulerbake-test-{arch}",
                                "arch": arch, "poll": 0.05, "workers": 16, "wait_timeout": 60.0,
                                **overrides}
    return ami(f"test:{arch}", raw, **settings)


def nonzero_blocks(path: Path) -> set[int]:
    """Indices of the 512 KiB blocks holding a non-zero byte, found by reading every byte (no SEEK_DATA)."""
    zero = bytes(BLOCK)
    found = set()
    with path.open("rb") as f:
        index = 0
        while block := f.read(BLOCK):
            if block.ljust(BLOCK, b"\0") != zero:
                found.add(index)
            index += 1
    return found


def file_blake3(path: Path) -> str:
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            hasher.update(chunk)
    return hasher.hexdigest()


def snapshot_blake3(ebs: Any, snapshot_id: str, size: int) -> tuple[str, set[int]]:
    """blake3 of the snapshot's first `size` bytes read back block by block (zeros where no block is listed),
    and the listed block indices; a block listed beyond `size` must be zeros."""
    listed: dict[int, str] = {}
    request: dict[str, Any] = {"SnapshotId": snapshot_id}
    while True:
        page = ebs.list_snapshot_blocks(**request)
        listed.update({block["BlockIndex"]: block["BlockToken"] for block in page.get("Blocks", [])})
        if not page.get("NextToken"):
            break
        request["NextToken"] = page["NextToken"]
    hasher = blake3.blake3()
    zero = bytes(BLOCK)
    for index in range(-(-size // BLOCK)):
        if index in listed:
            data = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index,
                                          BlockToken=listed[index])["BlockData"].read()
            assert len(data) == BLOCK
        else:
            data = zero
        hasher.update(data[: min(BLOCK, size - index * BLOCK)])
    return hasher.hexdigest(), set(listed)
