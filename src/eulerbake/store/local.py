"""The local store: `store/<key>-<name>/` outputs plus `store/<key>-<name>.json` metadata.

An entry exists only when both are present. Builds happen in `store/.tmp/` (same filesystem), are
fsynced, made read-only and renamed into place; the metadata rename is the commit point, and an
output directory without metadata is leftover from a killed build that the next build of that key
removes. A per-key `flock` makes concurrent builders wait for each other instead of building twice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eulerbake import __version__
from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, FixedOutput, Input, Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.buildlog import BuildLog
from eulerbake.tools.run import recording

DEFAULT_SOURCE_DATE_EPOCH = 1_700_000_000  # 2023-11-14T22:13:20Z, used when the recipe sets none


@dataclass(frozen=True)
class Realised:
    node: Node
    path: Path
    built: bool  # False when the entry was already in the store


def default_store_root(project: Path | None = None) -> Path:
    env = os.environ.get("EULERBAKE_STORE")
    if env:
        return Path(env).absolute()
    return (project or Path.cwd()) / "store"


def _make_writable(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        for root, dirs, _files in os.walk(path):
            os.chmod(root, 0o755)
            for d in dirs:
                full = os.path.join(root, d)
                if not os.path.islink(full):
                    os.chmod(full, 0o755)


def remove_tree(path: Path) -> None:
    """Remove a (possibly read-only) store path or temp dir."""
    if path.is_dir() and not path.is_symlink():
        _make_writable(path)
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _syncfs(path: Path) -> None:
    """Flush the whole filesystem holding `path` in one call (syncfs), instead of one fsync per file.

    A kernel-headers output has ~16,000 files: per-file fsync cost ~5 s, syncfs a fraction of that.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc is None or _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_libc = _load_libc()


def _seal(path: Path, epoch: int) -> None:
    """Pin mtimes to `epoch`, make the tree read-only and flush it to disk."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            full = os.path.join(root, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                os.chmod(full, 0o555 if st.st_mode & stat.S_IXUSR else 0o444)
            os.utime(full, (epoch, epoch), follow_symlinks=False)
        for name in dirs:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, 0o555)
            os.utime(full, (epoch, epoch), follow_symlinks=False)
    os.chmod(path, 0o555)
    os.utime(path, (epoch, epoch))
    _syncfs(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def source_date_epoch(node: Node) -> int:
    """The build's SOURCE_DATE_EPOCH: the stage's `source_date_epoch` parameter, or a fixed default."""
    params = getattr(node, "params", {})
    value = params.get("source_date_epoch") if isinstance(params, dict) else getattr(params, "source_date_epoch", None)
    return int(value) if value is not None else DEFAULT_SOURCE_DATE_EPOCH


class Store:
    """A content-addressed store rooted at `root` (created on demand)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self._ready = False

    # -- layout -------------------------------------------------------------------------------
    def _ensure(self) -> None:
        if self._ready:
            return
        for sub in (".tmp", ".locks", ".cache", ".roots", ".failed"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        hashing.use_stat_cache(self.root / ".cache" / "stat-cache.sqlite3")
        self._ready = True

    def open_stat_cache(self) -> None:
        """Use this store's stat cache for hashing (creates the store if needed)."""
        self._ensure()

    def path(self, node: Node) -> Path:
        return self.root / f"{node.key}-{node.store_name}"

    def meta_path(self, node: Node) -> Path:
        return self.root / f"{node.key}-{node.store_name}.json"

    def has(self, node: Node) -> bool:
        return self.meta_path(node).is_file() and self.path(node).is_dir()

    def input_path(self, value: Input) -> Path:
        """The path a builder sees for an input: a derivation's output dir, a source's file."""
        if isinstance(value, FixedOutput):
            return self.path(value) / value.filename
        if isinstance(value, Node):
            return self.path(value)
        return value.path.absolute()

    @contextmanager
    def lock(self, key: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        self._ensure()
        with open(self.root / ".locks" / f"{key}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    on_wait(f"waiting for another build of {key} to finish")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- building -----------------------------------------------------------------------------
    def realise(self, node: Node, log: Callable[[str], None] = print, _seen: set[str] | None = None) -> Realised:
        """Make sure `node` and everything it depends on is in the store; build what is missing."""
        self._ensure()
        seen = _seen if _seen is not None else set()
        for dep in node.dependencies():
            if dep.key not in seen:
                self.realise(dep, log, seen)
                seen.add(dep.key)
        if self.has(node):
            return Realised(node, self.path(node), built=False)
        with self.lock(node.key, on_wait=log):
            if self.has(node):  # another process finished it while we waited
                return Realised(node, self.path(node), built=False)
            self._discard_leftovers(node)
            self._build(node, log)
        return Realised(node, self.path(node), built=True)

    def _discard_leftovers(self, node: Node) -> None:
        remove_tree(self.path(node))
        for stale in (self.root / ".tmp").glob(f"{node.key}-*"):
            remove_tree(stale)

    def log_path(self, node: Node) -> Path:
        """The log of the build that made `node`'s entry: `store/<key>-<name>.log`."""
        return self.root / f"{node.key}-{node.store_name}.log"

    def failed_log_path(self, node: Node) -> Path:
        """The log of the last failed build of `node`: `store/.failed/<key>-<name>.log` (not an entry)."""
        return self.root / ".failed" / f"{node.key}-{node.store_name}.log"

    def _build(self, node: Node, log: Callable[[str], None]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"{node.key}-", dir=self.root / ".tmp"))
        build_log = BuildLog(node)

        def tee(message: str) -> None:
            build_log.message(message)
            log(message)

        try:
            out = tmp / "out"
            out.mkdir()
            work = tmp / "work"
            work.mkdir()
            started = time.time()
            epoch = source_date_epoch(node)
            ctx = BuildContext(
                inputs={name: self.input_path(value) for name, value in getattr(node, "inputs", {}).items()},
                params=getattr(node, "params", {}),
                out=out,
                key=node.key,
                work=work,
                log=tee,
                source_date_epoch=epoch,
                cache=self.root / ".cache",
                secrets=node.secrets(),
            )
            with recording() as recorder:
                build_log.recorder = recorder
                try:
                    node.build(ctx)
                except EulerbakeError as err:
                    build_log.failure(str(err))
                    raise
                except Exception as exc:  # a bug or unexpected failure in a builder
                    build_log.failure(f"{type(exc).__name__}: {exc}")
                    raise EulerbakeError(
                        f"builder for {node.task_name} failed: {type(exc).__name__}: {exc}",
                        hint="see the traceback above (run with -v 2) and fix the recipe or its inputs",
                    ) from exc
            undeclared = sorted(recorder.tools - set(node.tools))
            if undeclared:
                raise EulerbakeError(
                    f"{node.task_name} ran {', '.join(undeclared)}, which its stage does not list in `tools`; "
                    "the output was discarded (the key would not cover those tools' versions)",
                    hint=f"add {', '.join(repr(t) for t in undeclared)} to the tools of the `{node.stage}` stage",
                )
            remove_tree(work)
            self._check_inputs_unchanged(node)
            node.check_output(out, ctx.secrets)
            _seal(out, epoch)
            known = node.known_output_hash()
            output_hash = known if known is not None else hashing.hash_tree(out, use_cache=False)
            meta = {
                "key": node.key,
                "name": node.store_name,
                "task": node.task_name,
                "kind": node.kind,
                "manifest": node.manifest,
                "output": {"hash": output_hash, "size": hashing.tree_size(out)},
                "tools": {tool: node.manifest.get("tools", {}).get(tool, "") for tool in sorted(recorder.tools)},
                "built_at": int(started),
                "build_seconds": round(time.time() - started, 3),
                "built_by": {"engine": __version__, "host": socket.gethostname()},
            }
            meta_tmp = tmp / "meta.json"
            with meta_tmp.open("w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            build_log.write(tmp / "build.log", ok=True)
            os.rename(out, self.path(node))
            os.rename(meta_tmp, self.meta_path(node))  # the commit point
            os.rename(tmp / "build.log", self.log_path(node))  # after it: never a log without its entry
            self.failed_log_path(node).unlink(missing_ok=True)
            _fsync_dir(self.root)
        except BaseException:
            try:
                build_log.write(tmp / "build.log", ok=False)
                os.replace(tmp / "build.log", self.failed_log_path(node))
            except OSError:
                pass
            raise
        finally:
            remove_tree(tmp)

    @staticmethod
    def _check_inputs_unchanged(node: Node) -> None:
        """Refuse to commit when a local input changed while the builder ran (the key would lie)."""
        recorded = node.manifest.get("inputs", {})
        for name, value in getattr(node, "inputs", {}).items():
            if not isinstance(value, Node) and value.fingerprint() != recorded[name]:
                raise EulerbakeError(
                    f"input {value.path} changed while {node.task_name} was building; the output was discarded",
                    hint="run the build again once the file is no longer being edited",
                )

    def import_file(self, source: FixedOutput, path: Path) -> Path:
        """Commit a file already on disk (e.g. just pinned by `eulerbake lock`) as `source`'s entry.

        The same path as a fetch: pins verified, sealed, metadata written; the file is copied.
        """
        local = dataclasses.replace(source, urls=(str(Path(path).absolute()),))
        return self.realise(local, log=lambda _message: None).path

    # -- queries ------------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Metadata of every committed entry, sorted by name."""
        if not self.root.is_dir():
            return []
        found = []
        for meta_file in sorted(self.root.glob("*.json")):
            if meta_file.with_suffix("").is_dir():
                found.append(self.read_meta(meta_file))
        return found

    @staticmethod
    def read_meta(meta_file: Path) -> dict[str, Any]:
        with meta_file.open() as f:
            meta: dict[str, Any] = json.load(f)
        meta["path"] = str(meta_file.with_suffix(""))
        return meta

    def find(self, query: str) -> dict[str, Any]:
        """An entry by store path, `<key>-<name>`, key prefix or task name."""
        name = Path(query).name
        matches = [
            meta
            for meta in self.entries()
            if Path(meta["path"]).name == name or meta["key"].startswith(name) or meta["task"] == query
        ]
        if not matches:
            raise EulerbakeError(f"no store entry matches {query!r}", hint="list entries with `eulerbake store info`")
        if len(matches) > 1:
            names = ", ".join(Path(m["path"]).name for m in matches[:5])
            raise EulerbakeError(f"{query!r} matches {len(matches)} entries: {names}", hint="give a longer key prefix")
        return matches[0]

    def verify(self, entries: Iterable[dict[str, Any]] | None = None) -> list[tuple[dict[str, Any], str]]:
        """Re-hash entries from disk (no stat cache); return (entry, problem) for each bad one."""
        problems = []
        for meta in entries if entries is not None else self.entries():
            path = Path(meta["path"])
            try:
                actual = hashing.hash_tree(path, use_cache=False)
            except (OSError, ValueError) as exc:
                problems.append((meta, f"unreadable: {exc}"))
                continue
            recorded = meta["output"]["hash"]
            if actual != recorded:
                problems.append((meta, f"content hash {actual[:16]}… does not match recorded {recorded[:16]}…"))
            elif hashing.hash_json(meta["manifest"])[: len(meta["key"])] != meta["key"]:
                problems.append((meta, "metadata manifest does not hash to the entry's key"))
        return problems

    def delete(self, meta: dict[str, Any]) -> None:
        path = Path(meta["path"])
        with self.lock(meta["key"]):
            Path(str(path) + ".json").unlink(missing_ok=True)
            remove_tree(path)
            Path(str(path) + ".log").unlink(missing_ok=True)

    def gc(self, keep_keys: set[str], dry_run: bool = False) -> list[dict[str, Any]]:
        """Remove entries whose key is not in `keep_keys` (plus the inputs those need) and temp dirs."""
        entries = self.entries()
        by_key = {meta["key"]: meta for meta in entries}
        keep = set(keep_keys) | self.pinned_roots()
        stack = [key for key in keep if key in by_key]
        while stack:  # keep the closure: everything a kept entry was built from
            for ref in self.references(by_key[stack.pop()]):
                if ref in by_key and ref not in keep:
                    keep.add(ref)
                    stack.append(ref)
        doomed = [meta for meta in entries if meta["key"] not in keep]
        if not dry_run:
            for meta in doomed:
                self.delete(meta)
            # Leftover build dirs go; partial downloads (`<key>-…`) stay while their source is wanted.
            downloads = (self.root / ".cache" / "downloads").glob("*")
            unwanted = (d for d in downloads if d.name.split("-", 1)[0] not in keep)
            leftovers = [*(self.root / ".tmp").glob("*"), *unwanted]
            for leftover in leftovers:
                key = leftover.name.split("-", 1)[0]
                with self.lock(key):
                    remove_tree(leftover)
        return doomed

    def pinned_roots(self) -> set[str]:
        """Keys named in `store/.roots/` (one file per root, holding the key): kept by `gc`."""
        roots_dir = self.root / ".roots"
        if not roots_dir.is_dir():
            return set()
        return {p.read_text().strip() for p in roots_dir.iterdir() if p.is_file()}

    @staticmethod
    def references(meta: dict[str, Any]) -> list[str]:
        inputs = meta["manifest"].get("inputs", {})
        return [value["key"] for value in inputs.values() if "key" in value]

    def why_depends(self, start: str, target: str) -> list[dict[str, Any]] | None:
        """A chain of entries from `start` to `target` following recorded inputs, or None."""
        first, goal = self.find(start), self.find(target)
        by_key = {meta["key"]: meta for meta in self.entries()}
        parents: dict[str, str | None] = {first["key"]: None}
        queue = [first["key"]]
        while queue:
            key = queue.pop(0)
            if key == goal["key"]:
                chain = []
                cursor: str | None = key
                while cursor is not None:
                    chain.append(by_key[cursor])
                    cursor = parents[cursor]
                return list(reversed(chain))
            for ref in self.references(by_key[key]):
                if ref in by_key and ref not in parents:
                    parents[ref] = key
                    queue.append(ref)
        return None
