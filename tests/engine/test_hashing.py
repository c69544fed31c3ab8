"""Hashing: canonical trees and JSON, the stat cache, agreement with the b3sum reference tool."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from eulerbake.core import hashing


@pytest.fixture
def stat_cache(tmp_path: Path):  # type: ignore[no-untyped-def]
    hashing.use_stat_cache(tmp_path / "cache.sqlite3")
    yield tmp_path / "cache.sqlite3"
    hashing.use_stat_cache(None)


def _old(path: Path) -> None:
    """Give a file an mtime outside the racy window, as any input not edited this very second has."""
    os.utime(path, (1_600_000_000, 1_600_000_000))


@pytest.mark.skipif(shutil.which("b3sum") is None, reason="b3sum (Debian package b3sum) not installed")
def test_file_hash_matches_b3sum(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(hashing.MMAP_THRESHOLD + 12345))  # the mmap + threads path
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    for path in (big, small):
        expected = subprocess.run(["b3sum", "--no-names", str(path)], capture_output=True, text=True).stdout.strip()
        assert hashing.hash_file(path, use_cache=False) == expected


def test_blake3_and_sha256_in_one_pass(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "f"
    path.write_bytes(os.urandom(5 * hashing.CHUNK + 7))
    b3, sha = hashing.hash_file_pair(path, use_cache=False)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert b3 == hashing.hash_file(path, use_cache=False)


def test_stat_cache_avoids_rereading_unchanged_large_file(tmp_path: Path, stat_cache: Path) -> None:
    big = tmp_path / "disk.img"
    big.write_bytes(os.urandom(32 * 1024 * 1024))
    _old(big)
    before = hashing.STATS.bytes_read
    first = hashing.hash_file(big)
    assert hashing.STATS.bytes_read - before == big.stat().st_size
    # A new cache handle on the same database stands for a later process.
    hashing.use_stat_cache(None)
    hashing.use_stat_cache(stat_cache)
    hits = hashing.STATS.cache_hits
    assert hashing.hash_file(big) == first
    assert hashing.STATS.bytes_read - before == big.stat().st_size  # nothing more was read
    assert hashing.STATS.cache_hits == hits + 1

    with big.open("r+b") as f:  # same size, new content, old mtime restored: the inode ctime still moves
        f.write(b"\0" * 16)
    _old(big)
    assert hashing.hash_file(big) != first
    assert hashing.STATS.bytes_read - before == 2 * big.stat().st_size


def test_recently_modified_files_are_not_cached(tmp_path: Path, stat_cache: Path) -> None:
    path = tmp_path / "fresh"
    path.write_bytes(b"x" * 100)
    hashing.hash_file(path)
    hits = hashing.STATS.cache_hits
    hashing.hash_file(path)
    assert hashing.STATS.cache_hits == hits  # within the racy window: hashed again


def _tree(root: Path) -> Path:
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "b" / "run.sh").write_text("#!/bin/sh\n")
    (root / "link").symlink_to("a.txt")
    return root


def test_tree_hash_is_canonical(tmp_path: Path) -> None:
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    os.utime(two / "a.txt", (1, 1))  # times are not content
    os.chmod(two / "a.txt", 0o600)  # neither are non-exec mode bits
    assert hashing.hash_tree(one) == hashing.hash_tree(two)

    os.chmod(two / "b" / "run.sh", 0o755)
    assert hashing.hash_tree(one) != hashing.hash_tree(two)
    os.chmod(two / "b" / "run.sh", 0o644)

    (two / "link").unlink()
    (two / "link").symlink_to("b")
    assert hashing.hash_tree(one) != hashing.hash_tree(two)
    (two / "link").unlink()
    (two / "link").symlink_to("a.txt")

    (two / "b" / "run.sh").rename(two / "b" / "run2.sh")
    assert hashing.hash_tree(one) != hashing.hash_tree(two)


def test_file_and_tree_hashes_never_collide(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert hashing.hash_path(tmp_path / "d").startswith("tree:")
    (tmp_path / "f").write_text("")
    assert hashing.hash_path(tmp_path / "f").startswith("file:")


def test_canonical_json_ignores_key_order() -> None:
    assert hashing.canonical_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'
    assert hashing.hash_json({"b": 1, "a": 2}) == hashing.hash_json({"a": 2, "b": 1})


@pytest.mark.skipif(shutil.which("b3sum") is None, reason="b3sum (Debian package b3sum) not installed")
def test_sparse_file_hash_matches_b3sum(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.truncate(256 * 1024 * 1024 + 4097)  # holes, with data islands at odd places
        for offset in (0, 7 * 1024 * 1024 + 3, 200 * 1024 * 1024):
            f.seek(offset)
            f.write(os.urandom(1024 * 1024 + 11))
    assert hashing._is_sparse(path.stat())
    expected = subprocess.run(["b3sum", "--no-names", str(path)], capture_output=True, text=True).stdout.strip()
    assert hashing.hash_file(path, use_cache=False) == expected


def _hash_in_child(path: str, queue) -> None:  # type: ignore[no-untyped-def]
    queue.put(hashing.hash_file(Path(path), use_cache=False))


def test_hashing_after_fork_does_not_hang(tmp_path: Path) -> None:
    """doit -n forks workers after the parent hashed big inputs on blake3's thread pool."""
    import multiprocessing

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(hashing.MMAP_THRESHOLD * 2))
    expected = hashing.hash_file(big, use_cache=False)  # starts the thread pool in this process
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_hash_in_child, args=(str(big), queue))
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung, "hashing in a forked child deadlocked"
    assert queue.get(timeout=5) == expected
