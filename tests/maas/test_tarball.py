"""The maas-tgz tarball against the image it was made from: extracted by GNU tar as curtin extracts it and
compared with the root filesystem read independently (plain debugfs calls, `DebugfsView`).

Built rootless from a disk.raw (read in place) and from a qcow2 with /boot and the ESP on partitions of
their own; two builds under another umask and time zone give the same bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from eulerbake.core.derivation import LocalTree
from recipes.stages.maas_tgz import maas_tgz
from tests.maas.conftest import EPOCH, FUTURE, LONG_DIR, LONG_FILE, NON_UTF8_NAME, DiskImage, run_stage

REPO = Path(__file__).resolve().parents[2]


def _packed(image: DiskImage, store: Path, **options: Any) -> Path:
    options.setdefault("firmware", "both" if image.arch == "x86_64" else "uefi")
    node = maas_tgz("test", LocalTree(image.directory), arch=image.arch, **options)
    return run_stage(node, store)


def _acl_entries(value: bytes) -> list[tuple[int, int, int | None]]:
    """POSIX ACL xattr entries (tag, perm, id), the id only where it means something (named user/group):
    the kernel writes -1 for the others, e2fsprogs 0."""
    (version,) = struct.unpack_from("<I", value)
    assert version == 2
    entries = []
    for offset in range(4, len(value), 8):
        tag, perm, ident = struct.unpack_from("<HHI", value, offset)
        entries.append((tag, perm, ident if tag in (0x02, 0x08) else None))
    return entries


def _xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)}


def test_tarball_holds_the_filesystem_exactly(single_root_image: DiskImage, tmp_path: Path, extract: Any) -> None:
    out = _packed(single_root_image, tmp_path / "store", compat="native", hygiene=False)
    manifest = json.loads((out / "maas-tgz.json").read_text())
    assert manifest["compat_changes"] == [] and manifest["hygiene"] == []
    root = extract(out / "root.tgz")
    view = single_root_image.view()
    expected = set()
    by_inode: dict[int, list[Path]] = {}
    for path in view.paths():
        inode = view.inode(path)
        local = root / path.lstrip("/") if path != "/" else root
        if stat.S_ISSOCK(inode.mode):
            assert not os.path.lexists(local), "a socket cannot be in a tarball"
            assert manifest["skipped"] == [path]
            continue
        expected.add(path)
        st = os.lstat(local)
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(inode.mode), path
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(inode.mode), f"{path}: mode {st.st_mode:o} != {inode.mode:o}"
        assert (st.st_uid, st.st_gid) == (inode.uid, inode.gid), path
        if not stat.S_ISLNK(inode.mode):  # tar does not set a symlink's mtime with -p on every system
            assert int(st.st_mtime) == min(inode.mtime, EPOCH), path
        if stat.S_ISREG(inode.mode):
            assert local.read_bytes() == view.content(path), path
            by_inode.setdefault(inode.ino, []).append(local)
        elif stat.S_ISLNK(inode.mode):
            assert os.readlink(local) == view.link_target(path), path
        elif stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == inode.rdev, path
        wanted = view.xattrs(path, tmp_path)
        got = _xattrs(local)
        if "system.posix_acl_access" in wanted:
            assert _acl_entries(got.pop("system.posix_acl_access")) == \
                _acl_entries(wanted.pop("system.posix_acl_access")), path
        assert got == wanted, path
    extracted = {"/" + p.relative_to(root).as_posix() for p in root.rglob("*")} | {"/"}
    assert extracted == expected
    # hard links: every name of a multiply linked inode is one inode after extraction
    linked = [paths for paths in by_inode.values() if len(paths) > 1]
    assert sorted(len(paths) for paths in linked) == [2, 3]  # ping + ping6 (debugfs ln); mke2fs, mkfs.ext4/3
    for paths in linked:
        assert len({os.lstat(p).st_ino for p in paths}) == 1 and os.lstat(paths[0]).st_nlink == len(paths)


def test_the_edge_cases_are_really_in_the_image(single_root_image: DiskImage, tmp_path: Path) -> None:
    """The comparison above covers what it should: the image holds each awkward case."""
    view = single_root_image.view()
    paths = set(view.paths())
    assert f"/usr/share/doc/{NON_UTF8_NAME}" in paths
    assert f"/usr/share/doc/{LONG_DIR}/{LONG_FILE}" in paths and len(f"./usr/share/doc/{LONG_DIR}/{LONG_FILE}") > 100
    assert len(view.link_target("/usr/lib/long-link")) > 60  # not a fast symlink: its target is in a block
    assert view.inode("/usr/bin/passwd").mode & stat.S_ISUID
    assert view.inode("/tmp").mode & stat.S_ISVTX
    assert view.inode("/dev/null").rdev == (1, 3) and stat.S_ISBLK(view.inode("/dev/sda").mode)
    assert stat.S_ISFIFO(view.inode("/var/spool/fifo").mode) and stat.S_ISSOCK(view.inode("/run/test.sock").mode)
    assert view.inode("/usr/lib/firmware/blob.bin").mtime == FUTURE
    assert b"\x80" in view.xattrs("/usr/bin/newuidmap", tmp_path)["security.capability"]
    assert len(view.xattrs("/usr/lib/firmware/blob.bin", tmp_path)["security.selinux"]) > 40
    assert view.inode("/usr/sbin/mke2fs").links == 3
    ping, ping6 = view.inode("/usr/bin/ping"), view.inode("/usr/bin/ping6")
    assert ping6.ino == ping.ino and ping.links == 2


def test_archive_format_is_reproducible_by_construction(single_root_image: DiskImage, tmp_path: Path) -> None:
    out = _packed(single_root_image, tmp_path / "store")
    raw = (out / "root.tgz").read_bytes()
    flags, mtime = raw[3], struct.unpack_from("<I", raw, 4)[0]
    assert raw[:2] == b"\x1f\x8b" and flags & 0x08 == 0 and mtime == 0  # gzip: no FNAME, mtime 0
    tar_bytes = gzip.decompress(raw)
    assert b"hdrcharset" not in tar_bytes  # GNU tar 1.34 warns about it
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] in (".", "./")
    # depth first, a directory before its contents, names in byte order within each directory
    parts = [tuple(os.fsencode(part) for part in name.split("/")) for name in names]
    assert parts == sorted(parts)
    assert all(m.mtime <= EPOCH for m in members)
    assert {m.uname for m in members} == {""} and {m.gname for m in members} == {""}
    for m in members:
        assert not {"mtime", "atime", "ctime"} & set(m.pax_headers)
    blob = next(m for m in members if m.name == "./usr/lib/firmware/blob.bin")
    assert blob.mtime == EPOCH  # a future mtime is clamped to SOURCE_DATE_EPOCH
    assert blob.pax_headers["SCHILY.xattr.user.binary"] == "\x00\udcff\udc80binary\n"


_BUILD_SCRIPT = """
import sys
from pathlib import Path
from eulerbake.core.derivation import LocalTree
from eulerbake.store.local import Store
from recipes.stages.maas_tgz import maas_tgz
node = maas_tgz("repro", LocalTree(Path(sys.argv[1])), arch="x86_64", firmware="both")
print(Store(Path(sys.argv[2])).realise(node, log=lambda m: None).path)
"""


def _build_elsewhere(image: DiskImage, store: Path, umask: int, tz: str) -> tuple[Path, float]:
    path = [str(REPO / "src"), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "TZ": tz, "PYTHONPATH": os.pathsep.join(path)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", f"import os; os.umask({umask:#o}); exec({_BUILD_SCRIPT!r})",
                           str(image.directory), str(store)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1]), time.monotonic() - started


def test_two_builds_are_bit_identical_under_another_umask_and_time_zone(single_root_image: DiskImage,
                                                                        tmp_path: Path) -> None:
    first, seconds = _build_elsewhere(single_root_image, tmp_path / "store-a", 0o022, "UTC")
    second, _ = _build_elsewhere(single_root_image, tmp_path / "store-b", 0o077, "Asia/Shanghai")
    assert first.name == second.name  # the same key
    assert (first / "root.tgz").read_bytes() == (second / "root.tgz").read_bytes()
    assert (first / "maas-tgz.json").read_bytes() == (second / "maas-tgz.json").read_bytes()
    print(f"maas-tgz of the test image (process start included): {seconds:.2f} s")


def test_the_input_image_is_not_modified(single_root_image: DiskImage, tmp_path: Path) -> None:
    before = single_root_image.disk.read_bytes()
    _packed(single_root_image, tmp_path / "store", compat="masquerade")
    assert single_root_image.disk.read_bytes() == before


def test_qcow2_with_boot_and_esp_partitions(split_image: DiskImage, tmp_path: Path, extract: Any) -> None:
    out = _packed(split_image, tmp_path / "store", compat="id-like")
    manifest = json.loads((out / "maas-tgz.json").read_text())
    assert manifest["mounted"] == ["/boot: partition 2 (ext)", "/boot/efi: partition 1 (fat)"]
    root = extract(out / "root.tgz")
    kernel = next((root / "boot").glob("vmlinuz-*"))
    assert kernel.stat().st_size == 300_000 and stat.S_IMODE(kernel.stat().st_mode) == 0o755
    assert (root / "boot/grub2/grub.cfg").is_file()
    shim = root / "boot/efi/EFI/openEuler/shimaa64.efi"
    # FAT has no modes or owners: they come from fstab's umask=0077
    assert stat.S_IMODE(shim.stat().st_mode) == 0o700 and stat.S_IMODE((root / "boot/efi").stat().st_mode) == 0o700
    assert (root / "boot/efi/EFI/redhat/shimaa64.efi").read_bytes() == shim.read_bytes()
    assert manifest["readiness_problems"] == []


def test_parallel_compression_does_not_change_a_byte(single_root_image: DiskImage, tmp_path: Path,
                                                     monkeypatch: Any) -> None:
    from eulerbake.fs import tarball
    from eulerbake.fs.ext4 import Ext4Image, inside

    monkeypatch.setattr(tarball, "GZIP_BLOCK", 64 * 1024)  # many members from a small image
    tree = tarball.read_tree(Ext4Image(inside(single_root_image.disk, 2**20), EPOCH, tmp_path / "scratch"))
    outputs = []
    for workers in (1, 4):
        dest = tmp_path / f"root-{workers}.tgz"
        info = tarball.write_tarball(tree, dest, epoch=EPOCH, scratch=tmp_path / "contents", workers=workers)
        outputs.append(dest.read_bytes())
        assert info.size == len(outputs[-1])
    assert outputs[0] == outputs[1]
    assert outputs[0].count(b"\x1f\x8b\x08\x00\x00\x00\x00\x00") > 10  # members: no name, mtime 0
    with tarfile.open(tmp_path / "root-1.tgz") as tar:
        assert len(tar.getmembers()) == len(tree.nodes)
