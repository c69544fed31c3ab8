"""Reproducible tar archives of ext2/3/4 filesystems, read rootless with debugfs: no mount, NBD or FUSE.

`read_tree` reads the metadata of every inode in a handful of debugfs sessions (one `ls -p` session per
directory depth, one `stat` session for all inodes, one `ea_get` session for all extended attributes);
a `Tree` holds the result and the edits a caller makes on top of it (a file emptied, replaced or added,
a subtree removed or copied, another filesystem grafted at its mount point), so the image itself is never
written; `write_tarball` streams the tree into a gzip-compressed pax archive, the file contents dumped by
debugfs in bounded batches (at most `DUMP_BATCH_BYTES` of scratch space at a time).

Reproducible: entries depth first with names sorted bytewise (the order of `tar --sort=name`), mtimes
clamped to SOURCE_DATE_EPOCH, numeric owners only (no user or group names), no atime/ctime, pax extended
headers only for what ustar cannot hold (long or non-ASCII names, large ids, extended attributes as
`SCHILY.xattr.<name>`, as GNU tar writes them, raw bytes, no `hdrcharset`: GNU tar 1.34 warns about that
keyword), gzip members of 16 MiB of tar each (compressed in parallel) whose headers hold no file name and
mtime 0. The bytes then depend on the tree and on zlib alone (`zlib.ZLIB_RUNTIME_VERSION` belongs in the
caller's key), not on the number of cores.

Kept as `tar --xattrs --xattrs-include='*' --numeric-owner -xpf` restores them: regular files,
directories, symlinks, hard links (the first path in archive order carries the data, the others are
links to it), character and block devices, FIFOs, owners, modes with the setuid/setgid/sticky bits, and
every extended attribute (security.selinux, security.capability, POSIX ACLs in their xattr form, user.*).
Sockets cannot be archived (GNU tar skips them too): `Tree.skipped` names them. Holes of sparse files are
written as zeros.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from eulerbake.core.errors import EulerbakeError
from eulerbake.fs.ext4 import Ext4Image, quote

ROOT_INODE = 2
DUMP_BATCH_BYTES = 256 * 1024 * 1024  # scratch space used at once for file contents
DUMP_BATCH_FILES = 4096
GZIP_BLOCK = 16 * 1024 * 1024  # input bytes per gzip member (see _GzipMembers)
SESSION_COMMANDS = 20_000  # commands per debugfs session (its stdout is held in memory)
MAX_SYMLINK_HOPS = 40
USTAR_ID_LIMIT = 8**7  # uid/gid fields: 7 octal digits
USTAR_SIZE_LIMIT = 8**11
INLINE_DATA_XATTR = "system.data"  # ext4 keeps inline file data there: content, not an attribute
XATTR_PAX_PREFIX = "SCHILY.xattr."

KIND_BY_FORMAT = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}  # fmt: skip
TAR_TYPE = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
            "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}

_LS_LINE = re.compile(rb"^/(\d+)/([0-7]+)/(\d+)/(\d+)/([^/]*)/(\d*)/?$")
_LINKS = re.compile(rb"^Links:\s+(\d+)", re.M)
_MTIME = re.compile(rb"^\s*mtime:\s+0x([0-9a-fA-F]+)(?::([0-9a-fA-F]+))?", re.M)
_DEVICE = re.compile(rb"Device major/minor number:\s+(\d+):(\d+)")
_FAST_LINK = re.compile(rb'^Fast link dest: "(.*)"$', re.M)
_XATTR_LINE = re.compile(rb"^  (.+?) \((\d+)\)(?: = |$)")


@dataclass(frozen=True)
class InodeRef:
    """An inode of one of a tree's filesystems: where a file's bytes come from, and its hard-link identity."""

    fs: int  # index into Tree.filesystems
    inode: int


# Where a regular file's bytes come from: given bytes (an edit), an inode, or a file on the build machine.
Content = bytes | InodeRef | Path


@dataclass(frozen=True)
class Node:
    """One entry of the tree as the archive will hold it."""

    kind: str  # file, dir, symlink, char, block, fifo, socket
    mode: int  # permission bits, setuid/setgid/sticky included (07777)
    uid: int
    gid: int
    mtime: int
    size: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()  # sorted by name
    target: str = ""  # symlinks
    rdev: tuple[int, int] = (0, 0)  # devices: (major, minor)
    content: Content | None = None  # regular files
    link_id: InodeRef | None = None  # paths sharing it are hard links of one inode

    def xattr(self, name: str) -> bytes | None:
        return dict(self.xattrs).get(name)


@dataclass(frozen=True)
class TarballInfo:
    sha256: str
    size: int
    entries: int
    hard_links: int
    skipped: tuple[str, ...]


def _parent(path: str) -> str:
    return posixpath.dirname(path) or "/"


def _join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def _sort_key(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _under(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top + "/")


class Tree:
    """A filesystem tree (`path → Node`, canonical absolute paths, "/" the root) plus the edits made to it."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch  # edits are made "at" SOURCE_DATE_EPOCH
        self.nodes: dict[str, Node] = {}
        self.filesystems: list[Ext4Image] = []
        self.skipped: list[str] = []  # paths that cannot be archived (sockets)

    # -- queries -----------------------------------------------------------------------------------
    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def listdir(self, path: str) -> list[str]:
        """Names in the directory at canonical `path`, sorted; empty when it is not a directory."""
        prefix = "/" if path == "/" else path + "/"
        names = [p[len(prefix):] for p in self.nodes if p != "/" and p.startswith(prefix)]
        return sorted((name for name in names if "/" not in name), key=_sort_key)

    def resolve(self, path: str, *, follow_last: bool = True) -> str | None:
        """The canonical path of an existing entry, symlinks followed inside the tree; None when missing."""
        pending = [part for part in path.split("/") if part]
        current = "/"
        hops = 0
        while pending:
            name = pending.pop(0)
            if name == ".":
                continue
            if name == "..":
                current = _parent(current)
                continue
            child = _join(current, name)
            node = self.nodes.get(child)
            if node is None:
                return None
            if node.kind == "symlink" and (pending or follow_last):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise EulerbakeError(f"too many symlinks resolving {path} in the tree")
                if node.target.startswith("/"):
                    current = "/"
                pending = [part for part in node.target.split("/") if part] + pending
                continue
            if pending and node.kind != "dir":
                return None
            current = child
        return current

    def exists(self, path: str) -> bool:
        return self.resolve(path) is not None

    def is_file(self, path: str) -> bool:
        real = self.resolve(path)
        return real is not None and self.nodes[real].kind == "file"

    def is_dir(self, path: str) -> bool:
        real = self.resolve(path)
        return real is not None and self.nodes[real].kind == "dir"

    def glob(self, pattern: str) -> list[str]:
        """Canonical paths matching an absolute pattern component by component (`*` never crosses a `/`)."""
        parts = [part for part in pattern.split("/") if part]
        literal = []
        for part in parts:
            if any(char in part for char in "*?["):
                break
            literal.append(part)
        prefix = "/" + "/".join(literal)  # only paths under the pattern's literal head can match
        found = []
        for path in self.nodes:
            if not _under(path, prefix):
                continue
            names = [part for part in path.split("/") if part]
            if len(names) == len(parts) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts, strict=True)):
                found.append(path)
        return sorted(found, key=_sort_key)

    def read(self, path: str) -> bytes:
        """The bytes of the regular file at `path` (symlinks followed)."""
        real = self.resolve(path)
        node = self.nodes.get(real) if real is not None else None
        if real is None or node is None or node.kind != "file":
            raise EulerbakeError(f"{path} is not a regular file in the tree")
        content = node.content
        if isinstance(content, bytes):
            return content
        if isinstance(content, Path):
            return content.read_bytes()
        if content is None:
            return b""
        image = self.filesystems[content.fs]
        with tempfile.TemporaryDirectory(dir=_scratch_of(image)) as scratch:
            dest = Path(scratch) / "content"
            image.execute([f"dump <{content.inode}> {quote(str(dest))}"], write=False)
            return dest.read_bytes()

    # -- edits (the filesystem images are never written) ------------------------------------------
    def write_file(self, path: str, data: bytes, *, mode: int | None = None, uid: int | None = None,
                   gid: int | None = None, xattrs: Mapping[str, bytes] | None = None) -> str:
        """Create or replace a regular file; returns its canonical path.

        Replacing keeps the file's mode, owner and extended attributes unless given, and gives it a new
        inode, as `sed -i` does (its other hard links keep the old bytes). A new file is 0644 root:root
        with the given attributes only. Its mtime is the tree's epoch.
        """
        parent = self.resolve(_parent(path))
        if parent is None or self.nodes[parent].kind != "dir":
            raise EulerbakeError(f"cannot write {path}: its directory does not exist in the tree")
        target = _join(parent, posixpath.basename(path))
        real = self.resolve(target)
        existing = self.nodes.get(real) if real is not None else None
        if existing is not None and real is not None:
            if existing.kind != "file":
                raise EulerbakeError(f"cannot write {path}: it is a {existing.kind} in the tree")
            target = real
            node = replace(existing, content=data, size=len(data), link_id=None, mtime=self.epoch)
        else:
            node = Node("file", 0o644, 0, 0, self.epoch, size=len(data), content=data)
        self.nodes[target] = replace(
            node,
            mode=node.mode if mode is None else stat.S_IMODE(mode),
            uid=node.uid if uid is None else uid,
            gid=node.gid if gid is None else gid,
            xattrs=node.xattrs if xattrs is None else tuple(sorted(xattrs.items())),
        )
        return target

    def make_dir(self, path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0,
                 xattrs: Mapping[str, bytes] | None = None) -> str:
        """Create a directory whose parent exists (an existing directory is kept as it is)."""
        real = self.resolve(path)
        if real is not None:
            if self.nodes[real].kind != "dir":
                raise EulerbakeError(f"cannot make directory {path}: a {self.nodes[real].kind} is there")
            return real
        parent = self.resolve(_parent(path))
        if parent is None or self.nodes[parent].kind != "dir":
            raise EulerbakeError(f"cannot make directory {path}: its parent does not exist in the tree")
        target = _join(parent, posixpath.basename(path))
        self.nodes[target] = Node("dir", stat.S_IMODE(mode), uid, gid, self.epoch,
                                  xattrs=tuple(sorted((xattrs or {}).items())))
        return target

    def remove(self, path: str) -> list[str]:
        """Remove an entry and, for a directory, everything below it (`rm -rf`); returns the removed paths."""
        parent = self.resolve(_parent(path))
        if parent is None:
            return []
        target = _join(parent, posixpath.basename(path))
        if target == "/" or target not in self.nodes:
            return []
        doomed = sorted((p for p in self.nodes if _under(p, target)), key=_sort_key)
        for doomed_path in doomed:
            del self.nodes[doomed_path]
        return doomed

    def copy(self, source: str, dest: str) -> list[str]:
        """Copy an entry or subtree to `dest` (like `cp -a`: attributes and times kept, new inodes)."""
        real = self.resolve(source)
        if real is None:
            raise EulerbakeError(f"cannot copy {source}: it does not exist in the tree")
        parent = self.resolve(_parent(dest))
        if parent is None or self.nodes[parent].kind != "dir":
            raise EulerbakeError(f"cannot copy to {dest}: its directory does not exist in the tree")
        target = _join(parent, posixpath.basename(dest))
        if target in self.nodes:
            raise EulerbakeError(f"cannot copy to {dest}: it exists in the tree")
        made = []
        for path in sorted((p for p in self.nodes if _under(p, real)), key=_sort_key):
            new_path = target + path[len(real):]
            self.nodes[new_path] = replace(self.nodes[path], link_id=None)
            made.append(new_path)
        return made

    def graft(self, mount_point: str, other: Tree) -> None:
        """Mount `other` at the directory `mount_point`: its root replaces the directory, whose own
        entries (hidden by a real mount too) go."""
        real = self.resolve(mount_point)
        if real is None or self.nodes[real].kind != "dir":
            raise EulerbakeError(f"cannot mount a filesystem at {mount_point}: no such directory in the tree")
        offset = len(self.filesystems)
        self.filesystems.extend(other.filesystems)
        for hidden in [p for p in self.nodes if _under(p, real) and p != real]:
            del self.nodes[hidden]

        def moved(ref: InodeRef | None) -> InodeRef | None:
            return None if ref is None else InodeRef(ref.fs + offset, ref.inode)

        for path, node in other.nodes.items():
            content = node.content
            if isinstance(content, InodeRef):
                content = moved(content)
            new_path = real if path == "/" else (path if real == "/" else real + path)
            self.nodes[new_path] = replace(node, content=content, link_id=moved(node.link_id))
        self.skipped.extend(p if real == "/" else real + p for p in other.skipped)

    def graft_host_tree(self, mount_point: str, directory: Path, *, dir_mode: int, file_mode: int,
                        uid: int = 0, gid: int = 0) -> int:
        """Mount a directory of the build machine at `mount_point` (a FAT partition's files copied out:
        FAT has no owners, modes or attributes, so they come from the mount options). Returns the count."""
        real = self.resolve(mount_point)
        if real is None or self.nodes[real].kind != "dir":
            raise EulerbakeError(f"cannot mount a filesystem at {mount_point}: no such directory in the tree")
        for hidden in [p for p in self.nodes if _under(p, real) and p != real]:
            del self.nodes[hidden]
        top = self.nodes[real]
        self.nodes[real] = Node("dir", dir_mode, uid, gid, top.mtime)
        count = 0
        for here, dirnames, filenames in os.walk(directory):
            dirnames.sort()
            rel = Path(here).relative_to(directory).as_posix()
            base = real if rel == "." else (_join(real, rel) if real != "/" else "/" + rel)
            for name in sorted(dirnames):
                mtime = int((Path(here) / name).stat().st_mtime)
                self.nodes[_join(base, name)] = Node("dir", dir_mode, uid, gid, mtime)
                count += 1
            for name in sorted(filenames):
                local = Path(here) / name
                info = local.lstat()
                if not stat.S_ISREG(info.st_mode):
                    raise EulerbakeError(f"{local} is not a regular file (a FAT partition holds only files)")
                self.nodes[_join(base, name)] = Node("file", file_mode, uid, gid, int(info.st_mtime),
                                                     size=info.st_size, content=local)
                count += 1
        return count

    # -- archive order -----------------------------------------------------------------------------
    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every entry depth first, a directory before its contents, names sorted bytewise."""
        children: dict[str, list[str]] = {}
        for path in self.nodes:
            if path != "/":
                children.setdefault(_parent(path), []).append(path)
        for names in children.values():
            names.sort(key=lambda p: _sort_key(posixpath.basename(p)))
        if "/" not in self.nodes:
            raise EulerbakeError("the tree has no root directory")
        stack = ["/"]
        while stack:
            path = stack.pop()
            yield path, self.nodes[path]
            stack.extend(reversed(children.get(path, [])))


def _scratch_of(image: Ext4Image) -> Path:
    image.scratch.mkdir(parents=True, exist_ok=True)
    return image.scratch


# -- reading a filesystem ---------------------------------------------------------------------------


def _sessions(image: Ext4Image, commands: Sequence[str]) -> list[bytes]:
    """Run read-only debugfs commands (in sessions of at most SESSION_COMMANDS); one output per command.

    With `-f`, debugfs echoes each command as `debugfs: <command>` before its output, which splits it.
    """
    outputs: list[bytes] = []
    for start in range(0, len(commands), SESSION_COMMANDS):
        batch = commands[start:start + SESSION_COMMANDS]
        stdout = image.execute(batch, write=False)
        marks = []
        position = 0
        for command in batch:
            echo = b"debugfs: " + command.encode("utf-8", "surrogateescape") + b"\n"
            found = stdout.find(echo, position)
            if found < 0:
                raise EulerbakeError(f"debugfs did not answer {command!r} on {image.image}")
            marks.append((found, found + len(echo)))
            position = found + len(echo)
        for index, (_, begin) in enumerate(marks):
            end = marks[index + 1][0] if index + 1 < len(marks) else len(stdout)
            outputs.append(stdout[begin:end])
    return outputs


@dataclass(frozen=True)
class _Listed:
    inode: int
    mode: int
    uid: int
    gid: int
    size: int


def _list_directories(image: Ext4Image) -> dict[str, _Listed]:
    """Every path of the filesystem with its inode, full mode, owner and size: one session per depth."""
    found: dict[str, _Listed] = {}
    level = [("/", ROOT_INODE)]
    while level:
        outputs = _sessions(image, [f"ls -p <{inode}>" for _, inode in level])
        next_level = []
        for (directory, _), output in zip(level, outputs, strict=True):
            for line in output.splitlines():
                if not line.strip():
                    continue
                match = _LS_LINE.match(line)
                if match is None:
                    raise EulerbakeError(
                        f"cannot parse the listing of {directory} in {image.image}: {line[:120]!r}",
                        hint="a file name with a newline in it cannot be read through debugfs; rename it",
                    )
                inode, mode, uid, gid = (int(match.group(i), 8 if i == 2 else 10) for i in (1, 2, 3, 4))
                name = match.group(5).decode("utf-8", "surrogateescape")
                size = int(match.group(6) or 0)
                if name == ".." or inode == 0:  # inode 0: an unused slot (lost+found has many)
                    continue
                if name == ".":
                    if directory == "/":
                        found["/"] = _Listed(inode, mode, uid, gid, 0)
                    continue
                path = _join(directory, name)
                found[path] = _Listed(inode, mode, uid, gid, size)
                if stat.S_ISDIR(mode):
                    next_level.append((path, inode))
        level = next_level
    if "/" not in found:
        raise EulerbakeError(f"debugfs lists no root directory in {image.image}")
    return found


@dataclass(frozen=True)
class _Stat:
    links: int
    mtime: int
    rdev: tuple[int, int]
    xattr_names: tuple[str, ...]
    fast_link: bytes | None


def _parse_stat(output: bytes) -> _Stat:
    links = _LINKS.search(output)
    mtime = _MTIME.search(output)
    if links is None or mtime is None:
        raise EulerbakeError(f"cannot parse debugfs stat output: {output[:200]!r}")
    seconds = int(mtime.group(1), 16)
    if seconds >= 2**31:
        seconds -= 2**32
    if mtime.group(2):  # the extra field's two low bits extend the epoch beyond 2038
        seconds += (int(mtime.group(2), 16) & 3) << 32
    device = _DEVICE.search(output)
    rdev = (int(device.group(1)), int(device.group(2))) if device else (0, 0)
    names: list[str] = []
    lines = output.splitlines()
    if b"Extended attributes:" in lines:
        for line in lines[lines.index(b"Extended attributes:") + 1:]:
            xattr = _XATTR_LINE.match(line)
            if xattr is None:
                break
            name = xattr.group(1).decode("utf-8", "surrogateescape")
            if name != INLINE_DATA_XATTR:
                names.append(name)
    fast = _FAST_LINK.search(output)
    return _Stat(int(links.group(1)), seconds, rdev, tuple(names), fast.group(1) if fast else None)


def read_tree(image: Ext4Image, *, log: Callable[[str], None] | None = None) -> Tree:
    """The whole filesystem of `image` as a `Tree` (metadata only: contents are read when written)."""
    listed = _list_directories(image)
    inodes = sorted({entry.inode for entry in listed.values()})
    stats = dict(zip(inodes, (_parse_stat(out) for out in _sessions(image, [f"stat <{i}>" for i in inodes])),
                     strict=True))
    scratch = Path(tempfile.mkdtemp(prefix="tree-", dir=_scratch_of(image)))
    try:
        wanted = [(inode, name) for inode in inodes for name in stats[inode].xattr_names]
        files = {key: scratch / f"x{index}" for index, key in enumerate(wanted)}
        _sessions(image, [f"ea_get -f {quote(str(files[(i, n)]))} <{i}> {quote(n)}" for i, n in wanted])
        values = {key: path.read_bytes() for key, path in files.items()}
        slow_links = sorted({e.inode for e in listed.values() if stat.S_ISLNK(e.mode)
                             and stats[e.inode].fast_link is None})
        _sessions(image, [f"dump <{i}> {quote(str(scratch / f'l{i}'))}" for i in slow_links])
        targets = {i: (scratch / f"l{i}").read_bytes() for i in slow_links}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    tree = Tree(image.epoch)
    tree.filesystems.append(image)
    for path, entry in listed.items():
        info = stats[entry.inode]
        kind = KIND_BY_FORMAT.get(stat.S_IFMT(entry.mode))
        if kind is None:
            raise EulerbakeError(f"{path} in {image.image} has an unknown file type (mode {entry.mode:o})")
        if kind == "socket":
            tree.skipped.append(path)
            continue
        ref = InodeRef(0, entry.inode)
        target = ""
        if kind == "symlink":
            raw = info.fast_link if info.fast_link is not None else targets[entry.inode]
            target = raw.decode("utf-8", "surrogateescape")
        xattrs = tuple(sorted((name, values[(entry.inode, name)]) for name in info.xattr_names))
        tree.nodes[path] = Node(
            kind=kind, mode=stat.S_IMODE(entry.mode), uid=entry.uid, gid=entry.gid, mtime=info.mtime,
            size=entry.size if kind == "file" else 0, xattrs=xattrs, target=target, rdev=info.rdev,
            content=ref if kind == "file" else None, link_id=ref if kind == "file" and info.links > 1 else None,
        )
    if log is not None:
        log(f"read {len(tree.nodes)} entries ({len(inodes)} inodes, {len(wanted)} extended attributes) "
            f"from {Path(image.image.split('?')[0]).name}")
    return tree


# -- writing the archive ----------------------------------------------------------------------------


class _GzipMembers:
    """A write-only gzip stream of one member per GZIP_BLOCK bytes of input, compressed on `workers` threads
    (zlib releases the GIL). The block size, not the worker count, decides the bytes: the same archive comes
    out on 1 core or 16. Each member's header (zlib's) has no file name and mtime 0. gzip, `tar -xz` and
    Python read a multi-member file as one stream."""

    def __init__(self, target: BinaryIO, level: int, workers: int) -> None:
        self.target = target
        self.level = level
        self.sha256 = hashlib.sha256()
        self.size = 0  # compressed bytes written
        self._position = 0  # uncompressed bytes taken
        self._buffer = bytearray()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="gzip")
        self._pending: deque[Future[bytes]] = deque()
        self._limit = max(2, workers * 2)  # blocks in flight: memory stays at a few GZIP_BLOCKs

    def _compress(self, block: bytes) -> bytes:
        packer = zlib.compressobj(self.level, zlib.DEFLATED, 31)  # wbits 31: a gzip member
        return packer.compress(block) + packer.flush()

    def _emit(self, member: bytes) -> None:
        self.sha256.update(member)
        self.size += len(member)
        self.target.write(member)

    def write(self, data: bytes) -> int:
        self._buffer += data
        self._position += len(data)
        while len(self._buffer) >= GZIP_BLOCK:
            block = bytes(self._buffer[:GZIP_BLOCK])
            del self._buffer[:GZIP_BLOCK]
            self._pending.append(self._pool.submit(self._compress, block))
            while len(self._pending) >= self._limit:
                self._emit(self._pending.popleft().result())
        return len(data)

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if self._buffer:
            self._pending.append(self._pool.submit(self._compress, bytes(self._buffer)))
            self._buffer.clear()
        while self._pending:
            self._emit(self._pending.popleft().result())

    def shutdown(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def _pax_records(records: Sequence[tuple[str, bytes]]) -> bytes:
    """A pax extended header's body: `<length> <keyword>=<value>\\n` records, values as raw bytes."""
    out = b""
    for keyword, value in records:
        body = b" " + keyword.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
        length = len(body)
        while len(str(length)) + len(body) != length:
            length = len(str(length)) + len(body)
        out += str(length).encode("ascii") + body
    return out


def _fits_ustar(name: str) -> bool:
    return name.isascii() and len(name) <= 100


def _member_name(path: str) -> str:
    return "." if path == "/" else "." + path


def _add_member(tar: tarfile.TarFile, info: tarfile.TarInfo, pax: list[tuple[str, bytes]],
                data: BinaryIO | None) -> None:
    if pax:
        header = tarfile.TarInfo("././@PaxHeader")
        header.type = tarfile.XHDTYPE
        header.mode = 0o644
        header.uname = header.gname = ""
        body = _pax_records(pax)
        header.size = len(body)
        tar.addfile(header, io.BytesIO(body))
    tar.addfile(info, data)


def _tarinfo(path: str, node: Node, epoch: int, link_to: str | None) -> tuple[tarfile.TarInfo, list[tuple[str, bytes]]]:
    name = _member_name(path)
    pax: list[tuple[str, bytes]] = []
    info = tarfile.TarInfo(name)
    if not _fits_ustar(name + ("/" if node.kind == "dir" and path != "/" else "")):
        pax.append(("path", name.encode("utf-8", "surrogateescape")))
        info.name = "././@LongName"
    info.mode = node.mode
    info.mtime = max(0, min(node.mtime, epoch))
    info.uname = info.gname = ""
    for field_name, value in (("uid", node.uid), ("gid", node.gid)):
        if value >= USTAR_ID_LIMIT:
            pax.append((field_name, str(value).encode()))
            value = 0
        setattr(info, field_name, value)
    linkname = ""
    if link_to is not None:
        info.type = tarfile.LNKTYPE
        linkname = _member_name(link_to)
    else:
        info.type = TAR_TYPE[node.kind]
        if node.kind == "symlink":
            linkname = node.target
        elif node.kind == "file":
            if node.size >= USTAR_SIZE_LIMIT:
                raise EulerbakeError(f"{path} is {node.size} bytes: files of 8 GiB and more are not archived",
                                     hint="remove the file (a swap file?) from the image before packing it")
            info.size = node.size
        elif node.kind in ("char", "block"):
            info.devmajor, info.devminor = node.rdev
    if linkname:
        if _fits_ustar(linkname):
            info.linkname = linkname
        else:
            pax.append(("linkpath", linkname.encode("utf-8", "surrogateescape")))
            info.linkname = "././@LongLink"
    if link_to is None:
        pax.extend((XATTR_PAX_PREFIX + xname, value) for xname, value in node.xattrs)
    return info, pax


def _dump_contents(tree: Tree, refs: Sequence[InodeRef], scratch: Path) -> dict[InodeRef, Path]:
    """Dump the contents of `refs` into `scratch` (one debugfs session per filesystem)."""
    files = {ref: scratch / f"c{ref.fs}-{ref.inode}" for ref in refs}
    by_fs: dict[int, list[InodeRef]] = {}
    for ref in refs:
        by_fs.setdefault(ref.fs, []).append(ref)
    for fs_index, group in sorted(by_fs.items()):
        _sessions(tree.filesystems[fs_index], [f"dump <{ref.inode}> {quote(str(files[ref]))}" for ref in group])
    return files


def _batches(order: Sequence[tuple[str, Node]]) -> Iterator[tuple[int, int, list[InodeRef]]]:
    """(start, end, contents to dump) of consecutive runs of entries whose file data stays under the limits."""
    seen: set[InodeRef] = set()
    start = 0
    while start < len(order):
        end, size = start, 0
        wanted: list[InodeRef] = []
        while end < len(order) and len(wanted) < DUMP_BATCH_FILES:
            node = order[end][1]
            first_name = node.link_id is None or node.link_id not in seen  # later names are links to it
            if node.kind == "file" and isinstance(node.content, InodeRef) and first_name:
                if wanted and size + node.size > DUMP_BATCH_BYTES:
                    break
                wanted.append(node.content)
                size += node.size
            if node.link_id is not None:
                seen.add(node.link_id)
            end += 1
        yield start, end, wanted
        start = end


def _write_entries(tar: tarfile.TarFile, tree: Tree, epoch: int, scratch: Path) -> tuple[int, int]:
    """Every entry of the tree into `tar`, in archive order; returns (entries, hard links)."""
    order = list(tree.walk())
    first_path: dict[InodeRef, str] = {}
    links = 0
    for start, end, wanted in _batches(order):
        dumped = _dump_contents(tree, sorted(set(wanted), key=lambda r: (r.fs, r.inode)), scratch)
        for path, node in order[start:end]:
            link_to = first_path.get(node.link_id) if node.link_id is not None else None
            if node.link_id is not None and link_to is None:
                first_path[node.link_id] = path
            info, pax = _tarinfo(path, node, epoch, link_to)
            if link_to is not None or node.kind != "file":
                _add_member(tar, info, pax, None)
                links += link_to is not None
            else:
                _add_file(tar, info, pax, node, dumped, path)
        for file in dumped.values():
            file.unlink(missing_ok=True)
    return len(order), links


def write_tarball(tree: Tree, dest: Path, *, epoch: int, scratch: Path, compresslevel: int = 6, workers: int = 0,
                  log: Callable[[str], None] | None = None) -> TarballInfo:
    """Write `tree` as a reproducible `.tar.gz` at `dest` (see the module docstring for what is kept);
    `workers` threads compress (default: the cores, up to 8) without changing a byte."""
    scratch.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as raw:
        counted = _GzipMembers(raw, compresslevel, workers or min(8, os.cpu_count() or 1))
        try:
            with tarfile.open(fileobj=counted, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
                entries, links = _write_entries(tar, tree, epoch, scratch)
            counted.close()
        finally:
            counted.shutdown()
    result = TarballInfo(counted.sha256.hexdigest(), counted.size, entries, links, tuple(tree.skipped))
    if log is not None:
        log(f"{dest.name}: {entries} entries ({links} hard links), {result.size} bytes, sha256 {result.sha256}")
    return result


def _add_file(tar: tarfile.TarFile, info: tarfile.TarInfo, pax: list[tuple[str, bytes]], node: Node,
              dumped: Mapping[InodeRef, Path], path: str) -> None:
    content = node.content
    if isinstance(content, bytes):
        _add_member(tar, info, pax, io.BytesIO(content))
        return
    source = dumped[content] if isinstance(content, InodeRef) else content
    if source is None or not source.is_file() or source.stat().st_size != node.size:
        found = source.stat().st_size if source is not None and source.is_file() else "no"
        raise EulerbakeError(f"{path}: expected {node.size} bytes of content, debugfs gave {found}",
                             hint="check the filesystem with e2fsck -fn")
    with source.open("rb") as handle:
        _add_member(tar, info, pax, handle)
