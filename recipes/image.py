"""Image stages: shrink an openEuler qcow2's root filesystem, lay overlays on it, apply image
hygiene and write the sparse raw disk an AMI is made from. No NBD, no loop devices, no mounting.

- `raw:<release>:<arch>`: validate the qcow2, copy each partition out (cost follows the data, not
  the 40 GiB virtual size), find the root filesystem by its contents, e2fsck + resize2fs it to
  `root_size`, inject overlay trees (files with owner/mode, module indexes refreshed with
  depmod), apply hygiene, and assemble the sparse `disk.raw` with a partition table whose ids
  come from the derivation key. One stage, so the image data is written once: the root
  partition's copy becomes the disk file itself.
- `image-modules:<release>:<arch>`: `/lib/modules/<release>/` of the image, for module checks.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import eulerbake.fs.disk
import eulerbake.fs.ext4
import eulerbake.fs.vfat
from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import disk, ext4, vfat
from eulerbake.tools.run import require_tool, run

LIBRARY_CODE = tuple(Path(str(module.__file__)) for module in (eulerbake.fs.disk, eulerbake.fs.ext4, eulerbake.fs.vfat))
ROOT_MARKERS = ("/etc/os-release", "/usr/lib/os-release")
ATTRS_FILE = ".eulerbake-attrs"  # optional per-overlay manifest: "<mode> <uid> <gid> <path>" lines
MODULE_DIR_RE = re.compile(r"^/(?:usr/)?lib/modules/([^/]+)/")
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
DEPMOD_INPUTS = ("modules.order", "modules.builtin", "modules.builtin.modinfo")
SERIAL_CONSOLES = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}
KERNEL_ARGS_REMOVED = ("quiet", "rhgb")
ROOT_LOCKED = "!!"  # shadow's "locked, no password": nothing a known password could match


# -- inputs and layout -------------------------------------------------------------------------


def _qcow2_file(path: Path) -> Path:
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


def _pick_root(
    table: disk.PartitionTable,
    location: Callable[[disk.Partition], tuple[Path, int]],
    epoch: int,
    scratch: Path,
    name: str,
) -> disk.Partition:
    """The last partition (by position) holding an ext2/3/4 filesystem with an os-release file."""
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
        hint="give an openEuler cloud image (its root partition is ext4)",
    )


def find_root_partition(raw: Path, *, epoch: int = 0, scratch: Path | None = None) -> disk.Partition:
    """The root partition of a raw disk file, found by its contents (read-only, no copies made)."""
    table = disk.read_partition_table(raw)
    return _pick_root(table, lambda part: (raw, part.offset(table.sector_size)), epoch, scratch or raw.parent, raw.name)


def _extract_partitions(image: Path, table: disk.PartitionTable, work: Path, fmt: str = "qcow2") -> dict[int, Path]:
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


def _open_qcow2(ctx: BuildContext) -> tuple[Path, disk.PartitionTable]:
    image = _qcow2_file(ctx.inputs["qcow2"])
    info = disk.validate_qcow2(image)
    table = disk.read_image_partition_table(image, "qcow2", info.virtual_size, ctx.work)
    if not table.partitions:
        raise EulerbakeError(f"{image.name} has a partition table but no partitions", hint="give a bootable disk image")
    return image, table


# -- shrink --------------------------------------------------------------------------------------


def _shrunk_table(table: disk.PartitionTable, image_name: str, root_size: int, disk_size: int) -> disk.PartitionTable:
    """The partition table with its last partition (the root, checked later) cut to `root_size`."""
    last = table.by_position()[-1]
    parts = tuple(
        replace(part, size=root_size // table.sector_size) if part.number == last.number else part
        for part in table.partitions
    )
    shrunk = replace(table, partitions=parts)
    if disk_size < shrunk.min_disk_bytes():
        raise EulerbakeError(
            f"the disk size {disk.format_size(disk_size)} is smaller than the partitions of {image_name} "
            f"({disk.format_size(shrunk.min_disk_bytes())} with a {disk.format_size(root_size)} root)",
            hint=f"raise disk_size to at least {disk.size_argument(shrunk.min_disk_bytes())} or lower root_size",
        )
    return shrunk


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


def module_releases(root: ext4.Ext4Image) -> list[str]:
    """Kernel releases with a module tree in the image (`/lib/modules/<release>/`)."""
    modules_dir = root.realpath("/lib/modules") or root.realpath("/usr/lib/modules")
    listing = (root.list_dir(modules_dir) if modules_dir else None) or {}
    return sorted(name for name, entry in listing.items() if entry.is_dir)


def _kernel_releases_touched(paths: Iterable[str]) -> list[str]:
    return sorted({match.group(1) for path in paths if (match := MODULE_DIR_RE.match(path))})


def refresh_module_indexes(root: ext4.Ext4Image, kernel_release: str, work: Path) -> list[str]:
    """Run depmod on a copy of the image's module tree and write the new indexes back.

    depmod reads the image's own depmod.d configuration (never the build host's). Modules missing
    from modules.order are appended to it, sorted, in the copy only, so depmod's output does not
    depend on directory order.
    """
    modules_dir = root.realpath(f"/lib/modules/{kernel_release}")
    if modules_dir is None:
        raise EulerbakeError(f"/lib/modules/{kernel_release} does not exist in the image")
    base = work / f"depmod-{kernel_release}"
    copy = root.dump_tree(modules_dir, base / "lib" / "modules")
    if copy.name != kernel_release:
        copy = copy.rename(copy.parent / kernel_release)
    config = base / "depmod.d"
    config.mkdir()
    for index, candidate in enumerate(("/usr/lib/depmod.d", "/lib/depmod.d", "/etc/depmod.d")):
        real = root.realpath(candidate)
        if real is not None:  # copied in this order, so /etc's file of the same name wins
            for conf in sorted(root.dump_tree(real, base / f"config-{index}").glob("*.conf")):
                shutil.copyfile(conf, config / conf.name)
    order_file = copy / "modules.order"
    listed = order_file.read_text().splitlines() if order_file.is_file() else []
    present = sorted(
        path.relative_to(copy).as_posix() for path in copy.rglob("*") if path.name.endswith(MODULE_SUFFIXES)
    )
    extra = [module for module in present if module not in set(listed)]
    order_file.write_text("".join(line + "\n" for line in [*listed, *extra]))
    run(["depmod", "-b", base, "-C", config, kernel_release])
    written = []
    for generated in sorted(copy.glob("modules.*")):
        if generated.name in DEPMOD_INPUTS:
            continue
        target = f"{modules_dir}/{generated.name}"
        existing = root.lstat(target)
        if existing is not None and existing.is_file and root.read_file(target) == generated.read_bytes():
            continue
        written.append(root.write_file(target, generated))
    return written


# -- hygiene -------------------------------------------------------------------------------------


def lock_password(shadow: str, user: str = "root") -> str:
    """/etc/shadow text with `user`'s password replaced by a lock (no hash remains to match)."""
    lines = []
    for line in shadow.splitlines(keepends=True):
        fields = line.rstrip("\n").split(":")
        if len(fields) > 1 and fields[0] == user:
            fields[1] = ROOT_LOCKED
            line = ":".join(fields) + ("\n" if line.endswith("\n") else "")
        lines.append(line)
    return "".join(lines)


SSHD_SETTINGS = {"PermitRootLogin": "no", "PasswordAuthentication": "no", "ChallengeResponseAuthentication": "no"}
SSHD_MARKER = "# eulerbake image hygiene"


def harden_sshd_config(text: str) -> str:
    """No root login and no passwords for sshd.

    sshd keeps the first value it reads for a keyword, so the settings go at the very top (before
    any Include), and the file's own global lines are rewritten to agree.
    """
    if SSHD_MARKER in text:
        return text
    out = []
    in_match = False
    for line in text.splitlines(keepends=True):
        words = line.split()
        if words and words[0].lower() == "match":
            in_match = True
        if not in_match and len(words) >= 2:
            for keyword, value in SSHD_SETTINGS.items():
                if words[0].lower() == keyword.lower():
                    line = f"{keyword} {value}\n"
        out.append(line)
    header = [f"{SSHD_MARKER}: first value wins, so these come first\n"]
    header += [f"{keyword} {value}\n" for keyword, value in SSHD_SETTINGS.items()]
    return "".join(header) + "\n" + "".join(out)


KERNEL_LINE_RE = re.compile(r"^(\s*)(linux|linuxefi|linux16)(\s+)(\S+)(.*)$")


def _edit_args(args: list[str], remove: Sequence[str], add: Sequence[str]) -> list[str]:
    def same_console(arg: str) -> bool:
        # console=ttyS0,9600 and console=ttyS0,115200n8 are the same device: keep only ours.
        return any(
            arg.startswith("console=") and new.startswith("console=") and arg.split(",")[0] == new.split(",")[0]
            for new in add
        )

    kept = [arg for arg in args if arg not in remove and arg not in add and not same_console(arg)]
    return kept + list(add)


def edit_kernel_command_lines(grub_cfg: str, remove: Sequence[str], add: Sequence[str]) -> tuple[str, int]:
    """grub.cfg with every `linux` line's arguments edited; returns (text, lines edited)."""
    out = []
    edited = 0
    for line in grub_cfg.splitlines(keepends=True):
        match = KERNEL_LINE_RE.match(line.rstrip("\n"))
        if match:
            indent, command, space, kernel, rest = match.groups()
            args = _edit_args(rest.split(), remove, add)
            line = f"{indent}{command}{space}{kernel} {' '.join(args)}" + ("\n" if line.endswith("\n") else "")
            edited += 1
        out.append(line)
    return "".join(out), edited


GRUB_DEFAULT_RE = re.compile(r'^(GRUB_CMDLINE_LINUX=)(["\']?)(.*?)\2\s*$')


def edit_grub_defaults(text: str, remove: Sequence[str], add: Sequence[str]) -> str:
    """/etc/default/grub with GRUB_CMDLINE_LINUX edited, so a later grub2-mkconfig keeps the change."""
    out = []
    for line in text.splitlines(keepends=True):
        match = GRUB_DEFAULT_RE.match(line.rstrip("\n"))
        if match:
            prefix, quote, value = match.groups()
            line = f'{prefix}"{" ".join(_edit_args(value.split(), remove, add))}"\n'
        out.append(line)
    return "".join(out)


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


ROOT_GRUB_CONFIGS = ("/boot/grub2/grub.cfg", "/boot/efi/EFI/openEuler/grub.cfg")


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


def apply_hygiene(
    root: ext4.Ext4Image, boot_filesystems: Sequence[BootFilesystem], *, serial_console: str
) -> list[str]:
    """Make a stock cloud image safe to publish; returns what was changed, one line each.

    Locks root's known password, empties the machine id, drops cloud-init state, forbids root and
    password logins over ssh, and puts the kernel log on the serial console.
    """
    changes = []
    for shadow in ("/etc/shadow", "/etc/shadow-"):
        if root.exists(shadow):
            text = root.read_file(shadow).decode()
            locked = lock_password(text)
            if locked != text:
                root.write_file(shadow, locked.encode())
                changes.append(f"{shadow}: root password locked")
    if root.lstat("/etc/machine-id") is not None:
        root.write_file("/etc/machine-id", b"")
    else:
        root.write_file("/etc/machine-id", b"", ext4.FileAttrs(0o444))
    changes.append("/etc/machine-id: emptied (systemd generates a new id on first boot)")
    if root.remove("/var/lib/cloud"):
        changes.append("/var/lib/cloud: removed (cloud-init runs afresh on first boot)")
    sshd = "/etc/ssh/sshd_config"
    if root.exists(sshd):
        root.write_file(sshd, harden_sshd_config(root.read_file(sshd).decode()).encode())
        changes.append(f"{sshd}: PermitRootLogin no, PasswordAuthentication no")

    add = [f"console={serial_console},115200n8", "rd.multipath=0"]
    configs = [GrubConfig(f"root:{path}", root, None, path) for path in ROOT_GRUB_CONFIGS if root.exists(path)]
    for boot in boot_filesystems:
        configs += [GrubConfig(f"partition {boot.number}:{path}", None, boot, path) for path in boot.grub_configs()]
    edited_any = False
    for config in configs:
        text, count = edit_kernel_command_lines(config.read().decode(), KERNEL_ARGS_REMOVED, add)
        if count:
            config.write(text.encode())
            edited_any = True
            removed = " ".join(f"-{arg}" for arg in KERNEL_ARGS_REMOVED)
            changes.append(f"{config.where}: {count} kernel command line(s): {removed} +{' +'.join(add)}")
    if not edited_any:
        raise EulerbakeError(
            "no grub.cfg with a kernel command line found (looked for grub2/grub.cfg and EFI/<vendor>/grub.cfg "
            "on /boot, the EFI system partition and the root filesystem)",
            hint="the serial console cannot be enabled; check the image, or build with hygiene=False",
        )
    if root.exists("/etc/default/grub"):
        text = root.read_file("/etc/default/grub").decode()
        root.write_file("/etc/default/grub", edit_grub_defaults(text, KERNEL_ARGS_REMOVED, add).encode())
    return changes


def _selinux_enabled(root: ext4.Ext4Image) -> bool:
    if not root.exists("/etc/selinux/config"):
        return False
    config = root.read_file("/etc/selinux/config").decode(errors="replace")
    return re.search(r"^\s*SELINUX\s*=\s*(enforcing|permissive)\s*$", config, flags=re.MULTILINE) is not None


# -- raw -----------------------------------------------------------------------------------------


def build_raw(ctx: BuildContext) -> None:
    """Partitions out of the qcow2, root shrunk, overlays + hygiene applied, the sparse raw disk made."""
    for tool in ("qemu-img", "sfdisk", "e2fsck", "resize2fs", "tune2fs", "debugfs", "dumpe2fs", "depmod"):
        require_tool(tool)
    epoch = ctx.source_date_epoch
    root_size = int(ctx.params["root_size"])
    disk_size = int(ctx.params["disk_size"])
    image, table = _open_qcow2(ctx)
    new_table = disk.with_seeded_ids(
        _shrunk_table(table, image.name, root_size, disk_size), ctx.seed("partition-table")
    )
    pieces = _extract_partitions(image, table, ctx.work)
    scratch = ctx.work / "scratch"
    root_number = _pick_root(table, lambda part: (pieces[part.number], 0), epoch, scratch, image.name).number
    last = table.by_position()[-1]
    if root_number != last.number:
        raise EulerbakeError(
            f"the root filesystem is on partition {root_number}, but partition {last.number} comes after it",
            hint="only images whose root partition is the last one can be shrunk",
        )
    shrink_root(pieces[root_number], root_size, epoch=epoch, image_name=image.name, log=ctx.log)
    head = ctx.work / "head.img"
    disk.extract_range(image, "qcow2", 0, table.by_position()[0].offset(table.sector_size), head)

    root = ext4.Ext4Image(pieces[root_number], epoch, scratch)
    releases = module_releases(root)
    written: list[str] = []
    for name in ctx.params["overlays"]:
        overlay = ctx.inputs[name]
        written += ext4.inject_tree(root, overlay, attrs=read_attrs_manifest(overlay), skip={ATTRS_FILE})
    for release in _kernel_releases_touched(written):
        if release not in releases:
            raise EulerbakeError(
                f"an overlay installs kernel modules for {release}, but the image's kernel modules are for "
                f"{', '.join(releases) or 'no kernel at all'}",
                hint="build the module against the image's kernel (its release is in the image-modules stage output)",
            )
        indexes = refresh_module_indexes(root, release, ctx.work)
        ctx.log(f"raw: depmod {release}: {len(indexes)} module index file(s) rewritten")
    ctx.log(f"raw: {len(written)} overlay file(s) injected")

    boots = []
    for number, piece in sorted(pieces.items()):
        kind = "ext" if ext4.is_ext_filesystem(piece) else "fat" if vfat.is_fat_filesystem(piece) else "other"
        if number != root_number and kind != "other":
            boots.append(BootFilesystem(number, piece, kind, epoch, scratch))
    if ctx.params["hygiene"]:
        for change in apply_hygiene(root, boots, serial_console=ctx.params["serial_console"]):
            ctx.log(f"raw: {change}")
    if (written or ctx.params["hygiene"]) and _selinux_enabled(root):
        # New files have no SELinux label; a relabel on first boot gives them the policy's.
        root.write_file("/.autorelabel", b"", ext4.FileAttrs(0o644))

    ext4.check(pieces[root_number], epoch, repair=False)
    for boot in boots:
        boot.check()
    # The root piece is this build's own copy: it becomes disk.raw itself instead of being copied again.
    disk.assemble_disk(ctx.out / "disk.raw", disk_size, new_table, pieces, head=head, consume_last_piece=True)
    description = {"table": new_table.to_json(), "root": root_number, "disk_size": disk_size, "source": image.name}
    (ctx.out / "disk.json").write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def raw_image(
    label: str,
    qcow2: Derivation | FixedOutput,
    overlays: Sequence[Derivation | LocalTree],
    *,
    disk_size: str = "8G",
    root_size: str = "6G",
    hygiene: bool = True,
    arch: str,
) -> Derivation:
    """Stage `raw:<label>`: the sparse `disk.raw` (overlays injected, hygiene applied)."""
    if arch not in SERIAL_CONSOLES:
        raise EulerbakeError(f"unknown architecture {arch!r}", hint=f"use one of {sorted(SERIAL_CONSOLES)}")
    size = _mib_multiple(disk_size, "disk_size")
    root = _mib_multiple(root_size, "root_size")
    if size < root:
        raise EulerbakeError(
            f"disk_size {disk_size} is smaller than root_size {root_size}",
            hint="the disk holds the root partition and the partitions before it; make it larger",
        )
    inputs: dict[str, Derivation | LocalTree | FixedOutput] = {"qcow2": qcow2}
    names = []
    for index, overlay in enumerate(overlays):
        if not isinstance(overlay, (Derivation, LocalTree)):
            raise EulerbakeError(f"overlay {overlay!r} is neither a derivation nor a LocalTree")
        name = f"overlay-{index:02d}"
        inputs[name] = overlay
        names.append(name)
    return Derivation(
        stage="raw",
        label=label,
        builder=build_raw,
        inputs=inputs,
        params={
            "disk_size": size,
            "root_size": root,
            "hygiene": bool(hygiene),
            "arch": arch,
            "serial_console": SERIAL_CONSOLES[arch],
            "overlays": names,
        },
        extra_code=LIBRARY_CODE,
        doc=f"sparse raw disk ({disk_size}, root {root_size}) with {len(names)} overlay(s)"
        + (", hygiene" if hygiene else ""),
    )


# -- image modules -------------------------------------------------------------------------------


def build_image_modules(ctx: BuildContext) -> None:
    """/lib/modules/<release>/ of the image's root filesystem, plus `kernel-release`."""
    for tool in ("qemu-img", "sfdisk", "debugfs"):
        require_tool(tool)
    epoch = ctx.source_date_epoch
    image, table = _open_qcow2(ctx)
    pieces = _extract_partitions(image, table, ctx.work)
    root_part = _pick_root(table, lambda part: (pieces[part.number], 0), epoch, ctx.work / "scratch", image.name)
    root = ext4.Ext4Image(pieces[root_part.number], epoch, ctx.work / "scratch")
    releases = module_releases(root)
    wanted = ctx.params.get("kernel_release")
    if wanted:
        if wanted not in releases:
            raise EulerbakeError(f"{image.name} has no /lib/modules/{wanted} (it has: {', '.join(releases) or 'none'})")
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


def image_modules(label: str, qcow2: Derivation | FixedOutput, *, kernel_release: str | None = None) -> Derivation:
    """Stage `image-modules:<label>`: `lib/modules/<release>/` and `kernel-release` from the qcow2."""
    params: Mapping[str, Any] = {"kernel_release": kernel_release} if kernel_release else {}
    return Derivation(
        stage="image-modules",
        label=label,
        builder=build_image_modules,
        inputs={"qcow2": qcow2},
        params=params,
        extra_code=LIBRARY_CODE,
        doc="kernel modules and kernel release of the image (for module compatibility checks)",
    )
