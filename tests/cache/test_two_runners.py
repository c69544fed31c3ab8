"""Runner A builds and pushes; runner B, with its own store, builds nothing: every entry it needs comes
from the cache (directory and S3 over HTTP), bit for bit A's, and what lies below a hit is never fetched."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest

from eulerbake.core import hashing
from tests.cache.conftest import Runner
from tests.cache.graph import Graph, make_graph


def _same_tree(a: Path, b: Path) -> None:
    assert hashing.hash_tree(a, use_cache=False) == hashing.hash_tree(b, use_cache=False)
    for path in sorted(a.rglob("*")):
        other = b / path.relative_to(a)
        if path.is_symlink():
            assert os.readlink(path) == os.readlink(other)
        elif path.is_file():
            assert filecmp.cmp(path, other, shallow=False), path
            assert os.access(other, os.X_OK) == os.access(path, os.X_OK)


def test_runner_b_builds_nothing(make_runner, cache_url: str, graph: Graph, upstream: Path, ci_key) -> None:  # type: ignore[no-untyped-def]
    a: Runner = make_runner("a", [cache_url])
    a.realise([graph.image])
    assert sorted(a.ran()) == ["image", "kmod", "raw", "unpack"]
    assert a.push(graph.nodes, ci_key) == ["pushed"] * 5

    b: Runner = make_runner("b", [cache_url])
    fresh = make_graph(upstream)  # B loads the graph itself: same keys, other objects
    results = b.realise([fresh.raw, fresh.kmod, fresh.image])
    assert b.ran() == []  # no builder ran on B
    substituted = {r.node.task_name for r in results.values() if r.substituted}
    assert substituted == {"raw:sample", "kmod:sample", "image:sample"}
    for node in (fresh.raw, fresh.kmod, fresh.image):
        meta = b.meta(node)
        assert meta["substituted_from"] == b.caches[0].url
        assert meta["substitution"]["signed_by"] == "ci-1"
        assert meta["output"] == a.meta(node)["output"]
        _same_tree(a.store.path(node), b.store.path(node))
    # Below the hits: the upstream qcow2 was not fetched, the unpack not made.
    assert not b.store.has(fresh.source) and not b.store.has(fresh.unpack)
    assert b.entries() == {p.name for n in (fresh.raw, fresh.kmod, fresh.image)
                           for p in (b.store.path(n), b.store.meta_path(n))}
    disk = b.store.path(fresh.raw) / "disk.raw"
    assert disk.stat().st_size == 32 * 2**20 and disk.stat().st_blocks * 512 <= 3 * 2**20  # restored sparse
    assert b.leftovers() == [] and b.store.verify() == []

    # A second run on B: everything is in its store, nothing below it is touched, nothing asked.
    again = b.realise([fresh.image])
    assert b.ran() == [] and not any(r.substituted or r.built for r in again.values())
    assert not b.store.has(fresh.source)


def test_the_closure_is_pushed_inputs_first(make_runner, dir_url: str, graph: Graph, ci_key) -> None:  # type: ignore[no-untyped-def]
    a: Runner = make_runner("a", [dir_url])
    a.realise([graph.image])
    cache = a.caches[0]
    store = a.store
    with pytest.raises(Exception, match="references are not in"):
        cache.push(store, store.read_meta(store.meta_path(graph.image)), ci_key)
    assert cache.query([n.key for n in graph.nodes]) == set()  # nothing half-published
    a.push([graph.image, graph.raw, graph.source, graph.unpack, graph.kmod], ci_key)  # any order given
    assert cache.query([n.key for n in graph.nodes]) == {n.key for n in graph.nodes}
    assert a.push(graph.nodes, ci_key) == ["present"] * 5


def test_a_substituted_fixed_output_is_the_pinned_file(make_runner, cache_url: str, graph: Graph, upstream: Path,
                                                       ci_key) -> None:  # type: ignore[no-untyped-def]
    a: Runner = make_runner("a", [cache_url])
    a.realise([graph.source])
    a.push([graph.source], ci_key)
    upstream.unlink()  # the upstream is gone: B can only have it from the cache
    b: Runner = make_runner("b", [cache_url])
    fresh = make_graph(a.store.path(graph.source) / "upstream.qcow2")
    fresh.source.urls = (str(upstream),)
    results = b.realise([fresh.source])
    assert results[fresh.source.key].substituted
    assert (b.store.path(fresh.source) / "upstream.qcow2").read_bytes() == \
        (a.store.path(graph.source) / "upstream.qcow2").read_bytes()
