"""Downloads against the local mirror: resume, retries, wrong bytes, mirror fallback, file:// without network."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import blake3
import pytest

from eulerbake.core.derivation import FixedOutput
from eulerbake.core.errors import EulerbakeError
from eulerbake.fetch import http as fetch
from eulerbake.fetch.lock import LockEntry, LockFile
from eulerbake.store.local import Store
from recipes import releases

from .conftest import MirrorServer, corrupt


def pinned_source(data: bytes, urls: list[str], filename: str = "blob.bin") -> FixedOutput:
    return FixedOutput(filename=filename, urls=tuple(urls), sha256=hashlib.sha256(data).hexdigest(),
                  blake3=blake3.blake3(data).hexdigest(), size=len(data), label=f"test:{filename}")


def store_entries(store: Store) -> list[str]:
    """Committed entries and leftovers: everything in the store except its bookkeeping directories."""
    if not store.root.is_dir():
        return []
    found = [p.name for p in store.root.iterdir() if not p.name.startswith(".")]
    found += [f".tmp/{p.name}" for p in (store.root / ".tmp").iterdir()]
    downloads = fetch.downloads_dir(store.root)
    found += [f"downloads/{p.name}" for p in downloads.iterdir()] if downloads.is_dir() else []
    return found


def test_dropped_connection_is_resumed_with_range(tmp_path: Path, mirror: MirrorServer) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    url = mirror.add("pub/blob.bin", data)
    mirror.drop_after, mirror.drops_left = 700_000, 2
    store = Store(tmp_path / "store")

    result = store.realise(pinned_source(data, [url]), log=lambda _m: None)

    assert (result.path / "blob.bin").read_bytes() == data
    gets = mirror.gets("blob.bin")
    assert [r.range for r in gets] == [None, "bytes=700000-", "bytes=1400000-"]
    assert [r.status for r in gets] == [200, 206, 206]
    assert all(r.if_range == MirrorServer.etag(data) for r in gets[1:])  # resumes are guarded by the validator
    assert sum(r.body_bytes for r in gets) == len(data)  # nothing was downloaded twice
    entry = result.path.name
    assert sorted(store_entries(store)) == [entry, entry + ".json", entry + ".log"]  # partial moved in


def test_partial_left_by_a_killed_run_is_continued(tmp_path: Path, mirror: MirrorServer) -> None:
    data = os.urandom(2 * 1024 * 1024)
    url = mirror.add("pub/blob.bin", data)
    source = pinned_source(data, [url])
    store = Store(tmp_path / "store")
    store.open_stat_cache()
    partial = fetch.store_partial(store.root, source)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:1_000_000])  # what an interrupted earlier run left behind

    result = store.realise(source, log=lambda _m: None)

    assert (result.path / "blob.bin").read_bytes() == data
    rest = len(data) - 1_000_000
    assert [(r.range, r.status, r.body_bytes) for r in mirror.gets()] == [("bytes=1000000-", 206, rest)]
    assert not partial.exists()


def test_stale_partial_is_downloaded_again_from_the_start(tmp_path: Path, mirror: MirrorServer) -> None:
    data = os.urandom(1024 * 1024)
    url = mirror.add("pub/blob.bin", data)
    source = pinned_source(data, [url])
    store = Store(tmp_path / "store")
    store.open_stat_cache()
    partial = fetch.store_partial(store.root, source)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(os.urandom(300_000))  # garbage: continuing it cannot match the pins

    result = store.realise(source, log=lambda _m: None)

    assert (result.path / "blob.bin").read_bytes() == data
    assert [(r.range, r.status) for r in mirror.gets()] == [("bytes=300000-", 206), (None, 200)]


def test_wrong_bytes_are_refused_naming_both_hashes(tmp_path: Path, mirror: MirrorServer) -> None:
    data = os.urandom(512 * 1024)
    url = mirror.add("pub/blob.bin", data)
    mirror.wrong.add("/pub/blob.bin")
    source = pinned_source(data, [url])
    store = Store(tmp_path / "store")

    with pytest.raises(EulerbakeError) as caught:
        store.realise(source, log=lambda _m: None)

    message = str(caught.value)
    served = corrupt(data)
    assert f"sha256: expected {source.sha256}, got {hashlib.sha256(served).hexdigest()}" in message
    assert f"blake3: expected {source.blake3}, got {blake3.blake3(served).hexdigest()}" in message
    assert url in message and "eulerbake lock --update" in message
    assert not store.has(source)
    assert store_entries(store) == []  # no entry, no build directory, no partial download


def test_a_bad_mirror_is_skipped_for_a_good_one(tmp_path: Path, mirror: MirrorServer) -> None:
    data = os.urandom(100_000)
    bad = mirror.add("bad/blob.bin", data)
    good = mirror.add("good/blob.bin", data)
    mirror.wrong.add("/bad/blob.bin")
    logged: list[str] = []

    result = Store(tmp_path / "store").realise(pinned_source(data, [bad, good]), log=logged.append)

    assert (result.path / "blob.bin").read_bytes() == data
    assert any("do not match the pins" in line for line in logged)


def test_retries_give_up_with_a_clear_error(tmp_path: Path, mirror: MirrorServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EULERBAKE_FETCH_RETRIES", "3")
    data = os.urandom(200_000)
    url = mirror.add("pub/blob.bin", data)
    mirror.drop_after, mirror.drops_left = 0, 100  # every response dies before its first byte
    store = Store(tmp_path / "store")

    with pytest.raises(EulerbakeError) as caught:
        store.realise(pinned_source(data, [url]), log=lambda _m: None)

    assert "gave up after 3 attempts" in str(caught.value) and url in str(caught.value)
    assert len(mirror.gets()) == 3
    assert [p for p in store_entries(store) if not p.startswith("downloads/")] == []


def test_first_mirror_404_then_second_mirror(tmp_path: Path, mirror: MirrorServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rel = releases.matrix(["22.03-LTS-SP4"], ["aarch64"])[0]
    data = os.urandom(300_000)
    path = releases.qcow2_xz_paths(rel)[0]
    mirror.add(f"second/{path}", data)
    monkeypatch.setenv("EULERBAKE_MIRRORS", f"{mirror.base_url}/first, {mirror.base_url}/second/")
    entry = LockEntry(f"https://repo.openeuler.org/{path}", rel.qcow2_xz_filename, len(data),
                      hashlib.sha256(data).hexdigest(), blake3.blake3(data).hexdigest())
    lock = LockFile(tmp_path / "sources.lock", {f"{rel.label}:qcow2": entry})

    source = releases.qcow2_xz_source(rel, lock)
    result = Store(tmp_path / "store").realise(source, log=lambda _m: None)

    assert (result.path / rel.qcow2_xz_filename).read_bytes() == data
    assert [(r.path, r.status) for r in mirror.gets()] == [(f"/first/{path}", 404), (f"/second/{path}", 200)]


def test_file_mirror_needs_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rel = releases.matrix(["24.03-LTS"], ["x86_64"])[0]
    data = os.urandom(250_000)
    copy = tmp_path / "airgap" / releases.iso_paths(rel)[0]
    copy.parent.mkdir(parents=True)
    copy.write_bytes(data)
    monkeypatch.setenv("EULERBAKE_MIRRORS", f"file://{tmp_path / 'airgap'}")
    entry = LockEntry("https://repo.openeuler.org/x", rel.iso_filename, len(data),
                      hashlib.sha256(data).hexdigest(), blake3.blake3(data).hexdigest())
    source = releases.iso_source(rel, LockFile(tmp_path / "sources.lock", {f"{rel.label}:iso": entry}))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a file:// mirror must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    result = Store(tmp_path / "store").realise(source, log=lambda _m: None)

    assert source.urls[0] == f"file://{copy}"
    assert (result.path / rel.iso_filename).read_bytes() == data


def test_unpinned_source_is_refused(tmp_path: Path, mirror: MirrorServer) -> None:
    url = mirror.add("pub/blob.bin", b"x")
    source = FixedOutput(filename="blob.bin", urls=(url,), sha256="", blake3="", size=-1, label="test:blob")
    store = Store(tmp_path / "store")

    with pytest.raises(EulerbakeError, match="not pinned") as caught:
        store.realise(source, log=lambda _m: None)

    assert "eulerbake lock" in str(caught.value)
    assert mirror.gets() == [] and store_entries(store) == []


def test_oversized_answer_is_cut_short(tmp_path: Path, mirror: MirrorServer) -> None:
    data = os.urandom(50_000)
    url = mirror.add("pub/blob.bin", data + b"trailing junk")
    with pytest.raises(EulerbakeError, match="the pins say 50000"):
        Store(tmp_path / "store").realise(pinned_source(data, [url]), log=lambda _m: None)


def test_retry_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EULERBAKE_FETCH_RETRIES", "lots")
    with pytest.raises(EulerbakeError, match="EULERBAKE_FETCH_RETRIES"):
        fetch.RetryPolicy.from_env()
