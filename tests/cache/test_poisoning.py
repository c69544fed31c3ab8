"""A poisoned cache never gets into the store: each kind of bad entry is refused with a message naming the
entry and the reason, runner B builds the entry itself instead, and its store is left clean."""

from __future__ import annotations

import http.client
import http.server
import io
import json
import socketserver
import tarfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from eulerbake.core import hashing
from eulerbake.store.signing import SecretKey
from eulerbake.store.substituters import Cache, archive_name, entry_name, fingerprint
from tests.cache.conftest import MotoServer, Runner
from tests.cache.graph import Graph, make_graph


def _rewrite(cache: Cache, name: str, data: bytes) -> None:
    cache.backend.delete(name)
    assert cache.backend.create(name, data)


def _meta(cache: Cache, key: str) -> dict[str, Any]:
    meta = cache.read_entry(key)
    assert meta is not None
    return meta


def _put_meta(cache: Cache, meta: dict[str, Any]) -> None:
    _rewrite(cache, entry_name(meta["key"]), json.dumps(meta).encode())


def _resign(meta: dict[str, Any], key: SecretKey | None) -> None:
    meta["signatures"] = [key.sign(fingerprint(meta))] if key else []


def _forged_archive(cache: Cache, meta: dict[str, Any], build: Callable[[tarfile.TarFile], None],
                    signer: SecretKey) -> None:
    """Replace the entry's archive by a hand-made tar, with metadata that matches it, signed by `signer`
    (a compromised or buggy writer: the signature is good, the archive is not)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    data = zstandard.ZstdCompressor().compress(buffer.getvalue())
    digest = hashing.hash_bytes(data)
    assert cache.backend.create(archive_name(digest), data)
    meta["archive"] = {**meta["archive"], "hash": digest, "size": len(data)}
    _resign(meta, signer)
    _put_meta(cache, meta)


def _file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _traversal(tar: tarfile.TarFile) -> None:
    _file(tar, "disk.raw")
    _file(tar, "../escaped.txt", b"owned")


def _symlink_escape(tar: tarfile.TarFile) -> None:
    _file(tar, "disk.raw")
    link = tarfile.TarInfo("layout.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
    tar.addfile(link)


def _tamper_archive(cache: Cache, meta: dict[str, Any], _ci: SecretKey, _evil: SecretKey) -> None:
    name = archive_name(meta["archive"]["hash"])
    data = bytearray(cache.backend.read(name) or b"")
    data[len(data) // 2] ^= 0xFF
    _rewrite(cache, name, bytes(data))


def _truncate_archive(cache: Cache, meta: dict[str, Any], _ci: SecretKey, _evil: SecretKey) -> None:
    name = archive_name(meta["archive"]["hash"])
    _rewrite(cache, name, (cache.backend.read(name) or b"")[: meta["archive"]["size"] // 2])


def _tamper_meta(cache: Cache, meta: dict[str, Any], _ci: SecretKey, _evil: SecretKey) -> None:
    meta["output"]["hash"] = "0" * 64  # what a forger would change, keeping the old signature
    _put_meta(cache, meta)


def _untrusted(cache: Cache, meta: dict[str, Any], _ci: SecretKey, evil: SecretKey) -> None:
    _resign(meta, evil)
    _put_meta(cache, meta)


def _unsigned(cache: Cache, meta: dict[str, Any], _ci: SecretKey, _evil: SecretKey) -> None:
    _resign(meta, None)
    _put_meta(cache, meta)


POISONS: dict[str, tuple[Callable[[Cache, dict[str, Any], SecretKey, SecretKey], None], str]] = {
    "tampered archive": (_tamper_archive, "its archive hashes to"),
    "truncated archive": (_truncate_archive, "its archive is truncated"),
    "tampered metadata": (_tamper_meta, "the signature by trusted key ci-1 does not match"),
    "untrusted key": (_untrusted, "signed only by keys not trusted here (evil-1)"),
    "no signature": (_unsigned, "it is not signed"),
    "path traversal": (lambda c, m, ci, _e: _forged_archive(c, m, _traversal, ci),
                       "unsafe archive: member '../escaped.txt' has a '..' component"),
    "symlink escape": (lambda c, m, ci, _e: _forged_archive(c, m, _symlink_escape, ci),
                       "unsafe archive: symlink 'layout.txt' -> '../../../../etc/passwd' points outside the entry"),
}


def _pushed(make_runner: Any, url: str, graph: Graph, ci_key: SecretKey) -> Runner:
    a: Runner = make_runner("a", [url])
    a.realise([graph.image])
    a.push(graph.nodes, ci_key)
    a.ran()
    return a


def _assert_fell_back(b: Runner, node: Any, reason: str) -> None:
    refusals = [m for m in b.log if "not taken from" in m]
    assert refusals, b.log
    assert f"{node.key}-{node.store_name}" in refusals[0] and reason in refusals[0], refusals[0]
    assert "building it instead" in refusals[0]
    assert "raw" in b.ran()  # built on B
    assert "substituted_from" not in b.meta(node)
    assert b.leftovers() == [] and b.store.verify() == []


# The signature checks do not depend on the backend: their S3 runs are marked slow.
_BACKEND_NEUTRAL = ("no signature", "path traversal", "symlink escape", "untrusted key")
_CASES = [pytest.param(poison, backend, id=f"{backend}-{poison}",
                       marks=[pytest.mark.slow] if backend == "s3" and poison in _BACKEND_NEUTRAL else [])
          for poison in sorted(POISONS) for backend in ("dir", "s3")]


@pytest.mark.parametrize(("poison", "backend"), _CASES)
def test_poisoned_entry_is_refused_and_built(poison: str, backend: str, request: pytest.FixtureRequest,
                                             make_runner: Any, graph: Graph,
                                             upstream: Path, ci_key: SecretKey, evil_key: SecretKey,
                                             tmp_path: Path) -> None:
    cache_url = str(request.getfixturevalue("dir_url" if backend == "dir" else "s3_url"))
    a = _pushed(make_runner, cache_url, graph, ci_key)
    mutate, reason = POISONS[poison]
    mutate(a.caches[0], _meta(a.caches[0], graph.raw.key), ci_key, evil_key)

    b: Runner = make_runner("b", [cache_url])
    fresh = make_graph(upstream)
    results = b.realise([fresh.raw])
    _assert_fell_back(b, fresh.raw, reason)
    assert not results[fresh.raw.key].substituted and results[fresh.raw.key].built
    assert (b.store.path(fresh.raw) / "disk.raw").read_bytes() == (a.store.path(graph.raw) / "disk.raw").read_bytes()
    assert not list(tmp_path.rglob("escaped.txt"))  # nothing written outside the entry, anywhere


def test_unsigned_entries_are_taken_only_when_signatures_are_not_required(make_runner: Any, dir_url: str,
                                                                          graph: Graph, upstream: Path) -> None:
    a: Runner = make_runner("a", [dir_url], trusted=[])
    a.realise([graph.kmod])
    a.push([graph.kmod], None)
    strict: Runner = make_runner("strict", [dir_url], trusted=[])
    strict.realise([make_graph(upstream).kmod])
    assert strict.ran() == ["kmod"]
    assert "add the cache's public key" in " ".join(strict.log) or "not signed" in " ".join(strict.log)
    relaxed: Runner = make_runner("relaxed", [dir_url], trusted=[], require=False)
    results = relaxed.realise([make_graph(upstream).kmod])
    assert relaxed.ran() == [] and all(r.substituted for r in results.values())


def test_a_pin_mismatch_is_refused_even_when_signed(make_runner: Any, dir_url: str, graph: Graph, upstream: Path,
                                                    ci_key: SecretKey) -> None:
    """A fixed output's hash follows from its pins: a signed entry claiming other bytes is refused."""
    a = _pushed(make_runner, dir_url, graph, ci_key)
    cache = a.caches[0]
    meta = _meta(cache, graph.source.key)
    meta["output"]["hash"] = "f" * 64
    _resign(meta, ci_key)
    _put_meta(cache, meta)
    b: Runner = make_runner("b", [dir_url])
    b.realise([make_graph(upstream).source])
    assert any("not the one the pins give" in m for m in b.log), b.log
    assert b.leftovers() == []


# -- a download cut short on the wire -----------------------------------------------------------------


class _CuttingProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to moto; the body of every archive GET is cut in half, then the connection dropped."""

    upstream = ""

    def _forward(self) -> None:
        target = urllib.parse.urlsplit(self.upstream)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        connection.request(self.command, self.path, body=body or None, headers=headers)
        response = connection.getresponse()
        data = response.read()
        cut = self.command == "GET" and "/archives/" in self.path and response.status in (200, 206)
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if cut else data)
        if cut:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def cutting_proxy(moto: MotoServer) -> Iterator[str]:
    handler = type("Proxy", (_CuttingProxy,), {"upstream": moto.endpoint})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_download_cut_on_the_wire_is_refused(make_runner: Any, s3_url: str, cutting_proxy: str, graph: Graph,
                                               upstream: Path, ci_key: SecretKey, moto: MotoServer) -> None:
    _pushed(make_runner, s3_url, graph, ci_key)
    b: Runner = make_runner("b", [s3_url.replace(moto.endpoint, cutting_proxy)])
    fresh = make_graph(upstream)
    b.realise([fresh.raw])
    refusals = [m for m in b.log if "not taken from" in m]
    assert refusals and f"{fresh.raw.key}-raw-sample" in refusals[0], b.log
    assert any(word in refusals[0] for word in ("downloading", "truncated")), refusals[0]
    assert "raw" in b.ran() and "substituted_from" not in b.meta(fresh.raw)
    assert b.leftovers() == [] and b.store.verify() == []
