"""Publications: store outputs turned into resources on remote services, plus what their uploaders share.

    aws        ami(): the raw disk → a registered AMI, found again by its key tag (the Publisher)
    ebs        the EBS direct block uploader (sparse-aware, parallel, checksummed) — the default path
    s3import   the seed's path: S3 multipart upload, the vmimport role, ImportSnapshot

Every AWS failure reaches the user as one EulerbakeError naming the call, AWS's error code and message
(`aws_error`), never a botocore traceback; long transfers report through `Progress` (a line every few
seconds, not a line per block: an 8 GiB disk is 16384 blocks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from eulerbake.core.errors import EulerbakeError

PROGRESS_SECONDS = 5.0
MIB = 1 << 20


def aws_error(exc: BaseException, doing: str, hint: str | None = None) -> EulerbakeError:
    """One message for a failed AWS call: what we were doing, the AWS error code and AWS's own message."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response.get("Error") or {}
        code = error.get("Code") or "Unknown"
        message = error.get("Message") or error.get("message") or ""
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        operation = getattr(exc, "operation_name", "") or "an AWS call"
        detail = f"{operation} failed with {code}: {message}" + (f" (HTTP {status})" if status else "")
        fix = hint or _hint_for(code)
    else:  # botocore's own errors: an unreachable endpoint, a read timeout, a refused connection
        detail = f"{type(exc).__name__}: {exc}"
        fix = hint or "check the endpoint/region and the network; the next run adopts or cleans what this one made"
    return EulerbakeError(f"{doing}: {detail}", hint=fix)


def _hint_for(code: str) -> str:
    if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnrecognizedClientException",
                "AuthFailure", "InvalidClientTokenId", "ExpiredToken", "ExpiredTokenException"):
        return ("the credentials lack a permission or have expired: refresh them (aws sso login) or grant the "
                "ec2:*Snapshot*/RegisterImage/CreateTags and ebs:StartSnapshot/PutSnapshotBlock/CompleteSnapshot "
                "permissions")
    if "Throttl" in code or code in ("RequestLimitExceeded", "SlowDown", "TooManyRequestsException"):
        return "AWS kept throttling after every retry: lower workers= or run again later"
    return "fix the cause AWS names above and run again; nothing half-made was left behind"


def backoff(first: float, longest: float = 30.0, factor: float = 1.5) -> Iterator[float]:
    """Waits between status polls: quick at first (small images finish fast), then every `longest` seconds."""
    wait = first
    while True:
        yield wait
        wait = min(longest, wait * factor)


def wait_until(check: Callable[[], Any], *, timeout: float, first: float, what: str, hint: str) -> Any:
    """Call `check` with backoff until it returns something other than None; bounded by `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for pause in backoff(first):
        result = check()
        if result is not None:
            return result
        if time.monotonic() + pause > deadline:
            raise EulerbakeError(f"gave up waiting for {what} after {timeout:.0f} s", hint=hint)
        time.sleep(pause)
    raise AssertionError("unreachable")  # backoff() never ends


class Progress:
    """Counts work done by many threads; `report()` logs blocks/bytes, MB/s and the ETA at most every few seconds."""

    def __init__(self, log: Callable[[str], None], what: str, total_bytes: int, *, unit: str = "",
                 total_units: int = 0, interval: float = PROGRESS_SECONDS) -> None:
        self.log = log
        self.what = what
        self.total_bytes = total_bytes
        self.unit = unit
        self.total_units = total_units
        self.interval = interval
        self.units = 0
        self.done_bytes = 0  # bytes whose work is over (sent or found not worth sending)
        self.sent_bytes = 0
        self.started = time.monotonic()
        self._last = self.started
        self._lock = threading.Lock()

    def add(self, done: int, sent: int = 0, units: int = 0) -> None:
        with self._lock:
            self.done_bytes += done
            self.sent_bytes += sent
            self.units += units

    def report(self, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.interval:
            return
        self._last = now
        with self._lock:
            done, sent, units = self.done_bytes, self.sent_bytes, self.units
        elapsed = max(now - self.started, 1e-6)
        rate = sent / elapsed / 1e6
        counted = f"{units}/{self.total_units} {self.unit}, " if self.unit else ""
        if final:
            tail = f"done in {elapsed:.1f} s"
        else:
            fraction = done / self.total_bytes if self.total_bytes else 1.0
            eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("inf")
            tail = f"ETA {eta:.0f} s" if eta != float("inf") else "ETA unknown"
        self.log(f"{self.what}: {counted}{sent / MIB:.1f} MiB sent, {rate:.1f} MB/s, {tail}")
