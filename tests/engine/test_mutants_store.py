"""The store's gc, delete and quarantine, in-process (scripts/mutation found them reached only through the CLI)."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalFile
from eulerbake.core.errors import EulerbakeError
from eulerbake.store import seal
from eulerbake.store.local import GC_LOCK, NO_REBUILD_CORRUPT_ENV, Store


def write_value(ctx: BuildContext) -> None:
    (ctx.out / "value").write_text(str(ctx.params["value"]))


def node(label: str, **inputs: Derivation) -> Derivation:
    return Derivation("mutants", label, write_value, dict(inputs), {"value": label})


def quiet(_message: str) -> None:
    pass


def entry_files(store: Store, drv: Derivation) -> list[Path]:
    return [store.path(drv), store.meta_path(drv), store.seal_path(drv.key), store.log_path(drv)]


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Store, dict[str, Derivation]]:
    """base <- middle <- top, and an unrelated `other`, all built."""
    store = Store(tmp_path / "store")
    base = node("base")
    middle = node("middle", up=base)
    top = node("top", up=middle)
    other = node("other")
    for drv in (top, other):
        store.realise(drv, log=quiet)
    return store, {"base": base, "middle": middle, "top": top, "other": other}


def test_gc_keeps_the_closure_of_what_is_kept_and_deletes_every_file_of_the_rest(
        chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, nodes = chain
    assert store.references(store.find(nodes["top"].key)) == [nodes["middle"].key]
    doomed = store.gc({nodes["top"].key}, log=quiet)
    assert [meta["key"] for meta in doomed] == [nodes["other"].key]
    for name in ("base", "middle", "top"):
        assert store.has(nodes[name]), name
    assert not any(part.exists() for part in entry_files(store, nodes["other"]))
    assert {meta["key"] for meta in store.entries()} == {nodes[n].key for n in ("base", "middle", "top")}


def test_gc_dry_run_deletes_nothing(chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, nodes = chain
    doomed = store.gc(set(), dry_run=True, log=quiet)
    assert {meta["key"] for meta in doomed} == {drv.key for drv in nodes.values()}
    assert all(store.has(drv) for drv in nodes.values())


def test_gc_keeps_pinned_roots_and_their_inputs(chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, nodes = chain
    (store.root / ".roots" / "release").write_text(nodes["middle"].key + "\n")
    assert store.pinned_roots() == {nodes["middle"].key}
    doomed = store.gc(set(), log=quiet)
    assert {meta["key"] for meta in doomed} == {nodes["top"].key, nodes["other"].key}
    assert store.has(nodes["middle"]) and store.has(nodes["base"])


def test_gc_removes_leftovers_but_keeps_downloads_of_kept_sources(chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, nodes = chain
    kept, dropped = nodes["top"].key, "f" * 32
    downloads = store.root / ".cache" / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    (downloads / f"{kept}-a-file-with-dashes.part").write_text("partial")
    (downloads / f"{dropped}-another-file.part").write_text("partial")
    (store.root / ".tmp" / f"{kept}-build-dir").mkdir()
    store.gc({kept}, log=quiet)
    assert sorted(p.name for p in downloads.iterdir()) == [f"{kept}-a-file-with-dashes.part"]
    assert list((store.root / ".tmp").iterdir()) == []


def held(path: Path, mode: int, release: threading.Event) -> threading.Thread:
    """A thread holding flock(`mode`) on `path` until `release` is set."""
    ready = threading.Event()

    def hold() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            ready.set()
            release.wait(10)
        finally:
            os.close(fd)

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait(10)
    return thread


def test_gc_waits_for_builds_and_says_so(chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, nodes = chain
    release = threading.Event()
    holder = held(store.root / ".locks" / f"{GC_LOCK}.lock", fcntl.LOCK_SH, release)  # a build in flight
    said: list[str] = []
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(len(store.gc(set(), log=said.append))))
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive() and store.has(nodes["other"])  # nothing deleted while the build runs
    assert said == ["waiting for builds using this store to finish before gc"]
    release.set()
    worker.join(10)
    holder.join(10)
    assert result == [4]


def test_gc_takes_a_leftover_only_when_its_build_is_done(chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, _nodes = chain
    key = "e" * 32
    leftover = store.root / ".tmp" / f"{key}-abc-def"
    leftover.mkdir()
    release = threading.Event()
    holder = held(store.root / ".locks" / f"{key}.lock", fcntl.LOCK_EX, release)  # that build still runs
    worker = threading.Thread(target=lambda: store.gc(set(), log=quiet))
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive() and leftover.is_dir()
    release.set()
    worker.join(10)
    holder.join(10)
    assert not leftover.exists()


def test_a_deleted_entry_is_checked_again_once_rebuilt(chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, nodes = chain
    other = nodes["other"]
    assert store.has(other)  # checked once, then trusted for the rest of the process
    store.delete(store.find(other.key))
    assert not any(part.exists() for part in entry_files(store, other))
    store.realise(other, log=quiet)
    value = store.path(other) / "value"
    os.chmod(store.path(other), 0o755)
    os.chmod(value, 0o644)
    value.write_text("tampered")
    assert not store.has(other)  # the rebuilt entry's seal is checked, not the deleted one's verdict


def corrupt(store: Store, drv: Derivation) -> None:
    value = store.path(drv) / "value"
    os.chmod(store.path(drv), 0o755)
    os.chmod(value, 0o644)
    value.write_text("flipped")


def test_a_corrupted_entry_is_moved_aside_whole_with_a_note(chain: tuple[Store, dict[str, Derivation]],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    store, nodes = chain
    other = nodes["other"]
    corrupt(store, other)
    assert not store.has(other)
    assert not any(part.exists() for part in entry_files(store, other))
    [aside] = list((store.root / ".corrupt").iterdir())
    assert aside.name.startswith(f"{other.key}-{other.store_name}-")
    names = {p.name for p in aside.iterdir()}
    assert names == {store.path(other).name, store.meta_path(other).name, store.log_path(other).name,
                     store.seal_path(other.key).name, "NOTE"}
    note = (aside / "NOTE").read_text()
    assert note.startswith(f"{other.task_name} was corrupted in the store: value: content changed")
    warning = capsys.readouterr().err
    assert f"store entry {other.key}-{other.store_name} ({other.task_name}) is CORRUPT" in warning
    assert str(aside) in warning
    store.realise(other, log=quiet)
    assert (store.path(other) / "value").read_text() == "other"


def test_a_corrupted_entry_stops_the_build_when_told_to(chain: tuple[Store, dict[str, Derivation]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store, nodes = chain
    other = nodes["other"]
    corrupt(store, other)
    monkeypatch.setenv(NO_REBUILD_CORRUPT_ENV, "1")
    with pytest.raises(EulerbakeError, match="is corrupted: value: content changed since it was sealed"):
        store.has(other)
    assert store.meta_path(other).is_file() and list((store.root / ".corrupt").iterdir()) == []
    monkeypatch.setenv(NO_REBUILD_CORRUPT_ENV, "0")
    assert not store.has(other)


def write_files(ctx: BuildContext) -> None:
    for i in range(ctx.params["files"]):
        (ctx.out / f"f{i}").write_text(str(i))


@pytest.mark.parametrize(("files", "suffix"), [(1, ""), (5, ""), (6, " (and 1 more)"), (7, " (and 2 more)")])
def test_the_note_shows_five_problems_and_counts_the_rest(tmp_path: Path, files: int, suffix: str) -> None:
    store = Store(tmp_path / "store")
    drv = Derivation("mutants", f"files{files}", write_files, {}, {"files": files})
    store.realise(drv, log=quiet)
    os.chmod(store.path(drv), 0o755)
    for i in range(files):
        os.chmod(store.path(drv) / f"f{i}", 0o644)
        (store.path(drv) / f"f{i}").write_text("changed")
    problems = store.seal_problems(drv.key, store.path(drv))
    assert len(problems) == files
    assert not store.has(drv)
    [aside] = list((store.root / ".corrupt").iterdir())
    assert (aside / "NOTE").read_text() == f"{drv.task_name} was corrupted in the store: " + "; ".join(
        problems[:5]) + suffix + "\n"


def waits_for_the_entry_lock(store: Store, drv: Derivation, action: Callable[[], object]) -> None:
    release = threading.Event()
    holder = held(store.root / ".locks" / f"{drv.key}.lock", fcntl.LOCK_EX, release)
    worker = threading.Thread(target=action)
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive() and store.meta_path(drv).is_file()
    release.set()
    worker.join(10)
    holder.join(10)
    assert not store.meta_path(drv).exists()


def test_quarantine_waits_for_a_build_of_that_entry(chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, nodes = chain
    corrupt(store, nodes["other"])
    waits_for_the_entry_lock(store, nodes["other"], lambda: store.has(nodes["other"]))


def test_delete_waits_for_a_build_of_that_entry(chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, nodes = chain
    meta = store.find(nodes["top"].key)
    waits_for_the_entry_lock(store, nodes["top"], lambda: store.delete(meta))


def test_delete_takes_the_provenance_and_minds_no_missing_part(chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, nodes = chain
    other = nodes["other"]
    meta = store.find(other.key)
    store.provenance_path(other).write_text("{}")
    store.log_path(other).unlink()
    store.delete(meta)
    assert not store.provenance_path(other).exists() and not store.path(other).exists()
    store.delete(meta)  # nothing left: still fine


def test_a_source_entry_references_nothing() -> None:
    assert Store.references({"manifest": {"abi": 2, "kind": "fixed-output", "source": "b3"}}) == []


def test_gc_keeps_an_entry_whose_input_is_gone(chain: tuple[Store, dict[str, Derivation]]) -> None:
    store, nodes = chain
    store.delete(store.find(nodes["base"].key))  # a cache hit can leave an entry without its inputs
    doomed = store.gc({nodes["top"].key}, log=quiet)
    assert [meta["key"] for meta in doomed] == [nodes["other"].key]
    assert store.has(nodes["middle"]) and store.has(nodes["top"])


class Cache:
    """A substituter whose entry of a source holds `content`, claimed to hash as the pinned file would."""

    url = "test://cache"

    def __init__(self, content: bytes) -> None:
        self.content = content

    def fetch(self, node: Derivation, out: Path, log: Callable[[str], None]) -> dict[str, object]:
        out.mkdir()
        (out / node.store_name).write_bytes(self.content)
        return {"key": node.key, "name": node.store_name, "task": node.task_name, "kind": node.kind,
                "manifest": node.manifest, "output": {"hash": node.known_output_hash()}}


def pinned_source(tmp_path: Path) -> FixedOutput:
    import hashlib

    (tmp_path / "upstream.tar").write_bytes(b"the real bytes")
    return FixedOutput("src.tar", (str(tmp_path / "upstream.tar"),), hashlib.sha256(b"the real bytes").hexdigest(),
                       hashing.hash_bytes(b"the real bytes"), len(b"the real bytes"))


def test_a_cached_source_is_hashed_from_disk_before_it_is_committed(tmp_path: Path) -> None:
    source = pinned_source(tmp_path)
    said: list[str] = []
    forged = Store(tmp_path / "forged", substituters=[Cache(b"other bytes!!!")])
    result = forged.realise(source, log=said.append)
    assert not result.substituted and (result.path / "src.tar").read_bytes() == b"the real bytes"
    assert any("not taken from test://cache" in line for line in said)
    genuine = Store(tmp_path / "genuine", substituters=[Cache(b"the real bytes")])
    assert genuine.realise(source, log=quiet).substituted


def write_tree(ctx: BuildContext) -> None:
    (ctx.out / "sub").mkdir()
    (ctx.out / "sub" / "data").write_text("data")
    (ctx.out / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(ctx.out / "run.sh", 0o755)


def test_the_committed_metadata_and_seal_record_are_exact(tmp_path: Path) -> None:
    import json
    import stat

    store = Store(tmp_path / "store")
    drv = Derivation("mutants", "tree", write_tree)
    path = store.realise(drv, log=quiet).path
    text = store.meta_path(drv).read_text()
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=2, sort_keys=True)
    assert {k: meta[k] for k in ("key", "name", "task", "kind")} == {
        "key": drv.key, "name": "mutants-tree", "task": "mutants:tree", "kind": "derivation"}
    assert meta["manifest"] == drv.manifest
    assert meta["output"] == {"hash": hashing.hash_tree(path, use_cache=False), "size": hashing.tree_size(path)}
    record = store.seal_path(drv.key).read_text()
    assert record == seal.dumps(json.loads(record)) and record.startswith('{"stamp": "')
    assert json.loads(record)["stamp"] == seal.stamp(path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (path, path / "sub", path / "sub" / "data",
                                                             path / "run.sh")}
    assert modes == {path.name: 0o555, "sub": 0o555, "data": 0o444, "run.sh": 0o555}
    assert {p.stat().st_mtime for p in (path, path / "sub", path / "run.sh")} == {1_700_000_000}


def edit_own_input(ctx: BuildContext) -> None:
    Path(ctx.params["input"]).write_text("edited while building")
    (ctx.out / "x").write_text("x")


def test_an_input_edited_during_the_build_discards_the_output(tmp_path: Path) -> None:
    source = tmp_path / "input.txt"
    source.write_text("before")
    store = Store(tmp_path / "store")
    drv = Derivation("mutants", "edit", edit_own_input, {"input": LocalFile(source)}, {"input": str(source)})
    with pytest.raises(EulerbakeError, match=f"input {source} changed while mutants:edit was building"):
        store.realise(drv, log=quiet)
    assert not store.meta_path(drv).exists()
