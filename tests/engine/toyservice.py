"""A tiny in-memory HTTP service for the publication tests: the remote side a toy publisher talks to.

    POST   /resources          JSON {name, tag, digest} -> 201 {"id": ...}
    GET    /resources?tag=KEY  -> 200 [resource, ...]
    GET    /resources/<id>     -> 200 resource | 404
    DELETE /resources/<id>     -> 204 | 404
    GET    /_stats             -> 200 {"requests": [[method, path], ...], "resources": {...}}  (not counted)

Every request but `/_stats` needs `Authorization: Bearer <token>` (401 otherwise) and is recorded, so a
test can assert exactly which calls a doit run made. Tests start it in a thread (`ToyService`); it also
runs as a process: `python -m tests.engine.toyservice --port-file F --token T`.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


class ToyService:
    """The service's state (resources, request log) and its server; `start()` serves in a thread."""

    def __init__(self, token: str, port: int = 0) -> None:
        self.tokens = {token}  # a test may add one (a rotated credential) while the service runs
        self.resources: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path without the query), authorised or not
        self.rejected = 0  # requests refused with 401
        self._next_id = 1
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> ToyService:
        self._thread = threading.Thread(target=self.server.serve_forever, name="toyservice", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (the port then refuses connections); stopping twice is fine."""
        if self._thread is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
        self._thread = None

    # -- what tests look at ------------------------------------------------------------------------
    def count(self, method: str, path_prefix: str = "") -> int:
        """Requests made with `method` (and a path starting with `path_prefix`), since the last reset."""
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(path_prefix))

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(method for method, _ in self.requests)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.rejected = 0

    def tagged(self, tag: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.resources.values() if r["tag"] == tag]

    def forget(self, resource_id: str) -> None:
        """Delete a resource behind the publisher's back (not a request: not counted)."""
        with self._lock:
            del self.resources[resource_id]

    # -- the service ---------------------------------------------------------------------------------
    def handle(self, method: str, target: str, authorization: str | None, body: bytes) -> tuple[int, Any]:
        split = urlsplit(target)
        path = split.path.rstrip("/") or "/"
        if method == "GET" and path == "/_stats":
            with self._lock:
                return 200, {"requests": [list(r) for r in self.requests], "resources": dict(self.resources)}
        with self._lock:
            self.requests.append((method, path))
            if authorization not in {f"Bearer {token}" for token in self.tokens}:
                self.rejected += 1
                return 401, {"error": "missing or wrong bearer token"}
            parts = path.strip("/").split("/")
            if parts[0] != "resources" or len(parts) > 2:
                return 404, {"error": f"no route {path}"}
            if len(parts) == 1:
                if method == "GET":
                    tags = parse_qs(split.query).get("tag", [])
                    found = [r for r in self.resources.values() if not tags or r["tag"] in tags]
                    return 200, sorted(found, key=lambda r: str(r["id"]))
                if method == "POST":
                    try:
                        document = json.loads(body)
                        fields = {name: str(document[name]) for name in ("name", "tag", "digest")}
                    except (ValueError, KeyError, TypeError):
                        return 400, {"error": "the body must be JSON with name, tag and digest"}
                    resource_id = f"res-{self._next_id}"
                    self._next_id += 1
                    self.resources[resource_id] = {"id": resource_id, **fields}
                    return 201, {"id": resource_id}
                return 405, {"error": f"{method} not allowed on /resources"}
            resource_id = parts[1]
            if resource_id not in self.resources:
                return 404, {"error": f"no resource {resource_id}"}
            if method == "GET":
                return 200, dict(self.resources[resource_id])
            if method == "DELETE":
                del self.resources[resource_id]
                return 204, None
            return 405, {"error": f"{method} not allowed on a resource"}


def _handler_for(service: ToyService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, document = service.handle(self.command, self.path, self.headers.get("Authorization"), body)
            payload = b"" if document is None else json.dumps(document).encode()
            self.send_response(status)
            if payload:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests read `service.requests` instead

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.engine.toyservice", description=__doc__.split("\n")[0])
    parser.add_argument("--token", required=True, help="the bearer token every request must carry")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    parser.add_argument("--port-file", type=Path, help="write the chosen port here once listening")
    args = parser.parse_args(argv)
    service = ToyService(args.token, port=args.port)
    if args.port_file is not None:
        temporary = args.port_file.with_name(args.port_file.name + ".tmp")
        temporary.write_text(f"{service.server.server_address[1]}\n")
        temporary.replace(args.port_file)  # appears complete: a waiting test never reads half a number
    print(f"toy service on {service.url}", flush=True)
    try:
        service.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        service.server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
