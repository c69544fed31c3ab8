"""A runner that takes an entry from the cache keeps the provenance its builder signed: pushed as
`provenance/<sha256>.json` before the metadata that names it, fetched with the entry (exactly those bytes, or
the entry is refused), kept beside it, shown by `eulerbake provenance`, verified by audit, kept by cache gc."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from eulerbake.cli.audit import provenance_main
from eulerbake.cli.cache import cache_main
from eulerbake.core.derivation import Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.provenance import SIGNING_KEY_ENV, dsse
from eulerbake.provenance.audit import PASS, audit_entry
from eulerbake.provenance.statement import statement_for
from eulerbake.store.local import Store
from eulerbake.store.signing import SecretKey
from eulerbake.store.substituters import entry_name, provenance_name
from tests.cache.conftest import Runner
from tests.cache.graph import Graph, make_graph


class _Project:
    """What `provenance_main` asks of a project: its store and a node by task name."""

    def __init__(self, store: Store, nodes: list[Node]) -> None:
        self.store, self._nodes = store, {node.task_name: node for node in nodes}

    def node(self, task: str) -> Node:
        return self._nodes[task]


@pytest.fixture
def signing(tmp_path: Path, ci_key: SecretKey, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "keys").mkdir()
    secret, _public = ci_key.write(tmp_path / "keys")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(secret))
    return secret


def _built_and_pushed(make_runner, url: str, graph: Graph, ci_key: SecretKey) -> Runner:  # type: ignore[no-untyped-def]
    a: Runner = make_runner("a", [url])
    a.realise([graph.image])
    assert a.push(graph.nodes, ci_key) == ["pushed"] * 5
    return a


def test_a_substituted_entry_keeps_its_builders_provenance(make_runner, cache_url: str, graph: Graph, upstream: Path,  # type: ignore[no-untyped-def]
                                                           ci_key: SecretKey, signing: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    a = _built_and_pushed(make_runner, cache_url, graph, ci_key)
    monkeypatch.delenv(SIGNING_KEY_ENV)  # B signs nothing itself
    b: Runner = make_runner("b", [cache_url])
    fresh = make_graph(upstream)
    results = b.realise([fresh.raw, fresh.kmod, fresh.image])
    assert b.ran() == [] and all(r.substituted for r in results.values() if r.node in (fresh.raw, fresh.image))
    for node in (fresh.raw, fresh.kmod, fresh.image):
        given = b.store.provenance_path(node).read_bytes()
        assert given == a.store.provenance_path(node).read_bytes()  # the builder's, byte for byte
        assert b.meta(node)["substitution"]["provenance_sha256"] == hashlib.sha256(given).hexdigest()
        assert dsse.verify(dsse.read(b.store.provenance_path(node)), [ci_key.public()]).signer == "ci-1"
    audited = audit_entry(b.store, b.store.read_meta(b.store.meta_path(fresh.image)), [ci_key.public()]).root
    assert [(c.name, c.status) for c in audited.checks][:2] == [("sealed", PASS), ("signature", PASS)]
    assert b.leftovers() == [] and b.store.verify() == []
    with pytest.raises(EulerbakeError, match="was not built here") as refused:  # never re-signed as B's
        statement_for(b.store, fresh.image)
    assert refused.value.hint == f"its builder's provenance came with it: {b.store.provenance_path(fresh.image)}"
    # `eulerbake provenance TASK` on B shows the builder's envelope (even with a key: it is not B's to sign)
    monkeypatch.setenv(SIGNING_KEY_ENV, str(signing))
    capsys.readouterr()
    assert provenance_main([fresh.image.task_name], project=_Project(b.store, fresh.nodes)) == 0  # type: ignore[arg-type]
    assert json.loads(capsys.readouterr().out) == dsse.read(a.store.provenance_path(graph.image))
    assert b.store.provenance_path(fresh.image).read_bytes() == a.store.provenance_path(graph.image).read_bytes()


def test_an_entry_pushed_without_provenance_says_so(make_runner, dir_url: str, graph: Graph, upstream: Path,  # type: ignore[no-untyped-def]
                                                    ci_key: SecretKey) -> None:
    a = _built_and_pushed(make_runner, dir_url, graph, ci_key)  # no signing key: no provenance anywhere
    assert not a.store.provenance_path(graph.image).exists()
    b: Runner = make_runner("b", [dir_url])
    fresh = make_graph(upstream)
    b.realise([fresh.image])
    assert "provenance" not in json.loads((Path(dir_url.removeprefix("file://")) / entry_name(fresh.image.key))
                                          .read_text())
    assert not b.store.provenance_path(fresh.image).exists() and b.leftovers() == []
    with pytest.raises(EulerbakeError) as refused:
        statement_for(b.store, fresh.image)
    assert refused.value.hint is not None and "the cache entry had no provenance" in refused.value.hint


def test_a_changed_provenance_refuses_the_entry(make_runner, dir_url: str, graph: Graph, upstream: Path,  # type: ignore[no-untyped-def]
                                                ci_key: SecretKey, signing: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    a = _built_and_pushed(make_runner, dir_url, graph, ci_key)
    monkeypatch.delenv(SIGNING_KEY_ENV)
    cache = Path(dir_url.removeprefix("file://"))
    named = json.loads((cache / entry_name(graph.image.key)).read_text())["provenance"]
    envelope = cache / provenance_name(named["sha256"])
    pushed = a.settings.push_cache(dir_url)
    entry = pushed.read_entry(graph.image.key)
    assert entry is not None and pushed.verify([entry], deep=False) == []  # `cache verify` checks it too
    envelope.write_bytes(envelope.read_bytes().replace(b'"payload": "', b'"payload": "X'))
    (problem,) = pushed.verify([entry], deep=False)
    assert problem.reason == f"its provenance {provenance_name(named['sha256'])} is not the bytes its metadata names"
    b: Runner = make_runner("b", [dir_url])
    fresh = make_graph(upstream)
    b.realise([fresh.image])
    assert "image" in b.ran()  # built instead
    assert any("is not the bytes its metadata names" in message for message in b.log)
    assert not b.store.provenance_path(fresh.image).exists() and b.leftovers() == []


def test_cache_gc_keeps_named_provenance_and_drops_orphans(make_runner, dir_url: str, graph: Graph,  # type: ignore[no-untyped-def]
                                                           ci_key: SecretKey, signing: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    a = _built_and_pushed(make_runner, dir_url, graph, ci_key)
    cache = Path(dir_url.removeprefix("file://"))
    named = sorted(p.name for p in (cache / "provenance").iterdir())
    assert len(named) == 5
    capsys.readouterr()
    assert cache_main(["info", graph.image.key, "--cache", dir_url]) == 0
    sha = json.loads((cache / entry_name(graph.image.key)).read_text())["provenance"]["sha256"]
    assert f"provenance {sha}" in capsys.readouterr().out
    (cache / provenance_name("0" * 64)).write_bytes(b"{}")  # pushed, but its metadata never written
    assert a.settings.push_cache(dir_url).gc(grace=0, dry_run=True) == ([], [provenance_name("0" * 64)])
    assert a.settings.push_cache(dir_url).gc(grace=3600) == ([], [])  # a push in flight: kept
    assert cache_main(["gc", "--grace", "0", "--cache", dir_url]) == 0
    assert "deleted 0 entries and 0 archives and 1 provenance envelopes" in capsys.readouterr().out
    assert sorted(p.name for p in (cache / "provenance").iterdir()) == named
