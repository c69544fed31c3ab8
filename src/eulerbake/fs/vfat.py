"""FAT (EFI system partition) images, read and changed with mtools: no mount, no root.

Like ext4.py, this works on a partition copied out of a disk into its own file. FAT keeps
timestamps only: files are copied with `mcopy -m` from sources whose mtime is the epoch, and
SOURCE_DATE_EPOCH pins what mkfs.fat and mtools would otherwise take from the clock.
"""

from __future__ import annotations

import os
from pathlib import Path

from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.run import run

FAT_SIGNATURES = (b"FAT12", b"FAT16", b"FAT32")


def _env(epoch: int) -> dict[str, str]:
    # MTOOLS_SKIP_CHECK: images made by other tools may have harmless geometry quirks.
    return {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": os.devnull, "SOURCE_DATE_EPOCH": str(epoch)}


def _dos_path(path: str) -> str:
    return "::" + ("/" + path.lstrip("/"))


def is_fat_filesystem(path: Path, offset: int = 0) -> bool:
    """True when a FAT boot sector starts at `offset` in `path`."""
    with path.open("rb") as handle:
        handle.seek(offset)
        sector = handle.read(512)
    return len(sector) == 512 and sector[510:512] == b"\x55\xaa" and any(sig in sector[54:90] for sig in FAT_SIGNATURES)


def make_filesystem(image: Path, size: int, *, volume_id: str, epoch: int, label: str | None = None) -> None:
    """mkfs.vfat (FAT32) into a new sparse file with a fixed volume id and no clock-derived fields."""
    with image.open("wb") as handle:
        handle.truncate(size)
    # --invariant first: given after -i (dosfstools 4.2) it replaces the volume id with its constant 1234-ABCD.
    cmd: list[str | Path] = ["mkfs.vfat", "-F", "32", "--invariant", "-i", volume_id]
    if label:
        cmd += ["-n", label]
    run([*cmd, image], env=_env(epoch))


def copy_tree(image: Path, source: Path, epoch: int) -> None:
    """Copy the contents of directory `source` into the root of the FAT image (times pinned)."""
    entries = sorted(source.iterdir())
    for entry in source.rglob("*"):
        os.utime(entry, (epoch, epoch))
    if entries:
        run(["mcopy", "-s", "-m", "-i", image, *entries, "::/"], env=_env(epoch))


def exists(image: Path, path: str, epoch: int) -> bool:
    proc = run(["mdir", "-b", "-i", image, _dos_path(path)], env=_env(epoch), check=False)
    return proc.returncode == 0


def list_dir(image: Path, path: str, epoch: int) -> list[str]:
    """Names in a directory of the FAT image (empty when it does not exist)."""
    proc = run(["mdir", "-b", "-i", image, _dos_path(path)], env=_env(epoch), check=False)
    if proc.returncode != 0:
        return []
    names = []
    for line in proc.stdout.decode(errors="replace").splitlines():
        line = line.rstrip("/")
        if line.startswith("::"):
            names.append(line.rsplit("/", 1)[-1])
    return sorted(name for name in names if name not in (".", ".."))


def read_file(image: Path, path: str, epoch: int) -> bytes:
    proc = run(["mcopy", "-n", "-i", image, _dos_path(path), "-"], env=_env(epoch), check=False)
    if proc.returncode != 0:
        raise EulerbakeError(f"cannot read {path} from FAT image {image.name}: {proc.stderr.decode().strip()}")
    return proc.stdout


def write_file(image: Path, path: str, content: bytes, epoch: int, scratch: Path) -> None:
    """Create or overwrite a file in an existing directory of the FAT image."""
    scratch.mkdir(parents=True, exist_ok=True)
    local = scratch / "vfat-upload"
    local.write_bytes(content)
    os.utime(local, (epoch, epoch))
    run(["mcopy", "-o", "-m", "-i", image, local, _dos_path(path)], env=_env(epoch))
    local.unlink()


def check(image: Path) -> None:
    """Read-only fsck.fat; raise when it finds problems."""
    proc = run(["fsck.fat", "-n", image], check=False)
    if proc.returncode != 0:
        raise EulerbakeError(f"fsck.fat found problems in {image.name}: {proc.stdout.decode(errors='replace')[-400:]}")
