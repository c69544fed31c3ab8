"""The lock file's entry checks, its exact rendering and the upstream checksum lookup (found by scripts/mutation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eulerbake.core.derivation import FixedOutput
from eulerbake.core.errors import EulerbakeError
from eulerbake.fetch import http as fetch
from eulerbake.fetch.lock import LockEntry, LockFile, PinRequest, check_upstream_checksum

SHA = "a" * 64
B3 = "b" * 64


def entry(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"url": "https://m.example/x.qcow2", "filename": "x.qcow2", "size": 3, "sha256": SHA,
                            "blake3": B3}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize(("data", "problem"), [
    (["not", "a", "dict"], "is not an object"),
    ({"url": "u", "filename": "f"}, "lacks blake3, sha256, size"),
    (entry(zeta=1, alpha=2), "has unknown fields alpha, zeta"),
    (entry(size=-1), "has a size that is not a non-negative integer"),
    (entry(size="3"), "has a size that is not a non-negative integer"),
    (entry(url=5), "has a field that is not a string"),
    (entry(upstream_checksum=1), "has a field that is not a string"),
    (entry(sha256="a" * 63), "has a sha256 or blake3 that is not 64 lowercase hex digits"),
    (entry(sha256="X" * 64), "has a sha256 or blake3 that is not 64 lowercase hex digits"),
    (entry(sha256="A" * 64), "has a sha256 or blake3 that is not 64 lowercase hex digits"),
    (entry(blake3="g" * 64), "has a sha256 or blake3 that is not 64 lowercase hex digits"),
])
def test_a_bad_entry_is_named_with_its_problem(data: Any, problem: str) -> None:
    with pytest.raises(EulerbakeError) as err:
        LockEntry.from_json("rel:x86_64:qcow2", data, Path("recipes/sources.lock"))
    assert err.value.message == f"recipes/sources.lock: entry 'rel:x86_64:qcow2' {problem}"


def test_an_empty_file_of_size_zero_is_a_valid_pin() -> None:
    pinned = LockEntry.from_json("id", entry(size=0), Path("l"))
    assert (pinned.size, pinned.upstream_checksum) == (0, "")


def test_reading_names_the_lock_file(tmp_path: Path) -> None:
    path = tmp_path / "sources.lock"
    path.write_text(json.dumps({"format": 1, "sources": {"id": entry(size=-5)}}))
    with pytest.raises(EulerbakeError) as err:
        LockFile.read(path)
    assert err.value.message.startswith(f"{path}: entry 'id' has a size")


def test_the_lock_file_renders_sorted_indented_and_keeps_non_ascii(tmp_path: Path) -> None:
    lock = LockFile(tmp_path / "new" / "dir" / "sources.lock", {
        "z": LockEntry("https://m.example/ü/z.qcow2", "z.qcow2", 1, SHA, B3),
        "a": LockEntry("https://m.example/a.qcow2", "a.qcow2", 2, SHA, B3, "https://m.example/a.qcow2.sha256sum"),
    })
    lock.write()
    assert lock.path.read_text() == (
        '{\n  "format": 1,\n  "sources": {\n    "a": {\n'
        f'      "blake3": "{B3}",\n      "filename": "a.qcow2",\n      "sha256": "{SHA}",\n      "size": 2,\n'
        '      "upstream_checksum": "https://m.example/a.qcow2.sha256sum",\n'
        '      "url": "https://m.example/a.qcow2"\n    },\n    "z": {\n'
        f'      "blake3": "{B3}",\n      "filename": "z.qcow2",\n      "sha256": "{SHA}",\n      "size": 1,\n'
        '      "upstream_checksum": "",\n      "url": "https://m.example/ü/z.qcow2"\n    }\n  }\n}\n'
    )
    assert LockFile.read(lock.path).entries == lock.entries


def request(*urls: str, suffix: str = ".sha256sum") -> PinRequest:
    return PinRequest("id", FixedOutput("x.qcow2", tuple(urls), "", "", -1), suffix)


def fetched(url: str, sha256: str = SHA) -> fetch.Fetched:
    return fetch.Fetched(url, Path("x.qcow2.part"), 3, sha256, B3, False)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Checksum files by URL (absent ones are None); every fetch_text call is recorded."""
    texts: dict[str, Any] = {"calls": []}

    def fetch_text(location: str, policy: fetch.RetryPolicy | None = None, log: Any = print) -> str | None:
        texts["calls"].append((location, policy, log))
        return texts.get(location)

    monkeypatch.setattr(fetch, "fetch_text", fetch_text)
    return texts


def test_the_checksum_is_looked_for_beside_every_location(published: dict[str, Any]) -> None:
    policy = fetch.RetryPolicy(attempts=1)
    said: list[str] = []
    published["https://b.example/x.qcow2.sha256sum"] = f"{SHA}  x.qcow2\n"
    req = request("https://a.example/x.qcow2", "https://b.example/x.qcow2", "https://c.example/x.qcow2")
    got = check_upstream_checksum(req, fetched("https://c.example/x.qcow2"), said.append, policy)
    assert got == "https://b.example/x.qcow2.sha256sum"
    assert published["calls"] == [("https://c.example/x.qcow2.sha256sum", policy, said.append),
                                  ("https://a.example/x.qcow2.sha256sum", policy, said.append),
                                  ("https://b.example/x.qcow2.sha256sum", policy, said.append)]
    assert said == ["x.qcow2: sha256 matches https://b.example/x.qcow2.sha256sum"]


def test_no_checksum_anywhere_pins_as_downloaded(published: dict[str, Any]) -> None:
    said: list[str] = []
    req = request("https://a.example/x.qcow2", "https://b.example/x.qcow2")
    assert check_upstream_checksum(req, fetched("https://a.example/x.qcow2"), said.append) == ""
    assert len(published["calls"]) == 2
    assert said == ["x.qcow2: upstream publishes no x.qcow2.sha256sum; pinned as downloaded, review it"]
    assert check_upstream_checksum(request("https://a.example/x.qcow2", suffix=""),
                                   fetched("https://a.example/x.qcow2")) == ""
    assert len(published["calls"]) == 2  # no suffix: nothing is asked


def test_a_checksum_file_without_the_file_names_where_it_looked(published: dict[str, Any]) -> None:
    published["https://a.example/x.qcow2.sha256sum"] = f"{SHA}  other.qcow2\n"
    with pytest.raises(EulerbakeError) as err:
        check_upstream_checksum(request("https://a.example/x.qcow2"), fetched("https://a.example/x.qcow2"))
    assert "https://a.example/x.qcow2.sha256sum" in str(err.value)


def test_pin_source_fetches_under_the_sources_lock_with_the_callers_policy(
        tmp_path: Path, published: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from eulerbake.fetch.lock import pin_source
    from eulerbake.store.local import Store

    store = Store(tmp_path / "store")
    policy = fetch.RetryPolicy(attempts=1)
    calls: list[dict[str, Any]] = []

    def fetch_first(locations: Any, partial: Path, **options: Any) -> fetch.Fetched:
        calls.append({"locations": locations, **options})
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"abc")
        import hashlib

        import blake3
        return fetch.Fetched(locations[0], partial, 3, hashlib.sha256(b"abc").hexdigest(),
                             blake3.blake3(b"abc").hexdigest(), False)

    monkeypatch.setattr(fetch, "fetch_first", fetch_first)
    req = request("https://a.example/x.qcow2")
    said: list[str] = []
    unpinned = FixedOutput("x.qcow2", req.source.urls, "", "", -1)
    store.open_stat_cache()
    release = threading.Event()
    got: list[LockEntry] = []

    def hold() -> None:
        with store.lock(unpinned.key):
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.2)
    worker = threading.Thread(target=lambda: got.append(pin_source(req, store, said.append, policy)))
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive() and calls == []  # another pin of the same source is running
    release.set()
    worker.join(10)
    holder.join(10)
    assert said[0] == f"waiting for another build of {unpinned.key} to finish"
    assert calls == [{"locations": req.source.urls, "label": "id", "log": said.append, "policy": policy}]
    assert [call[1] for call in published["calls"]] == [policy]
    assert got[0].size == 3 and store.has(dataclass_replace(req.source, sha256=got[0].sha256,
                                                             blake3=got[0].blake3, size=3))


def dataclass_replace(source: FixedOutput, **changes: Any) -> FixedOutput:
    import dataclasses

    return dataclasses.replace(source, **changes)
