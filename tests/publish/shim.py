"""An HTTP shim in front of moto's server: what moto leaves out, done here the way AWS does it.

moto 5.2 has S3, IAM, RegisterImage and the EBS direct calls, but no ImportSnapshot /
DescribeImportSnapshotTasks, validates no block checksum, reports an EBS direct snapshot `completed` to
DescribeSnapshots while it is still pending, and ignores RegisterImage's BootMode/ImdsSupport. Every
request boto3 makes goes through here; the shim

- implements ImportSnapshot, DescribeImportSnapshotTasks and CancelImportTask: the object is read from
  moto's S3, refused with AWS's "ClientError: No valid partitions" unless it starts with a valid MBR or
  GPT, and otherwise written into moto through its EBS direct calls; the task goes active → completed
  (or deleted, when refused or cancelled);
- checks each PutSnapshotBlock's base64 SHA256 and CompleteSnapshot's ChangedBlocksCount and LINEAR
  aggregate, refusing a wrong one as AWS does (400 ValidationException), and counts requests and bytes;
- keeps each EBS direct snapshot's real state and rewrites DescribeSnapshots to show it;
- records RegisterImage's parameters;
- injects errors (throttling, 5xx, a permanent AccessDenied) for N calls of an action, after M.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import secrets
import struct
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
BLOCK = 524288
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}
ZERO_BLOCK = bytes(BLOCK)


@dataclass
class Rule:
    """Answer `times` calls of `action` (None: all of them), after letting `after` through, with an error."""

    action: str
    times: int | None
    status: int
    code: str
    message: str
    after: int = 0
    seen: int = 0


@dataclass
class EbsSnapshot:
    """What the shim knows of one EBS direct snapshot (moto keeps the blocks)."""

    snapshot_id: str
    volume_size: int
    state: str = "pending"
    client_token: str = ""
    timeout: int | None = None
    encrypted: bool | None = None
    tags: list[dict[str, str]] = field(default_factory=list)
    digests: dict[int, bytes] = field(default_factory=dict)
    complete_checked: bool = False


@dataclass
class ImportTask:
    task_id: str
    bucket: str
    key: str
    description: str
    client_token: str
    tags: list[dict[str, str]]
    status: str = "active"
    status_message: str = "pending"
    progress: str = "0"
    snapshot_id: str = ""
    size: int = 0


class AwsShim:
    """The shim's state and server; `start()` serves on 127.0.0.1 in a thread."""

    def __init__(self, upstream: str) -> None:
        split = urlsplit(upstream)
        self.upstream_host = split.hostname or "127.0.0.1"
        self.upstream_port = split.port or 80
        self.upstream = upstream
        self._lock = threading.Lock()
        self.reset()
        self.server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread: threading.Thread | None = None
        self._direct: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> AwsShim:
        self._thread = threading.Thread(target=self.server.serve_forever, name="aws-shim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(timeout=5)
            self._thread = None

    def reset(self) -> None:
        with self._lock:
            self.counts: Counter[str] = Counter()
            self.bytes_in: Counter[str] = Counter()  # request body bytes by action
            self.rules: list[Rule] = []
            self.delays: dict[str, float] = {}
            self.injected: Counter[str] = Counter()
            self.checksum_errors: list[str] = []
            self.register_requests: list[dict[str, str]] = []
            self.start_requests: list[dict[str, Any]] = []
            self.snapshots: dict[str, EbsSnapshot] = {}
            self.tasks: dict[str, ImportTask] = {}
            self.import_seconds = 0.2  # how long a task stays active: long enough for a poll to see it

    def reset_counts(self) -> None:
        """Forget what was counted and recorded; the snapshots' and tasks' states stay."""
        with self._lock:
            for counter in (self.counts, self.bytes_in, self.injected):
                counter.clear()
            self.register_requests.clear()
            self.start_requests.clear()

    # -- what tests do -------------------------------------------------------------------------------
    def inject(self, action: str, times: int | None = 1, *, status: int = 400, code: str = "ThrottlingException",
               message: str = "Rate exceeded", after: int = 0) -> None:
        with self._lock:
            self.rules.append(Rule(action, times, status, code, message, after))

    def clear_rules(self) -> None:
        with self._lock:
            self.rules.clear()

    def delay(self, action: str, seconds: float) -> None:
        with self._lock:
            self.delays[action] = seconds

    def ok_count(self, action: str) -> int:
        """Calls of `action` that were passed on (not answered with an injected error)."""
        with self._lock:
            return self.counts[action] - self.injected[action]

    # -- the direct (unshimmed) clients the import emulation uses ------------------------------------------
    def direct(self, service: str) -> Any:
        import boto3

        with self._lock:
            if service not in self._direct:
                self._direct[service] = boto3.client(service, endpoint_url=self.upstream, region_name="us-east-1",
                                                     aws_access_key_id="shim", aws_secret_access_key="shim")
            return self._direct[service]

    # -- request handling ----------------------------------------------------------------------------------
    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = _read_body(request)
        service = _service(request.headers.get("Authorization", ""))
        split = urlsplit(request.path)
        query = {name: values[0] for name, values in parse_qs(split.query, keep_blank_values=True).items()}
        form: dict[str, str] = {}
        if service in ("ec2", "iam", "sts") and body:
            form = {name: values[0] for name, values in parse_qs(body.decode(), keep_blank_values=True).items()}
        action = _action(service, request.command, split.path, query, form)
        with self._lock:
            self.counts[action] += 1
            self.bytes_in[action] += len(body)
            rule = self._matching_rule(action)
            if rule is not None:
                self.injected[action] += 1
            pause = self.delays.get(action, 0.0)
        if rule is not None:
            return _send(request, *_error(service, rule.status, rule.code, rule.message))
        if pause:
            time.sleep(pause)
        local = self._local(service, action, request, split.path, form, body)
        if local is not None:
            return _send(request, *local)
        status, headers, answer = self._forward(request, body)
        answer = self._after(service, action, split.path, status, answer, body)
        _send(request, status, headers, answer, head=request.command == "HEAD")

    def _matching_rule(self, action: str) -> Rule | None:
        for rule in self.rules:
            if rule.action != action:
                continue
            rule.seen += 1
            if rule.seen <= rule.after:
                return None
            if rule.times is None or rule.seen - rule.after <= rule.times:
                return rule
        return None

    def _forward(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        try:
            connection.request(request.command, request.path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            kept = [(name, value) for name, value in response.getheaders() if name.lower() not in HOP_BY_HOP]
            return response.status, kept, answer
        finally:
            connection.close()

    # -- what moto lacks -----------------------------------------------------------------------------------
    def _local(self, service: str, action: str, request: BaseHTTPRequestHandler, path: str, form: dict[str, str],
               body: bytes) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """An answer made here (import calls, a refused checksum), or None to pass the request to moto."""
        if service == "ec2" and action == "ImportSnapshot":
            return self._import_snapshot(form)
        if service == "ec2" and action == "DescribeImportSnapshotTasks":
            return self._describe_import_tasks(form)
        if service == "ec2" and action == "CancelImportTask":
            return self._cancel_import(form)
        if service == "ec2" and action == "RegisterImage":
            with self._lock:
                self.register_requests.append(dict(form))
        if service == "ebs" and action == "PutSnapshotBlock":
            return self._check_block(request, path, body)
        if service == "ebs" and action == "CompleteSnapshot":
            return self._check_complete(request, path)
        return None

    def _check_block(self, request: BaseHTTPRequestHandler, path: str, body: bytes
                     ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        parts = path.strip("/").split("/")  # snapshots/<id>/blocks/<index>
        snapshot_id, index = parts[1], int(parts[3])
        headers = request.headers
        problems = []
        digest = hashlib.sha256(body).digest()
        if headers.get("x-amz-Checksum-Algorithm") != "SHA256":
            problems.append(f"block {index}: checksum algorithm {headers.get('x-amz-Checksum-Algorithm')!r}")
        if headers.get("x-amz-Checksum") != base64.b64encode(digest).decode():
            problems.append(f"block {index}: checksum does not match the data")
        if headers.get("x-amz-Data-Length") != str(BLOCK) or len(body) != BLOCK:
            problems.append(f"block {index}: {len(body)} bytes, Data-Length {headers.get('x-amz-Data-Length')}")
        with self._lock:
            snapshot = self.snapshots.get(snapshot_id)
            if snapshot is None or snapshot.state != "pending":
                problems.append(f"block {index}: snapshot {snapshot_id} is not pending")
            elif index >= snapshot.volume_size * 2048:
                problems.append(f"block {index}: beyond the {snapshot.volume_size} GiB volume")
            if problems:
                self.checksum_errors.extend(problems)
            else:
                assert snapshot is not None
                snapshot.digests[index] = digest
        if problems:
            return _error("ebs", 400, "ValidationException", "; ".join(problems))
        return None

    def _check_complete(self, request: BaseHTTPRequestHandler, path: str
                        ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        snapshot_id = path.strip("/").split("/")[-1]
        headers = request.headers
        with self._lock:
            snapshot = self.snapshots.get(snapshot_id)
            problems = []
            if snapshot is None:
                problems.append(f"unknown snapshot {snapshot_id}")
            else:
                digests = snapshot.digests
                if headers.get("x-amz-ChangedBlocksCount") != str(len(digests)):
                    problems.append(f"ChangedBlocksCount {headers.get('x-amz-ChangedBlocksCount')} but "
                                    f"{len(digests)} blocks were put")
                if digests:
                    aggregate = base64.b64encode(hashlib.sha256(
                        b"".join(digests[i] for i in sorted(digests))).digest()).decode()
                    if headers.get("x-amz-Checksum") != aggregate:
                        problems.append("the LINEAR aggregate checksum does not match the blocks")
                    if headers.get("x-amz-Checksum-Aggregation-Method") != "LINEAR":
                        problems.append(f"aggregation {headers.get('x-amz-Checksum-Aggregation-Method')!r}")
                    if headers.get("x-amz-Checksum-Algorithm") != "SHA256":
                        problems.append(f"aggregate algorithm {headers.get('x-amz-Checksum-Algorithm')!r}")
                snapshot.complete_checked = not problems
            self.checksum_errors.extend(problems)
        if problems:
            return _error("ebs", 400, "ValidationException", "; ".join(problems))
        return None

    def _after(self, service: str, action: str, path: str, status: int, answer: bytes, body: bytes) -> bytes:
        """Learn from moto's answer (a snapshot started, completed, deleted) and correct what it reports."""
        if status >= 300:
            return answer
        if service == "ebs" and action == "StartSnapshot":
            started = json.loads(answer)
            sent = json.loads(body or b"{}")
            with self._lock:
                self.start_requests.append(sent)
                self.snapshots[started["SnapshotId"]] = EbsSnapshot(
                    started["SnapshotId"], int(started["VolumeSize"]), client_token=sent.get("ClientToken", ""),
                    timeout=sent.get("Timeout"), encrypted=sent.get("Encrypted"), tags=sent.get("Tags", []))
        elif service == "ebs" and action == "CompleteSnapshot":
            with self._lock:
                self.snapshots[path.strip("/").split("/")[-1]].state = "completed"
        elif service == "ec2" and action == "DescribeSnapshots":
            return self._true_snapshot_states(answer)
        return answer

    def _true_snapshot_states(self, answer: bytes) -> bytes:
        root = ET.fromstring(answer)
        ET.register_namespace("", root.tag[1:].split("}")[0] if root.tag.startswith("{") else "")
        changed = False
        with self._lock:
            for item in root.iter():
                if not item.tag.endswith("item"):
                    continue
                snapshot_id = next((child.text for child in item if child.tag.endswith("snapshotId")), None)
                known = self.snapshots.get(snapshot_id or "")
                if known is None or known.state == "completed":
                    continue
                for child in item:
                    if child.tag.endswith("}status"):
                        child.text = known.state
                        changed = True
                    elif child.tag.endswith("}progress"):
                        child.text = "0%"
        return ET.tostring(root, encoding="utf-8", xml_declaration=True) if changed else answer

    # -- the import calls ------------------------------------------------------------------------------------
    def _import_snapshot(self, form: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        bucket = form.get("DiskContainer.UserBucket.S3Bucket", "")
        key = form.get("DiskContainer.UserBucket.S3Key", "")
        if form.get("DiskContainer.Format", "").upper() != "RAW":
            return _error("ec2", 400, "InvalidParameter", "this shim imports RAW disks only")
        role = form.get("RoleName") or "vmimport"
        try:
            self.direct("iam").get_role(RoleName=role)
        except Exception:
            return _error("ec2", 400, "InvalidParameter",
                          f"The service role {role} provided does not exist or does not have sufficient permissions")
        try:
            size = int(self.direct("s3").head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception:
            return _error("ec2", 400, "InvalidParameter",
                          f"The given S3 object s3://{bucket}/{key} does not exist or cannot be read")
        tags = []
        for index in range(1, 50):
            name = form.get(f"TagSpecification.1.Tag.{index}.Key")
            if name is None:
                break
            tags.append({"Key": name, "Value": form.get(f"TagSpecification.1.Tag.{index}.Value", "")})
        token = form.get("ClientToken", "")
        with self._lock:
            same = next((task for task in self.tasks.values() if token and task.client_token == token), None)
            if same is None:
                same = ImportTask(f"import-snap-{secrets.token_hex(8)}", bucket, key, form.get("Description", ""),
                                  token, tags, size=size)
                self.tasks[same.task_id] = same
                threading.Thread(target=self._run_import, args=(same,), daemon=True).start()
            task = same
        return 200, [("Content-Type", "text/xml")], _xml(
            "ImportSnapshotResponse", f"<requestId>{secrets.token_hex(8)}</requestId>"
            f"<description>{escape(task.description)}</description><importTaskId>{task.task_id}</importTaskId>"
            f"{_task_detail(task)}{_tag_set(task.tags)}")

    def _run_import(self, task: ImportTask) -> None:
        """What VM Import does: read the object, refuse a non-disk, write the snapshot (here: into moto)."""
        time.sleep(self.import_seconds)
        try:
            data = self.direct("s3").get_object(Bucket=task.bucket, Key=task.key)["Body"].read()
            if not has_valid_partitions(data):
                return self._end(task, "deleted", "ClientError: No valid partitions")
            ebs = self.direct("ebs")
            volume = max(1, -(-len(data) // (1 << 30)))
            snapshot_id = ebs.start_snapshot(VolumeSize=volume, Description=f"Created by AWS-VMIE for {task.task_id}",
                                             )["SnapshotId"]
            with self._lock:
                self.snapshots[snapshot_id] = EbsSnapshot(snapshot_id, volume)
            count = 0
            for offset in range(0, len(data), BLOCK):
                block = data[offset:offset + BLOCK].ljust(BLOCK, b"\0")
                if block != ZERO_BLOCK:
                    ebs.put_snapshot_block(SnapshotId=snapshot_id, BlockIndex=offset // BLOCK, BlockData=block,
                                           DataLength=BLOCK, Checksum=base64.b64encode(
                                               hashlib.sha256(block).digest()).decode(), ChecksumAlgorithm="SHA256")
                    count += 1
            ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=count)
            with self._lock:
                self.snapshots[snapshot_id].state = "completed"
                if task.status != "active":  # cancelled meanwhile
                    return
                task.snapshot_id = snapshot_id
            self._end(task, "completed", "")
        except Exception as exc:  # what AWS reports for an import that broke on its side
            self._end(task, "deleted", f"ServerError: {type(exc).__name__}: {exc}")

    def _end(self, task: ImportTask, status: str, message: str) -> None:
        with self._lock:
            if task.status == "active":
                task.status, task.status_message = status, message
                task.progress = "100" if status == "completed" else ""

    def _describe_import_tasks(self, form: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        wanted = [value for name, value in form.items() if name.startswith("ImportTaskId.")]
        with self._lock:
            unknown = [task_id for task_id in wanted if task_id not in self.tasks]
            if unknown:
                return _error("ec2", 400, "InvalidConversionTaskId.Malformed",
                              f"The import task id '{unknown[0]}' does not exist")
            tasks = [self.tasks[task_id] for task_id in wanted] if wanted else list(self.tasks.values())
            items = "".join(f"<item><description>{escape(task.description)}</description>"
                            f"<importTaskId>{task.task_id}</importTaskId>{_task_detail(task)}{_tag_set(task.tags)}"
                            "</item>" for task in tasks)
        return 200, [("Content-Type", "text/xml")], _xml(
            "DescribeImportSnapshotTasksResponse",
            f"<requestId>{secrets.token_hex(8)}</requestId><importSnapshotTaskSet>{items}</importSnapshotTaskSet>")

    def _cancel_import(self, form: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        task_id = form.get("ImportTaskId", "")
        with self._lock:
            task = self.tasks.get(task_id)
            if task is None:
                return _error("ec2", 400, "InvalidConversionTaskId", f"The import task '{task_id}' does not exist")
            previous = task.status
            if task.status == "active":
                task.status, task.status_message = "deleted", "ClientError: the import task was cancelled"
        return 200, [("Content-Type", "text/xml")], _xml(
            "CancelImportTaskResponse", f"<requestId>{secrets.token_hex(8)}</requestId><importTaskId>{task_id}"
            f"</importTaskId><previousState>{previous}</previousState><state>deleting</state>")


def has_valid_partitions(data: bytes) -> bool:
    """What VM Import wants before it makes a snapshot: an MBR (or a protective MBR + GPT) naming a partition."""
    if len(data) < 1024 or data[510:512] != b"\x55\xaa":
        return False
    sectors = len(data) // 512
    entries = [struct.unpack_from("<4xB3xII", data, 446 + 16 * i) for i in range(4)]
    if any(kind == 0xEE for kind, _, _ in entries):
        header = data[512:1024]
        if header[:8] != b"EFI PART":
            return False
        first_entry, count, size = struct.unpack_from("<QII", header, 72)
        table = data[first_entry * 512:first_entry * 512 + count * size]
        for offset in range(0, len(table), size):
            type_guid = table[offset:offset + 16]
            first, last = struct.unpack_from("<QQ", table, offset + 32)
            if type_guid.strip(b"\0") and 0 < first <= last < sectors:
                return True
        return False
    return any(kind != 0 and start > 0 and length > 0 and start + length <= sectors for kind, start, length in entries)


def _read_body(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            line = request.rfile.readline().strip()
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while request.rfile.readline().strip():  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
    length = int(request.headers.get("Content-Length") or 0)
    return request.rfile.read(length) if length else b""


def _service(authorization: str) -> str:
    """The service a SigV4 request is signed for: Credential=AKID/date/region/<service>/aws4_request."""
    marker = "Credential="
    if marker not in authorization:
        return ""
    scope = authorization.split(marker, 1)[1].split(",", 1)[0].split("/")
    return scope[3] if len(scope) > 3 else ""


def _action(service: str, method: str, path: str, query: dict[str, str], form: dict[str, str]) -> str:
    if service in ("ec2", "iam", "sts"):
        return form.get("Action") or query.get("Action", "?")
    if service == "ebs":
        parts = path.strip("/").split("/")
        if method == "POST" and parts == ["snapshots"]:
            return "StartSnapshot"
        if method == "POST" and parts[:2] == ["snapshots", "completion"]:
            return "CompleteSnapshot"
        if len(parts) == 4 and parts[2] == "blocks":
            return "PutSnapshotBlock" if method == "PUT" else "GetSnapshotBlock"
        if len(parts) == 3 and parts[2] == "blocks":
            return "ListSnapshotBlocks"
        return "ebs?"
    if service == "s3":
        has_key = len(path.strip("/").split("/")) > 1
        if method == "PUT":
            return "UploadPart" if "uploadId" in query else ("PutObject" if has_key else "CreateBucket")
        if method == "POST":
            return "CreateMultipartUpload" if "uploads" in query else "CompleteMultipartUpload"
        if method == "DELETE":
            return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
        if method == "HEAD":
            return "HeadObject" if has_key else "HeadBucket"
        return "GetObject" if has_key else "ListObjects"
    return f"{service or 'unsigned'}:{method}"


def _error(service: str, status: int, code: str, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """An error in the protocol of `service`, as AWS words it (botocore reads the code from here)."""
    request_id = secrets.token_hex(8)
    if service == "ebs":
        body = json.dumps({"message": message}).encode()
        return status, [("Content-Type", "application/json"), ("x-amzn-ErrorType", code),
                        ("x-amzn-RequestId", request_id)], body
    if service == "s3":
        return status, [("Content-Type", "application/xml")], (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{escape(message)}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>").encode()
    if service in ("iam", "sts"):
        return status, [("Content-Type", "text/xml")], (
            f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{escape(message)}</Message>"
            f"</Error><RequestId>{request_id}</RequestId></ErrorResponse>").encode()
    return status, [("Content-Type", "text/xml")], (
        f"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>{code}</Code><Message>"
        f"{escape(message)}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>").encode()


def _xml(root: str, inner: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?><{root} xmlns="{EC2_NS}">{inner}</{root}>'.encode()


def _task_detail(task: ImportTask) -> str:
    snapshot = f"<snapshotId>{task.snapshot_id}</snapshotId>" if task.snapshot_id else ""
    return (f"<snapshotTaskDetail><description>{escape(task.description)}</description>"
            f"<diskImageSize>{task.size}.0</diskImageSize><format>RAW</format><progress>{task.progress}</progress>"
            f"{snapshot}<status>{task.status}</status><statusMessage>{escape(task.status_message)}</statusMessage>"
            f"<userBucket><s3Bucket>{escape(task.bucket)}</s3Bucket><s3Key>{escape(task.key)}</s3Key></userBucket>"
            "</snapshotTaskDetail>")


def _tag_set(tags: list[dict[str, str]]) -> str:
    items = "".join(f"<item><key>{escape(tag['Key'])}</key><value>{escape(tag['Value'])}</value></item>"
                    for tag in tags)
    return f"<tagSet>{items}</tagSet>"


def _send(request: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], body: bytes,
          head: bool = False) -> None:
    request.send_response(status)
    for name, value in headers:
        if name.lower() == "content-length" and not head:
            continue
        request.send_header(name, value)
    if not head:
        request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    if not head and body:
        request.wfile.write(body)


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # 64 workers connect at once; the default backlog of 5 would refuse some
    daemon_threads = True


def _handler_for(shim: AwsShim) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            try:
                shim.handle(self)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
