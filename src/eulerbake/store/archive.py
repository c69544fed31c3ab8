"""A store entry as one archive and back: a sorted, owner-free, zstd-compressed POSIX tar stream.

The tar is what `tar --format=pax --sparse --numeric-owner --sort=name` would write (GNU tar extracts it):
members depth-first in byte order of their names, uid/gid 0 and no owner names, modes and mtimes as
sealed, no hard links. Files with holes are GNU sparse 1.0 members (a map of data regions, then only the
data), so an 8 GiB raw disk holding 1 GiB is 1 GiB before compression and never 8 on the wire; zero runs
inside data regions compress to almost nothing, and unpacking skips every all-zero 4 KiB block, so the
restored file is sparse whichever way its zeros came.

Unpacking trusts nothing (it runs before the store re-hashes the result): a member with an absolute
name or a `..` component, a hard link, a device file, a FIFO, a setuid or setgid bit, a duplicate, a
member below a symlink, or a symlink that resolves outside the entry (followed through the archive's
own symlinks, the way the kernel would) is refused, naming the member; nothing is written outside `out`.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import zstandard

from eulerbake.core import hashing
from eulerbake.core.errors import EulerbakeError

COMPRESSION = "zstd"
LEVEL = 3  # zstd -3: ~300 MB/s per core; -19 saves ~15 % more on a disk image at 1/20 the speed
BLOCK = 4096  # the granularity of zero detection on unpack (a filesystem block)
CHUNK = 4 * 1024 * 1024
SUFFIX = ".tar.zst"
_ZERO_BLOCK = bytes(BLOCK)
_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}
_MAX_LINK_HOPS = 40  # the kernel's own limit (MAXSYMLINKS)


class UnsafeArchive(EulerbakeError):
    """An archive (or an entry to archive) that must not be unpacked; `reason` names the member and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, hint="the cache entry is corrupt or forged: remove it with "
                         "`eulerbake cache verify --delete`")
        self.reason = reason


@dataclass(frozen=True)
class Packed:
    """What `pack` wrote: the compressed archive's blake3 and size, and what it carries."""

    hash: str
    size: int
    compression: str
    members: int
    data_bytes: int  # file bytes stored (holes excluded)
    apparent_bytes: int  # the files' sizes as `ls -l` shows them


@dataclass(frozen=True)
class Unpacked:
    members: int
    written_bytes: int  # bytes really written (zero blocks skipped)
    apparent_bytes: int


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, dest: BinaryIO) -> None:
        self.dest = dest
        self.hasher = blake3.blake3()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.hasher.update(data)
        self.size += len(data)
        self.dest.write(data)
        return len(data)

    def flush(self) -> None:
        self.dest.flush()


# -- paths and links ----------------------------------------------------------------------------------


def _parts(name: str) -> list[str]:
    return name.split("/")


def _safe_name(name: str) -> str | None:
    """Why `name` may not be a member name (None when it is a plain relative path)."""
    if name.startswith("/"):
        return "an absolute path"
    parts = _parts(name)
    if any(part == ".." for part in parts):
        return "a '..' component"
    if any(part in ("", ".") for part in parts):
        return "an empty or '.' component"
    return None


def link_escapes(links: Mapping[str, str]) -> list[str]:
    """The symlinks (relative path → target) that resolve outside the tree, each with the reason.

    Resolution follows the tree's own symlinks component by component, as the kernel does, so `x -> .`
    with `l -> x/..` is caught although `l`'s target looks harmless on its own. A component that is not
    in the tree is taken as a plain directory name (a dangling link inside the tree is allowed).
    """
    problems = []
    for path, target in sorted(links.items()):
        reason = _resolve_problem(path, target, links)
        if reason:
            problems.append(f"symlink {path!r} -> {target!r} {reason}")
    return problems


def _resolve_problem(path: str, target: str, links: Mapping[str, str]) -> str | None:
    current = _parts(path)[:-1]
    pending = _parts(target)
    if target.startswith("/"):
        return "is absolute: it points outside the entry"
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not current:
                return "points outside the entry"
            current.pop()
            continue
        candidate = "/".join([*current, part])
        if candidate in links:
            hops += 1
            if hops > _MAX_LINK_HOPS:
                return "is a symlink loop"
            inner = links[candidate]
            if inner.startswith("/"):
                return f"goes through {candidate!r}, which is absolute"
            pending = _parts(inner) + pending
            continue
        current.append(part)
    return None


# -- packing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    relative: str
    path: str
    st: os.stat_result


def _walk_depth_first(entry: Path) -> list[_Member]:
    ordered: list[_Member] = []

    def visit(prefix: str, directory: str) -> None:
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: os.fsencode(e.name))
        for child in children:
            st = child.stat(follow_symlinks=False)
            ordered.append(_Member(prefix + child.name, child.path, st))
            if stat.S_ISDIR(st.st_mode):
                visit(f"{prefix}{child.name}/", child.path)

    visit("", str(entry))
    return ordered


def _check_packable(entry: Path, members: list[_Member]) -> None:
    links: dict[str, str] = {}
    for member in members:
        mode = member.st.st_mode
        if stat.S_ISLNK(mode):
            links[member.relative] = os.readlink(member.path)
        elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsafeArchive(f"{member.relative!r} in {entry.name} is a {_kind(mode)}: it cannot go into an archive")
        if mode & (stat.S_ISUID | stat.S_ISGID):
            raise UnsafeArchive(f"{member.relative!r} in {entry.name} has a setuid or setgid bit")
    escapes = link_escapes(links)
    if escapes:
        raise UnsafeArchive(f"{entry.name} holds a link out of the entry: {escapes[0]}")


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, **_ENCODING)


def _base_info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = st.st_mode & 0o7777
    info.mtime = int(st.st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _pad(writer: _Stream, size: int) -> None:
    remainder = size % tarfile.BLOCKSIZE
    if remainder:
        writer.write(bytes(tarfile.BLOCKSIZE - remainder))


class _Stream:
    """The zstd-compressing writer the tar stream goes through."""

    def __init__(self, dest: _HashingWriter, level: int) -> None:
        self.compressor = zstandard.ZstdCompressor(level=level).stream_writer(dest, closefd=False)  # type: ignore[arg-type]

    def write(self, data: bytes | memoryview) -> None:
        self.compressor.write(data)

    def close(self) -> None:
        self.compressor.close()


def _copy_range(fd: int, start: int, end: int, out: _Stream) -> None:
    position = start
    while position < end:
        chunk = os.pread(fd, min(CHUNK, end - position), position)
        if not chunk:
            raise EulerbakeError(f"file shrank while it was archived (at byte {position})",
                                 hint="nothing may write into a sealed store entry")
        out.write(chunk)
        position += len(chunk)


def _write_file(member: _Member, out: _Stream) -> tuple[int, int]:
    """Write one regular file (a sparse member when it has holes); returns (data bytes, apparent bytes)."""
    size = member.st.st_size
    with open(member.path, "rb") as f:
        fd = f.fileno()
        segments = hashing.data_segments(fd, size) if size else []
        if segments == [(0, size)] or size == 0:
            info = _base_info(member.relative, member.st)
            info.size = size
            out.write(_header(info))
            _copy_range(fd, 0, size, out)
            _pad(out, size)
            return size, size
        regions = [(start, end - start) for start, end in segments]
        if not regions or segments[-1][1] != size:
            regions.append((size, 0))  # as GNU tar does: a file ending in a hole still carries its length
        sparse_map = f"{len(regions)}\n" + "".join(f"{start}\n{length}\n" for start, length in regions)
        mapped = sparse_map.encode()
        mapped += bytes(-len(mapped) % tarfile.BLOCKSIZE)
        data = sum(length for _start, length in regions)
        info = _base_info("GNUSparseFile.0/data", member.st)  # the real name is in GNU.sparse.name
        info.size = len(mapped) + data
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": member.relative, "GNU.sparse.realsize": str(size)}
        out.write(_header(info))
        out.write(mapped)
        for start, length in regions:
            _copy_range(fd, start, start + length, out)
        _pad(out, info.size)
        return data, size


def pack(entry: Path, dest: BinaryIO, *, level: int = LEVEL) -> Packed:
    """Write the archive of the (sealed) tree `entry` to `dest`; refuses what `unpack` would refuse."""
    members = _walk_depth_first(entry)
    _check_packable(entry, members)
    hashing_dest = _HashingWriter(dest)
    out = _Stream(hashing_dest, level)
    data_bytes = apparent = 0
    for member in members:
        mode = member.st.st_mode
        if stat.S_ISDIR(mode):
            info = _base_info(member.relative, member.st)
            info.type = tarfile.DIRTYPE
            out.write(_header(info))
        elif stat.S_ISLNK(mode):
            info = _base_info(member.relative, member.st)
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(member.path)
            out.write(_header(info))
        else:
            stored, size = _write_file(member, out)
            data_bytes += stored
            apparent += size
    out.write(bytes(2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    out.close()
    hashing_dest.flush()
    return Packed(hashing_dest.hasher.hexdigest(), hashing_dest.size, COMPRESSION, len(members), data_bytes, apparent)


def pack_file(entry: Path, path: Path, *, level: int = LEVEL) -> Packed:
    with path.open("wb") as f:
        packed = pack(entry, f, level=level)
        f.flush()
        os.fsync(f.fileno())
    return packed


# -- unpacking ----------------------------------------------------------------------------------------


def _write_skipping_zeros(fd: int, offset: int, data: bytes) -> int:
    """pwrite `data` at `offset`, leaving every all-zero 4 KiB-aligned block a hole; returns bytes written."""
    if data == bytes(len(data)):
        return 0
    written = 0
    position = 0
    run_start: int | None = None
    length = len(data)
    first = -offset % BLOCK or BLOCK  # blocks are aligned to the file, not to the chunk
    while position < length:
        step = min(first if position == 0 else BLOCK, length - position)
        block = data[position:position + step]
        zero = block == _ZERO_BLOCK[:step]
        if zero and run_start is not None:
            written += os.pwrite(fd, data[run_start:position], offset + run_start)
            run_start = None
        elif not zero and run_start is None:
            run_start = position
        position += step
    if run_start is not None:
        written += os.pwrite(fd, data[run_start:], offset + run_start)
    return written


def _check_member(info: tarfile.TarInfo, seen: dict[str, str]) -> str:
    name = info.name.rstrip("/") if info.isdir() else info.name
    why = _safe_name(name)
    if why:
        return f"member {info.name!r} has {why}"
    if info.islnk():
        return f"member {name!r} is a hard link"
    if info.ischr() or info.isblk():
        return f"member {name!r} is a device file"
    if info.isfifo():
        return f"member {name!r} is a FIFO"
    if not (info.isreg() or info.isdir() or info.issym()):
        return f"member {name!r} has an unknown type {info.type!r}"
    if info.mode & (stat.S_ISUID | stat.S_ISGID):
        return f"member {name!r} has a setuid or setgid bit (mode {info.mode:04o})"
    if name in seen:
        return f"member {name!r} appears twice"
    parts = _parts(name)
    for depth in range(1, len(parts)):
        parent = "/".join(parts[:depth])
        kind = seen.get(parent)
        if kind == "l":
            return f"member {name!r} lies below the symlink {parent!r}"
        if kind != "d":
            return f"member {name!r} comes before its directory {parent!r}"
    if info.issym() and info.linkname.startswith("/"):
        return f"symlink {name!r} -> {info.linkname!r} is absolute: it points outside the entry"
    return ""


def _sparse_map(info: tarfile.TarInfo) -> list[tuple[int, int]]:
    given: Any = info.sparse or []
    segments = [(int(start), int(length)) for start, length in given]
    position = 0
    for start, length in segments:
        if start < position or length < 0 or start + length > info.size:
            raise UnsafeArchive(f"member {info.name!r} has a malformed sparse map")
        position = start + length
    return segments


def unpack(source: BinaryIO, out: Path, *, max_apparent_bytes: int | None = None,
           on_progress: Callable[[int], None] | None = None) -> Unpacked:
    """Unpack an archive from `source` into `out` (created here, must not exist).

    `max_apparent_bytes` bounds the files' total size (the signed output size): a forged archive cannot
    fill the disk. Raises `UnsafeArchive` for anything the module docstring lists.
    """
    os.mkdir(out, 0o755)
    reader = zstandard.ZstdDecompressor().stream_reader(source, closefd=False)
    seen: dict[str, str] = {}
    links: dict[str, str] = {}
    members = written = apparent = 0
    try:
        with tarfile.open(fileobj=reader, mode="r|", bufsize=CHUNK, **_ENCODING) as tar:  # type: ignore[call-overload]
            for info in tar:
                problem = _check_member(info, seen)
                if problem:
                    raise UnsafeArchive(problem)
                name = info.name.rstrip("/") if info.isdir() else info.name
                target = os.path.join(out, name)
                members += 1
                if info.isdir():
                    seen[name] = "d"
                    os.mkdir(target, 0o755)
                    continue
                if info.issym():
                    seen[name] = "l"
                    links[name] = info.linkname
                    os.symlink(info.linkname, target)
                    continue
                seen[name] = "f"
                apparent += info.size
                if max_apparent_bytes is not None and apparent > max_apparent_bytes:
                    raise UnsafeArchive(f"the archive holds more than the {max_apparent_bytes} bytes its metadata "
                                        f"declares (at member {name!r})")
                written += _extract_file(tar, info, target, on_progress)
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"the archive is not a valid tar stream ({exc}); it may be truncated") from exc
    except zstandard.ZstdError as exc:
        raise UnsafeArchive(f"the archive does not decompress ({exc}); it may be truncated") from exc
    escapes = link_escapes(links)
    if escapes:
        raise UnsafeArchive(escapes[0])
    return Unpacked(members, written, apparent)


def _extract_file(tar: tarfile.TarFile, info: tarfile.TarInfo, target: str,
                  on_progress: Callable[[int], None] | None) -> int:
    mode = 0o755 if info.mode & stat.S_IXUSR else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    written = 0
    try:
        # The data of a member (a sparse one's regions, back to back) follows its header in the stream:
        # read it straight from the stream instead of through extractfile, which would expand the holes.
        stream = tar.fileobj
        assert stream is not None
        stream.seek(info.offset_data)
        segments = _sparse_map(info) if info.sparse is not None else [(0, info.size)]
        for start, length in segments:
            position = start
            while position < start + length:
                chunk = stream.read(min(CHUNK, start + length - position))
                if not chunk:
                    raise UnsafeArchive(f"member {info.name!r} ends early: the archive is truncated")
                written += _write_skipping_zeros(fd, position, chunk)
                position += len(chunk)
                if on_progress is not None:
                    on_progress(len(chunk))
        os.ftruncate(fd, info.size)
    finally:
        os.close(fd)
    return written
