"""The lock file: pins (URL, size, sha256, blake3) for every upstream source, reviewed in git like flake.lock.

`recipes/sources.lock` is JSON with sorted keys and stable formatting, so a re-pin shows up as a small,
readable diff. Recipes read pins from it (`LockFile.apply`); `eulerbake lock` writes it: it downloads
each source that is not pinned yet (or every one with `--update`), checks the checksum file upstream
publishes beside it when there is one, records the pins and commits the downloaded file to the store,
so the build that follows never downloads it again.

The project says what can be pinned, and where its lock file is, through its recipes package
(`pin_requests()` lists every pinnable source, `lock_targets(names, arches)` the nodes a lock call
reaches, and `LOCK_PATH`; see `eulerbake.cli.lock`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eulerbake.core.derivation import FixedOutput
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store

if TYPE_CHECKING:  # fetch (http, ssl) and rich load only when pinning: recipes read the lock on every run
    from eulerbake.fetch import http as fetch

LOCK_FORMAT = 1

Log = Callable[[str], None]


@dataclass(frozen=True)
class LockEntry:
    """The pins of one source and where they were taken from."""

    url: str  # the location that served the pinned bytes
    filename: str
    size: int
    sha256: str
    blake3: str
    upstream_checksum: str = ""  # the checksum file that confirmed sha256; "" when upstream offers none

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, lock_id: str, data: Any, origin: Path) -> LockEntry:
        fields = {field.name: field.type for field in dataclasses.fields(cls)}
        problem = ""
        if not isinstance(data, dict):
            problem = "is not an object"
        elif missing := sorted(set(fields) - set(data) - {"upstream_checksum"}):
            problem = f"lacks {', '.join(missing)}"
        elif unknown := sorted(set(data) - set(fields)):
            problem = f"has unknown fields {', '.join(unknown)}"
        elif not isinstance(data["size"], int) or data["size"] < 0:
            problem = "has a size that is not a non-negative integer"
        elif not all(isinstance(data.get(name, ""), str) for name in fields if name != "size"):
            problem = "has a field that is not a string"
        elif not (_is_hex(data["sha256"], 64) and _is_hex(data["blake3"], 64)):
            problem = "has a sha256 or blake3 that is not 64 lowercase hex digits"
        if problem:
            raise EulerbakeError(
                f"{origin}: entry {lock_id!r} {problem}",
                hint=f"fix the entry by hand or re-pin it with `eulerbake lock --update` (entry {lock_id})",
            )
        return cls(**data)

    def same_pins(self, other: LockEntry) -> bool:
        return (self.filename, self.size, self.sha256, self.blake3) == (
            other.filename, other.size, other.sha256, other.blake3)


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


class LockFile:
    """The entries of one lock file, keyed by lock id (e.g. `22.03-LTS-SP4:aarch64:qcow2`)."""

    def __init__(self, path: Path, entries: dict[str, LockEntry] | None = None) -> None:
        self.path = path
        self.entries: dict[str, LockEntry] = dict(entries or {})

    @classmethod
    def read(cls, path: Path) -> LockFile:
        """The lock file at `path`; an empty one when the file does not exist yet."""
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise EulerbakeError(f"cannot read lock file {path}: {exc}",
                                 hint="restore it from git (`git checkout -- recipes/sources.lock`)") from exc
        if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT or not isinstance(data.get("sources"), dict):
            raise EulerbakeError(
                f"{path} is not a format-{LOCK_FORMAT} eulerbake lock file (expected {{'format': {LOCK_FORMAT}, "
                "'sources': {…}})",
                hint="restore it from git, or delete it and run `eulerbake lock` to pin everything again",
            )
        entries = {lock_id: LockEntry.from_json(lock_id, entry, path) for lock_id, entry in data["sources"].items()}
        return cls(path, entries)

    def get(self, lock_id: str) -> LockEntry | None:
        return self.entries.get(lock_id)

    def render(self) -> str:
        document = {"format": LOCK_FORMAT, "sources": {k: v.to_json() for k, v in sorted(self.entries.items())}}
        return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def write(self) -> None:
        """Write atomically (a reader never sees half a lock file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.render())
        os.replace(tmp, self.path)

    def apply(self, source: FixedOutput, lock_id: str) -> FixedOutput:
        """`source` with the pins recorded for `lock_id`; unchanged (unpinned) when there are none."""
        entry = self.entries.get(lock_id)
        if entry is None:
            return source
        if entry.filename != source.filename:
            raise EulerbakeError(
                f"{self.path}: {lock_id} pins {entry.filename}, but the recipe now fetches {source.filename}",
                hint=f"re-pin it: `eulerbake lock --update` for {lock_id}, and review the diff",
            )
        return dataclasses.replace(source, sha256=entry.sha256, blake3=entry.blake3, size=entry.size)


@dataclass(frozen=True)
class PinRequest:
    """One source the project wants pinned: its candidate locations and upstream's checksum convention."""

    lock_id: str
    source: FixedOutput  # filename, candidate URLs in preference order, label; its pins are ignored
    checksum_suffix: str = ""  # e.g. ".sha256sum" when upstream publishes `<url><suffix>` beside the file


def check_upstream_checksum(request: PinRequest, fetched: fetch.Fetched, log: Log = print,
                            policy: fetch.RetryPolicy | None = None) -> str:
    """Compare the download with upstream's checksum file; return that file's URL ("" if none is offered)."""
    from eulerbake.fetch import http as fetch

    if not request.checksum_suffix:
        return ""
    candidates = [fetched.url] + [url for url in request.source.urls if url != fetched.url]
    for url in candidates:
        checksum_url = url + request.checksum_suffix
        text = fetch.fetch_text(checksum_url, policy, log)
        if text is None:
            continue
        published = fetch.parse_sha256sum(text, request.source.filename, origin=checksum_url)
        if published != fetched.sha256:
            raise EulerbakeError(
                f"{request.source.filename} from {fetched.url} does not match upstream's checksum:\n"
                f"  sha256: {checksum_url} says {published}, the download has {fetched.sha256}",
                hint="the mirror served bad or stale bytes, or the download was corrupted; try another mirror "
                "(EULERBAKE_MIRRORS) and run `eulerbake lock` again",
            )
        log(f"{request.source.filename}: sha256 matches {checksum_url}")
        return checksum_url
    log(f"{request.source.filename}: upstream publishes no {request.source.filename}{request.checksum_suffix}; "
        "pinned as downloaded, review it")
    return ""


def pin_source(request: PinRequest, store: Store, log: Log = print,
               policy: fetch.RetryPolicy | None = None) -> LockEntry:
    """Download `request`'s source once, check it against upstream, commit it to the store, return its pins."""
    from eulerbake.fetch import http as fetch

    source = dataclasses.replace(request.source, sha256="", blake3="", size=-1)
    store.open_stat_cache()
    partial = fetch.store_partial(store.root, source)
    with store.lock(source.key, on_wait=log):
        fetched = fetch.fetch_first(source.urls, partial, label=request.lock_id, log=log, policy=policy)
        try:
            checksum_url = check_upstream_checksum(request, fetched, log, policy)
        except EulerbakeError:
            fetch.discard_partial(partial)  # suspect bytes: the next run downloads afresh
            raise
        entry = LockEntry(fetched.url, source.filename, fetched.size, fetched.sha256, fetched.blake3, checksum_url)
        pinned = dataclasses.replace(source, sha256=entry.sha256, blake3=entry.blake3, size=entry.size)
        store.import_file(pinned, partial)
        fetch.discard_partial(partial)
    return entry
