"""Hashing, where mutation testing found gaps: the digest formats (pinned: a change must be made on purpose),
the stat cache never answering when it is not asked, sparse files with their sha256, and the stat cache's
database set-up retried the way it says."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from eulerbake.core import hashing


@pytest.fixture
def stat_cache(tmp_path: Path) -> Iterator[hashing.StatCache]:
    hashing.use_stat_cache(tmp_path / "cache" / "stat.sqlite3")
    assert hashing._stat_cache is not None
    yield hashing._stat_cache
    hashing.use_stat_cache(None)


def _old(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.utime(path, (1_000_000_000, 1_000_000_000))  # outside the racy window: the cache keeps it
    return path


def test_canonical_json_is_utf8_not_escaped() -> None:
    # A parameter's non-ASCII text is part of keys: its bytes must not change with an encoder default.
    assert hashing.canonical_json({"b": "é", "a": [1, "ü"]}) == '{"a":[1,"ü"],"b":"é"}'.encode()


def test_the_tree_digest_format_is_pinned(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n")
    (tree / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tree / "sub" / "run.sh", 0o755)
    os.symlink("a.txt", tree / "link")
    # Every key of every stage with a local tree depends on this format: change it on purpose, never by accident.
    expected = hashing.hash_json([
        ["f", "a.txt", False, blake3.blake3(b"alpha\n").hexdigest()],
        ["l", "link", "a.txt"],
        ["d", "sub", hashing.hash_json([["f", "run.sh", True, blake3.blake3(b"#!/bin/sh\n").hexdigest()]])],
    ])
    assert hashing.hash_tree(tree, use_cache=False) == expected
    copy = tmp_path / "copy"
    (copy / "sub").mkdir(parents=True)
    (copy / "a.txt").write_text("alpha\n")
    (copy / "link").write_text("alpha\n")  # a file with the link's target's bytes is not the link
    (copy / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(copy / "sub" / "run.sh", 0o755)
    assert hashing.hash_tree(copy, use_cache=False) != expected


def test_each_file_hashed_counts_once(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    before = hashing.STATS.files_hashed
    hashing.hash_file(path, use_cache=False)
    hashing.hash_file_pair(path, use_cache=False)
    assert hashing.STATS.files_hashed - before == 2


def test_a_sparse_file_gets_its_sha256_too(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    with path.open("wb") as f:
        f.truncate(hashing.MMAP_THRESHOLD * 4)
        f.seek(hashing.MMAP_THRESHOLD)
        f.write(b"data" * 1024)
    assert path.stat().st_blocks * 512 < path.stat().st_size // 2  # really sparse
    data = path.read_bytes()
    b3, sha = hashing.hash_file_pair(path, use_cache=False)
    assert (b3, sha) == (blake3.blake3(data).hexdigest(), hashlib.sha256(data).hexdigest())
    assert hashing.hash_file(path, use_cache=False) == b3


def test_a_cache_that_is_not_asked_is_never_believed(stat_cache: hashing.StatCache, tmp_path: Path) -> None:
    path = _old(tmp_path / "f", b"real bytes")
    truth = hashing.hash_file_pair(path, use_cache=False)
    stat_cache.remember(path, path.stat(), "0" * 64, "1" * 64)  # a wrong answer for the file's current stats
    assert hashing.hash_file(path) == "0" * 64  # asked: the cache answers (the poison is in place)
    assert hashing.hash_file(path, use_cache=False) == truth[0]
    assert hashing.hash_file_pair(path, use_cache=False) == truth
    # A tree's files are looked up by default (the no-op path depends on it), and only then.
    tree = tmp_path / "tree"
    tree.mkdir()
    inside = _old(tree / "g", b"tree bytes")
    honest = hashing.hash_tree(tree, use_cache=False)
    stat_cache.remember(inside, inside.stat(), "3" * 64, None)
    assert hashing.hash_tree(tree) != honest and hashing.hash_tree(tree, use_cache=False) == honest


def test_the_stat_cache_makes_its_directories(tmp_path: Path) -> None:
    cache = hashing.StatCache(tmp_path / "a" / "b" / "stat.sqlite3")
    path = _old(tmp_path / "f", b"x")
    cache.remember(path, path.stat(), "2" * 64, None)
    assert cache.lookup(path, path.stat()) == ("2" * 64, None)
    cache.close()


def test_a_row_read_from_the_database_is_answered_the_same_the_second_time(tmp_path: Path) -> None:
    """Another process's cache: the first lookup reads the row from SQLite and keeps it in memory, the second
    is served from memory, and both give (blake3, sha256) in that order."""
    path = _old(tmp_path / "f", b"x")
    writer = hashing.StatCache(tmp_path / "stat.sqlite3")
    writer.remember(path, path.stat(), "2" * 64, "3" * 64)
    writer.close()
    reader = hashing.StatCache(tmp_path / "stat.sqlite3")
    assert [reader.lookup(path, path.stat()) for _ in range(2)] == [("2" * 64, "3" * 64)] * 2
    reader.close()


class _Counted:
    """A sqlite3 connection that counts its statements (the in-process layer exists to save them)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn, self.statements = conn, 0

    def execute(self, sql: str, *args: Any) -> Any:
        self.statements += 1
        return self.conn.execute(sql, *args)

    def close(self) -> None:
        self.conn.close()


def test_a_path_asked_again_in_one_process_costs_no_query(tmp_path: Path) -> None:
    """A graph names the same files many times: after the first answer (read from SQLite, or just
    remembered), the same path with the same stats is answered from memory; moved stats ask SQLite again."""
    path, other = _old(tmp_path / "f", b"x"), _old(tmp_path / "g", b"y")
    writer = hashing.StatCache(tmp_path / "stat.sqlite3")
    writer.remember(path, path.stat(), "2" * 64, "3" * 64)
    writer.close()
    cache = hashing.StatCache(tmp_path / "stat.sqlite3")
    counted = _Counted(cache._conn)
    cache._conn = counted  # type: ignore[assignment]
    assert cache.lookup(path, path.stat()) == ("2" * 64, "3" * 64) and counted.statements == 1
    assert cache.lookup(path, path.stat()) == ("2" * 64, "3" * 64) and counted.statements == 1  # from memory
    assert cache.lookup(other, other.stat()) is None and counted.statements == 2  # not the first path's answer
    cache.remember(other, other.stat(), "4" * 64, None)
    queries = counted.statements
    assert cache.lookup(other, other.stat()) == ("4" * 64, None) and counted.statements == queries
    os.utime(path, (1_000_000_001, 1_000_000_001))
    assert cache.lookup(path, path.stat()) is None and counted.statements == queries + 1  # moved: asked again
    cache.close()


def test_pointing_the_cache_at_its_own_database_again_keeps_it(stat_cache: hashing.StatCache,
                                                                 tmp_path: Path) -> None:
    """`use_stat_cache` with the path already in use keeps the open cache and what it remembers in memory;
    another path opens another."""
    hashing.use_stat_cache(stat_cache.db_path)
    assert hashing._stat_cache is stat_cache
    hashing.use_stat_cache(tmp_path / "other.sqlite3")
    assert hashing._stat_cache is not None and hashing._stat_cache.db_path == tmp_path / "other.sqlite3"


def test_a_sparse_file_reads_only_its_data(tmp_path: Path) -> None:
    """bytes_read counts what was read: a sparse file of at least the mmap threshold reads its data regions
    only; a smaller sparse file and a dense one are read whole (the same digest either way)."""
    mib = 1 << 20
    cases = {"sparse": (hashing.MMAP_THRESHOLD, 4 * mib, mib), "small": (hashing.MMAP_THRESHOLD // 4, 0, 4096),
             "dense": (hashing.MMAP_THRESHOLD, 0, hashing.MMAP_THRESHOLD)}  # (size, where the data is, how much)
    read = {}
    for name, (size, offset, data) in cases.items():
        path = tmp_path / name
        with path.open("wb") as f:
            f.seek(offset)
            f.write(b"\1" * data)
            f.truncate(size)
        before = hashing.STATS.bytes_read
        assert hashing.hash_file(path, use_cache=False) == blake3.blake3(path.read_bytes()).hexdigest()
        read[name] = hashing.STATS.bytes_read - before
    assert read == {"sparse": 1 << 20, "small": hashing.MMAP_THRESHOLD // 4, "dense": hashing.MMAP_THRESHOLD}


class _Flaky:
    """A sqlite3 connection whose statements fail `failures` times (another process holds the database)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.statements: list[str] = []

    def execute(self, sql: str, *args: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        self.statements.append(sql.split()[0])
        return None

    def close(self) -> None:
        pass


def test_the_stat_cache_set_up_is_retried_then_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(hashing.time, "sleep", sleeps.append)
    flaky = _Flaky(failures=1)
    monkeypatch.setattr(hashing.sqlite3, "connect", lambda *_a, **_k: flaky)
    hashing.StatCache(tmp_path / "stat.sqlite3")
    assert sleeps == [0.05] and flaky.statements == ["PRAGMA", "CREATE"]  # once more, then both statements

    sleeps.clear()
    always = _Flaky(failures=10**6)
    monkeypatch.setattr(hashing.sqlite3, "connect", lambda *_a, **_k: always)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        hashing.StatCache(tmp_path / "stat.sqlite3")
    assert len(sleeps) == 99 and always.failures == 10**6 - 100  # 100 attempts, a pause between each
