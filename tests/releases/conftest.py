"""A local mirror for the download tests: http.server on 127.0.0.1 in a thread, serving files from memory.

It honours `Range` (and `If-Range` against its ETag) like a real mirror, and can misbehave on purpose:
drop the connection part-way through a body (`flaky`), or serve other bytes of the same length
(`wrong`). Every request is recorded so tests can see what the client asked for.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `recipes` is imported from the repository, as the CLI does
    sys.path.insert(0, str(REPO))


def corrupt(data: bytes) -> bytes:
    """What the `wrong` mode serves: same length, every byte different."""
    return bytes(b ^ 0x5A for b in data)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int = 0
    body_bytes: int = 0


@dataclass
class MirrorServer:
    files: dict[str, bytes] = field(default_factory=dict)  # URL path ("/a/b.iso") -> content
    wrong: set[str] = field(default_factory=set)  # paths served corrupted
    drop_after: int = 0  # flaky: body bytes sent before the connection is dropped …
    drops_left: int = 0  # … for this many responses
    requests: list[Request] = field(default_factory=list)
    base_url: str = ""

    def add(self, path: str, data: bytes) -> str:
        """Serve `data` at `path`; returns its URL."""
        self.files["/" + path.lstrip("/")] = data
        return f"{self.base_url}/{path.lstrip('/')}"

    def gets(self, suffix: str = "") -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(suffix)]

    @staticmethod
    def etag(data: bytes) -> str:
        return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


def _handler(mirror: MirrorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            record = Request("GET", self.path, self.headers.get("Range"), self.headers.get("If-Range"))
            mirror.requests.append(record)
            data = mirror.files.get(self.path)
            if data is None:
                record.status = 404
                self.send_error(404)
                return
            etag = mirror.etag(data)
            if self.path in mirror.wrong:
                data = corrupt(data)
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", record.range or "")
            if match and (record.if_range is None or record.if_range == etag):
                start = int(match.group(1))
                if start >= len(data):
                    record.status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                record.status = 206
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                record.status = 200
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if mirror.drops_left > 0 and len(body) > mirror.drop_after:
                mirror.drops_left -= 1
                body = body[: mirror.drop_after]
                self.close_connection = True
            self.wfile.write(body)
            record.body_bytes = len(body)

    return Handler


@pytest.fixture
def mirror() -> Iterator[MirrorServer]:
    state = MirrorServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quick backoff, and no mirror or store settings leaking in from the caller's environment."""
    monkeypatch.setenv("EULERBAKE_FETCH_BACKOFF", "0.01")
    monkeypatch.setenv("EULERBAKE_FETCH_RETRIES", "4")
    monkeypatch.setenv("EULERBAKE_FETCH_TIMEOUT", "10")
    for name in ("EULERBAKE_MIRRORS", "EULERBAKE_STORE", "EULERBAKE_PROJECT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def small_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) qcow2 image made by qemu-img, with a little data written into it."""
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img is missing: apt-get install qemu-utils")
    work = tmp_path_factory.mktemp("qcow2")
    raw = work / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(8 * 1024 * 1024)
        f.seek(1024 * 1024)
        f.write(b"openEuler-shaped test disk\n" * 4096)
    image = work / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    return image
