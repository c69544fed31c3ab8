"""A MAAS stand-in: the boot-resource part of the MAAS 2.0 API, in memory, for the upload tests.

No MAAS can run here (it needs PostgreSQL, a region and a rack controller, and snap or an Ubuntu host),
so this small HTTP server (127.0.0.1, any free port) stands in for one. It implements what eulerbake's
publisher talks to, as maascli / python-libmaas see MAAS do it (maasserver/api/boot_resources.py):

    GET    /MAAS/api/2.0/boot-resources/[?type=uploaded]     the resources (id, type, name, architecture, …)
    POST   /MAAS/api/2.0/boot-resources/                     multipart: name, title, architecture, filetype,
                                                             and sha256 + size (create, upload later) or content
    GET    /MAAS/api/2.0/boot-resources/{id}/                one resource with its sets and files
    DELETE /MAAS/api/2.0/boot-resources/{id}/                204
    PUT    /MAAS/api/2.0/boot-resources/{id}/upload/{file}/  one chunk, application/octet-stream

and enforces its rules: every request OAuth 1.0a PLAINTEXT-signed with `consumer:token:secret` (empty
consumer secret; anything else → 401), the create form's fields (400 with MAAS's per-field messages),
"Missing data.", "Content-Length doesn't equal size of recieved data." (sic), "Cannot upload to a complete
file.", "Too much data received.", and the sha256 check when the last byte arrives ("Saved content does not
match given SHA256 value."; the stand-in then drops what it holds, so a client must start the file over).
A second create with the same name and architecture adds a set to the resource, as MAAS does; incomplete
files report `progress` (percent) and their `upload_uri`.

Faults for the tests (`inject`): "drop-mid-body" (read half a chunk, then cut the connection),
"drop-after-store" (store the chunk, then cut the connection before answering: the ambiguous case),
"error-503" (answer 503 without storing), "pass" (nothing); each applies to the next PUT.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import hashlib
import json
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API = "/MAAS/api/2.0/"
FILETYPES = {"tgz": "root-tgz", "tbz": "root-tbz", "txz": "root-txz", "ddtgz": "root-dd", "ddraw": "root-dd.raw",
             "ddxz": "root-dd.xz"}
ARCH_RE = re.compile(r"^[a-z0-9]+/[a-z0-9.-]+$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*/[a-z0-9][a-z0-9._-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class StoredFile:
    id: int
    filetype: str
    sha256: str
    size: int
    content: bytearray = field(default_factory=bytearray)
    complete: bool = False


@dataclass
class Resource:
    id: int
    name: str
    architecture: str
    title: str
    base_image: str
    sets: dict[str, dict[int, StoredFile]] = field(default_factory=dict)


class MaasStandin:
    """The stand-in's state and server; `start()` serves it in a thread, `url` is its MAAS root."""

    def __init__(self, api_key: str) -> None:
        self.consumer_key, self.token_key, self.token_secret = api_key.split(":")
        self.resources: dict[int, Resource] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.faults: list[str] = []
        self.put_bodies: list[int] = []  # sizes of the chunks received whole
        self._next = 1
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/MAAS"

    def start(self) -> MaasStandin:
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="maas-standin",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(timeout=5)
            self._thread = None

    def inject(self, *faults: str) -> None:
        with self._lock:
            self.faults.extend(faults)

    def count(self, method: str, fragment: str = "") -> int:
        with self._lock:
            return sum(1 for m, p, _ in self.requests if m == method and fragment in p)

    def _id(self) -> int:
        value, self._next = self._next, self._next + 1
        return value

    # -- OAuth -------------------------------------------------------------------------------------------
    def authorised(self, header: str | None) -> str | None:
        """None when the header is a valid PLAINTEXT signature of the key, else why not."""
        if not header or not header.startswith("OAuth "):
            return "Missing OAuth authorization header"
        params = {}
        for item in re.findall(r'(\w+)="([^"]*)"', header):
            params[item[0]] = urllib.parse.unquote(item[1])
        if params.get("oauth_signature_method") != "PLAINTEXT":
            return f"unsupported signature method {params.get('oauth_signature_method')!r}"
        if params.get("oauth_version", "1.0") != "1.0" or not params.get("oauth_nonce") \
                or not params.get("oauth_timestamp", "").isdigit():
            return "malformed OAuth parameters"
        if params.get("oauth_consumer_key") != self.consumer_key or params.get("oauth_token") != self.token_key:
            return f"Invalid access token: {params.get('oauth_token')}"
        if params.get("oauth_signature") != "&" + self.token_secret:
            return "Invalid signature"
        return None

    # -- views -------------------------------------------------------------------------------------------
    def summary(self, resource: Resource) -> dict[str, Any]:
        return {"id": resource.id, "type": "Uploaded", "name": resource.name, "architecture": resource.architecture,
                "resource_uri": f"{API}boot-resources/{resource.id}/", "title": resource.title,
                "subarches": resource.architecture.split("/")[1]}

    def detail(self, resource: Resource) -> dict[str, Any]:
        sets = {}
        for version, files in resource.sets.items():
            entries = {}
            for stored in files.values():
                entry: dict[str, Any] = {"filename": stored.filetype, "filetype": stored.filetype,
                                         "sha256": stored.sha256, "size": stored.size, "complete": stored.complete}
                if not stored.complete:
                    entry["progress"] = 100.0 * len(stored.content) / stored.size if stored.size else 0.0
                    entry["upload_uri"] = f"{API}boot-resources/{resource.id}/upload/{stored.id}/"
                entries[stored.filetype] = entry
            complete = all(f.complete for f in files.values())
            size = sum(f.size for f in files.values())
            sets[version] = {"version": version, "label": "uploaded", "size": size, "complete": complete,
                             "files": entries}
        return {**self.summary(resource), "sets": sets}

    def create(self, fields: dict[str, bytes]) -> tuple[int, Any]:
        errors: dict[str, list[str]] = {}
        text = {k: v.decode(errors="replace") for k, v in fields.items() if k != "content"}
        for required in ("name", "architecture"):
            if not text.get(required):
                errors[required] = ["This field is required."]
        name, arch = text.get("name", ""), text.get("architecture", "")
        if name and not NAME_RE.match(name):
            errors["name"] = [f"Invalid name: {name!r} (expected os/series)"]
        if arch and not ARCH_RE.match(arch):
            errors["architecture"] = [f"Select a valid choice. {arch} is not one of the available choices."]
        filetype = text.get("filetype", "tgz")
        if filetype not in FILETYPES:
            errors["filetype"] = [f"Select a valid choice. {filetype} is not one of the available choices."]
        if name.startswith("custom/") and not text.get("base_image"):
            errors["base_image"] = ["A base image is required for custom images."]
        content = fields.get("content")
        if content is None:
            if not SHA256_RE.match(text.get("sha256", "")):
                errors["sha256"] = ["This field is required."]
            if not text.get("size", "").isdigit() or int(text.get("size", "0")) <= 0:
                errors["size"] = ["This field is required."]
        unknown = set(text) - {"name", "title", "architecture", "filetype", "sha256", "size", "base_image"}
        if unknown:
            errors["__all__"] = [f"Unexpected fields: {', '.join(sorted(unknown))}"]
        if errors:
            return 400, errors
        resource = next((r for r in self.resources.values() if r.name == name and r.architecture == arch), None)
        if resource is None:
            resource = Resource(self._id(), name, arch, text.get("title", ""), text.get("base_image", ""))
            self.resources[resource.id] = resource
        elif text.get("title"):
            resource.title = text["title"]
        day = datetime.now(UTC).strftime("%Y%m%d")
        version = day if day not in resource.sets else f"{day}.{len(resource.sets)}"
        if content is not None:
            stored = StoredFile(self._id(), FILETYPES[filetype], hashlib.sha256(content).hexdigest(), len(content),
                                bytearray(content), True)
        else:
            stored = StoredFile(self._id(), FILETYPES[filetype], text["sha256"], int(text["size"]))
        resource.sets[version] = {stored.id: stored}
        return 201, self.detail(resource)

    def upload(self, resource_id: int, file_id: int, length: int | None, body: bytes) -> tuple[int, Any]:
        resource = self.resources.get(resource_id)
        stored = next((f for files in (resource.sets.values() if resource else []) for f in files.values()
                       if f.id == file_id), None)
        if resource is None or stored is None:
            return 404, "Not Found"
        if not length:
            return 400, "Missing data."
        if length != len(body):
            return 400, "Content-Length doesn't equal size of recieved data."
        if stored.complete:
            return 400, "Cannot upload to a complete file."
        if len(stored.content) + len(body) > stored.size:
            return 400, "Too much data received."
        stored.content += body
        self.put_bodies.append(len(body))
        if len(stored.content) == stored.size:
            if hashlib.sha256(stored.content).hexdigest() != stored.sha256:
                stored.content = bytearray()
                return 400, "Saved content does not match given SHA256 value."
            stored.complete = True
        return 200, "OK"


def _handler_for(standin: MaasStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, document: Any) -> None:
            if isinstance(document, str):
                payload, kind = document.encode(), "text/plain; charset=utf-8"
            else:
                payload, kind = (b"" if document is None else json.dumps(document).encode()), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _cut(self) -> None:
            """Drop the connection without an answer (what a client sees when a proxy or the network fails)."""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def _serve(self) -> None:
            split = urllib.parse.urlsplit(self.path)
            path = split.path
            length_header = self.headers.get("Content-Length")
            length = int(length_header) if length_header and length_header.isdigit() else None
            fault = None
            if self.command == "PUT":
                with standin._lock:
                    fault = standin.faults.pop(0) if standin.faults else None
            if fault == "drop-mid-body":
                self.rfile.read(max(1, (length or 2) // 2))
                with standin._lock:
                    standin.requests.append((self.command, path, 0))
                self._cut()
                return
            body = self.rfile.read(length) if length else b""
            with standin._lock:
                status, document = self._route(split, path, length, body, fault)
                standin.requests.append((self.command, path, status))
            if fault == "drop-after-store" and status == 200:
                self._cut()
                return
            self._answer(status, document)

        def _route(self, split: urllib.parse.SplitResult, path: str, length: int | None, body: bytes,
                   fault: str | None) -> tuple[int, Any]:
            why = standin.authorised(self.headers.get("Authorization"))
            if why is not None:
                return 401, f"Authorization Error: {why}"
            if not path.startswith(API + "boot-resources/"):
                return 404, "Not Found"
            parts = path[len(API + "boot-resources/"):].strip("/").split("/")
            if parts == [""]:
                if self.command == "GET":
                    kind = urllib.parse.parse_qs(split.query).get("type", ["all"])[0]
                    if kind not in ("all", "uploaded"):
                        return 200, []
                    return 200, [standin.summary(r) for r in sorted(standin.resources.values(), key=lambda r: r.id)]
                if self.command == "POST":
                    return standin.create(_form_fields(self.headers.get("Content-Type", ""), body))
                return 405, "Method Not Allowed"
            if not parts[0].isdigit():
                return 404, "Not Found"
            resource = standin.resources.get(int(parts[0]))
            if len(parts) == 1:
                if resource is None:
                    return 404, "No BootResource matches the given query."
                if self.command == "GET":
                    return 200, standin.detail(resource)
                if self.command == "DELETE":
                    del standin.resources[resource.id]
                    return 204, None
                return 405, "Method Not Allowed"
            if len(parts) == 3 and parts[1] == "upload" and parts[2].isdigit() and self.command == "PUT":
                if fault == "error-503":
                    return 503, "Service Unavailable"
                if self.headers.get("Content-Type") != "application/octet-stream":
                    return 400, "Content-Type must be application/octet-stream"
                return standin.upload(int(parts[0]), int(parts[2]), length, body)
            return 404, "Not Found"

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _form_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body (MAAS's API takes its create form that way)."""
    if not content_type.startswith("multipart/form-data"):
        return {}
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            fields[name] = part.get_payload(decode=True) or b""
    return fields
