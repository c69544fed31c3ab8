"""The local store: `store/<key>-<name>/` outputs plus `store/<key>-<name>.json` metadata.

An entry exists only when both are present. Builds happen in `store/.tmp/` (same filesystem), are
fsynced, made read-only and renamed into place; the metadata rename is the commit point, and an
output directory without metadata is leftover from a killed build that the next build of that key
removes. A per-key `flock` makes concurrent builders wait for each other instead of building twice.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from eulerbake import __version__
from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, FixedOutput, Input, Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.store import seal
from eulerbake.store.buildlog import BuildLog
from eulerbake.tools import versions
from eulerbake.tools.run import recording

DEFAULT_SOURCE_DATE_EPOCH = 1_700_000_000  # 2023-11-14T22:13:20Z, used when the recipe sets none
SHARED_STORE_ENV = "EULERBAKE_SHARED_STORE"  # a store that a group of users writes to on purpose
NO_REBUILD_CORRUPT_ENV = "EULERBAKE_NO_REBUILD_CORRUPT"  # fail instead of rebuilding a corrupted entry
PROVENANCE_SUFFIX = ".provenance.json"  # an entry's signed provenance, beside its metadata (see `provenance`)
META_FIELDS = ("key", "name", "task", "manifest", "output")
ENTRY_RE = re.compile(r"^(([0-9a-f]{32})-[A-Za-z0-9][A-Za-z0-9._+-]*?)(\.provenance\.json|\.json|\.log)?$")
GC_LOCK = "gc"  # store/.locks/gc.lock: shared by builds, exclusive for gc
SUBDIRS = (".tmp", ".locks", ".cache", ".roots", ".failed", ".seals", ".corrupt")
# (store root, key) of entries whose seal was checked in this process: checked once per run, not per use.
_intact: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Realised:
    node: Node
    path: Path
    built: bool  # False when the entry was already in the store (or came from a substituter)
    substituted: bool = False


class Substituter(Protocol):
    """Where an entry can come from instead of being built (a binary cache; see `store.substituters`)."""

    url: str

    def fetch(self, node: Node, out: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
        """Unpack `node`'s entry into `out` (a fresh directory to create) and return its verified metadata
        (with `provenance`: the builder's envelope as bytes, when the cache has it); None when the cache does
        not have it. Raises EulerbakeError for an entry it refuses."""
        ...


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

    def __init__(self, root: Path, substituters: Sequence[Substituter] = ()) -> None:
        self.root = Path(root).absolute()
        self.substituters = list(substituters)
        self._ready = False

    # -- layout -------------------------------------------------------------------------------
    def _ensure(self) -> None:
        if self._ready:
            return
        if self.root.exists() and not self.root.is_dir():
            raise EulerbakeError(f"the store {self.root} is not a directory",
                                 hint="point EULERBAKE_STORE at a directory (or unset it to use ./store)")
        self._check_permissions()
        if self.read_only:  # reads (store path, info, verify, a no-op doit) work; builds fail in `lock`
            hashing.use_stat_cache(None)
            versions.use_cache_file(None)
            self._ready = True
            return
        try:
            for sub in SUBDIRS:
                (self.root / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise EulerbakeError(f"cannot create the store {self.root}: {exc.strerror}",
                                 hint="make the directory writable, or point EULERBAKE_STORE elsewhere") from exc
        hashing.use_stat_cache(self.root / ".cache" / "stat-cache.sqlite3")
        versions.use_cache_file(self.root / ".cache" / "tool-versions.json")
        self._ready = True

    @property
    def read_only(self) -> bool:
        """The store exists but cannot be written here (a read-only mount, another user's store)."""
        return self.root.is_dir() and not os.access(self.root, os.W_OK)

    def _check_permissions(self) -> None:
        """Refuse a store others could write into (they could plant entries), unless it is declared shared."""
        if not self.root.is_dir():
            return
        mode = self.root.stat().st_mode
        shared = os.environ.get(SHARED_STORE_ENV, "") not in ("", "0")
        if mode & stat.S_IWOTH and not (shared and mode & stat.S_ISVTX):
            raise EulerbakeError(f"the store {self.root} is writable by every user (mode {mode & 0o7777:04o})",
                                 hint=f"chmod o-w {self.root}; a store shared by a group: chmod g+ws, and set "
                                 f"{SHARED_STORE_ENV}=1")
        if mode & stat.S_IWGRP and not shared:
            raise EulerbakeError(f"the store {self.root} is writable by its group (mode {mode & 0o7777:04o})",
                                 hint=f"chmod g-w {self.root}, or set {SHARED_STORE_ENV}=1 if the group shares it")

    def open_stat_cache(self) -> None:
        """Use this store's stat cache for hashing (creates the store if needed)."""
        self._ensure()

    def path(self, node: Node) -> Path:
        return self.root / f"{node.key}-{node.store_name}"

    def meta_path(self, node: Node) -> Path:
        return self.root / f"{node.key}-{node.store_name}.json"

    def seal_path(self, key: str) -> Path:
        return self.root / ".seals" / f"{key}.json"

    def has(self, node: Node) -> bool:
        """The entry is committed and still what was sealed (a corrupted one is moved aside: not there)."""
        if not (self.meta_path(node).is_file() and self.path(node).is_dir()):
            return False
        if (str(self.root), node.key) in _intact:
            return True
        problems = self.seal_problems(node.key, self.path(node))
        if problems:
            self._quarantine(node, problems)
            return False
        _intact.add((str(self.root), node.key))
        return True

    def seal_problems(self, key: str, path: Path) -> list[str]:
        """How an entry differs from its seal record (a missing or garbled record is a problem too)."""
        try:
            now = seal.stamp(path)  # taken before any check: a write after it moves the stamp again
        except OSError:
            now = ""  # an unreadable tree: the full check below names it
        try:
            with self.seal_path(key).open("rb") as f:
                head = f.read(128)
                if now and seal.recorded_stamp(head) == now:  # nothing moved: the record need not be read
                    return []
                record = json.loads(head + f.read())
        except FileNotFoundError:
            return ["its seal record is missing"]
        except (OSError, ValueError) as exc:
            return [f"its seal record is unreadable: {exc}"]
        problems = seal.check(path, record)
        if not problems and now and record.get("stamp") != now:
            self._restamp(key, record, now)
        return problems

    def _restamp(self, key: str, record: dict[str, Any], stamp: str) -> None:
        """Record the stamp of an entry a full check found intact (a record from before stamps, or a file
        touched but unchanged), so the next check is the shortcut again. A read-only store keeps the old one."""
        target = self.seal_path(key)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            partial.write_text(seal.dumps({**record, "stamp": stamp}))
            os.replace(partial, target)
        except OSError:
            partial.unlink(missing_ok=True)

    def _quarantine(self, node: Node, problems: list[str]) -> None:
        """Move a corrupted entry to `store/.corrupt/` with a note, so it is rebuilt; or fail, if told to."""
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        if os.environ.get(NO_REBUILD_CORRUPT_ENV, "") not in ("", "0"):
            raise EulerbakeError(f"the store entry of {node.task_name} is corrupted: {shown}",
                                 hint=f"unset {NO_REBUILD_CORRUPT_ENV} to move it aside and rebuild it; "
                                 "find what writes into the store (a VM run on a store file, a manual edit)")
        where = self.root / ".corrupt" / f"{node.key}-{node.store_name}-{int(time.time())}"
        with self.lock(node.key):
            if self.meta_path(node).is_file():
                where.mkdir(parents=True, exist_ok=True)
                for part in (self.path(node), self.meta_path(node), self.log_path(node), self.seal_path(node.key),
                             self.provenance_path(node)):
                    if part.exists():
                        os.rename(part, where / part.name)
                (where / "NOTE").write_text(f"{node.task_name} was corrupted in the store: {shown}\n")
        sys.stderr.write(f"  WARNING: store entry {node.key}-{node.store_name} ({node.task_name}) is CORRUPT: "
                         f"{shown}; moved to {where}, it will be rebuilt\n")

    def input_path(self, value: Input) -> Path:
        """The path a builder sees for an input: a derivation's output dir, a source's file."""
        if isinstance(value, FixedOutput):
            return self.path(value) / value.filename
        if isinstance(value, Node):
            return self.path(value)
        return value.path.absolute()

    @contextmanager
    def lock(self, key: str, on_wait: Callable[[str], None] | None = None, *, shared: bool = False,
             waiting: str = "") -> Iterator[None]:
        """flock `store/.locks/<key>.lock` (opened without following links and never truncated)."""
        self._ensure()
        if self.read_only:
            raise EulerbakeError(f"the store {self.root} is read-only here: nothing can be built or changed in it",
                                 hint="point EULERBAKE_STORE at a writable store (a read-only one serves what it has)")
        path = self.root / ".locks" / f"{key}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise EulerbakeError(f"{path} is a symbolic link; the store refuses to follow it",
                                     hint=f"remove {path} (lock files are plain files the store creates)") from exc
            raise
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    on_wait(waiting or f"waiting for another build of {key} to finish")
                fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # -- building -----------------------------------------------------------------------------
    def realise(self, node: Node, log: Callable[[str], None] = print, _seen: set[str] | None = None) -> Realised:
        """Make sure `node` and everything it depends on is in the store; build what is missing.

        The whole realisation holds the store's gc lock shared: `store gc` (exclusive) never deletes an
        entry a build in any checkout is using or making.
        """
        self._ensure()
        if _seen is None:
            with self.lock(GC_LOCK, log, shared=True, waiting="waiting for `eulerbake store gc` to finish"):
                return self.realise(node, log, set())
        seen = _seen
        if self.has(node):  # a committed entry needs nothing below it (a cache hit may have cut its inputs)
            return Realised(node, self.path(node), built=False)
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
            for substituter in self.substituters:
                if self._substitute(substituter, node, log):
                    return Realised(node, self.path(node), built=False, substituted=True)
            self._build(node, log)
        return Realised(node, self.path(node), built=True)

    def substitute(self, node: Node, log: Callable[[str], None] = print) -> bool:
        """Fill `node`'s entry from the substituters without realising its inputs (a planned cache hit);
        False when none has it or every one was refused."""
        with self.lock(node.key, on_wait=log):
            if self.has(node):
                return True
            self._discard_leftovers(node)
            return any(self._substitute(substituter, node, log) for substituter in self.substituters)

    def _substitute(self, substituter: Substituter, node: Node, log: Callable[[str], None]) -> bool:
        """Try to fill `node`'s entry from a substituter (a cache); False when it has none or it is refused."""
        tmp = Path(tempfile.mkdtemp(prefix=f"{node.key}-", dir=self.root / ".tmp"))
        try:
            meta = substituter.fetch(node, tmp / "out", log)
            if meta is None:
                return False
            envelope = meta.pop("provenance", None)
            provenance = None
            if envelope is not None:  # its builder's, as the cache gave it
                provenance = tmp / "provenance.json"
                provenance.write_bytes(envelope)
            extra = {k: v for k, v in meta.items() if k not in ("key", "name", "task", "kind", "manifest", "output")}
            extra["substituted_from"] = substituter.url
            self.commit(node, tmp, source_date_epoch(node), extra, expected_output_hash=meta["output"]["hash"],
                        provenance=provenance)
            log(f"{node.task_name}: substituted from {substituter.url}")
            return True
        except EulerbakeError as err:
            log(f"{node.task_name}: not taken from {substituter.url}: {err.message}; building it instead")
            return False
        finally:
            remove_tree(tmp)

    def _discard_leftovers(self, node: Node) -> None:
        remove_tree(self.path(node))
        self.provenance_path(node).unlink(missing_ok=True)  # an orphan: provenance is renamed in after the metadata
        self.seal_path(node.key).unlink(missing_ok=True)
        for stale in (self.root / ".tmp").glob(f"{node.key}-*"):
            remove_tree(stale)

    def log_path(self, node: Node) -> Path:
        """The log of the build that made `node`'s entry: `store/<key>-<name>.log`."""
        return self.root / f"{node.key}-{node.store_name}.log"

    def provenance_path(self, node: Node) -> Path:
        """The signed provenance of `node`'s entry: `store/<key>-<name>.provenance.json` (see `provenance`)."""
        return self.root / f"{node.key}-{node.store_name}{PROVENANCE_SUFFIX}"

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
                input_keys={name: value.key for name, value in getattr(node, "inputs", {}).items()
                            if isinstance(value, Node)},
            )
            (work / ".tmp").mkdir()
            with recording(tmpdir=work / ".tmp") as recorder:
                build_log.recorder = recorder
                try:
                    node.build(ctx)
                except EulerbakeError as err:
                    build_log.failure(str(err))
                    if "No space left on device" in str(err):
                        raise self._no_space(node, tmp) from err
                    raise
                except OSError as exc:
                    build_log.failure(f"{type(exc).__name__}: {exc}")
                    if exc.errno == errno.ENOSPC:
                        raise self._no_space(node, tmp) from exc
                    raise EulerbakeError(f"builder for {node.task_name} failed: {exc}",
                                         hint="see the traceback above (run with -v 2)") from exc
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
            meta_extra = {
                "tools": {tool: node.manifest.get("tools", {}).get(tool, "") for tool in sorted(recorder.tools)},
                "built_at": int(started),
                "build_seconds": round(time.time() - started, 3),
                "built_by": {"engine": __version__, "host": socket.gethostname()},
            }
            build_log.write(tmp / "build.log", ok=True)
            self.commit(node, tmp, epoch, meta_extra, log_file=tmp / "build.log", secrets=ctx.secrets)
        except BaseException:
            try:
                build_log.write(tmp / "build.log", ok=False)
                os.replace(tmp / "build.log", self.failed_log_path(node))
            except OSError:
                pass
            raise
        finally:
            remove_tree(tmp)

    def commit(self, node: Node, tmp: Path, epoch: int, meta_extra: dict[str, Any], *,
               log_file: Path | None = None, expected_output_hash: str | None = None,
               secrets: Mapping[str, str] | None = None, provenance: Path | None = None) -> None:
        """Seal `tmp/out`, record it and commit it as `node`'s entry: the only way anything enters the store.

        Builds and substitutions (a cache download unpacked into `tmp/out`) both end here: sealed, hashed
        from disk, seal record, metadata, then renames — output, seal record, metadata (the commit point),
        log. With `expected_output_hash` (what the cache says it holds) a different hash commits nothing.
        With a signing key (EULERBAKE_SIGNING_KEY_FILE) a build's signed provenance is made from `tmp/out`
        before any rename and renamed in right after the metadata; a failure to make it commits nothing.
        A substituted entry keeps the provenance its builder signed, as the cache gave it (`provenance`).
        """
        out = tmp / "out"
        seal.seal(out, epoch)
        known = node.known_output_hash()
        if known is not None and isinstance(node, FixedOutput) and expected_output_hash is None:
            output_hash, hashes = known, {node.filename: node.blake3}
        else:
            output_hash, hashes = hashing.hash_tree_files(out)
        if expected_output_hash is not None and output_hash != expected_output_hash:
            raise EulerbakeError(
                f"the output of {node.task_name} hashes to {output_hash[:16]}…, not the {expected_output_hash[:16]}… "
                "it should; nothing was committed",
                hint="the cache entry is corrupt or forged: remove it from the cache (eulerbake cache verify)",
            )
        (tmp / "seal.json").write_text(seal.dumps(seal.record(out, hashes)))
        meta = {
            "key": node.key,
            "name": node.store_name,
            "task": node.task_name,
            "kind": node.kind,
            "manifest": node.manifest,
            "output": {"hash": output_hash, "size": hashing.tree_size(out)},
            **meta_extra,
        }
        meta_tmp = tmp / "meta.json"
        with meta_tmp.open("w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if "substituted_from" not in meta_extra:
            from eulerbake.provenance.statement import commit_provenance  # lazy: provenance sits above the store

            provenance = commit_provenance(self, node, meta, tmp, secrets=secrets, log_file=log_file)
        os.rename(out, self.path(node))
        os.rename(tmp / "seal.json", self.seal_path(node.key))
        os.rename(meta_tmp, self.meta_path(node))  # the commit point
        if provenance is not None:
            os.rename(provenance, self.provenance_path(node))  # after it: never a provenance without its entry
        if log_file is not None:
            os.rename(log_file, self.log_path(node))  # after it: never a log without its entry
        self.failed_log_path(node).unlink(missing_ok=True)
        _fsync_dir(self.root)

    def _no_space(self, node: Node, tmp: Path) -> EulerbakeError:
        used = hashing.tree_size(tmp) if tmp.exists() else 0
        free = shutil.disk_usage(self.root).free
        return EulerbakeError(
            f"no space left on {self.root} while building {node.task_name} (it had written {used / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB are free); nothing was committed",
            hint=f"free space on the store's filesystem (eulerbake store gc) or move the store: EULERBAKE_STORE; "
            f"need at least ~{max(1.0, used * 2 / 2**30):.0f} GiB",
        )

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
        """Metadata of every committed entry, sorted by name (garbled ones are left to `anomalies`)."""
        if not self.root.is_dir():
            return []
        found = []
        for meta_file in sorted(self.root.glob("*.json")):
            if meta_file.with_suffix("").is_dir():
                try:
                    found.append(self.read_meta(meta_file))
                except EulerbakeError:
                    continue
        return found

    @staticmethod
    def read_meta(meta_file: Path) -> dict[str, Any]:
        """An entry's metadata; garbled metadata is one error naming the file."""
        try:
            with meta_file.open() as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or any(field not in meta for field in META_FIELDS):
                raise ValueError(f"not an entry's metadata (needs {', '.join(META_FIELDS)})")
        except (OSError, ValueError) as exc:
            raise EulerbakeError(f"store metadata {meta_file} is unreadable: {exc}",
                                 hint="run `eulerbake store verify --repair` to move the broken entry aside") from exc
        meta["path"] = str(meta_file.with_suffix(""))
        return dict(meta)

    def anomalies(self) -> list[tuple[Path, str]]:
        """What in the store is not a whole entry: garbled metadata, orphans, strays (not builds in flight)."""
        found: list[tuple[Path, str]] = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith("."):
                continue
            match = ENTRY_RE.match(path.name)
            if match is None:
                found.append((path, "stray: not a store entry (expected <key>-<name>[.json|.log])"))
                continue
            base, key, suffix = self.root / match.group(1), match.group(2), match.group(3)
            if suffix == ".json":
                if not base.is_dir():
                    found.append((path, "orphaned metadata: its output directory is gone"))
                    continue
                try:
                    self.read_meta(path)
                except EulerbakeError as err:
                    found.append((path, err.message))
            elif suffix == ".log":
                if not Path(f"{base}.json").is_file():
                    found.append((path, "orphaned build log: no entry"))
            elif suffix == ".provenance.json":
                if not Path(f"{base}.json").is_file():
                    found.append((path, "orphaned provenance: no entry"))
            elif not Path(f"{path}.json").is_file() and not self._building(key):
                found.append((path, "orphaned output: no metadata (a build was killed before its commit)"))
        return found

    def _building(self, key: str) -> bool:
        """Whether a build of `key` holds its lock right now."""
        try:
            fd = os.open(self.root / ".locks" / f"{key}.lock", os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def repair(self, paths: Iterable[Path]) -> Path:
        """Move broken things to `store/.corrupt/repair-<time>/`: a broken entry's files go together
        (output, metadata, log, seal record); returns that folder."""
        where = self.root / ".corrupt" / f"repair-{int(time.time())}"
        where.mkdir(parents=True, exist_ok=True)
        for path in paths:
            match = ENTRY_RE.match(path.name)
            parts = [path]
            if match is not None and path.parent == self.root:
                base = self.root / match.group(1)
                parts = [base, Path(f"{base}.json"), Path(f"{base}.log"), Path(f"{base}.provenance.json"),
                         self.seal_path(match.group(2))]
            for part in parts:
                if part.exists() or part.is_symlink():
                    os.rename(part, where / part.name)
        return where

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
            sealed = self.seal_problems(meta["key"], path)
            if sealed:
                problems.append((meta, "; ".join(sealed[:3])))
            elif actual != recorded:
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
            Path(str(path) + ".provenance.json").unlink(missing_ok=True)
            self.seal_path(meta["key"]).unlink(missing_ok=True)
            _intact.discard((str(self.root), meta["key"]))

    def gc(self, keep_keys: set[str], dry_run: bool = False, log: Callable[[str], None] = print
           ) -> list[dict[str, Any]]:
        """Remove entries whose key is not in `keep_keys` (plus the inputs those need) and temp dirs.

        Holds the store's gc lock exclusively: it waits for builds in flight (in any checkout sharing the
        store) and no build starts until it is done. Entries named in `store/.roots/` are kept too.
        """
        with self.lock(GC_LOCK, log, waiting="waiting for builds using this store to finish before gc"):
            return self._gc(keep_keys, dry_run)

    def _gc(self, keep_keys: set[str], dry_run: bool) -> list[dict[str, Any]]:
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
