"""Node inputs, graph walks and the stat cache's use (found by scripts/mutation)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, Derivation, LocalFile, LocalTree, walk


def noop(ctx: BuildContext) -> None:
    pass


def test_local_files_are_the_local_inputs_files_only(tmp_path: Path) -> None:
    (tmp_path / "tree" / "b").mkdir(parents=True)
    (tmp_path / "tree" / "b" / "2").write_text("2")
    (tmp_path / "tree" / "1").write_text("1")
    (tmp_path / "f").write_text("f")
    up = Derivation("s", "up", noop)
    drv = Derivation("s", "l", noop, {"a": LocalFile(tmp_path / "f"), "b": up, "c": LocalTree(tmp_path / "tree")})
    assert drv.local_files() == [tmp_path / "f", tmp_path / "tree" / "1", tmp_path / "tree" / "b" / "2"]
    assert LocalTree(tmp_path / "missing").files() == []
    assert drv.confirm(tmp_path) is True


def test_walk_yields_dependencies_first_and_each_node_once() -> None:
    base = Derivation("s", "base", noop)
    left = Derivation("s", "left", noop, {"up": base})
    right = Derivation("s", "right", noop, {"up": base})
    top = Derivation("s", "top", noop, {"l": left, "r": right})
    assert [n.label for n in walk([top, left])] == ["base", "left", "right", "top"]


@pytest.fixture
def stat_cache(tmp_path: Path) -> Iterator[Path]:
    hashing.use_stat_cache(tmp_path / "cache.sqlite3")
    yield tmp_path / "cache.sqlite3"
    hashing.use_stat_cache(None)


def old_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (1_000_000_000, 1_000_000_000))  # long past the racy window: cacheable
    return path


def cache_hits(path: Path, *, use_cache: bool) -> int:
    before = hashing.STATS.cache_hits
    hashing.hash_path(path, use_cache=use_cache)
    return hashing.STATS.cache_hits - before


def test_hash_path_uses_the_stat_cache_only_when_asked(stat_cache: Path, tmp_path: Path) -> None:
    single = old_file(tmp_path / "one", "x")
    old_file(tmp_path / "tree" / "inside", "y")
    for path in (single, tmp_path / "tree"):
        hashing.hash_path(path)  # remembered
        assert cache_hits(path, use_cache=True) == 1
        assert cache_hits(path, use_cache=False) == 0


def in_forked_child(report: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """What `report` returns when called in a forked child (which never returns into pytest)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, json.dumps(report()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        seen: dict[str, Any] = json.loads(f.read())  # nothing written (the child raised): a JSON error here
    os.waitpid(pid, 0)
    return seen


def test_a_forked_child_hashes_on_its_own_thread_with_its_own_cache(stat_cache: Path) -> None:
    parent_cache = hashing._stat_cache
    assert parent_cache is not None

    def inherited() -> dict[str, Any]:
        child = hashing._stat_cache
        return {"threads": hashing._threads, "new": child is not parent_cache and child is not None,
                "path": str(child.db_path) if child is not None else None,
                "kept": any(c is parent_cache for c in hashing._inherited)}

    seen = in_forked_child(inherited)
    assert seen == {"threads": 1, "new": True, "path": str(stat_cache), "kept": True}
    assert hashing._stat_cache is parent_cache


def test_a_forked_child_whose_cache_is_gone_hashes_without_one(stat_cache: Path, tmp_path: Path) -> None:
    """A stat cache the child cannot open (its store deleted or made unreadable under a run; here a directory
    took the database's name): the child hashes without a cache, never with the parent's connection."""
    (tmp_path / "f").write_text("f")
    for leftover in tmp_path.glob("cache.sqlite3*"):
        leftover.unlink()
    stat_cache.mkdir()
    seen = in_forked_child(lambda: {"none": hashing._stat_cache is None, "hash": hashing.hash_file(tmp_path / "f")})
    assert seen == {"none": True, "hash": hashing.hash_bytes(b"f")}


def test_a_consumer_names_each_kind_of_input_exactly(tmp_path: Path) -> None:
    from eulerbake.core.derivation import FixedOutput, input_manifest

    (tmp_path / "f").write_text("f")
    (tmp_path / "t").mkdir()
    source = FixedOutput("src.tar", ("https://m.example/src.tar",), "5" * 64, "6" * 64, 7)
    up = Derivation("s", "up", noop)
    assert input_manifest({"src": source, "up": up, "f": LocalFile(tmp_path / "f"), "t": LocalTree(tmp_path / "t")}) \
        == {"src": {"kind": "source", "blake3": "6" * 64, "sha256": "5" * 64, "size": 7, "key": source.key,
                    "name": "src.tar"},
            "up": {"kind": "derivation", "key": up.key, "name": "s-up"},
            "f": {"kind": "file", "blake3": hashing.hash_file(tmp_path / "f")},
            "t": {"kind": "tree", "blake3": hashing.hash_tree(tmp_path / "t")}}


def test_seeds_are_the_hash_of_key_and_purpose(tmp_path: Path) -> None:
    ctx = BuildContext({}, {}, tmp_path, "k" * 32, tmp_path)
    assert ctx.seed("disk-guid") == bytes.fromhex(hashing.hash_bytes(b"k" * 32 + b":disk-guid"))
    assert ctx.seed("disk-guid") != ctx.seed("partition-1")


def test_hash_file_pair_is_served_by_the_cache_only_with_both_hashes(stat_cache: Path, tmp_path: Path) -> None:
    import hashlib

    import blake3

    path = old_file(tmp_path / "data", "some bytes")
    want = (blake3.blake3(b"some bytes").hexdigest(), hashlib.sha256(b"some bytes").hexdigest())
    hashing.hash_file(path)  # cached with blake3 only: not enough for a pair
    before = hashing.STATS.cache_hits
    assert hashing.hash_file_pair(path) == want
    assert hashing.STATS.cache_hits == before
    assert hashing.hash_file_pair(path) == want
    assert hashing.STATS.cache_hits == before + 1
    assert hashing.hash_file_pair(path, use_cache=False) == want
    assert hashing.STATS.cache_hits == before + 1
    again = hashing.StatCache(stat_cache)  # what was kept on disk, for the next process
    try:
        assert again.lookup(path, path.stat()) == want
    finally:
        again.close()


def test_a_sparse_file_starting_with_a_hole_hashes_like_its_bytes(tmp_path: Path) -> None:
    import blake3

    path = tmp_path / "sparse.raw"
    with path.open("wb") as f:
        f.truncate(hashing.MMAP_THRESHOLD * 2)
        f.seek(hashing.MMAP_THRESHOLD + 12345)
        f.write(b"data in the middle")
    assert hashing._is_sparse(path.stat())
    assert hashing.hash_file(path, use_cache=False) == blake3.blake3(path.read_bytes()).hexdigest()


def test_hash_tree_files_gives_the_tree_hash_and_each_files_hash(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a").write_text("a")
    (tmp_path / "d" / "sub" / "b").write_text("b")
    assert hashing.hash_tree_files(tmp_path / "d") == (
        hashing.hash_tree(tmp_path / "d", use_cache=False),
        {"a": hashing.hash_bytes(b"a"), "sub/b": hashing.hash_bytes(b"b")})


def test_hash_file_pair_without_a_stat_cache(tmp_path: Path) -> None:
    import hashlib

    hashing.use_stat_cache(None)
    path = old_file(tmp_path / "data", "abc")
    assert hashing.hash_file_pair(path) == (hashing.hash_bytes(b"abc"), hashlib.sha256(b"abc").hexdigest())


module_level_lambda = lambda ctx: None  # noqa: E731  (a builder doit could not pickle by name)


def test_builders_must_be_named_module_level_functions() -> None:
    from eulerbake.core.derivation import builder_ref
    from eulerbake.core.errors import EulerbakeError

    def nested(ctx: BuildContext) -> None:
        pass

    assert builder_ref(noop) == (__name__, "noop")
    for builder in (nested, module_level_lambda):
        with pytest.raises(EulerbakeError, match="must be a module-level function"):
            builder_ref(builder)


def test_names_labels_and_docs_by_default() -> None:
    from eulerbake.core.derivation import FixedOutput

    assert Derivation("s", "", noop).name == "s"
    assert Derivation("s", "a:b", noop).name == "s-a-b"
    unpinned = FixedOutput("f.tar", (), "", "", -1)
    assert (unpinned.label, unpinned.doc) == ("f.tar", "fetch f.tar (NOT pinned: run eulerbake lock)")
    pinned = FixedOutput("f.tar", (), "5" * 64, "6" * 64, 0)
    assert (pinned.label, pinned.doc) == ("f.tar", "fetch f.tar (pinned)")
    named = FixedOutput("f.tar", (), "", "", -1, label="src", doc="the sources")
    assert (named.label, named.doc) == ("src", "the sources")


def test_a_sources_known_output_hash_is_the_tree_hash_of_its_file(tmp_path: Path) -> None:
    from eulerbake.core.derivation import FixedOutput

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f.tar").write_bytes(b"bytes")
    source = FixedOutput("f.tar", (), "5" * 64, hashing.hash_bytes(b"bytes"), 5)
    assert source.known_output_hash() == hashing.hash_tree(tmp_path / "out", use_cache=False)


def test_hash_tree_files_reads_the_disk_not_the_stat_cache(stat_cache: Path, tmp_path: Path) -> None:
    old_file(tmp_path / "d" / "a", "a")
    hashing.hash_tree(tmp_path / "d")  # remembered
    before = hashing.STATS.cache_hits
    hashing.hash_tree_files(tmp_path / "d")
    assert hashing.STATS.cache_hits == before


def test_a_stat_cache_that_cannot_be_written_is_only_a_miss(tmp_path: Path) -> None:
    path = old_file(tmp_path / "f", "x")
    cache = hashing.StatCache(tmp_path / "c.sqlite3")
    cache._conn.close()  # as good as a full disk or a read-only store
    cache.remember(path, path.stat(), "b3", None)
    assert hashing.StatCache(tmp_path / "c.sqlite3").lookup(path, path.stat()) is None
