"""blake3 hashing of bytes, files, directory trees and canonical JSON, with a persistent stat cache.

Large files are memory-mapped and hashed on all cores. A stat cache (device, inode, size, mtime_ns,
ctime_ns → hash) kept in SQLite means an unchanged multi-GB input is hashed once, ever.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

MMAP_THRESHOLD = 16 * 1024 * 1024  # below this a plain read is faster than mmap + threads
CHUNK = 4 * 1024 * 1024
# A file modified this recently may be modified again within the same mtime tick: never cache it.
RACY_SECONDS = 2.0


# blake3's worker threads (a Rayon pool) do not survive fork(): a forked child that hashes on them waits
# forever (doit -n forks its workers). After a fork, hash on the calling thread only.
_threads: int = blake3.blake3.AUTO
_inherited: list[StatCache] = []


def _after_fork_in_child() -> None:
    global _threads, _stat_cache
    _threads = 1
    if _stat_cache is not None:  # an SQLite connection must not be shared across fork either
        _inherited.append(_stat_cache)  # kept, never closed: closing it would touch the parent's handle
        try:
            _stat_cache = StatCache(_stat_cache.db_path)
        except (OSError, sqlite3.Error):
            _stat_cache = None  # its directory is gone: the child hashes without a cache (never the parent's)


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class HashStats:
    """Counters for tests and benchmarks: how much content was really read."""

    files_hashed: int = 0
    bytes_read: int = 0  # a sparse file's data regions only: its holes are never read
    cache_hits: int = 0


STATS = HashStats()


def hash_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys, no whitespace, UTF-8: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def hash_json(value: Any) -> str:
    return hash_bytes(canonical_json(value))


_ZEROS = bytes(CHUNK)


def data_segments(fd: int, size: int, start: int = 0) -> list[tuple[int, int]]:
    """(start, end) of the data regions of a sparse file in [start, size), via SEEK_DATA/SEEK_HOLE."""
    segments = []
    offset = start
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            break
        if data >= size:
            break
        end = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        segments.append((data, end))
        offset = end
    return segments


def _hash_sparse(path: Path, size: int) -> str:
    """blake3 of a sparse file: data regions memory-mapped, holes fed from a shared zero buffer.

    Same digest as reading every byte, but the holes never go through the page cache (an 8 GiB raw
    disk with 20 MiB of data hashes in about a second instead of faulting in 8 GiB of zero pages).
    """
    hasher = blake3.blake3(max_threads=_threads)
    with path.open("rb") as f:
        fd = f.fileno()
        position = 0
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
            for start, end in data_segments(fd, size):
                while position < start:
                    step = min(CHUNK, start - position)
                    hasher.update(_ZEROS[:step] if step < CHUNK else _ZEROS)
                    position += step
                hasher.update(memoryview(mapped)[start:end])
                STATS.bytes_read += end - start
                position = end
        while position < size:
            step = min(CHUNK, size - position)
            hasher.update(_ZEROS[:step] if step < CHUNK else _ZEROS)
            position += step
    return hasher.hexdigest()


def _is_sparse(st: os.stat_result) -> bool:
    return st.st_size >= MMAP_THRESHOLD and st.st_blocks * 512 < st.st_size // 2


def _hash_file_uncached(path: Path, with_sha256: bool) -> tuple[str, str | None]:
    st = path.stat()
    size = st.st_size
    STATS.files_hashed += 1
    if not with_sha256 and _is_sparse(st):
        return _hash_sparse(path, size), None
    STATS.bytes_read += size
    if not with_sha256:
        hasher = blake3.blake3(max_threads=_threads if size >= MMAP_THRESHOLD else 1)
        if size >= MMAP_THRESHOLD:
            hasher.update_mmap(path)
        else:
            hasher.update(path.read_bytes())
        return hasher.hexdigest(), None
    # One read pass feeds both hashes (sha256 is what upstream mirrors publish).
    b3 = blake3.blake3(max_threads=_threads)
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            b3.update(chunk)
            sha.update(chunk)
    return b3.hexdigest(), sha.hexdigest()


class StatCache:
    """Persistent map (path, dev, inode, size, mtime_ns, ctime_ns) → (blake3, sha256)."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db_path = db_path
        self._memory: dict[str, tuple[tuple[int, int, int, int, int], tuple[str, str | None]]] = {}
        self._conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
        # Two processes creating the database at once: switching to WAL ignores the busy timeout.
        for attempt in range(100):
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, dev INT, ino INT, size INT,"
                    " mtime_ns INT, ctime_ns INT, blake3 TEXT, sha256 TEXT)"
                )
                break
            except sqlite3.OperationalError:
                if attempt == 99:
                    raise
                time.sleep(0.05)

    @staticmethod
    def _signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def lookup(self, path: Path, st: os.stat_result) -> tuple[str, str | None] | None:
        # In-process layer: one graph names the same overlay and builder files many times.
        seen = self._memory.get(str(path))
        if seen is not None and seen[0] == self._signature(st):
            return seen[1]
        try:
            row = self._conn.execute(
                "SELECT dev, ino, size, mtime_ns, ctime_ns, blake3, sha256 FROM hashes WHERE path = ?",
                (str(path),),
            ).fetchone()
        except sqlite3.Error:  # a damaged or unreadable cache is a miss: it only ever saves work
            return None
        if row is None or tuple(row[:5]) != self._signature(st):
            return None
        self._memory[str(path)] = (self._signature(st), (row[5], row[6]))
        return row[5], row[6]

    def remember(self, path: Path, st: os.stat_result, b3: str, sha: str | None) -> None:
        self._memory[str(path)] = (self._signature(st), (b3, sha))
        if time.time() - st.st_mtime < RACY_SECONDS:
            self._memory.pop(str(path))
            return
        with contextlib.suppress(sqlite3.Error):  # a full disk, a read-only store: the hash is right, just not kept
            self._conn.execute(
                "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (str(path), *self._signature(st), b3, sha),
            )

    def close(self) -> None:
        self._conn.close()


_stat_cache: StatCache | None = None


def use_stat_cache(db_path: Path | None) -> None:
    """Point the process-wide stat cache at `db_path` (None disables it)."""
    global _stat_cache
    if _stat_cache is not None and (db_path is None or _stat_cache.db_path != db_path):
        _stat_cache.close()
        _stat_cache = None
    if db_path is not None and _stat_cache is None:
        _stat_cache = StatCache(db_path)


def hash_file_pair(path: Path, *, use_cache: bool = True) -> tuple[str, str]:
    """(blake3, sha256) of a file in one read pass, served by the stat cache when unchanged."""
    path = Path(os.path.abspath(path))
    st = path.stat()
    if use_cache and _stat_cache is not None:
        hit = _stat_cache.lookup(path, st)
        if hit is not None and hit[1] is not None:
            STATS.cache_hits += 1
            return hit[0], hit[1]
    b3, sha = _hash_file_uncached(path, with_sha256=True)
    assert sha is not None
    if use_cache and _stat_cache is not None:
        _stat_cache.remember(path, st, b3, sha)
    return b3, sha


def hash_file(path: Path, *, use_cache: bool = True) -> str:
    """blake3 of a file's content, served by the stat cache when the file is unchanged."""
    path = Path(os.path.abspath(path))
    st = path.stat()
    if use_cache and _stat_cache is not None:
        hit = _stat_cache.lookup(path, st)
        if hit is not None:
            STATS.cache_hits += 1
            return hit[0]
    b3, _ = _hash_file_uncached(path, with_sha256=False)
    if use_cache and _stat_cache is not None:
        _stat_cache.remember(path, st, b3, None)
    return b3


def _tree_entries(path: Path, use_cache: bool, collect: dict[str, str] | None, prefix: str) -> list[list[Any]]:
    entries: list[list[Any]] = []
    with os.scandir(path) as it:
        children = sorted(it, key=lambda e: os.fsencode(e.name))
    for entry in children:
        st = entry.stat(follow_symlinks=False)
        name = entry.name
        if stat.S_ISLNK(st.st_mode):
            entries.append(["l", name, os.readlink(entry.path)])
        elif stat.S_ISDIR(st.st_mode):
            entries.append(["d", name, _tree_hash(Path(entry.path), use_cache, collect, f"{prefix}{name}/")])
        elif stat.S_ISREG(st.st_mode):
            executable = bool(st.st_mode & stat.S_IXUSR)
            digest = hash_file(Path(entry.path), use_cache=use_cache)
            if collect is not None:
                collect[prefix + name] = digest
            entries.append(["f", name, executable, digest])
        else:
            raise ValueError(f"cannot hash special file {entry.path}")
    return entries


def _tree_hash(path: Path, use_cache: bool, collect: dict[str, str] | None = None, prefix: str = "") -> str:
    return hash_json(_tree_entries(path, use_cache, collect, prefix))


def hash_tree_files(path: Path) -> tuple[str, dict[str, str]]:
    """`hash_tree` read from disk (no stat cache), plus each regular file's blake3 by relative path."""
    files: dict[str, str] = {}
    return _tree_hash(Path(path), False, files), files


def hash_tree(path: Path, *, use_cache: bool = True) -> str:
    """Canonical hash of a directory tree (like Nix's NAR hash).

    Each directory serializes as its entries sorted by byte name: type, name, and for files the
    executable bit and content hash, for symlinks the target, for directories their own hash.
    Owners, times and other mode bits are not part of the hash.
    """
    return _tree_hash(Path(path), use_cache)


def single_file_tree_hash(name: str, blake3_hex: str, *, executable: bool) -> str:
    """`hash_tree` of a directory holding one regular file, from the file's blake3 (no reading)."""
    return hash_json([["f", name, executable, blake3_hex]])


def hash_path(path: Path, *, use_cache: bool = True) -> str:
    """Hash a file or a tree, prefixed so that the two can never collide."""
    if path.is_dir() and not path.is_symlink():
        return "tree:" + hash_tree(path, use_cache=use_cache)
    return "file:" + hash_file(path, use_cache=use_cache)


def tree_files(path: Path) -> Iterator[Path]:
    """Regular files below `path`, sorted."""
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def tree_size(path: Path) -> int:
    """Apparent size in bytes of a file or all files below a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.lstat().st_size for f in tree_files(path))
