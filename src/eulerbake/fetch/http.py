"""Fetching fixed-output sources: mirrors, resumable HTTP(S) downloads, retries, verification against pins.

A source lists its locations in preference order: local paths, `file://` URLs (air-gapped mirrors that
pre-copy the files) and `http(s)://` URLs. Each is tried in turn; a location that is missing (404) or
keeps failing after retries with exponential backoff gives way to the next one.

HTTP downloads go to a partial file that survives a failed attempt: the next attempt asks only for the
rest (`Range`, guarded by `If-Range` with the validator the server gave). The partial lives under
`<store>/.cache/downloads/` when the store runs the fetch (it hands the builder its cache directory),
so it also survives a killed or failed run; otherwise it sits beside the destination and lives as long
as the fetch. blake3 and sha256 are computed as the bytes arrive, so a multi-GB ISO is read once.

Nothing reaches the store unless size, sha256 and blake3 all match the pins; a resumed download that
does not match is downloaded once more from the start before the location is declared bad.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import blake3

from eulerbake import __version__
from eulerbake.core.derivation import BuildContext, FixedOutput
from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.units import human_size

Log = Callable[[str], None]
T = TypeVar("T")

CHUNK = 1024 * 1024
USER_AGENT = f"eulerbake/{__version__}"
DOWNLOADS_SUBDIR = Path(".cache") / "downloads"
# HTTP answers that mean "this location does not have the file": no point in retrying them.
MISSING_STATUSES = frozenset({400, 401, 403, 404, 405, 410, 451})
PROGRESS_LOG_SECONDS = 10.0  # without a TTY, one progress line this often
MAX_TEXT_BYTES = 1024 * 1024  # checksum files are tiny; refuse anything larger


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one location: attempts, exponential backoff between them, socket timeout."""

    attempts: int = 5
    backoff_seconds: float = 1.0  # first wait; doubles after every failed attempt
    max_backoff_seconds: float = 60.0
    timeout_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """Defaults, overridden by EULERBAKE_FETCH_RETRIES / _BACKOFF / _TIMEOUT."""
        default = cls()

        def number(name: str, fallback: float) -> float:
            raw = os.environ.get(name)
            if raw is None or raw == "":
                return fallback
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if value < 0:
                raise EulerbakeError(f"{name}={raw!r} is not a non-negative number", hint=f"unset {name} or fix it")
            return value

        return cls(
            attempts=max(1, int(number("EULERBAKE_FETCH_RETRIES", default.attempts))),
            backoff_seconds=number("EULERBAKE_FETCH_BACKOFF", default.backoff_seconds),
            max_backoff_seconds=default.max_backoff_seconds,
            timeout_seconds=number("EULERBAKE_FETCH_TIMEOUT", default.timeout_seconds) or default.timeout_seconds,
        )

    def delay(self, failures: int) -> float:
        return float(min(self.backoff_seconds * 2 ** (failures - 1), self.max_backoff_seconds))


@dataclass(frozen=True)
class Fetched:
    """What one location delivered: where from, and the size and hashes of every byte written."""

    url: str
    path: Path
    size: int
    sha256: str
    blake3: str
    resumed: bool  # part of the bytes were left by an earlier call (a failed or killed run)


class LocationFailed(Exception):
    """This location could not deliver the file (missing, or still failing after every retry)."""


class _RestartNeeded(Exception):
    """The partial file cannot be continued; the attempt starts over from byte 0."""


def _meta_path(partial_path: Path) -> Path:
    """The sidecar recording which URL started a partial file and the validator it gave."""
    return partial_path.with_name(partial_path.name + ".json")


def _recorded_validator(partial_path: Path, url: str) -> str | None:
    """The ETag / Last-Modified recorded when `url` started this partial file, if any."""
    try:
        meta = json.loads(_meta_path(partial_path).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and meta.get("url") == url and isinstance(meta.get("validator"), str):
        return str(meta["validator"])
    return None


def discard_partial(partial_path: Path) -> None:
    """Delete a partial download and its sidecar."""
    partial_path.unlink(missing_ok=True)
    _meta_path(partial_path).unlink(missing_ok=True)


class _PartialFile:
    """An append-only partial download with running blake3 + sha256 over everything in it."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.meta_path = _meta_path(path)
        self.resumed_bytes = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._reset_hashes()
        if resume and path.is_file():
            with path.open("rb") as existing:  # the hashes must cover the bytes already there
                while chunk := existing.read(CHUNK):
                    self._update(chunk)
            self.resumed_bytes = self.size
        else:
            self.discard()
        self._handle: IO[bytes] = path.open("ab")

    def _reset_hashes(self) -> None:
        self._b3 = blake3.blake3()
        self._sha = hashlib.sha256()
        self.size = 0

    def _update(self, data: bytes) -> None:
        self._b3.update(data)
        self._sha.update(data)
        self.size += len(data)

    def write(self, data: bytes) -> None:
        self._handle.write(data)
        self._update(data)

    def restart(self) -> None:
        self._handle.seek(0)
        self._handle.truncate()
        self._reset_hashes()
        self.resumed_bytes = 0
        self.meta_path.unlink(missing_ok=True)

    def remember(self, url: str, validator: str | None) -> None:
        self.meta_path.write_text(json.dumps({"url": url, "validator": validator}))

    def finish(self, url: str) -> Fetched:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        return Fetched(url, self.path, self.size, self._sha.hexdigest(), self._b3.hexdigest(), self.resumed_bytes > 0)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def discard(self) -> None:
        discard_partial(self.path)


class _Progress:
    """A rich progress bar on a TTY, otherwise a log line every PROGRESS_LOG_SECONDS."""

    def __init__(self, label: str, log: Log) -> None:
        self.label = label
        self.log = log
        self.total: int | None = None
        self.done = 0
        self.started = time.monotonic()
        self.baseline = 0
        self.last_line = self.started
        self._bar: Any = None
        self._task: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                TimeRemainingColumn(), console=Console(stderr=True), transient=True,
            )

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=None)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, total: int | None, done: int) -> None:
        self.total, self.done = total, done
        self.started, self.baseline = time.monotonic(), done  # the rate counts this attempt's bytes only
        if self._bar is not None:
            self._bar.update(self._task, total=total, completed=done)

    def advance(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.monotonic()
        if now - self.last_line >= PROGRESS_LOG_SECONDS:
            self.last_line = now
            rate = (self.done - self.baseline) / max(now - self.started, 1e-6)
            of_total = f" of {human_size(self.total)} ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.log(f"{self.label}: {human_size(self.done)}{of_total}, {human_size(int(rate))}/s")


def _local_path(location: str) -> Path | None:
    """The filesystem path of a local path or `file://` location, None for network URLs."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise LocationFailed(f"file:// URL with a host ({parsed.netloc}) is not supported; use file:///path")
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "":
        return Path(location)
    return None


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(match.group(1)) if match else None


def _http_attempt(url: str, partial: _PartialFile, expected_size: int | None, policy: RetryPolicy,
                  progress: _Progress, log: Log) -> None:
    """One request: continue `partial` from its current size (or start it), raising on any failure."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    offset = partial.size
    if offset and expected_size is not None and offset == expected_size:
        return  # a previous attempt already got every byte; the pins decide whether they are right
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = _recorded_validator(partial.path, url)
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=policy.timeout_seconds)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            partial.restart()
            raise _RestartNeeded("the server refused to continue the partial download") from exc
        raise
    with response:
        if offset and response.status == 206:
            if _content_range_start(response.headers.get("Content-Range")) != offset:
                partial.restart()
                raise _RestartNeeded("the server answered with a different byte range")
            log(f"resuming {url} at {human_size(offset)}")
        elif offset:
            log(f"{url}: the server sent the whole file instead of the rest; starting over")
            partial.restart()
        partial.remember(url, response.headers.get("ETag") or response.headers.get("Last-Modified"))
        length_header = response.headers.get("Content-Length")
        remaining = int(length_header) if length_header and length_header.isdigit() else None
        total = partial.size + remaining if remaining is not None else expected_size
        if expected_size is not None and total is not None and total > expected_size:
            partial.restart()
            raise LocationFailed(f"serves {total} bytes, the pins say {expected_size}")
        progress.start(total, partial.size)
        received = 0
        while chunk := response.read(CHUNK):
            partial.write(chunk)
            received += len(chunk)
            progress.advance(len(chunk))
            if expected_size is not None and partial.size > expected_size:
                partial.restart()
                raise LocationFailed(f"sent more than the {expected_size} bytes the pins say")
        if remaining is not None and received < remaining:
            raise http.client.IncompleteRead(b"", remaining - received)


def _with_retries(what: str, attempt: Callable[[], T], policy: RetryPolicy, log: Log) -> T:
    """Call `attempt` until it succeeds, retrying transient failures with exponential backoff.

    Transient: connection errors, resets, timeouts, short bodies, HTTP errors other than "not there"
    (`MISSING_STATUSES`), and a partial download that must start over. After `policy.attempts` of them the
    location is given up (`LocationFailed`); anything else (`LocationFailed` itself included) passes through.
    """
    failures = 0
    while True:
        try:
            return attempt()
        except (_RestartNeeded, OSError, http.client.HTTPException) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code in MISSING_STATUSES:
                raise LocationFailed(f"HTTP {exc.code} {exc.reason}") from exc
            reason: BaseException = exc
        failures += 1
        if failures >= policy.attempts:
            raise LocationFailed(f"gave up after {failures} attempts: {_describe(reason)}")
        wait = policy.delay(failures)
        log(f"{what}: {_describe(reason)}; retrying in {wait:.1f}s (attempt {failures + 1} of {policy.attempts})")
        time.sleep(wait)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{exc.reason}"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed with {exc.expected} bytes still to come"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _copy_local(path: Path, partial: _PartialFile, progress: _Progress) -> None:
    if not path.is_file():
        raise LocationFailed(f"{path} does not exist")
    partial.restart()  # a local copy is quick and exact: never continue an old partial
    progress.start(path.stat().st_size, 0)
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            partial.write(chunk)
            progress.advance(len(chunk))


def fetch_location(location: str, partial_path: Path, *, expected_size: int | None = None,
                   trust_partial: bool = True, label: str = "", log: Log = print,
                   policy: RetryPolicy | None = None) -> Fetched:
    """Get `location` into `partial_path`, continuing what an earlier attempt left there.

    With `trust_partial` (the caller verifies the result against pins) any partial file is continued;
    without it, only one this same URL started and that the server can validate with `If-Range`.
    Raises `LocationFailed` when this location cannot deliver.
    """
    policy = policy or RetryPolicy.from_env()
    local = _local_path(location)
    resume = local is None
    if resume and not trust_partial:
        resume = _recorded_validator(partial_path, location) is not None
    partial = _PartialFile(partial_path, resume=resume)
    try:
        with _Progress(label or partial_path.name, log) as progress:
            if local is not None:
                _copy_local(local, partial, progress)
            else:
                _with_retries(location, lambda: _http_attempt(location, partial, expected_size, policy, progress, log),
                              policy, log)
        return partial.finish(location)
    finally:
        partial.close()


class _Exhausted(Exception):
    """No location delivered: why each failed, and which delivered bytes that `verify` refused."""

    def __init__(self, failures: list[str], mismatches: list[tuple[str, list[str]]]) -> None:
        super().__init__("no location delivered")
        self.failures = failures
        self.mismatches = mismatches


def _first_good(locations: Sequence[str], partial_path: Path, *, label: str, log: Log, policy: RetryPolicy | None,
                expected_size: int | None, trust_partial: bool,
                verify: Callable[[Fetched], list[str]] | None = None) -> Fetched:
    """The one location loop: each location in turn until one delivers bytes that `verify` accepts.

    A resumed download that `verify` refuses is fetched once more from the start before the location is
    declared bad (the old part may have come from a changed or broken server).
    """
    failures: list[str] = []
    mismatches: list[tuple[str, list[str]]] = []
    for location in locations:
        for from_scratch in (False, True):
            if from_scratch:
                log(f"{location}: the resumed download does not match the pins; downloading it again from the start")
            try:
                got = fetch_location(location, partial_path, expected_size=expected_size, label=label, log=log,
                                     trust_partial=trust_partial and not from_scratch, policy=policy)
            except LocationFailed as exc:
                failures.append(f"{location}: {exc}")
                log(f"{location}: {exc}")
                break
            wrong = verify(got) if verify else []
            if not wrong:
                return got
            discard_partial(partial_path)
            if got.resumed and not from_scratch:
                continue
            mismatches.append((location, wrong))
            log(f"{location} served bytes that do not match the pins; trying the next location")
            break
    raise _Exhausted(failures, mismatches)


def _unreachable(label: str, failures: list[str]) -> EulerbakeError:
    return EulerbakeError(
        f"could not fetch {label}:\n  " + "\n  ".join(failures or ["no locations given"]),
        hint="check the URL or the mirror list (EULERBAKE_MIRRORS), or pre-copy the file and point a file:// "
        "mirror at it",
    )


def fetch_first(locations: Sequence[str], partial_path: Path, *, label: str = "", log: Log = print,
                policy: RetryPolicy | None = None, expected_size: int | None = None,
                trust_partial: bool = False) -> Fetched:
    """The first of `locations` that delivers; an EulerbakeError listing every failure otherwise."""
    try:
        return _first_good(locations, partial_path, label=label, log=log, policy=policy,
                           expected_size=expected_size, trust_partial=trust_partial)
    except _Exhausted as exc:
        raise _unreachable(label or partial_path.name, exc.failures) from None


def fetch_text(location: str, policy: RetryPolicy | None = None, log: Log = print) -> str | None:
    """A small text file (a checksum list), or None when the location does not have it."""
    policy = policy or RetryPolicy.from_env()
    try:
        local = _local_path(location)
    except LocationFailed as exc:
        raise EulerbakeError(f"cannot read {location}: {exc}", hint="use file:///absolute/path") from exc
    if local is not None:
        return local.read_text(errors="replace")[:MAX_TEXT_BYTES] if local.is_file() else None

    def attempt() -> str:
        request = urllib.request.Request(location, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(request, timeout=policy.timeout_seconds) as response:
            return bytes(response.read(MAX_TEXT_BYTES)).decode(errors="replace")

    try:
        return _with_retries(location, attempt, policy, log)
    except LocationFailed as exc:
        if isinstance(exc.__cause__, urllib.error.HTTPError):
            return None  # the location does not have it
        raise EulerbakeError(f"could not read {location}: {exc}", hint="check the mirror") from exc


_GNU_LINE = re.compile(r"^([0-9a-fA-F]{64})(?:\s+\*?(.+?))?\s*$")
_BSD_LINE = re.compile(r"^SHA256\s*\((.+)\)\s*=\s*([0-9a-fA-F]{64})\s*$", re.IGNORECASE)


def parse_sha256sum(text: str, filename: str, origin: str = "checksum file") -> str:
    """The sha256 that a `sha256sum` (`<hash>  <name>`, or a bare hash) or BSD-style list gives `filename`."""
    listed: list[tuple[str | None, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if gnu := _GNU_LINE.match(line):
            listed.append((gnu.group(2), gnu.group(1).lower()))
        elif bsd := _BSD_LINE.match(line):
            listed.append((bsd.group(1), bsd.group(2).lower()))
    for name, digest in listed:
        if name is not None and Path(name.strip()).name == filename:
            return digest
    unnamed = [digest for name, digest in listed if name is None]
    if len(listed) == 1 and unnamed:
        return unnamed[0]
    names = ", ".join(sorted({name for name, _ in listed if name})) or "nothing"
    raise EulerbakeError(
        f"{origin} gives no sha256 for {filename} (it lists {names})",
        hint="check that the mirror publishes the right checksum file beside the download",
    )


def pin_problems(source: FixedOutput, size: int, sha256: str, b3: str) -> list[str]:
    """How a file of this size and hashes differs from the source's pins (empty when it matches)."""
    wrong = []
    if size != source.size:
        wrong.append(f"size: expected {source.size}, got {size}")
    if sha256 != source.sha256:
        wrong.append(f"sha256: expected {source.sha256}, got {sha256}")
    if b3 != source.blake3:
        wrong.append(f"blake3: expected {source.blake3}, got {b3}")
    return wrong


def _mismatch_error(source: FixedOutput, problems: list[tuple[str, list[str]]]) -> EulerbakeError:
    lines = [f"source {source.filename} from {origin} does not match its pins:\n  " + "\n  ".join(wrong)
             for origin, wrong in problems]
    return EulerbakeError(
        "\n".join(lines),
        hint="if upstream really changed, re-pin it with `eulerbake lock --update`; otherwise the mirror is bad",
    )


def downloads_dir(store_root: Path) -> Path:
    """Where partial downloads wait to be resumed: `<store>/.cache/downloads/`."""
    return store_root / DOWNLOADS_SUBDIR


def store_partial(store_root: Path, source: FixedOutput) -> Path:
    """A source's partial download in a store, `<key>-<filename>.part` (gc keeps it by that key)."""
    return downloads_dir(store_root) / f"{source.key}-{source.filename}.part"


def fetch_fixed_output(source: FixedOutput, dest: Path, ctx: BuildContext) -> None:
    """The builder of a `FixedOutput`: fetch into `dest`, the partial kept in the store's cache to resume."""
    if ctx.cache is None:
        partial = dest.with_name(dest.name + ".part")
    else:
        partial = store_partial(ctx.cache.parent, source)
        partial.parent.mkdir(parents=True, exist_ok=True)
    fetch_source(source, dest, ctx.log, partial)


def fetch_source(source: FixedOutput, dest: Path, log: Log = print, partial_path: Path | None = None) -> None:
    """Fetch `source` into `dest` from the first location that works and matches the pins."""
    if not source.pinned:
        raise EulerbakeError(
            f"source {source.filename} ({source.label or 'no label'}) is not pinned",
            hint="pin it with `eulerbake lock` and review the change to recipes/sources.lock",
        )
    partial_path = partial_path or dest.with_name(dest.name + ".part")
    label = source.label or source.filename
    try:
        _first_good(source.urls, partial_path, label=label, log=log, policy=RetryPolicy.from_env(),
                    expected_size=source.size, trust_partial=True,
                    verify=lambda got: pin_problems(source, got.size, got.sha256, got.blake3))
    except _Exhausted as exc:
        if exc.mismatches:
            raise _mismatch_error(source, exc.mismatches) from None
        raise _unreachable(f"{source.filename} ({label})", exc.failures) from None
    shutil.move(str(partial_path), dest)
    _meta_path(partial_path).unlink(missing_ok=True)
