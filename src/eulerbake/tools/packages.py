"""The external tools eulerbake and its recipes run: the Debian package of each, and how it tells its version.

A stage lists the tools it runs (`Derivation.tools`); their versions go into its key, so two machines
with another e2fsprogs, qemu-img or gcc never put different bytes under one key. A tool whose name is
not here still runs; a missing one is reported with the package named here (or its own name).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tool:
    package: str
    # Arguments that print the version on the first line of stdout or stderr; None: the tool has no such
    # option, and the blake3 of its executable stands for its version.
    version_args: tuple[str, ...] | None = ("--version",)


_E2FS_V = ("-V",)

TOOLS: dict[str, Tool] = {
    "qemu-img": Tool("qemu-utils"),
    "qemu-system-x86_64": Tool("qemu-system-x86"),
    "qemu-system-aarch64": Tool("qemu-system-arm"),
    "sfdisk": Tool("fdisk"),
    "fallocate": Tool("util-linux"),
    "mkfs.ext4": Tool("e2fsprogs", _E2FS_V),
    "e2fsck": Tool("e2fsprogs", _E2FS_V),
    "resize2fs": Tool("e2fsprogs", ()),  # prints its version before the usage text when given no argument
    "debugfs": Tool("e2fsprogs", _E2FS_V),
    "tune2fs": Tool("e2fsprogs", None),
    "dumpe2fs": Tool("e2fsprogs", _E2FS_V),
    "mkfs.vfat": Tool("dosfstools", None),
    "fsck.fat": Tool("dosfstools", None),
    "mcopy": Tool("mtools"),
    "mdir": Tool("mtools"),
    "mmd": Tool("mtools"),
    "gcc": Tool("gcc"),
    "ld": Tool("binutils"),
    "strip": Tool("binutils"),
    "make": Tool("make"),
    "aarch64-linux-gnu-gcc": Tool("gcc-aarch64-linux-gnu"),
    "aarch64-linux-gnu-ld": Tool("binutils-aarch64-linux-gnu"),
    "aarch64-linux-gnu-strip": Tool("binutils-aarch64-linux-gnu"),
    "x86_64-linux-gnu-gcc": Tool("gcc-x86-64-linux-gnu"),
    "x86_64-linux-gnu-ld": Tool("binutils-x86-64-linux-gnu"),
    "x86_64-linux-gnu-strip": Tool("binutils-x86-64-linux-gnu"),
    "patch": Tool("patch"),
    "tar": Tool("tar"),
    "xz": Tool("xz-utils"),
    "cpio": Tool("cpio"),
    "rpm2cpio": Tool("rpm2cpio", None),
    "depmod": Tool("kmod"),
    "packer": Tool("packer"),
    "cloud-init": Tool("cloud-init"),
    "ssh-keygen": Tool("openssh-client", None),
    "mkfs.fat": Tool("dosfstools", None),
    "xorriso": Tool("xorriso"),
    "genisoimage": Tool("genisoimage"),
    "mmdebstrap": Tool("mmdebstrap"),
}


def package_of(tool: str) -> str:
    """The Debian package to install for `tool` (its own name when unknown)."""
    known = TOOLS.get(tool)
    return known.package if known else tool
