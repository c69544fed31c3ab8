"""The lock file: pins (URL, size, sha256, blake3) for every upstream source, reviewed in git like flake.lock.

`recipes/sources.lock` is JSON with sorted keys and stable formatting, so a re-pin shows up as a small,
readable diff. Recipes read pins from it (`LockFile.apply`); `eulerbake lock` writes it: it downloads
each source that is not pinned yet (or every one with `--update`), checks the checksum file upstream
publishes beside it when there is one, records the pins and commits the downloaded file to the store,
so the build that follows never downloads it again.

The project says what can be pinned through one hook, `recipes/releases.py:pin_requests(releases,
arches) -> list[PinRequest]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eulerbake.derivation import Source
from eulerbake.errors import EulerbakeError
from eulerbake.store import Store, default_store_root

if TYPE_CHECKING:  # fetch (http, ssl) and rich load only when pinning: recipes read the lock on every run
    from eulerbake import fetch

LOCK_FORMAT = 1
LOCK_RELATIVE_PATH = Path("recipes") / "sources.lock"
PIN_REQUESTS_HOOK = ("recipes.releases", "pin_requests")

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

    def apply(self, source: Source, lock_id: str) -> Source:
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
    source: Source  # filename, candidate URLs in preference order, label; its pins are ignored
    checksum_suffix: str = ""  # e.g. ".sha256sum" when upstream publishes `<url><suffix>` beside the file


def check_upstream_checksum(request: PinRequest, fetched: fetch.Fetched, log: Log = print,
                            policy: fetch.RetryPolicy | None = None) -> str:
    """Compare the download with upstream's checksum file; return that file's URL ("" if none is offered)."""
    from eulerbake import fetch

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
    from eulerbake import fetch

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


def _load_pin_requests(project: Path) -> Callable[[Sequence[str] | None, Sequence[str] | None], list[PinRequest]]:
    module_name, function_name = PIN_REQUESTS_HOOK
    if str(project) not in sys.path:
        sys.path.insert(0, str(project))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EulerbakeError(
            f"cannot import {module_name} from {project}: {exc}",
            hint="run `eulerbake lock` from the project root (the directory holding recipes/)",
        ) from exc
    hook = getattr(module, function_name, None)
    if not callable(hook):
        raise EulerbakeError(f"{module_name} has no {function_name}(releases, arches) function",
                             hint="define it to list the sources `eulerbake lock` pins")
    return hook


def _short(digest: str) -> str:
    return digest[:16] + "…" if digest else ""


def lock_main(argv: list[str], project: Path) -> int:
    """`eulerbake lock [RELEASE…] [--arch A] [--update]`: pin upstream sources into recipes/sources.lock."""
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(
        prog="eulerbake lock",
        description="Download what is not pinned yet, check upstream's .sha256sum, record url/size/sha256/blake3 "
        "in recipes/sources.lock and put the file in the store. Without RELEASE: every release, plus the sources "
        "that belong to no release (the ENA driver).",
    )
    parser.add_argument("releases", nargs="*", metavar="RELEASE", help="e.g. 22.03-LTS-SP4 (default: all)")
    parser.add_argument("--arch", action="append", dest="arches", metavar="ARCH", help="x86_64 or aarch64 (repeatable)")
    parser.add_argument("--update", action="store_true", help="re-pin sources that are already pinned")
    args = parser.parse_args(argv)

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    requests = _load_pin_requests(project)(args.releases or None, args.arches or None)
    lockfile = LockFile.read(project / LOCK_RELATIVE_PATH)
    store = Store(default_store_root(project))

    table = Table(title=f"pins in {LOCK_RELATIVE_PATH}", show_edge=False)
    for column in ("source", "status", "size", "sha256"):
        table.add_column(column)
    failures: list[str] = []
    for request in requests:
        old = lockfile.get(request.lock_id)
        if old is not None and not args.update:
            table.add_row(request.lock_id, "pinned", str(old.size), _short(old.sha256))
            continue
        console.print(f"[bold]pinning[/] {request.lock_id}")
        try:
            entry = pin_source(request, store, log=lambda message: console.print(f"  {message}"))
        except EulerbakeError as err:
            console.print(f"  [red]failed:[/] {err.message}")
            failures.append(f"{request.lock_id}: {err.message}")
            table.add_row(request.lock_id, "[red]failed[/]", "", "")
            continue
        if old is None:
            status = "[green]new[/]"
        elif old.same_pins(entry):
            status, entry = "unchanged", old  # keep the reviewed entry (and its URL) as it is
        else:
            status = f"[yellow]CHANGED[/] (was {_short(old.sha256)})"
        lockfile.entries[request.lock_id] = entry
        lockfile.write()  # after every pin, so an interrupted run keeps what it did
        table.add_row(request.lock_id, status, str(entry.size), _short(entry.sha256))
    Console(highlight=False).print(table)
    if failures:
        raise EulerbakeError(
            f"{len(failures)} of {len(requests)} sources could not be pinned:\n  " + "\n  ".join(failures),
            hint="fix the cause above and run `eulerbake lock` again; what was pinned is already recorded",
        )
    return 0
