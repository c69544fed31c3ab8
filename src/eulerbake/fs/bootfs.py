"""Boot configuration outside the root filesystem: the /boot partition (ext) or the EFI system partition (FAT).

A `BootFilesystem` is a copied-out partition piece that may hold a grub.cfg (`grub2/grub.cfg` on an ext
/boot, `EFI/<vendor>/grub.cfg` on an ESP or under /boot/efi); a `GrubConfig` is one such file, on a boot
partition or on the root filesystem, read and rewritten in place with debugfs or mtools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eulerbake.fs import ext4, vfat


class BootFilesystem:
    """A non-root partition piece that may hold a grub.cfg: ext (/boot) or FAT (the ESP)."""

    def __init__(self, number: int, piece: Path, kind: str, epoch: int, scratch: Path) -> None:
        self.number = number
        self.piece = piece
        self.kind = kind
        self.epoch = epoch
        self.scratch = scratch
        self.ext = ext4.Ext4Image(piece, epoch, scratch) if kind == "ext" else None

    def grub_configs(self) -> list[str]:
        if self.ext is not None:  # a /boot partition: grub2/ and possibly efi/EFI/<vendor>/
            found = [p for p in ("/grub2/grub.cfg",) if self.ext.exists(p)]
            for vendor in sorted(self.ext.list_dir(self.ext.realpath("/efi/EFI") or "/nonexistent") or {}):
                if self.ext.exists(f"/efi/EFI/{vendor}/grub.cfg"):
                    found.append(f"/efi/EFI/{vendor}/grub.cfg")
            return found
        return [
            f"/EFI/{vendor}/grub.cfg"
            for vendor in vfat.list_dir(self.piece, "/EFI", self.epoch)
            if vendor.upper() != "BOOT" and vfat.exists(self.piece, f"/EFI/{vendor}/grub.cfg", self.epoch)
        ]

    def read(self, path: str) -> bytes:
        if self.ext is not None:
            return self.ext.read_file(path)
        return vfat.read_file(self.piece, path, self.epoch)

    def write(self, path: str, content: bytes) -> None:
        if self.ext is not None:
            self.ext.write_file(path, content)
        else:
            vfat.write_file(self.piece, path, content, self.epoch, self.scratch)

    def check(self) -> None:
        if self.ext is not None:
            ext4.check(self.piece, self.epoch, repair=False)
        else:
            vfat.check(self.piece)


def boot_filesystems(pieces: dict[int, Path], root_number: int, epoch: int, scratch: Path) -> list[BootFilesystem]:
    """Every partition piece other than the root that holds an ext or FAT filesystem, by partition number."""
    boots = []
    for number, piece in sorted(pieces.items()):
        kind = "ext" if ext4.is_ext_filesystem(piece) else "fat" if vfat.is_fat_filesystem(piece) else "other"
        if number != root_number and kind != "other":
            boots.append(BootFilesystem(number, piece, kind, epoch, scratch))
    return boots


@dataclass(frozen=True)
class GrubConfig:
    """A grub.cfg on the root filesystem or on a boot partition."""

    where: str
    root: ext4.Ext4Image | None
    boot: BootFilesystem | None
    path: str

    def read(self) -> bytes:
        return self.root.read_file(self.path) if self.root is not None else self._boot().read(self.path)

    def write(self, content: bytes) -> None:
        if self.root is not None:
            self.root.write_file(self.path, content)
        else:
            self._boot().write(self.path, content)

    def _boot(self) -> BootFilesystem:
        assert self.boot is not None
        return self.boot
