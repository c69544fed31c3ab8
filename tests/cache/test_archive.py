"""The archive format on its own: round trips, what GNU tar makes of it, sparse files and zero runs, and
everything unpacking refuses (named by member), with nothing written outside the target."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from eulerbake.core import hashing
from eulerbake.store import archive
from eulerbake.store.seal import seal

MiB = 2**20


def _tree(root: Path) -> Path:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("hello\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "sub" / "deep" / "ünïcode name").write_bytes(b"\x00\x01")
    (root / ("long-" + "x" * 150)).write_text("long name")
    os.symlink("sub/a.txt", root / "link")
    os.symlink("../a.txt", root / "sub" / "deep" / "up")
    (root / "empty").mkdir()
    with (root / "disk.raw").open("wb") as f:
        f.truncate(64 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    (root / "zeros.bin").write_bytes(bytes(4 * MiB) + b"end")  # zeros written out, not holes
    seal(root, 1_700_000_000)
    return root


def _roundtrip(tmp_path: Path) -> tuple[Path, Path, archive.Packed]:
    entry = _tree(tmp_path / "entry")
    packed = archive.pack_file(entry, tmp_path / "a.tar.zst")
    with (tmp_path / "a.tar.zst").open("rb") as f:
        archive.unpack(f, tmp_path / "out")
    return entry, tmp_path / "out", packed


def test_roundtrip_keeps_the_tree_and_its_holes(tmp_path: Path) -> None:
    entry, out, packed = _roundtrip(tmp_path)
    assert hashing.hash_tree(out, use_cache=False) == hashing.hash_tree(entry, use_cache=False)
    assert packed.hash == hashing.hash_file(tmp_path / "a.tar.zst", use_cache=False)
    assert packed.size < 1.1 * MiB and packed.data_bytes < 6 * MiB  # the disk's holes are not stored
    assert (out / "disk.raw").stat().st_blocks * 512 <= MiB + 64 * 1024
    assert (out / "zeros.bin").stat().st_blocks * 512 <= 8192  # zero runs restored as holes
    assert os.readlink(out / "sub" / "deep" / "up") == "../a.txt"


def test_the_archive_is_deterministic_and_owner_free(tmp_path: Path) -> None:
    entry = _tree(tmp_path / "entry")
    first = archive.pack_file(entry, tmp_path / "1.tar.zst")
    second = archive.pack_file(entry, tmp_path / "2.tar.zst")
    assert first.hash == second.hash
    data = zstandard.ZstdDecompressor().stream_reader((tmp_path / "1.tar.zst").open("rb")).read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "disk.raw" and names.index("sub") < names.index("sub/a.txt")
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)
    assert all(m.mtime == 1_700_000_000 for m in members)
    modes = {m.name: stat.S_IMODE(m.mode) for m in members}
    assert modes["run.sh"] == 0o555 and modes["sub/a.txt"] == 0o444 and modes["sub"] == 0o555


@pytest.mark.skipif(shutil.which("tar") is None or shutil.which("zstd") is None, reason="GNU tar and zstd")
def test_gnu_tar_extracts_it_sparse(tmp_path: Path) -> None:
    entry = _tree(tmp_path / "entry")
    archive.pack_file(entry, tmp_path / "a.tar.zst")
    (tmp_path / "gnu").mkdir()
    subprocess.run(f"zstd -dc {tmp_path / 'a.tar.zst'} | tar -xf - -C {tmp_path / 'gnu'}", shell=True, check=True)
    assert hashing.hash_tree(tmp_path / "gnu", use_cache=False) == hashing.hash_tree(entry, use_cache=False)
    assert (tmp_path / "gnu" / "disk.raw").stat().st_blocks * 512 <= 2 * MiB


def _bad_archive(tmp_path: Path, build: Callable[[tarfile.TarFile], None]) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    path = tmp_path / "bad.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(buffer.getvalue()))
    return path


def _member(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", mode: int = 0o644,
            linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


BAD = {
    "absolute path": (lambda t: _member(t, "/etc/owned"), "member '/etc/owned' has an absolute path"),
    "dot-dot": (lambda t: _member(t, "a/../../owned"), "has a '..' component"),
    "device": (lambda t: _member(t, "null", tarfile.CHRTYPE), "member 'null' is a device file"),
    "fifo": (lambda t: _member(t, "pipe", tarfile.FIFOTYPE), "member 'pipe' is a FIFO"),
    "hard link": (lambda t: (_member(t, "a"), _member(t, "b", tarfile.LNKTYPE, linkname="a")), "is a hard link"),
    "setuid": (lambda t: _member(t, "su", mode=0o4755), "member 'su' has a setuid or setgid bit"),
    "duplicate": (lambda t: (_member(t, "a"), _member(t, "a")), "member 'a' appears twice"),
    "absolute symlink": (lambda t: _member(t, "l", tarfile.SYMTYPE, linkname="/etc/passwd"), "is absolute"),
    "escaping symlink": (lambda t: _member(t, "l", tarfile.SYMTYPE, linkname="../x"), "points outside the entry"),
    "write through a symlink": (lambda t: (_member(t, "d", tarfile.SYMTYPE, linkname="."), _member(t, "d/f")),
                                "lies below the symlink 'd'"),
    # each link stays inside on its own; followed through `x -> .`, `l -> x/..` is the parent
    "escape through another link": (lambda t: (_member(t, "x", tarfile.SYMTYPE, linkname="."),
                                               _member(t, "l", tarfile.SYMTYPE, linkname="x/..")),
                                    "symlink 'l' -> 'x/..' points outside the entry"),
    "loop": (lambda t: (_member(t, "a", tarfile.SYMTYPE, linkname="b/c"), _member(t, "b", tarfile.SYMTYPE,
                                                                                 linkname="a/c")), "symlink loop"),
    "orphan member": (lambda t: _member(t, "nodir/f"), "comes before its directory"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsafe_archives_are_refused(case: str, tmp_path: Path) -> None:
    build, reason = BAD[case]
    path = _bad_archive(tmp_path, build)
    (tmp_path / "out").mkdir()
    with path.open("rb") as f, pytest.raises(archive.UnsafeArchive) as caught:
        archive.unpack(f, tmp_path / "out" / "entry")
    assert reason in caught.value.reason, caught.value.reason
    assert not (tmp_path / "owned").exists() and not (tmp_path / "out" / "owned").exists()


def test_truncated_and_oversized_archives_are_refused(tmp_path: Path) -> None:
    entry = _tree(tmp_path / "entry")
    packed = archive.pack_file(entry, tmp_path / "a.tar.zst")
    data = (tmp_path / "a.tar.zst").read_bytes()
    with pytest.raises(archive.UnsafeArchive, match="truncated"):
        archive.unpack(io.BytesIO(data[: len(data) // 2]), tmp_path / "half")
    with pytest.raises(archive.UnsafeArchive, match="more than the 1000 bytes"):
        archive.unpack(io.BytesIO(data), tmp_path / "small", max_apparent_bytes=1000)
    assert packed.apparent_bytes > 1000


def test_an_entry_that_cannot_be_archived_is_named(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    os.symlink("/etc/passwd", entry / "passwd")
    with pytest.raises(archive.UnsafeArchive, match="entry holds a link out of the entry: symlink 'passwd'"):
        archive.pack_file(entry, tmp_path / "a.tar.zst")
    os.unlink(entry / "passwd")
    os.mkfifo(entry / "pipe")
    with pytest.raises(archive.UnsafeArchive, match="'pipe' in entry is a FIFO"):
        archive.pack_file(entry, tmp_path / "b.tar.zst")
