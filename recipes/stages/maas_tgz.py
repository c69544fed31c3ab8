"""Stage `maas-tgz`: a disk image's root filesystem as a MAAS root tarball (`root.tgz`, boot-resource filetype tgz).

    maas-tgz:<release>:<arch>  disk.raw (or a qcow2) → root.tgz + maas-tgz.json [+ curtin-openeuler.patch]

The seed made `openeuler.tar.gz` with `setup-nbd` + `tar-root`: qemu-nbd, mount and tar, as root; packer-maas
today uses qemu-nbd + nbdfuse + fuse2fs. Here nothing is mounted and nothing runs as root: the root
filesystem (found by its contents) and the filesystems /etc/fstab mounts below it (/boot, the EFI system
partition at /boot/efi) are read with debugfs and mtools and written by Python's tarfile
(`eulerbake.fs.tarball`): bit-reproducible, owners, modes, hard links, devices and xattrs
(security.selinux, security.capability) kept. Measured here (2 shared cores): the 94-entry test image packs
in ~0.5 s; a 1.4 GiB tree of 14,866 files in 74 s, of which debugfs reads all metadata in 3.6 s and dumps
the contents in ~13 s; the rest is gzip -6, on every core (GNU tar | gzip -6 of the same tree: 124 s).

Edits go into the tarball, never into the input image:

- hygiene: /etc/machine-id emptied (systemd makes a new one at first boot), what `cloud-init clean --logs`
  removes (/var/lib/cloud/* but seed/, the cloud-init logs), ssh host keys, a stale /var/lib/dbus/machine-id;
- the compatibility mode (how curtin and cloud-init, which MAAS runs, come to accept openEuler):
  `masquerade` (the seed): os-release `ID="rhel"`, `%rhel <major>` in /etc/rpm/macros.dist, and for UEFI
  `EFI/<vendor>` copied to `EFI/redhat` (curtin's boot id for the rhel family);
  `id-like` (packer-maas today, the default): `ID` kept, `ID_LIKE="rhel centos fedora"` (curtin ≥ 21.3 falls
  back to it), the same `%rhel` macro and EFI copy;
  `native`: the image says what it is; `curtin-openeuler.patch` (in the output) teaches the MAAS server's
  curtin openEuler, and the image's cloud-init is patched only where it lacks openEuler (older than 21.4,
  or the sysconfig renderer's `KNOWN_DISTROS` spelling `openEuler` while its variant is `openeuler`, the
  seed's "No available network renderers" on 21.4).

Then a readiness check (what curtin needs, read from the final tree) fails the stage with the whole list
of what is missing instead of a deploy that fails ten minutes later on the MAAS side.
"""

from __future__ import annotations

import ast
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from eulerbake.core.derivation import BuildContext, Derivation, Input, LocalFile
from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import disk, ext4, vfat
from eulerbake.fs.partitions import pick_root
from eulerbake.fs.tarball import Tree, read_tree, write_tarball
from eulerbake.tools.run import run

COMPAT_MODES = ("masquerade", "id-like", "native")
FIRMWARES = ("bios", "uefi", "both")
DEFAULT_FIRMWARE = {"x86_64": "bios", "aarch64": "uefi"}  # the release table's layouts: dos/BIOS, GPT/UEFI
TARBALL = "root.tgz"
MANIFEST = "maas-tgz.json"
CURTIN_PATCH = Path(__file__).resolve().parents[2] / "overlays" / "maas" / "curtin-openeuler.patch"
ID_LIKE = "rhel centos fedora"  # what packer-maas's openeuler template appends
RPM_MACROS = "/etc/rpm/macros.dist"  # where the seed puts `%rhel 8`
REDHAT_BOOT_ID = "redhat"  # curtin's EFI boot id for the rhel family
EFI_ARCH = {"x86_64": ("x64", "x86_64-efi"), "aarch64": ("aa64", "arm64-efi")}  # (shim/grub suffix, grub target)
CLOUD_INIT_NATIVE = (21, 4)  # distros/openEuler.py appeared in cloud-init 21.4
SELINUX = "security.selinux"
TOOLS = ("sfdisk", "qemu-img", "debugfs", "mcopy")  # table, qcow2 partitions, ext filesystems, FAT (ESP)


@dataclass(frozen=True)
class Params:
    arch: str  # x86_64 or aarch64
    firmware: str  # bios, uefi or both: which boot pieces the readiness check asks for
    compat: str  # masquerade, id-like or native
    rhel_major: int  # the `%rhel` the masquerade and id-like modes define (curtin's `rpm -E %rhel`)
    efi_vendor: str  # the image's own EFI directory (EFI/<vendor>), openEuler's packages use "openEuler"
    hygiene: bool
    require_ready: bool  # False: report what curtin would miss in the log and maas-tgz.json, pack anyway
    compresslevel: int
    zlib: str  # zlib.ZLIB_RUNTIME_VERSION: the compressed bytes depend on it


@dataclass(frozen=True)
class Change:
    path: str
    action: str  # emptied, removed, edited, created, copied
    why: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "action": self.action, "why": self.why}


# -- the disk: partitions, the root filesystem, what fstab mounts under it ----------------------------


def _disk_of(given: Path) -> tuple[Path, str]:
    """(disk file, "raw" or "qcow2"): a derivation output holding disk.raw or one *.qcow2, or the file itself."""
    found = disk.disk_image_in(given)
    if found is None:
        raise EulerbakeError(f"{given} holds neither disk.raw nor exactly one *.qcow2 image",
                             hint="give maas-tgz the raw stage, the packer-maas stage or a disk image file")
    return found


@dataclass(frozen=True)
class _Partition:
    number: int
    location: tuple[Path, int]  # (file, offset) of its bytes
    kind: str  # ext, fat or other
    ids: frozenset[str]  # fstab specs that name it: UUID=…, LABEL=…, PARTUUID=…


def _ext_ids(path: Path, offset: int) -> set[str]:
    with path.open("rb") as handle:
        handle.seek(offset + 1024 + 0x68)
        uuid, label = handle.read(16), handle.read(16)
    text = uuid.hex()
    ids = {f"UUID={text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"}
    name = label.split(b"\0", 1)[0].decode(errors="replace")
    return ids | ({f"LABEL={name}"} if name else set())


def _fat_ids(path: Path, offset: int) -> set[str]:
    with path.open("rb") as handle:
        handle.seek(offset)
        sector = handle.read(512)
    at = 0x43 if sector[0x52:0x57] == b"FAT32" else 0x27  # the extended boot record moves with FAT32
    (volume,) = struct.unpack("<I", sector[at:at + 4])
    label = sector[at + 4:at + 15].decode(errors="replace").strip()
    ids = {f"UUID={volume >> 16:04X}-{volume & 0xFFFF:04X}"}
    return ids | ({f"LABEL={label}"} if label and label != "NO NAME" else set())


def _partitions(image: Path, fmt: str, work: Path) -> tuple[disk.PartitionTable, dict[int, _Partition]]:
    """The partition table and where each partition's bytes are: in place for a raw disk, copied out of a qcow2."""
    if fmt == "qcow2":
        info = disk.validate_qcow2(image)
        table = disk.read_image_partition_table(image, "qcow2", info.virtual_size, work)
    else:
        table = disk.read_partition_table(image)
    found = {}
    for part in table.partitions:
        if fmt == "qcow2":
            piece = work / f"p{part.number}.img"
            disk.extract_range(image, "qcow2", part.offset(table.sector_size), part.length(table.sector_size), piece)
            location = (piece, 0)
        else:
            location = (image, part.offset(table.sector_size))
        ids: set[str] = set()
        if part.uuid:
            ids.add(f"PARTUUID={part.uuid.lower()}")
        elif table.label == "dos":
            ids.add(f"PARTUUID={table.id.removeprefix('0x').lower()}-{part.number:02x}")
        if ext4.is_ext_filesystem(*location):
            kind, ids = "ext", ids | _ext_ids(*location)
        elif vfat.is_fat_filesystem(*location):
            kind, ids = "fat", ids | _fat_ids(*location)
        else:
            kind = "other"
        found[part.number] = _Partition(part.number, location, kind, frozenset(i.upper() if i.startswith(
            ("UUID=", "PARTUUID=")) else i for i in ids))
    return table, found


def _fstab(tree: Tree) -> list[tuple[str, str, str, str]]:
    """(spec, mount point, type, options) of /etc/fstab's filesystems, parents first."""
    if not tree.is_file("/etc/fstab"):
        return []
    entries = []
    for line in tree.read("/etc/fstab").decode(errors="replace").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 3 and fields[1].startswith("/") and fields[1] != "/" and fields[2] not in ("swap", "none"):
            entries.append((fields[0], os.path.normpath(fields[1]), fields[2], fields[3] if len(fields) > 3 else ""))
    return sorted(entries, key=lambda entry: entry[1].count("/"))


def _fat_modes(options: str) -> tuple[int, int, int, int]:
    """(dir mode, file mode, uid, gid) a vfat mount shows, from its fstab options (kernel defaults otherwise)."""
    opts = dict(opt.partition("=")[::2] for opt in options.split(",") if opt)
    umask = int(opts.get("umask", "022"), 8)
    dmask, fmask = int(opts.get("dmask", f"{umask:o}"), 8), int(opts.get("fmask", f"{umask:o}"), 8)
    return 0o777 & ~dmask, 0o777 & ~fmask, int(opts.get("uid", "0")), int(opts.get("gid", "0"))


def _mount_filesystems(tree: Tree, parts: dict[int, _Partition], root: int, epoch: int, work: Path,
                       log: Callable[[str], None]) -> list[str]:
    """Graft what /etc/fstab mounts from this disk (/boot, /boot/efi, …) into the tree; returns what was mounted."""
    mounted = []
    for spec, mount_point, fstype, options in _fstab(tree):
        wanted = spec.upper() if spec.upper().startswith(("UUID=", "PARTUUID=")) else spec
        matches = [p for p in parts.values() if p.number != root and wanted in p.ids]
        if not matches:
            log(f"maas-tgz: {mount_point} ({spec}) is on no partition of this disk: left as the root filesystem has it")
            continue
        part = matches[0]
        if not tree.exists(mount_point) and tree.is_dir(os.path.dirname(mount_point)):
            # systemd makes a missing mount point too; it is root's, labelled like its parent.
            tree.make_dir(mount_point, mode=0o755, xattrs=_inherited_label(tree, os.path.dirname(mount_point)))
        if not tree.is_dir(mount_point):
            raise EulerbakeError(f"/etc/fstab mounts partition {part.number} at {mount_point}, "
                                 "which is not a directory of the root filesystem")
        if part.kind == "ext":
            tree.graft(mount_point, read_tree(ext4.Ext4Image(ext4.inside(*part.location), epoch, work / "scratch")))
        elif part.kind == "fat":
            copied = work / f"fat-p{part.number}"
            copied.mkdir()
            path, offset = part.location
            image = f"{path}@@{offset}" if offset else str(path)
            env = {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": os.devnull}
            proc = run(["mcopy", "-s", "-m", "-n", "-i", image, "::/*", f"{copied}/"], env=env, check=False)
            message = proc.stderr.decode(errors="replace").strip()
            if proc.returncode != 0 and not (not any(copied.iterdir()) and "not found" in message):
                raise EulerbakeError(f"mcopy could not copy partition {part.number} ({mount_point}): {message[-300:]}")
            dir_mode, file_mode, uid, gid = _fat_modes(options)
            tree.graft_host_tree(mount_point, copied, dir_mode=dir_mode, file_mode=file_mode, uid=uid, gid=gid)
        else:
            log(f"maas-tgz: {mount_point} is a {fstype} filesystem that cannot be read here: left out")
            continue
        mounted.append(f"{mount_point}: partition {part.number} ({part.kind})")
    return mounted


# -- hygiene ----------------------------------------------------------------------------------------


def apply_hygiene(tree: Tree) -> list[Change]:
    """What must not travel to every machine MAAS deploys: identities, cloud-init state, host keys."""
    changes = []
    if tree.is_file("/etc/machine-id") and tree.read("/etc/machine-id"):
        changes.append(Change(tree.write_file("/etc/machine-id", b""), "emptied",
                              "systemd makes a new machine id at first boot"))
    dbus = tree.get("/var/lib/dbus/machine-id")
    if dbus is not None and dbus.kind == "file":
        changes.append(Change("/var/lib/dbus/machine-id", "removed", "a stale copy of the machine id"))
        tree.remove("/var/lib/dbus/machine-id")
    cloud = tree.resolve("/var/lib/cloud")
    if cloud is not None and tree.is_dir(cloud):
        for name in tree.listdir(cloud):
            if name != "seed":  # `cloud-init clean` keeps the seed unless told otherwise
                for path in tree.remove(f"{cloud}/{name}"):
                    changes.append(Change(path, "removed", "cloud-init state (cloud-init clean)"))
    for log_file in ("/var/log/cloud-init.log", "/var/log/cloud-init-output.log"):
        for path in tree.remove(log_file):
            changes.append(Change(path, "removed", "cloud-init log (cloud-init clean --logs)"))
    for key in tree.glob("/etc/ssh/ssh_host_*key") + tree.glob("/etc/ssh/ssh_host_*key.pub"):
        changes.append(Change(key, "removed", "ssh host key: every deployed machine would share it"))
        tree.remove(key)
    return changes


# -- os-release, rpm macros, EFI directories ---------------------------------------------------------


def parse_os_release(text: str) -> dict[str, str]:
    """os-release's KEY=value pairs (quotes removed), as curtin and cloud-init read them."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            values[key] = value
    return values


def set_os_release_field(text: str, key: str, value: str) -> str:
    """os-release text with `key="value"` replacing the key's line, or appended; other lines untouched."""
    line = f'{key}="{value}"'
    pattern = re.compile(rf"^{re.escape(key)}=.*$", re.M)
    if pattern.search(text):
        return pattern.sub(line, text, count=1)
    return text + ("" if text.endswith("\n") or not text else "\n") + line + "\n"


def _os_release_path(tree: Tree) -> str:
    for candidate in ("/etc/os-release", "/usr/lib/os-release"):
        real = tree.resolve(candidate)
        if real is not None and tree.is_file(real):
            return real
    raise EulerbakeError("the root filesystem has no os-release file", hint="give an openEuler disk image")


def _inherited_label(tree: Tree, directory: str) -> dict[str, bytes]:
    """A new file's SELinux label: its directory's, as the kernel gives one without a type transition."""
    node = tree.get(directory)
    label = node.xattr(SELINUX) if node is not None else None
    return {SELINUX: label} if label is not None else {}


def define_rhel_macro(tree: Tree, major: int) -> Change | None:
    """`%rhel <major>` in /etc/rpm/macros.dist (curtin runs `rpm -E %rhel` on the BIOS grub path)."""
    line = f"%rhel {major}\n"
    existing = tree.read(RPM_MACROS) if tree.is_file(RPM_MACROS) else None
    if existing is not None:
        text = existing.decode(errors="surrogateescape")
        if re.search(rf"^%rhel\s+{major}\s*$", text, re.M):
            return None
        text = re.sub(r"^%rhel\s.*\n?", "", text, flags=re.M)
        path = tree.write_file(RPM_MACROS, (text + ("" if text.endswith("\n") or not text else "\n") + line)
                               .encode(errors="surrogateescape"))
        return Change(path, "edited", f"%rhel {major} for curtin's `rpm -E %rhel`")
    rpm_dir = tree.make_dir("/etc/rpm", xattrs=_inherited_label(tree, "/etc"))
    path = tree.write_file(RPM_MACROS, line.encode(), xattrs=_inherited_label(tree, rpm_dir))
    return Change(path, "created", f"%rhel {major} for curtin's `rpm -E %rhel`")


def copy_efi_vendor_dir(tree: Tree, vendor: str) -> list[Change]:
    """EFI/<vendor> copied to EFI/redhat, where curtin looks for the rhel family's shim and grub."""
    source, dest = f"/boot/efi/EFI/{vendor}", f"/boot/efi/EFI/{REDHAT_BOOT_ID}"
    if vendor == REDHAT_BOOT_ID or not tree.is_dir(source) or tree.exists(dest):
        return []
    return [Change(path, "copied", f"from EFI/{vendor}: curtin's boot id for the rhel family is redhat")
            for path in tree.copy(source, dest)]


# -- cloud-init inside the image --------------------------------------------------------------------


@dataclass(frozen=True)
class CloudInit:
    package: str  # the cloudinit package directory
    version: tuple[int, ...]

    @property
    def version_text(self) -> str:
        return ".".join(str(part) for part in self.version)


def find_cloud_init(tree: Tree) -> CloudInit | None:
    """The image's cloudinit Python package and its version (cloudinit/version.py), if there is one."""
    for pattern in ("/usr/lib/python3*/site-packages/cloudinit/version.py",
                    "/usr/lib64/python3*/site-packages/cloudinit/version.py"):
        for path in tree.glob(pattern):
            match = re.search(r"""__VERSION__\s*=\s*["']([\d.]+)""", tree.read(path).decode(errors="replace"))
            if match:
                version = tuple(int(part) for part in match.group(1).split(".") if part)
                return CloudInit(path.rsplit("/", 1)[0], version)
    return None


def _list_literal(text: str, name: str) -> tuple[re.Match[str], list[str]] | None:
    match = re.search(rf"^{name}\s*=\s*\[[^\]]*\]", text, re.M)
    if match is None:
        return None
    return match, list(ast.literal_eval(match.group(0).split("=", 1)[1].strip()))


def sysconfig_known_distros(tree: Tree, cloud: CloudInit) -> list[str] | None:
    """cloud-init's sysconfig renderer's KNOWN_DISTROS (it renders the network only for those variants)."""
    path = f"{cloud.package}/net/sysconfig.py"
    if not tree.is_file(path):
        return None
    found = _list_literal(tree.read(path).decode(errors="replace"), "KNOWN_DISTROS")
    return found[1] if found else None


OPENEULER_DISTRO_PY = b'''# Added by eulerbake (maas-tgz, compat=native): cloud-init 21.4's openEuler distro.
from cloudinit.distros import rhel


class Distro(rhel.Distro):
    pass
'''


def _edit_python(tree: Tree, path: str, edit: Callable[[str], str | None], why: str) -> Change | None:
    text = tree.read(path).decode()
    changed = edit(text)
    if changed is None:
        raise EulerbakeError(f"cannot patch {path} for openEuler: its layout is not the one expected",
                             hint="use compat=id-like or compat=masquerade for this image's cloud-init")
    if changed == text:
        return None
    tree.write_file(path, changed.encode())
    return Change(path, "edited", why)


def patch_cloud_init(tree: Tree, cloud: CloudInit) -> list[Change]:
    """Teach an image's cloud-init openEuler where it lacks it (native mode), as cloud-init 21.4/23.3 do."""
    changes: list[Change | None] = []
    pkg = cloud.package

    def add_to_list(name: str, value: str) -> Callable[[str], str | None]:
        def edit(text: str) -> str | None:
            found = _list_literal(text, name)
            if found is None:
                return None
            match, values = found
            if value in values:
                return text
            opening = match.group(0).index("[") + 1
            return text[:match.start() + opening] + f'"{value}", ' + text[match.start() + opening:]
        return edit

    if cloud.version < CLOUD_INIT_NATIVE:
        def add_variant(text: str) -> str | None:
            match = re.search(r"if linux_dist in \(", text)
            if match is None:
                return None
            if re.search(r"""["']openeuler["']""", text):
                return text
            return text[:match.end()] + '"openeuler", ' + text[match.end():]

        def add_family(text: str) -> str | None:
            match = re.search(r"""["']redhat["']\s*:\s*\[""", text)
            if match is None:
                return None
            return text if "openEuler" in text else text[:match.end()] + '"openEuler", ' + text[match.end():]

        changes.append(_edit_python(tree, f"{pkg}/util.py", add_variant, "cloud-init < 21.4: openeuler variant"))
        changes.append(_edit_python(tree, f"{pkg}/distros/__init__.py", add_family,
                                    "cloud-init < 21.4: openEuler in the redhat family"))
        if not tree.exists(f"{pkg}/distros/openEuler.py"):
            node = tree.get(f"{pkg}/distros/rhel.py")
            tree.write_file(f"{pkg}/distros/openEuler.py", OPENEULER_DISTRO_PY,
                            mode=node.mode if node else 0o644,
                            xattrs=_inherited_label(tree, f"{pkg}/distros"))
            changes.append(Change(f"{pkg}/distros/openEuler.py", "created", "cloud-init < 21.4: openEuler distro"))
    known = sysconfig_known_distros(tree, cloud)
    if known is not None and "openeuler" not in known:
        changes.append(_edit_python(tree, f"{pkg}/net/sysconfig.py", add_to_list("KNOWN_DISTROS", "openeuler"),
                                    "sysconfig renders the network only for KNOWN_DISTROS; the variant is openeuler"))
    return [change for change in changes if change is not None]


def apply_compat(tree: Tree, params: Params) -> list[Change]:
    """The compatibility mode's edits (see the module docstring); each edit recorded."""
    changes: list[Change] = []
    if params.compat in ("masquerade", "id-like"):
        path = _os_release_path(tree)
        text = tree.read(path).decode(errors="surrogateescape")
        if params.compat == "masquerade":
            edited, why = set_os_release_field(text, "ID", "rhel"), 'ID="rhel": curtin and cloud-init see RHEL'
        else:
            edited = set_os_release_field(text, "ID_LIKE", ID_LIKE)
            why = f'ID_LIKE="{ID_LIKE}": curtin falls back to it'
        if edited != text:
            tree.write_file(path, edited.encode(errors="surrogateescape"))
            changes.append(Change(path, "edited", why))
        macro = define_rhel_macro(tree, params.rhel_major)
        changes += [macro] if macro else []
        if params.firmware in ("uefi", "both"):
            changes += copy_efi_vendor_dir(tree, params.efi_vendor)
    else:
        cloud = find_cloud_init(tree)
        if cloud is not None:
            changes += patch_cloud_init(tree, cloud)
    return changes


# -- readiness: what curtin needs ---------------------------------------------------------------------

# curtin's distro.py (2026): the names `name_to_distro` knows and the rhel family; native adds openEuler.
CURTIN_DISTRO_NAMES = ("arch", "centos", "debian", "fedora", "freebsd", "gentoo", "opensuse", "redhat", "rhel",
                       "sles", "suse", "ubuntu", "rocky")
CURTIN_REDHAT_FAMILY = ("centos", "fedora", "redhat", "rhel", "rocky")


def curtin_variant(os_release: dict[str, str], native: bool) -> str | None:
    """The variant curtin's `get_distroinfo` picks (ID, then ID_LIKE's words); None when it fails."""
    names = CURTIN_DISTRO_NAMES + (("openEuler",) if native else ())
    for name in [os_release.get("ID", ""), *os_release.get("ID_LIKE", "").split()]:
        if name in names:
            return name
    return None


def _cloud_init_variant(os_release: dict[str, str]) -> str:
    name = os_release.get("ID", "").lower()
    return "rhel" if name in ("rhel", "redhat") else name


def _has(tree: Tree, patterns: Sequence[str]) -> bool:
    return any(tree.glob(pattern) for pattern in patterns)


def readiness_problems(tree: Tree, params: Params) -> list[str]:
    """What a MAAS deployment (curtin, then cloud-init) would miss in this tree, each with where it was looked for."""
    missing = []
    os_release = parse_os_release(tree.read(_os_release_path(tree)).decode(errors="replace"))
    native = params.compat == "native"
    variant = curtin_variant(os_release, native)
    if variant is None:
        missing.append(f"a distro curtin knows: os-release ID={os_release.get('ID', '')!r} "
                       f"ID_LIKE={os_release.get('ID_LIKE', '')!r} names none of {', '.join(CURTIN_DISTRO_NAMES)}")
    elif variant not in CURTIN_REDHAT_FAMILY + ("openEuler",):
        missing.append(f"the rhel family for curtin: os-release makes it {variant!r}")
    if not tree.exists("/usr/bin/cloud-init"):
        missing.append("cloud-init (/usr/bin/cloud-init; package cloud-init)")
    else:
        cloud = find_cloud_init(tree)
        known = sysconfig_known_distros(tree, cloud) if cloud is not None else None
        ci_variant = _cloud_init_variant(os_release)
        network_manager = cloud is not None and tree.exists(f"{cloud.package}/net/network_manager.py") \
            and tree.exists("/usr/bin/nmcli")
        if cloud is not None and known is not None and ci_variant not in known and not network_manager:
            missing.append(f"a network renderer for cloud-init {cloud.version_text}: its sysconfig renderer knows "
                           f"{', '.join(known)} but the variant is {ci_variant!r} (the seed's \"No available network "
                           "renderers\"); use compat=native (patches it) or masquerade")
    if not tree.glob("/boot/vmlinuz-*"):
        missing.append("a kernel (/boot/vmlinuz-*): curtin's grub2-mkconfig finds none")
    if params.firmware in ("uefi", "both"):
        suffix, target = EFI_ARCH[params.arch]
        if not _has(tree, ["/usr/sbin/efibootmgr", "/usr/bin/efibootmgr"]):
            missing.append("efibootmgr (/usr/sbin/efibootmgr; package efibootmgr)")
        if not tree.glob(f"/usr/lib/grub/{target}/*.mod"):
            missing.append(f"grub2 EFI modules (/usr/lib/grub/{target}/*.mod; package grub2-efi-{suffix}-modules)")
        if not tree.glob(f"/boot/efi/EFI/*/shim{suffix}.efi"):
            missing.append(f"shim (/boot/efi/EFI/*/shim{suffix}.efi; package shim)")
        if not any(tree.glob(f"/boot/efi/EFI/{vendor}/grub{suffix}.efi") for vendor in (REDHAT_BOOT_ID,
                                                                                         params.efi_vendor)):
            missing.append(f"the EFI loader directory (/boot/efi/EFI/{REDHAT_BOOT_ID} or "
                           f"/boot/efi/EFI/{params.efi_vendor} with grub{suffix}.efi; package grub2-efi-{suffix})")
    if params.firmware in ("bios", "both"):
        if params.arch != "x86_64":
            missing.append(f"BIOS boot: {params.arch} boots with UEFI only (use firmware=uefi)")
        else:
            if not tree.glob("/usr/lib/grub/i386-pc/*.mod") or not tree.exists("/usr/sbin/grub2-install"):
                missing.append("grub2-pc (/usr/lib/grub/i386-pc/*.mod and /usr/sbin/grub2-install; "
                               "packages grub2-pc, grub2-pc-modules)")
            if not native and rhel_macro(tree) not in ("7", "8", "9"):
                missing.append("a %rhel macro of 7, 8 or 9 (/etc/rpm/macros*, /usr/lib/rpm/macros.d/macros.*): "
                               "curtin's BIOS grub path runs `rpm -E %rhel`")
    return missing


def rhel_macro(tree: Tree) -> str | None:
    """The `%rhel` value the rpm macro files define (the last definition wins, as in rpm)."""
    value = None
    for path in tree.glob("/usr/lib/rpm/macros.d/macros.*") + tree.glob("/etc/rpm/macros*"):
        if tree.is_file(path):
            for match in re.finditer(r"^%rhel\s+(\S+)", tree.read(path).decode(errors="replace"), re.M):
                value = match.group(1)
    return value


# -- the stage -----------------------------------------------------------------------------------------


def build(ctx: BuildContext) -> None:
    """Root filesystem (+ its fstab mounts) → hygiene, compatibility edits, readiness check → root.tgz."""
    params: Params = ctx.params
    epoch = ctx.source_date_epoch
    image, fmt = _disk_of(ctx.inputs["image"])
    table, parts = _partitions(image, fmt, ctx.work)
    scratch = ctx.work / "scratch"
    root = pick_root(table, lambda part: parts[part.number].location, epoch, scratch, image.name).number
    tree = read_tree(ext4.Ext4Image(ext4.inside(*parts[root].location), epoch, scratch), log=ctx.log)
    mounted = _mount_filesystems(tree, parts, root, epoch, ctx.work, ctx.log)
    changes = apply_hygiene(tree) if params.hygiene else []
    compat_changes = apply_compat(tree, params)
    for change in [*changes, *compat_changes]:
        ctx.log(f"maas-tgz: {change.action} {change.path} ({change.why})")
    problems = readiness_problems(tree, params)
    if problems and params.require_ready:
        raise EulerbakeError(
            f"{image.name} is not ready for a MAAS deployment ({params.firmware}, compat={params.compat}); "
            "curtin would miss:\n  - " + "\n  - ".join(problems),
            hint="install what is missing (kickstart %packages in overlays/kickstart), pick the firmware the "
            "image really boots with, or pass require_ready=False to pack it anyway",
        )
    for problem in problems:
        ctx.log(f"maas-tgz: WARNING: curtin would miss {problem}")
    for skipped in tree.skipped:
        ctx.log(f"maas-tgz: {skipped} is a socket: not archived (tar cannot hold one)")
    info = write_tarball(tree, ctx.out / TARBALL, epoch=epoch, scratch=ctx.work / "contents",
                         compresslevel=params.compresslevel, log=ctx.log)
    if params.compat == "native":
        patch = ctx.inputs["curtin-patch"]
        (ctx.out / patch.name).write_bytes(patch.read_bytes())
    manifest = {
        "tarball": TARBALL, "sha256": info.sha256, "size": info.size, "entries": info.entries,
        "hard_links": info.hard_links, "skipped": list(info.skipped), "source": image.name,
        "root_partition": root, "mounted": mounted, "compat": params.compat, "firmware": params.firmware,
        "arch": params.arch, "hygiene": [c.to_json() for c in changes],
        "compat_changes": [c.to_json() for c in compat_changes], "readiness_problems": problems,
    }
    (ctx.out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def maas_tgz(
    label: str,
    image: Input,
    *,
    arch: str,
    firmware: str = "",
    compat: str = "id-like",
    rhel_major: int = 8,
    efi_vendor: str = "openEuler",
    hygiene: bool = True,
    require_ready: bool = True,
    compresslevel: int = 6,
) -> Derivation:
    """Stage `maas-tgz:<label>`: the MAAS root tarball of `image` (a derivation holding disk.raw or a qcow2,
    or an image file). `firmware` defaults to the arch's (x86_64: bios, aarch64: uefi); `both` for an image
    installed with both boot loaders, as the kickstart stage's is."""
    if arch not in EFI_ARCH:
        raise EulerbakeError(f"unknown architecture {arch!r}", hint=f"use one of {', '.join(EFI_ARCH)}")
    firmware = firmware or DEFAULT_FIRMWARE[arch]
    if firmware not in FIRMWARES:
        raise EulerbakeError(f"unknown firmware {firmware!r}", hint=f"use one of {', '.join(FIRMWARES)}")
    if compat not in COMPAT_MODES:
        raise EulerbakeError(f"unknown compatibility mode {compat!r}", hint=f"use one of {', '.join(COMPAT_MODES)}")
    if not 1 <= compresslevel <= 9:
        raise EulerbakeError(f"compresslevel {compresslevel} is not a gzip level", hint="use 1 (fast) to 9 (small)")
    inputs: dict[str, Input] = {"image": image}
    if compat == "native":
        inputs["curtin-patch"] = LocalFile(CURTIN_PATCH)
    return Derivation(
        stage="maas-tgz",
        label=label,
        builder=build,
        inputs=inputs,
        params=Params(arch=arch, firmware=firmware, compat=compat, rhel_major=rhel_major, efi_vendor=efi_vendor,
                      hygiene=bool(hygiene), require_ready=bool(require_ready), compresslevel=compresslevel,
                      zlib=zlib.ZLIB_RUNTIME_VERSION),
        tools=TOOLS,
        doc=f"MAAS root tarball ({firmware}, compat={compat}), rootless and reproducible",
    )
