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
