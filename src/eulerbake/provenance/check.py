"""`--check`: rebuild an output in a fresh temporary store and compare it bit for bit with the store's.

Like `nix-build --check`: the entry must already be in the store. The fresh store gets the entry's direct
inputs copied from the main store (through the store's own substitution path, so each copy is sealed and
hash-checked like a cache download) and builds only the entry itself; inputs the main store lacks are
built there too. The two trees are compared file by file, in byte order of their paths: the first
difference is named (a missing or extra file, a changed mode or link, or the first differing byte's
offset), and diffoscope, when installed, explains the two trees.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eulerbake.core import hashing
from eulerbake.core.derivation import Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import GC_LOCK, Store, remove_tree
from eulerbake.tools import versions
from eulerbake.tools.run import run

COMPARE_CHUNK = 1 << 20
DIFFOSCOPE_LINES = 200


@dataclass(frozen=True)
class Difference:
    path: str  # inside the entry
    offset: int | None  # first differing byte (None: not a content difference)
    detail: str

    def __str__(self) -> str:
        where = f" at byte offset {self.offset}" if self.offset is not None else ""
        return f"{self.path}{where}: {self.detail}"


@dataclass(frozen=True)
class CheckResult:
    task: str
    key: str
    recorded_hash: str
    rebuilt_hash: str
    difference: Difference | None
    diffoscope: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.difference is None and self.recorded_hash == self.rebuilt_hash

    def to_json(self) -> dict[str, Any]:
        diff = self.difference
        difference = None if diff is None else {"path": diff.path, "offset": diff.offset, "detail": diff.detail}
        return {"task": self.task, "key": self.key, "ok": self.ok, "recorded_hash": self.recorded_hash,
                "rebuilt_hash": self.rebuilt_hash, "seconds": round(self.seconds, 3),
                "difference": difference,
                "diffoscope": self.diffoscope}

    def summary(self) -> str:
        if self.ok:
            return f"{self.task}: rebuilt bit for bit ({self.recorded_hash[:16]}…) in {self.seconds:.1f} s"
        return f"{self.task}: NOT reproducible: {self.difference or 'the output hash differs'}"


# -- comparing two trees ------------------------------------------------------------------------------------


def _listing(root: Path) -> dict[str, os.stat_result]:
    found: dict[str, os.stat_result] = {}
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            full = Path(directory) / name
            found[full.relative_to(root).as_posix()] = full.lstat()
    return found


def first_byte_difference(a: Path, b: Path) -> int | None:
    """The offset of the first byte where the files differ (the shorter one's length if one is a prefix)."""
    offset = 0
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            left, right = fa.read(COMPARE_CHUNK), fb.read(COMPARE_CHUNK)
            if left != right:
                for index, (x, y) in enumerate(zip(left, right, strict=False)):
                    if x != y:
                        return offset + index
                return offset + min(len(left), len(right))
            if not left:
                return None
            offset += len(left)


def first_difference(recorded: Path, rebuilt: Path) -> Difference | None:
    """The first difference between two trees, in byte order of their paths; None when they are identical."""
    left, right = _listing(recorded), _listing(rebuilt)
    for name in sorted(set(left) | set(right), key=os.fsencode):
        if name not in right:
            return Difference(name, None, "in the store's entry, missing from the rebuild")
        if name not in left:
            return Difference(name, None, "made by the rebuild, not in the store's entry")
        a, b = left[name], right[name]
        if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
            return Difference(name, None, "a different kind of file (regular file, directory, symlink)")
        if stat.S_ISLNK(a.st_mode):
            before, after = os.readlink(recorded / name), os.readlink(rebuilt / name)
            if before != after:
                return Difference(name, None, f"the symlink points at {after!r}, not {before!r}")
        elif stat.S_ISREG(a.st_mode):
            if bool(a.st_mode & stat.S_IXUSR) != bool(b.st_mode & stat.S_IXUSR):
                return Difference(name, None, "the executable bit differs")
            offset = first_byte_difference(recorded / name, rebuilt / name)
            if offset is not None:
                sizes = f" (sizes {a.st_size} and {b.st_size})" if a.st_size != b.st_size else ""
                return Difference(name, offset, f"the content differs{sizes}")
    return None


def diffoscope(recorded: Path, rebuilt: Path) -> str | None:
    """diffoscope's text report of the two trees (its last lines), None when it is not installed."""
    if shutil.which("diffoscope") is None:
        return None
    proc = run(["diffoscope", "--no-progress", "--text", "-", str(recorded), str(rebuilt)], check=False, timeout=600)
    text = proc.stdout.decode(errors="replace") or proc.stderr.decode(errors="replace")
    lines = text.splitlines()
    if len(lines) > DIFFOSCOPE_LINES:
        lines = [*lines[:DIFFOSCOPE_LINES], f"… ({len(lines) - DIFFOSCOPE_LINES} more lines)"]
    return "\n".join(lines)


# -- the fresh store ---------------------------------------------------------------------------------------


def copy_tree(source: Path, dest: Path) -> None:
    """Copy an entry's tree, keeping holes (only data regions are copied) and executable bits."""
    dest.mkdir()
    for directory, dirs, files in os.walk(source):
        here = Path(directory)
        target = dest / here.relative_to(source)
        for name in sorted(dirs):
            if (here / name).is_symlink():
                os.symlink(os.readlink(here / name), target / name)
            else:
                (target / name).mkdir()
        for name in sorted(files):
            path = here / name
            if path.is_symlink():
                os.symlink(os.readlink(path), target / name)
                continue
            _copy_file(path, target / name)


def _copy_file(source: Path, dest: Path) -> None:
    with source.open("rb") as src, dest.open("wb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        for start, end in hashing.data_segments(src.fileno(), size):
            offset = start
            while offset < end:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), end - offset, offset, offset)
                if copied == 0:
                    raise EulerbakeError(f"copying {source} stopped at byte {offset} of {size}")
                offset += copied
    os.chmod(dest, 0o755 if source.stat().st_mode & stat.S_IXUSR else 0o644)


class StoreCopy:
    """A substituter serving the main store's entries (never `exclude`, the entry being checked)."""

    def __init__(self, store: Store, exclude: str) -> None:
        self.store = store
        self.exclude = exclude
        self.url = f"the store at {store.root}"

    def fetch(self, node: Node, out: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
        if node.key == self.exclude or not self.store.has(node):
            return None
        copy_tree(self.store.path(node), out)
        meta = self.store.read_meta(self.store.meta_path(node))
        meta.pop("path", None)
        return meta


def _restore_caches(store: Store) -> None:
    """A second Store points the process-wide stat and tool-version caches at itself: point them back."""
    if store.root.is_dir() and not store.read_only:
        hashing.use_stat_cache(store.root / ".cache" / "stat-cache.sqlite3")
        versions.use_cache_file(store.root / ".cache" / "tool-versions.json")
    else:
        hashing.use_stat_cache(None)
        versions.use_cache_file(None)


def check(store: Store, node: Node, log: Callable[[str], None] = print, *, keep: Path | None = None) -> CheckResult:
    """Rebuild `node` in a fresh store and compare; `keep` (a directory) keeps the rebuilt tree there."""
    if node.kind == "publication":
        raise EulerbakeError(f"{node.task_name} is a publication: --check rebuilds outputs, it does not publish again",
                             hint="check the outputs it publishes (their tasks) instead")
    if not store.has(node):
        raise EulerbakeError(f"{node.task_name} is not in the store: there is nothing to compare a rebuild with",
                             hint=f"build it first: doit {node.task_name}")
    if store.read_only:  # nothing to protect from gc, nowhere to put the scratch store
        return _check(store, node, log, keep, None)
    with store.lock(GC_LOCK, log, shared=True, waiting="waiting for `eulerbake store gc` to finish"):
        return _check(store, node, log, keep, store.root / ".tmp")


def _check(store: Store, node: Node, log: Callable[[str], None], keep: Path | None, base: Path | None
           ) -> CheckResult:
    recorded = store.read_meta(store.meta_path(node))
    scratch = Path(tempfile.mkdtemp(prefix=f"check-{node.key}-", dir=base))
    started = time.monotonic()
    try:
        fresh = Store(scratch / "store", substituters=[StoreCopy(store, node.key)])
        quiet: Callable[[str], None] = lambda _message: None  # noqa: E731 - the copies are not news
        for dep in node.dependencies():
            if not fresh.substitute(dep, quiet):
                fresh.realise(dep, log)
        log(f"{node.task_name}: rebuilding in a fresh store to compare with {store.path(node).name}")
        rebuilt = fresh.realise(node, log)
        rebuilt_meta = fresh.read_meta(fresh.meta_path(node))
        difference = first_difference(store.path(node), rebuilt.path)
        report = diffoscope(store.path(node), rebuilt.path) if difference is not None else None
        if keep is not None and difference is not None:
            copy_tree(rebuilt.path, keep / f"{node.key}-{node.store_name}.rebuilt")
        return CheckResult(node.task_name, node.key, recorded["output"]["hash"], rebuilt_meta["output"]["hash"],
                           difference, report, time.monotonic() - started)
    finally:
        remove_tree(scratch)
        _restore_caches(store)
