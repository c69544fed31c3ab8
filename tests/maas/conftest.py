"""Fixtures for the MAAS tests: openEuler-shaped disk images made here with real tools, read back independently.

`mkfs.ext4 -d` copies a staging tree (file types, hard links and sockets as the host has them), then one
`debugfs -w` session sets what a checkout cannot carry: owners, modes, device nodes (`mknod`), SELinux
labels and capabilities (`ea_set`), a POSIX ACL, mtimes (one in the future, to be clamped). `DebugfsView`
reads an image back with its own debugfs calls, one path at a time, so the tests compare the tarball
with something that shares no code with `eulerbake.fs.tarball`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

EPOCH = 1_700_000_000
FUTURE = 1_900_000_000  # after EPOCH: clamped in the tarball
KERNEL = "5.10.0-216.0.0.115.oe2203sp4"
ROOT_UUID = "3c1f0c0e-6a52-4d57-9f0e-0d1a2b3c4d5e"
BOOT_UUID = "7a4e2f10-1b2c-4d3e-8f90-a1b2c3d4e5f6"
ESP_VOLUME_ID = "7B7795E7"
NON_UTF8_NAME = os.fsdecode(b"caf\xe9-latin1.txt")  # a file name that is not UTF-8
LONG_DIR = "a-directory-name-long-enough-that-the-whole-path-needs-a-pax-header-" + "x" * 20
LONG_FILE = "and-a-file-name-that-makes-it-longer-still-" + "y" * 30 + ".txt"
LONG_TARGET = "../../usr/share/doc/" + "z" * 70 + "/target-of-a-slow-symlink"
NUL = "\x00"

OS_RELEASE = (
    'NAME="openEuler"\nVERSION="22.03 (LTS-SP4)"\nID="openEuler"\nVERSION_ID="22.03"\n'
    'PRETTY_NAME="openEuler 22.03 (LTS-SP4)"\nANSI_COLOR="0;31"\n\n'
)
# cap_net_raw=ep and cap_setuid=ep as vfs_cap_data v2 (the second has a byte >= 0x80).
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
CAP_SETUID = struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0)
# POSIX ACL xattr (version 2): user::rwx user:1000:r-x group::r-x mask::r-x other::---
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in (
    (0x01, 7, 0xFFFFFFFF), (0x02, 5, 1000), (0x04, 5, 0xFFFFFFFF), (0x10, 5, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)))

# A cloud-init whose sysconfig knows the lower-case variant (like 23.3+), and an old one (< 21.4).
CLOUD_INIT_PKG = "usr/lib/python3.9/site-packages/cloudinit"
CLOUD_INIT_NEW = {
    "version.py": '__VERSION__ = "23.4"\n',
    "util.py": "def _get_variant(info):\n    if linux_dist in (\n        \"centos\",\n        \"openeuler\",\n    ):\n"
               "        return linux_dist\n",
    "net/sysconfig.py": 'KNOWN_DISTROS = [\n    "almalinux",\n    "centos",\n    "openeuler",\n    "rhel",\n]\n',
    "net/network_manager.py": "# renderer\n",
    "distros/__init__.py": 'OSFAMILIES = {\n    "redhat": [\n        "centos",\n        "openeuler",\n    ],\n}\n',
    "distros/rhel.py": "class Distro:\n    pass\n",
    "distros/openeuler.py": "from cloudinit.distros import rhel\n\n\nclass Distro(rhel.Distro):\n    pass\n",
}
CLOUD_INIT_OLD = {
    "version.py": '__VERSION__ = "19.4"\n',
    "util.py": "def system_info():\n    if system == \"linux\":\n        linux_dist = info['dist'][0].lower()\n"
               "        if linux_dist in (\n                'arch', 'centos', 'debian', 'fedora', 'rhel', 'suse'):\n"
               "            var = linux_dist\n",
    "net/sysconfig.py": "KNOWN_DISTROS = ['centos', 'fedora', 'rhel', 'suse']\n",
    "distros/__init__.py": "OSFAMILIES = {\n    'debian': ['debian', 'ubuntu'],\n    'redhat': ['centos', 'fedora', "
                           "'rhel'],\n}\n",
    "distros/rhel.py": "class Distro:\n    pass\n",
}


def _blob(size: int, seed: bytes) -> bytes:
    out, block = bytearray(), seed
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64  # compressible enough to keep the tarball small, varied enough to matter
    return bytes(out[:size])


def _write(root: Path, rel: str, data: bytes | str = b"", mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def stage_root(root: Path, *, cloud_init: dict[str, str], split_boot: bool, arch: str = "x86_64") -> list[str]:
    """An openEuler-shaped root tree; returns the debugfs commands that finish it inside the image."""
    suffix, target = ("x64", "x86_64-efi") if arch == "x86_64" else ("aa64", "arm64-efi")
    (root / "etc").mkdir(parents=True)
    _write(root, "usr/lib/os-release", OS_RELEASE)
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    _write(root, "etc/machine-id", "4f2c9d0e8a7b4c3d2e1f0a9b8c7d6e5f\n", 0o444)
    fstab = f"UUID={ROOT_UUID} / ext4 defaults 1 1\n"
    if split_boot:
        fstab += f"UUID={BOOT_UUID} /boot ext4 defaults 1 2\n"
        fstab += f"UUID={ESP_VOLUME_ID[:4]}-{ESP_VOLUME_ID[4:]} /boot/efi vfat umask=0077,shortname=winnt 0 2\n"
    _write(root, "etc/fstab", fstab)
    _write(root, "etc/hostname", "localhost\n")
    _write(root, "etc/passwd", "root:x:0:0:root:/root:/bin/bash\nopeneuler:x:1000:1000::/home/openeuler:/bin/bash\n")
    _write(root, "etc/shadow", "root:!!:19000:0:99999:7:::\n", 0o000)
    _write(root, "etc/ssh/sshd_config", "PermitRootLogin no\n", 0o600)
    _write(root, "etc/ssh/ssh_host_ed25519_key", "PRIVATE\n", 0o640)
    _write(root, "etc/ssh/ssh_host_ed25519_key.pub", "ssh-ed25519 AAAA host\n")
    (root / "etc/rpm").mkdir()
    _write(root, "usr/lib/rpm/macros.d/macros.dist", "%dist .oe2203sp4\n%openEuler 1\n")
    _write(root, "usr/bin/cloud-init", "#!/usr/bin/python3\n", 0o755)
    for rel, text in cloud_init.items():
        _write(root, f"{CLOUD_INIT_PKG}/{rel}", text)
    _write(root, "usr/sbin/efibootmgr", "ELF efibootmgr\n", 0o755)
    _write(root, "usr/sbin/grub2-install", "ELF grub2-install\n", 0o755)
    _write(root, f"usr/lib/grub/{target}/normal.mod", "grub module\n")
    if arch == "x86_64":
        _write(root, "usr/lib/grub/i386-pc/normal.mod", "grub module\n")
    (root / "boot/efi").mkdir(parents=True)
    if not split_boot:
        _write(root, f"boot/vmlinuz-{KERNEL}.{arch}", _blob(300_000, b"kernel"), 0o755)
        _write(root, f"boot/initramfs-{KERNEL}.{arch}.img", _blob(200_000, b"initrd"), 0o600)
        _write(root, "boot/grub2/grub.cfg", "set timeout=1\n", 0o600)
        _write(root, f"boot/efi/EFI/openEuler/shim{suffix}.efi", _blob(9000, b"shim"), 0o700)
        _write(root, f"boot/efi/EFI/openEuler/grub{suffix}.efi", _blob(7000, b"grub"), 0o700)
        _write(root, "boot/efi/EFI/openEuler/grub.cfg", "configfile /boot/grub2/grub.cfg\n", 0o700)
        _write(root, f"boot/efi/EFI/BOOT/BOOT{suffix.upper()}.EFI", _blob(9000, b"shim"), 0o700)
    _write(root, "var/lib/cloud/instances/i-0abc/user-data.txt", "#cloud-config\n", 0o600)
    (root / "var/lib/cloud/instance").symlink_to("/var/lib/cloud/instances/i-0abc")
    _write(root, "var/lib/cloud/data/instance-id", "i-0abc\n")
    _write(root, "var/lib/cloud/seed/nocloud/meta-data", "instance-id: seed\n")
    _write(root, "var/log/cloud-init.log", "ran\n", 0o640)
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    _write(root, "usr/bin/ping", "ELF ping\n", 0o755)
    _write(root, "usr/bin/newuidmap", "ELF newuidmap\n", 0o755)
    _write(root, "usr/bin/passwd", "ELF passwd\n", 0o755)
    _write(root, "usr/sbin/mke2fs", "ELF mke2fs\n", 0o755)
    os.link(root / "usr/sbin/mke2fs", root / "usr/sbin/mkfs.ext4")
    os.link(root / "usr/sbin/mke2fs", root / "usr/sbin/mkfs.ext3")
    _write(root, "usr/lib/firmware/blob.bin", _blob(3 * 1024 * 1024 + 17, b"firmware"))
    _write(root, "usr/share/doc/caf\u00e9.txt", "caf\u00e9\n")
    (root / "usr/share/doc" / NON_UTF8_NAME).write_bytes(b"latin-1 name\n")
    _write(root, f"usr/share/doc/{LONG_DIR}/{LONG_FILE}", "long\n")
    (root / "usr/lib/long-link").symlink_to(LONG_TARGET)
    _write(root, "var/empty.conf", "")
    (root / "tmp").mkdir()
    (root / "root").mkdir()
    _write(root, "home/openeuler/.bashrc", "# bashrc\n")
    (root / "dev").mkdir()
    (root / "var/spool").mkdir(parents=True)
    os.mkfifo(root / "var/spool/fifo")
    (root / "run").mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "run/test.sock"))

    commands = [
        "sif /tmp mode 041777", "sif /root mode 040550",
        "sif /home/openeuler uid 1000", "sif /home/openeuler gid 1000", "sif /home/openeuler mode 040700",
        "sif /home/openeuler/.bashrc uid 1000", "sif /home/openeuler/.bashrc gid 1000",
        "sif /usr/bin/passwd mode 0104755",
        "ln /usr/bin/ping /usr/bin/ping6", "sif /usr/bin/ping links_count 2",  # a hard link made by debugfs
        "sif /etc/ssh/ssh_host_ed25519_key gid 994",
        "cd /dev", "mknod null c 1 3", "sif null mode 020666", "mknod sda b 8 0", "sif sda mode 060660",
        "sif sda gid 6", "cd /",
        "sif /var/spool/fifo mode 010600",
        "ea_set -f {cap_net_raw} /usr/bin/ping security.capability",
        "ea_set -f {cap_setuid} /usr/bin/newuidmap security.capability",
        "sif /var/empty.conf mode 0100750", "ea_set -f {acl} /var/empty.conf system.posix_acl_access",
        "ea_set /usr/lib/firmware/blob.bin user.origin vendor-blob",
        "ea_set -f {binary} /usr/lib/firmware/blob.bin user.binary",
        "sif /usr/lib/firmware/blob.bin mtime @" + str(FUTURE),
        "sif /etc/hostname mtime @1600000000",
    ]
    return commands


def label_commands(root: Path, paths: list[str]) -> list[str]:
    """An SELinux label on every path, as an openEuler image has (with the trailing NUL of real labels)."""
    kinds = {"etc": "etc_t", "usr": "usr_t", "boot": "boot_t", "var": "var_t", "home": "user_home_t",
             "dev": "device_t", "tmp": "tmp_t"}
    commands = []
    for path in paths:
        top = path.strip("/").split("/")[0]
        label = f"system_u:object_r:{kinds.get(top, 'default_t')}:s0"
        if path == "/usr/lib/firmware/blob.bin":
            label = "system_u:object_r:a_label_long_enough_to_be_left_out_of_debugfs_stat_t:s0"
        label_file = root / f"label-{len(commands)}"
        label_file.write_bytes((label + NUL).encode())
        commands.append(f'ea_set -f "{label_file}" "{path}" security.selinux')
    return commands


def fs_env() -> dict[str, str]:
    return {**os.environ, "E2FSPROGS_FAKE_TIME": str(EPOCH), "LC_ALL": "C.UTF-8", "TZ": "UTC"}


def make_ext4(staging: Path, image: Path, size_mib: int, uuid: str, extra: list[str], scratch: Path) -> None:
    """mkfs.ext4 -d staging, then the debugfs commands (plus an SELinux label on every path)."""
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", uuid, "-E", "hash_seed=" + uuid, "-d", staging,
                    image, f"{size_mib}M"], check=True, env=fs_env(), capture_output=True)
    scratch.mkdir(parents=True, exist_ok=True)
    for name, value in (("cap_net_raw", CAP_NET_RAW), ("cap_setuid", CAP_SETUID), ("acl", ACL),
                        ("binary", b"\x00\xff\x80binary\n")):
        (scratch / name).write_bytes(value)
    commands = [c.format(cap_net_raw=scratch / "cap_net_raw", cap_setuid=scratch / "cap_setuid",
                         acl=scratch / "acl", binary=scratch / "binary") for c in extra]
    paths = ["/"] + sorted("/" + p.relative_to(staging).as_posix() for p in staging.rglob("*")
                           if not p.is_socket())
    if any(c.startswith("mknod") for c in commands):
        paths += ["/dev/null", "/dev/sda"]
    commands += label_commands(scratch, [p for p in paths if '"' not in p])
    script = "\n".join(commands).encode("utf-8", "surrogateescape")
    proc = subprocess.run(["debugfs", "-w", "-f", "-", image], input=script, env=fs_env(), capture_output=True,
                          check=True)
    problems = [line for line in proc.stderr.decode(errors="replace").splitlines() if not line.startswith("debugfs ")]
    assert not problems, problems


def make_fat(image: Path, size_mib: int, files: dict[str, bytes]) -> None:
    with image.open("wb") as handle:
        handle.truncate(size_mib * 2**20)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC", "SOURCE_DATE_EPOCH": str(EPOCH)}
    subprocess.run(["mkfs.vfat", "-F", "32", "-i", ESP_VOLUME_ID, "-n", "EFI", image], check=True,
                   env=env, capture_output=True)
    made: set[str] = set()
    for rel, data in sorted(files.items()):
        parts = rel.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folder = "/".join(parts[:depth])
            if folder not in made:
                subprocess.run(["mmd", "-i", image, f"::/{folder}"], check=True, env=env, capture_output=True)
                made.add(folder)
        local = image.with_name("fat-upload")
        local.write_bytes(data)
        os.utime(local, (EPOCH - 100, EPOCH - 100))
        subprocess.run(["mcopy", "-m", "-i", image, local, f"::/{rel}"], check=True, env=env, capture_output=True)
        local.unlink()


def assemble(disk: Path, label: str, pieces: list[tuple[Path, str]]) -> None:
    """A disk with the pieces as partitions (1 MiB aligned) and a partition table made by sfdisk."""
    offset = 2**20
    lines = [f"label: {label}", "unit: sectors", ""]
    for piece, kind in pieces:
        sectors = piece.stat().st_size // 512
        lines.append(f"start={offset // 512}, size={sectors}, type={kind}")
        offset += piece.stat().st_size
    with disk.open("wb") as handle:
        handle.truncate(offset + 2**20)
    if label == "dos":
        lines[1:1] = ["label-id: 0x1234abcd"]
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", disk], input="\n".join(lines).encode(), check=True,
                   capture_output=True)
    offset = 2**20
    for piece, _ in pieces:
        subprocess.run(["dd", f"if={piece}", f"of={disk}", "bs=1M", f"seek={offset // 2**20}", "conv=notrunc,sparse",
                        "status=none"], check=True)
        offset += piece.stat().st_size


@dataclass
class DiskImage:
    disk: Path  # disk.raw (or a qcow2)
    directory: Path  # the folder holding it, like a derivation output
    root_fs: Path  # the root filesystem alone, for DebugfsView
    arch: str

    def view(self) -> DebugfsView:
        return DebugfsView(self.root_fs)


def build_single_root_image(where: Path, *, cloud_init: dict[str, str] | None = None,
                            omit: tuple[str, ...] = ()) -> DiskImage:
    """x86_64, one ext4 root partition holding /boot and /boot/efi (what the Packer install makes);
    `omit`: staged paths (files or trees) left out, to make an image that is not ready for curtin."""
    staging = where / "staging"
    extra = stage_root(staging, cloud_init=cloud_init or CLOUD_INIT_NEW, split_boot=False)
    for rel in omit:
        target = staging / rel
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    root_fs = where / "root.ext4"
    make_ext4(staging, root_fs, 64, ROOT_UUID, extra, where / "scratch")
    out = where / "image"
    out.mkdir()
    assemble(out / "disk.raw", "dos", [(root_fs, "83")])
    return DiskImage(out / "disk.raw", out, root_fs, "x86_64")


def build_split_image(where: Path) -> DiskImage:
    """aarch64 as a qcow2: GPT with an ESP (vfat), /boot (ext4) and the root (ext4), mounted by fstab UUIDs."""
    staging = where / "staging"
    extra = stage_root(staging, cloud_init=CLOUD_INIT_NEW, split_boot=True, arch="aarch64")
    root_fs = where / "root.ext4"
    make_ext4(staging, root_fs, 64, ROOT_UUID, extra, where / "scratch")
    boot_staging = where / "boot-staging"
    _write(boot_staging, f"vmlinuz-{KERNEL}.aarch64", _blob(300_000, b"kernel"), 0o755)
    _write(boot_staging, "grub2/grub.cfg", "set timeout=1\n", 0o600)
    (boot_staging / "efi").mkdir()
    boot_fs = where / "boot.ext4"
    make_ext4(boot_staging, boot_fs, 16, BOOT_UUID, [], where / "scratch-boot")
    esp = where / "esp.vfat"
    make_fat(esp, 40, {"EFI/openEuler/shimaa64.efi": _blob(9000, b"shim"),
                       "EFI/openEuler/grubaa64.efi": _blob(7000, b"grub"),
                       "EFI/BOOT/BOOTAA64.EFI": _blob(9000, b"shim")})
    raw = where / "split.raw"
    assemble(raw, "gpt", [(esp, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
                          (boot_fs, "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
                          (root_fs, "0FC63DAF-8483-4772-8E79-3D69D8477DE4")])
    out = where / "image"
    out.mkdir()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out / "openeuler.qcow2"], check=True)
    raw.unlink()
    return DiskImage(out / "openeuler.qcow2", out, root_fs, "aarch64")


@pytest.fixture(scope="session")
def single_root_image(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    return build_single_root_image(tmp_path_factory.mktemp("single-root"))


@pytest.fixture(scope="session")
def split_image(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    return build_split_image(tmp_path_factory.mktemp("split"))


# -- reading an image back, independently ------------------------------------------------------------


@dataclass(frozen=True)
class Inode:
    ino: int
    mode: int  # full st_mode
    uid: int
    gid: int
    links: int
    mtime: int
    rdev: tuple[int, int]


class DebugfsView:
    """An ext4 image read one path at a time with plain `debugfs -R` calls (no eulerbake code)."""

    def __init__(self, image: Path) -> None:
        self.image = image

    def _run(self, request: str) -> bytes:
        proc = subprocess.run(["debugfs", "-R", request, self.image], capture_output=True, check=True)
        return proc.stdout

    def paths(self) -> Iterator[str]:
        """Every path (depth first), sockets included."""
        stack = ["/"]
        while stack:
            directory = stack.pop()
            yield directory
            for line in self._run(f'ls -p "{directory}"').splitlines():
                fields = line.split(b"/")
                if len(fields) < 6 or fields[5] in (b".", b"..", b"") or fields[1] == b"0":
                    continue
                path = (directory.rstrip("/") + "/" + os.fsdecode(fields[5]))
                if stat.S_ISDIR(int(fields[2], 8)):
                    stack.append(path)
                else:
                    yield path

    def inode(self, path: str) -> Inode:
        text = self._run(f'stat "{path}"').decode(errors="replace")
        ino = int(re.search(r"Inode: (\d+)", text).group(1))  # type: ignore[union-attr]
        perms = int(re.search(r"Mode:\s+(\d+)", text).group(1), 8)  # type: ignore[union-attr]
        kind = re.search(r"Type: (\w+)", text).group(1)  # type: ignore[union-attr]
        fmt = {"regular": stat.S_IFREG, "directory": stat.S_IFDIR, "symlink": stat.S_IFLNK,
               "character": stat.S_IFCHR, "block": stat.S_IFBLK, "FIFO": stat.S_IFIFO, "socket": stat.S_IFSOCK}[kind]
        uid = int(re.search(r"User:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
        gid = int(re.search(r"Group:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
        links = int(re.search(r"Links: (\d+)", text).group(1))  # type: ignore[union-attr]
        mtime = int(re.search(r" mtime: 0x([0-9a-f]+)", text).group(1), 16)  # type: ignore[union-attr]
        device = re.search(r"Device major/minor number: (\d+):(\d+)", text)
        rdev = (int(device.group(1)), int(device.group(2))) if device else (0, 0)
        return Inode(ino, fmt | perms, uid, gid, links, mtime, rdev)

    def content(self, path: str) -> bytes:
        return self._run(f'cat "{path}"')

    def link_target(self, path: str) -> str:
        text = self._run(f'stat "{path}"')
        fast = re.search(rb'Fast link dest: "(.*)"', text)
        return os.fsdecode(fast.group(1) if fast else self.content(path))

    def xattrs(self, path: str, scratch: Path) -> dict[str, bytes]:
        listing = self._run(f'ea_list "{path}"')
        values = {}
        for name in re.findall(rb"^  (\S+) \(\d+\)", listing, re.M):
            dest = scratch / "xattr-value"
            subprocess.run(["debugfs", "-R", f'ea_get -f "{dest}" "{path}" {name.decode()}', self.image],
                           check=True, capture_output=True)
            values[name.decode()] = dest.read_bytes()
        values.pop("system.data", None)
        return values


def run_stage(node: object, store: Path) -> Path:
    """Realise a node in a throw-away store (the engine's own path: declared tools checked) → its output."""
    from eulerbake.store.local import Store

    return Store(store).realise(node, log=lambda _m: None).path  # type: ignore[arg-type]


@pytest.fixture
def extract(tmp_path: Path) -> Iterator[object]:
    """Extract a tarball with GNU tar as curtin does (xattrs, SELinux labels, numeric owners), as root."""
    made: list[Path] = []

    def _extract(tarball: Path, name: str = "extracted") -> Path:
        dest = tmp_path / name
        dest.mkdir()
        # curtin's own command (commands/extract.py), plus --selinux as packer-maas's tar-root writes them.
        subprocess.run(["tar", "-C", dest, "--xattrs", "--xattrs-include=*", "--selinux", "-Sxpzf", tarball,
                        "--numeric-owner"], check=True, capture_output=True)
        made.append(dest)
        return dest

    yield _extract
    for dest in made:
        shutil.rmtree(dest, ignore_errors=True)
