"""Binary caches: store entries shared through a directory (`file:///mnt/cache`) or an S3 bucket
(`s3://bucket/prefix`), signed with ed25519, so a runner or a laptop takes what another machine built.

Layout (the same on both backends, like a Nix binary cache):
- `entries/<key>.json` — the entry's metadata: key, name, task, output hash and size, references (the
  keys of its inputs), the archive's compression, blake3 and size, the manifest, and `signatures`. The
  signature is over a canonical fingerprint of exactly those fields
  (`1;<key>-<name>;<task>;<output hash>;<output size>;<ref,ref…>;<compression>;<archive hash>;<archive size>`),
  so a reader needs the public key only, never the secret one.
- `archives/<blake3>.tar.zst` — the entry as one archive (`store.archive`), named by its own hash: two
  entries with the same bytes share it, and a name can never hold other bytes unnoticed.
- `provenance/<sha256>.json` — the entry's provenance envelope as its builder signed it (when it was
  signed), named by its sha256, which the metadata's `provenance` field gives; a runner that takes the
  entry keeps it beside the entry, so `eulerbake audit` works there as where it was built. The envelope
  carries its own signature: the entry's signature does not cover it.

Publishing order is what keeps readers safe without a server: the archive first, the signed metadata
last and only once every reference's metadata is there, written with a conditional create (S3
`If-None-Match: *`, a directory's `link()`), so two runners pushing one key leave one valid entry and a
reader never sees metadata whose archive is not complete. Fetching checks, in order: the signature by a
trusted key (unless explicitly disabled), the archive's size and blake3, then unpacks into the store's
temp dir; the store re-hashes what was unpacked and commits it exactly as it commits a build.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import blake3

from eulerbake.core import hashing
from eulerbake.core.derivation import Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.store import archive
from eulerbake.store.local import PROVENANCE_SUFFIX, Store
from eulerbake.store.signing import PublicKey, SecretKey, check_signatures, parse_public_keys

ENTRY_FORMAT = "eulerbake-cache-entry/1"
FINGERPRINT_VERSION = "1"
DEFAULT_PRIORITY = 50  # lower is asked first (Nix: cache.nixos.org is 40)
QUERY_THREADS = 16
SUBSTITUTERS_ENV = "EULERBAKE_SUBSTITUTERS"
TRUSTED_KEYS_ENV = "EULERBAKE_TRUSTED_PUBLIC_KEYS"
SIGNING_KEY_ENV = "EULERBAKE_SIGNING_KEY_FILE"
REQUIRE_SIGNATURES_ENV = "EULERBAKE_REQUIRE_SIGNATURES"
PUSH_TO_ENV = "EULERBAKE_PUSH_TO"
CONFIG_KEYS = ("substituters", "trusted-public-keys", "require-signatures", "push-to")
MAX_PROVENANCE_BYTES = 16 * 2**20  # an envelope is a few KiB: more is not one
PROVENANCE_DIR = "provenance"  # the cache's folder of envelopes (`provenance_name`)

Log = Callable[[str], None]


class CacheUnavailable(EulerbakeError):
    """The cache cannot be asked at all (no such bucket, no credentials, access denied)."""


# -- backends -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    name: str  # relative to the cache root, e.g. `entries/<key>.json`
    size: int
    modified: float  # seconds since the epoch


class Backend(Protocol):
    """Where a cache keeps its files: a few object-store verbs, nothing more."""

    url: str

    def read(self, name: str) -> bytes | None: ...

    def sizes(self, names: Sequence[str]) -> dict[str, int]:
        """The size of each of `names` that exists (missing ones are left out)."""
        ...

    def download(self, name: str, dest: Path) -> None: ...

    def open(self, name: str, size: int) -> BinaryIO:
        """A reader of the first `size` bytes of `name` (the caller hashes and counts what it reads)."""
        ...

    def upload(self, name: str, path: Path) -> None:
        """Put a file whose name is its content's hash (a replace is harmless)."""
        ...

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist, atomically; False when it already does."""
        ...

    def listing(self, prefix: str) -> Iterator[Listed]: ...

    def delete(self, name: str) -> None: ...


class DirectoryBackend:
    """A cache in a directory (a shared volume, an NFS mount, a USB disk)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"

    def _path(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheUnavailable(f"cannot read {self._path(name)}: {exc.strerror}",
                                   hint=f"check that {self.root} is mounted and readable") from exc

    def sizes(self, names: Sequence[str]) -> dict[str, int]:
        found = {}
        for name in names:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                found[name] = self._path(name).stat().st_size
        return found

    def download(self, name: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(name), dest)
        except FileNotFoundError as exc:
            raise EulerbakeError(f"{self.url}/{name} is missing", hint="eulerbake cache verify") from exc
        except OSError as exc:
            raise CacheUnavailable(f"cannot read {self._path(name)}: {exc.strerror}",
                                   hint=f"check that {self.root} is mounted and readable") from exc

    def open(self, name: str, size: int) -> BinaryIO:
        try:
            return self._path(name).open("rb")
        except FileNotFoundError as exc:
            raise EulerbakeError(f"{self.url}/{name} is missing", hint="eulerbake cache verify") from exc

    def _temporary(self, name: str) -> Path:
        directory = self._path(name).parent
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f".tmp-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"

    def upload(self, name: str, path: Path) -> None:
        temporary = self._temporary(name)
        try:
            with path.open("rb") as source, temporary.open("wb") as target:
                while chunk := source.read(archive.CHUNK):
                    target.write(chunk)
                target.flush()
                os.fsync(target.fileno())
            os.chmod(temporary, 0o644)
            os.replace(temporary, self._path(name))
        finally:
            temporary.unlink(missing_ok=True)

    def create(self, name: str, data: bytes) -> bool:
        temporary = self._temporary(name)
        try:
            with temporary.open("wb") as target:
                target.write(data)
                target.flush()
                os.fsync(target.fileno())
            os.chmod(temporary, 0o644)
            try:
                os.link(temporary, self._path(name))  # atomic, and fails if the name exists: If-None-Match
            except FileExistsError:
                return False
            except OSError as exc:  # a filesystem without hard links: exclusive create, then the bytes
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                try:
                    fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as target:
                    target.write(data)
            with contextlib.suppress(OSError):
                fd = os.open(self._path(name).parent, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            return True
        finally:
            temporary.unlink(missing_ok=True)

    def listing(self, prefix: str) -> Iterator[Listed]:
        directory = self._path(prefix)
        if not directory.is_dir():
            return
        for path in sorted(directory.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                yield Listed(f"{prefix.rstrip('/')}/{path.name}", st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)


class S3Backend:
    """A cache in an S3 bucket (AWS, MinIO, Ceph, moto): the boto3 credential chain, any `endpoint_url`."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 profile: str | None = None, anonymous: bool = False) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.profile = profile
        self.anonymous = anonymous
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3  # ~0.3 s to import: only when an S3 cache is really used
                from botocore import UNSIGNED
                from botocore.config import Config

                config = Config(
                    max_pool_connections=QUERY_THREADS * 2,
                    retries={"max_attempts": 4, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=120,
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                    signature_version=UNSIGNED if self.anonymous else None,
                )
                session = boto3.session.Session(profile_name=self.profile)
                self._client = session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                              config=config)
            return self._client

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _failure(self, exc: Exception, what: str) -> CacheUnavailable:
        code = (_error_code(exc) or type(exc).__name__)
        hint = "check the bucket name, the endpoint_url and the credentials (the standard AWS chain)"
        if code in ("403", "AccessDenied"):
            hint = ("readers need s3:GetObject and s3:ListBucket (without ListBucket S3 answers 403 for a key that "
                    "does not exist); writers s3:PutObject too")
        elif code in ("NoCredentialsError", "PartialCredentialsError"):
            hint = "give AWS credentials the standard way (AWS_PROFILE, env, instance role), or ?anonymous=1"
        return CacheUnavailable(f"{self.url}: {what} failed: {code}: {exc}", hint=hint)

    @staticmethod
    def _missing(exc: Exception) -> bool:
        code = _error_code(exc)
        return code in ("404", "NoSuchKey", "NotFound")

    def read(self, name: str) -> bytes | None:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except Exception as exc:
            if self._missing(exc):
                return None
            raise self._failure(exc, f"reading {name}") from exc
        return body

    def _size(self, name: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"])
        except Exception as exc:
            if self._missing(exc):
                return None
            raise self._failure(exc, f"asking for {name}") from exc

    def sizes(self, names: Sequence[str]) -> dict[str, int]:
        if not names:
            return {}
        with ThreadPoolExecutor(max_workers=min(QUERY_THREADS, len(names))) as pool:
            answers = list(pool.map(self._size, names))
        return {name: size for name, size in zip(names, answers, strict=True) if size is not None}

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024,
                              max_concurrency=8, use_threads=True)

    def download(self, name: str, dest: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(name), str(dest), Config=self._transfer_config())
        except Exception as exc:
            if self._missing(exc):
                raise EulerbakeError(f"{self.url}/{name} is missing", hint="eulerbake cache verify") from exc
            raise EulerbakeError(f"downloading {self.url}/{name} failed: {type(exc).__name__}: {exc}",
                                 hint="a network problem: run the build again (the entry is built meanwhile)") from exc

    def open(self, name: str, size: int) -> BinaryIO:
        return _RangedReader(self, self._key(name), size)  # type: ignore[return-value]

    def upload(self, name: str, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(name), Config=self._transfer_config(),
                                    ExtraArgs={"ContentType": "application/zstd"})
        except Exception as exc:
            raise self._failure(exc, f"uploading {name}") from exc

    def create(self, name: str, data: bytes) -> bool:
        for attempt in range(5):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, IfNoneMatch="*",
                                       ContentType="application/json")
                return True
            except Exception as exc:
                code = _error_code(exc)
                if code in ("PreconditionFailed", "412"):
                    return False
                if code == "ConditionalRequestConflict" and attempt < 4:  # a concurrent create: ask again
                    time.sleep(0.2 * (attempt + 1))
                    if self._size(name) is not None:
                        return False
                    continue
                raise self._failure(exc, f"writing {name}") from exc
        return False

    def listing(self, prefix: str) -> Iterator[Listed]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix.rstrip("/") + "/"))
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.prefix) + 1:] if self.prefix else item["Key"]
                    yield Listed(name, int(item["Size"]), item["LastModified"].timestamp())
        except CacheUnavailable:
            raise
        except Exception as exc:
            raise self._failure(exc, f"listing {prefix}") from exc

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            raise self._failure(exc, f"deleting {name}") from exc


def _error_code(exc: Exception) -> str:
    """The S3 error code of a botocore exception ('' for others, e.g. a connection cut mid-body)."""
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


class _RangedReader(io.RawIOBase):
    """An S3 object read as one stream, fetched as parallel ranged GETs a few parts ahead (what
    `download_file` does, but in order, so unpacking starts with the first part instead of after the last)."""

    PART = 8 * 1024 * 1024
    AHEAD = 6

    def __init__(self, backend: S3Backend, key: str, size: int) -> None:
        super().__init__()
        self.backend, self.key, self.size = backend, key, size
        self.pool = ThreadPoolExecutor(max_workers=self.AHEAD)
        self.parts: collections.deque[Future[bytes]] = collections.deque()
        self.next_start = 0
        self.current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _get(self, start: int, end: int) -> bytes:
        for attempt in range(3):
            try:
                body: bytes = self.backend.client.get_object(Bucket=self.backend.bucket, Key=self.key,
                                                             Range=f"bytes={start}-{end}")["Body"].read()
                return body
            except Exception as exc:
                if _error_code(exc) == "InvalidRange":
                    return b""  # the object is shorter than signed: the caller counts the bytes and says so
                if self.backend._missing(exc) or attempt == 2:
                    raise EulerbakeError(f"downloading {self.backend.url}/{self.key} failed at byte {start}: "
                                         f"{type(exc).__name__}: {exc}",
                                         hint="a network problem: run the build again") from exc
        raise AssertionError("unreachable")

    def _fill(self) -> None:
        while len(self.parts) < self.AHEAD and self.next_start < self.size:
            end = min(self.next_start + self.PART, self.size) - 1
            self.parts.append(self.pool.submit(self._get, self.next_start, end))
            self.next_start = end + 1

    def readinto(self, buffer: Any) -> int:
        if not self.current:
            self._fill()
            if not self.parts:
                return 0
            self.current = memoryview(self.parts.popleft().result())
            self._fill()
            if not self.current:  # an empty range: the object is shorter than asked for
                return 0
        count = min(len(buffer), len(self.current))
        buffer[:count] = self.current[:count]
        self.current = self.current[count:]
        return count

    def close(self) -> None:
        for part in self.parts:
            part.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        super().close()


class _Counted:
    """A reader that hashes and counts what passes, and never reads past `limit` bytes."""

    def __init__(self, source: BinaryIO, limit: int) -> None:
        self.source, self.limit = source, limit
        self.hasher = blake3.blake3()  # one thread: the reads are small (threads cost more than they save)
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        want = self.limit - self.count if size < 0 else min(size, self.limit - self.count)
        data = self.source.read(want) if want > 0 else b""
        self.hasher.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) the rest, up to the signed size."""
        while self.read(archive.CHUNK):
            pass


def _truthy(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def parse_url(url: str) -> tuple[Backend, int]:
    """A backend and its priority from `file:///path?priority=N` or `s3://bucket/prefix?endpoint_url=…`."""
    parsed = urllib.parse.urlsplit(url.strip())
    params = {name: values[-1] for name, values in urllib.parse.parse_qs(parsed.query).items()}
    priority_text = params.pop("priority", str(DEFAULT_PRIORITY))
    try:
        priority = int(priority_text)
    except ValueError:
        raise EulerbakeError(f"substituter {url}: priority {priority_text!r} is not a number") from None
    backend: Backend
    if parsed.scheme == "file" or (not parsed.scheme and url.startswith("/")):
        path = urllib.parse.unquote(parsed.path)
        if not path.startswith("/") or parsed.netloc:
            raise EulerbakeError(f"substituter {url}: a directory cache needs an absolute path (file:///mnt/cache)")
        backend = DirectoryBackend(Path(path))
    elif parsed.scheme == "s3":
        if not parsed.netloc:
            raise EulerbakeError(f"substituter {url}: no bucket", hint="write s3://BUCKET/PREFIX")
        known = {"endpoint_url", "region", "profile", "anonymous"}
        backend = S3Backend(parsed.netloc, parsed.path, endpoint_url=params.pop("endpoint_url", None),
                            region=params.pop("region", None), profile=params.pop("profile", None),
                            anonymous=_truthy(params.pop("anonymous", "")))
        params = {name: value for name, value in params.items() if name not in known}
    else:
        raise EulerbakeError(f"substituter {url}: unknown scheme {parsed.scheme!r}",
                             hint="use file:///PATH or s3://BUCKET/PREFIX")
    if params:
        raise EulerbakeError(f"substituter {url}: unknown parameter(s) {', '.join(sorted(params))}",
                             hint="known: priority; for s3: endpoint_url, region, profile, anonymous")
    return backend, priority


# -- entry metadata -----------------------------------------------------------------------------------


def fingerprint(meta: Mapping[str, Any]) -> bytes:
    """What a signature covers: every field a reader acts on, in a fixed order (Nix's narinfo fingerprint)."""
    output, packed = meta["output"], meta["archive"]
    references = ",".join(sorted(meta.get("references", [])))
    return ";".join([FINGERPRINT_VERSION, f"{meta['key']}-{meta['name']}", str(meta["task"]), str(output["hash"]),
                     str(int(output["size"])), references, str(packed["compression"]), str(packed["hash"]),
                     str(int(packed["size"]))]).encode()


def archive_name(archive_hash: str) -> str:
    return f"archives/{archive_hash}{archive.SUFFIX}"


def entry_name(key: str) -> str:
    return f"entries/{key}.json"


def provenance_name(sha256: str) -> str:
    return f"{PROVENANCE_DIR}/{sha256}.json"


def _label(meta: Mapping[str, Any]) -> str:
    return f"{meta.get('key', '?')}-{meta.get('name', '?')}"


def _well_formed(meta: Any) -> str | None:
    """Why a parsed metadata document is not a cache entry's (None when it is)."""
    try:
        if not isinstance(meta, dict) or meta.get("format") != ENTRY_FORMAT:
            return f"its format is not {ENTRY_FORMAT}"
        fingerprint(meta)
        if not isinstance(meta.get("signatures", []), list):
            return "its signatures are not a list"
        if not all(isinstance(ref, str) for ref in meta.get("references", [])):
            return "its references are not keys"
    except (KeyError, TypeError, ValueError) as exc:
        return f"it lacks a field ({exc})"
    return None


@dataclass
class PushResult:
    label: str
    status: str  # "pushed", or "present" (the cache had it: earlier, or another runner was faster)
    archive_bytes: int = 0
    seconds: float = 0.0


@dataclass
class Problem:
    label: str
    reason: str
    key: str = ""


class Refused(EulerbakeError):
    """A cache entry that must not be used; the message names the entry and the reason."""


# -- the cache ----------------------------------------------------------------------------------------


@dataclass
class Cache:
    """One binary cache: query, fetch (the store's `Substituter`), push, list, verify and gc."""

    backend: Backend
    trusted: Sequence[PublicKey] = ()
    require_signatures: bool = True
    priority: int = DEFAULT_PRIORITY
    _absent: set[str] = field(default_factory=set, repr=False)  # keys the last query found missing
    _refused: dict[str, str] = field(default_factory=dict, repr=False)  # keys refused in this process, why
    url: str = field(init=False)  # the `Substituter` protocol's: recorded as `substituted_from`
    _unavailable: str = field(default="", repr=False)  # why the last query failed: not asked again

    def __post_init__(self) -> None:
        self.url = self.backend.url

    # -- reading --------------------------------------------------------------------------------
    def query(self, keys: Iterable[str]) -> set[str]:
        """Which of `keys` the cache holds, asked in one batch (parallel requests)."""
        wanted = sorted(set(keys))
        try:
            sizes = self.backend.sizes([entry_name(key) for key in wanted])
        except CacheUnavailable as err:
            self._unavailable = err.message
            raise
        self._unavailable = ""
        found = {name.removeprefix("entries/").removesuffix(".json") for name in sizes}
        self._absent.update(set(wanted) - found)
        self._absent.difference_update(found)
        return found

    def read_entry(self, key: str) -> dict[str, Any] | None:
        """An entry's metadata as stored (not verified); None when the cache has no such key."""
        raw = self.backend.read(entry_name(key))
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = None
        problem = _well_formed(meta)
        if problem:
            raise Refused(f"cache entry {key} at {self.url} is unreadable: {problem}",
                          hint="remove it: eulerbake cache verify --delete")
        assert isinstance(meta, dict)
        return meta

    def check_signature(self, meta: Mapping[str, Any]) -> str | None:
        """The trusted key that signed `meta`, None when signatures are not required and none verified.

        Raises Refused when signatures are required and none by a trusted key verifies."""
        verdict = check_signatures(fingerprint(meta), meta.get("signatures", []), self.trusted)
        if verdict.signer is None and self.require_signatures:
            hint = ("add the cache's public key to trusted-public-keys ([tool.eulerbake] or "
                    f"{TRUSTED_KEYS_ENV})" if not self.trusted else "remove the entry: eulerbake cache verify --delete")
            raise Refused(f"cache entry {_label(meta)} refused: {verdict.reason}", hint=hint)
        return verdict.signer

    def fetch(self, node: Node, out: Path, log: Log) -> dict[str, Any] | None:
        """`Substituter.fetch`: signature → archive size and hash → unpack into `out`; the metadata for the store."""
        if node.key in self._absent or self._unavailable:  # the plan's answer (a cache found down stays down)
            return None
        if node.key in self._refused:  # refused once in this process: no second download, no second message
            return None
        try:
            return self._fetch(node, out, log)
        except EulerbakeError as err:
            if isinstance(err, Refused | archive.UnsafeArchive):
                self._refused[node.key] = err.message
            raise

    def _fetch(self, node: Node, out: Path, log: Log) -> dict[str, Any] | None:
        started = time.monotonic()
        meta = self.read_entry(node.key)
        if meta is None:
            self._absent.add(node.key)
            return None
        label = f"{node.key}-{node.store_name}"
        if meta["key"] != node.key or meta["name"] != node.store_name:
            raise Refused(f"cache entry {label} refused: its metadata is for {_label(meta)}")
        signer = self.check_signature(meta)
        known = node.known_output_hash()
        if known is not None and meta["output"]["hash"] != known:
            raise Refused(f"cache entry {label} refused: its output hash is not the one the pins give "
                          f"({str(meta['output']['hash'])[:16]}…, pinned {known[:16]}…)")
        packed = meta["archive"]
        if packed["compression"] != archive.COMPRESSION:
            raise Refused(f"cache entry {label} refused: unknown compression {packed['compression']!r}")
        log(f"{node.task_name}: fetching {_size(int(packed['size']))} from {self.url}")
        envelope = self._provenance(meta, label)
        unpacked = self._receive(meta, out, label)
        seconds = time.monotonic() - started
        log(f"{node.task_name}: unpacked {_size(unpacked.apparent_bytes)} ({_size(unpacked.written_bytes)} written) "
            f"in {seconds:.1f}s")
        substitution = {"signed_by": signer, "archive_hash": packed["hash"], "archive_bytes": int(packed["size"]),
                        "compression": packed["compression"], "seconds": round(seconds, 3)}
        fetched: dict[str, Any] = {"key": meta["key"], "name": meta["name"], "task": meta["task"],
                                   "output": dict(meta["output"]), "substitution": substitution}
        if envelope is not None:
            substitution["provenance_sha256"] = meta["provenance"]["sha256"]
            fetched["provenance"] = envelope
        return fetched

    def _provenance(self, meta: Mapping[str, Any], label: str) -> bytes | None:
        """The entry's provenance envelope, when its metadata names one: exactly the bytes it names."""
        named = meta.get("provenance")
        if named is None:
            return None
        try:
            digest, size = str(named["sha256"]), int(named["size"])
        except (KeyError, TypeError, ValueError):
            raise Refused(f"cache entry {label} refused: its provenance field is garbled",
                          hint="remove it: eulerbake cache verify --delete") from None
        data = self.backend.read(provenance_name(digest)) if 0 < size <= MAX_PROVENANCE_BYTES else None
        if data is None or len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise Refused(f"cache entry {label} refused: its provenance {provenance_name(digest)} is "
                          f"{'missing' if data is None else 'not the bytes its metadata names'}",
                          hint="push the entry again from the runner that built it, or remove it: "
                          "eulerbake cache verify --delete")
        return data

    def _receive(self, meta: Mapping[str, Any], out: Path, label: str) -> archive.Unpacked:
        """Stream the entry's archive into `out`: hashed and counted as it arrives, unpacked as it goes.

        Nothing is committed here: the store commits `out` only after this returns, i.e. after the size
        and the blake3 of every byte matched the signed ones (a mismatch raises, and the store discards
        `out`), and after it re-hashed the tree against the signed output hash. Unpacking already refuses
        unsafe members and more bytes than the signed output size while the bytes arrive.
        """
        packed = meta["archive"]
        name, size = archive_name(str(packed["hash"])), int(packed["size"])
        failure: EulerbakeError | None = None
        unpacked = None
        try:
            with contextlib.closing(self.backend.open(name, size)) as source:
                counted = _Counted(source, size)
                try:
                    unpacked = archive.unpack(counted, out, max_apparent_bytes=int(meta["output"]["size"]))  # type: ignore[arg-type]
                except archive.UnsafeArchive as exc:
                    failure = Refused(f"cache entry {label} refused: unsafe archive: {exc.reason}", hint=exc.hint)
                counted.drain()  # the hash covers every byte, whatever unpacking made of them
        except Refused:
            raise
        except EulerbakeError as err:
            raise EulerbakeError(f"cache entry {label} not fetched: {err.message}", hint=err.hint) from err
        except OSError as exc:
            raise EulerbakeError(f"cache entry {label} not fetched: {exc}", hint="run the build again") from exc
        if counted.count != size:  # (bytes past the signed size are never read: they cannot matter)
            raise Refused(f"cache entry {label} refused: its archive is truncated ({counted.count} bytes arrived, "
                          f"the metadata says {size})")
        got = counted.hasher.hexdigest()
        if got != packed["hash"]:  # checked before any unpacking error: the bytes themselves are wrong
            raise Refused(f"cache entry {label} refused: its archive hashes to {got[:16]}…, not the signed "
                          f"{str(packed['hash'])[:16]}… (the archive was changed)")
        if failure is not None:
            raise failure
        assert unpacked is not None
        return unpacked

    # -- writing --------------------------------------------------------------------------------
    def push(self, store: Store, meta: Mapping[str, Any], key: SecretKey | None, log: Log = print) -> PushResult:
        """Upload one store entry: its archive, then its signed metadata once every reference is here."""
        started = time.monotonic()
        label = _label(meta)
        if self.backend.sizes([entry_name(meta["key"])]):
            return PushResult(label, "present")
        references = sorted(set(Store.references(dict(meta))))
        missing = sorted(set(references) - self.query(references))
        if missing:
            raise EulerbakeError(
                f"cannot push {label} ({meta['task']}): {len(missing)} of its references are not in {self.url} "
                f"({', '.join(missing[:3])}{'…' if len(missing) > 3 else ''})",
                hint="push its inputs first: `eulerbake cache push TASK` pushes the task's whole closure, inputs first",
            )
        path = Path(meta["path"])
        with self._packing(store, meta["key"]) as temporary:
            problems = store.seal_problems(meta["key"], path)
            if problems:
                raise EulerbakeError(f"not pushing {label}: the store entry is not what was sealed ({problems[0]})",
                                     hint="eulerbake store verify --repair, then build it again")
            packed = archive.pack_file(path, temporary)
            name = archive_name(packed.hash)
            if self.backend.sizes([name]).get(name) != packed.size:  # archive first (shared when bytes are equal)
                self.backend.upload(name, temporary)
            provenance = self._push_provenance(Path(f"{path}{PROVENANCE_SUFFIX}"))
        document = self._document(meta, packed)
        if provenance is not None:
            document["provenance"] = provenance
        if key is not None:
            document["signatures"] = [key.sign(fingerprint(document))]
        body = json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"
        created = self.backend.create(entry_name(meta["key"]), body)  # metadata last: the commit point
        self._absent.discard(meta["key"])
        seconds = time.monotonic() - started
        if created:
            log(f"pushed {meta['task']} ({_size(packed.size)} archive of {_size(packed.apparent_bytes)}) to "
                f"{self.url} in {seconds:.1f}s")
        return PushResult(label, "pushed" if created else "present", packed.size, seconds)

    def _push_provenance(self, envelope: Path) -> dict[str, Any] | None:
        """Upload the entry's provenance envelope (before its metadata names it); None when it has none."""
        try:
            data = envelope.read_bytes()
        except FileNotFoundError:
            return None
        digest = hashlib.sha256(data).hexdigest()
        name = provenance_name(digest)
        if self.backend.sizes([name]).get(name) != len(data):  # as an archive: named by its hash, a replace is harmless
            self.backend.upload(name, envelope)
        return {"sha256": digest, "size": len(data)}

    @contextlib.contextmanager
    def _packing(self, store: Store, key: str) -> Iterator[Path]:
        """A temp file for the archive; the entry's lock held shared (no gc or repair deletes it meanwhile)."""
        if store.read_only:
            with tempfile.TemporaryDirectory(prefix="eulerbake-push-") as directory:
                yield Path(directory) / f"{key}{archive.SUFFIX}"
            return
        with store.lock(key, shared=True):
            fd, name = tempfile.mkstemp(prefix=f"{key}-push-", suffix=archive.SUFFIX, dir=store.root / ".tmp")
            os.close(fd)
            try:
                yield Path(name)
            finally:
                Path(name).unlink(missing_ok=True)

    @staticmethod
    def _document(meta: Mapping[str, Any], packed: archive.Packed) -> dict[str, Any]:
        return {
            "format": ENTRY_FORMAT,
            "key": meta["key"],
            "name": meta["name"],
            "task": meta["task"],
            "kind": meta.get("kind", ""),
            "output": {"hash": meta["output"]["hash"], "size": int(meta["output"]["size"])},
            "references": sorted(set(Store.references(dict(meta)))),
            "archive": {"hash": packed.hash, "size": packed.size, "compression": packed.compression,
                        "data_bytes": packed.data_bytes},
            "manifest": meta["manifest"],
            # Not signed, for people reading `cache info`: where and how long it took to build.
            "origin": {name: meta[name] for name in ("built_by", "built_at", "build_seconds", "tools") if name in meta},
            "signatures": [],
        }

    def push_all(self, store: Store, metas: Sequence[Mapping[str, Any]], key: SecretKey | None, log: Log = print
                 ) -> list[PushResult]:
        """Push entries in dependency order (every reference before the entries naming it)."""
        return [self.push(store, meta, key, log) for meta in dependency_order(metas)]

    # -- operating ------------------------------------------------------------------------------
    def listing(self) -> list[tuple[Listed, dict[str, Any] | None]]:
        """Every entry's listing and metadata (None for a garbled one), read in parallel."""
        listed = [item for item in self.backend.listing("entries") if item.name.endswith(".json")]

        def load(item: Listed) -> dict[str, Any] | None:
            try:
                return self.read_entry(item.name.removeprefix("entries/").removesuffix(".json"))
            except EulerbakeError:
                return None

        if not listed:
            return []
        with ThreadPoolExecutor(max_workers=min(QUERY_THREADS, len(listed))) as pool:
            return list(zip(listed, pool.map(load, listed), strict=True))

    def find(self, query: str) -> dict[str, Any]:
        """An entry by key, key prefix or task name."""
        if len(query) == 32:
            meta = self.read_entry(query)
            if meta is not None:
                return meta
        matches = [meta for _item, meta in self.listing()
                   if meta is not None and (meta["key"].startswith(query) or meta["task"] == query)]
        if not matches:
            raise EulerbakeError(f"{self.url} has no entry matching {query!r}", hint="eulerbake cache ls")
        if len(matches) > 1:
            raise EulerbakeError(f"{query!r} matches {len(matches)} entries in {self.url}",
                                 hint="give the key (eulerbake cache ls shows them)")
        return matches[0]

    def verify(self, metas: Sequence[Mapping[str, Any]], *, deep: bool = True, work: Path | None = None
               ) -> list[Problem]:
        """Check entries: signature, archive present with its size, references present, the provenance it
        names exactly those bytes; `deep` also downloads, hashes and unpacks each archive and re-hashes the
        tree against the signed output hash."""
        problems: list[Problem] = []
        keys = {meta["key"] for meta in metas}
        present = self.query({ref for meta in metas for ref in meta.get("references", [])} - keys) | keys
        sizes = self.backend.sizes([archive_name(str(meta["archive"]["hash"])) for meta in metas])
        for meta in metas:
            label, key = _label(meta), meta["key"]
            try:
                self.check_signature(meta)
            except Refused as err:
                problems.append(Problem(label, err.message.split(": ", 1)[-1], key))
                continue
            if hashing.hash_json(meta["manifest"])[: len(key)] != key:
                problems.append(Problem(label, "its manifest does not hash to its key", key))
            missing = [ref for ref in meta.get("references", []) if ref not in present]
            if missing:
                problems.append(Problem(label, f"references missing from the cache: {', '.join(missing)}", key))
            name = archive_name(str(meta["archive"]["hash"]))
            if name not in sizes:
                problems.append(Problem(label, "its archive is missing", key))
                continue
            if sizes[name] != int(meta["archive"]["size"]):
                problems.append(Problem(label, f"its archive is {sizes[name]} bytes, the metadata says "
                                        f"{meta['archive']['size']}", key))
                continue
            try:
                self._provenance(meta, label)
            except Refused as err:
                problems.append(Problem(label, err.message.split(": ", 1)[-1], key))
                continue
            if deep:
                problem = self._deep_check(meta, work)
                if problem:
                    problems.append(Problem(label, problem, key))
        return problems

    def _deep_check(self, meta: Mapping[str, Any], work: Path | None) -> str | None:
        with tempfile.TemporaryDirectory(prefix="eulerbake-verify-", dir=work) as directory:
            out = Path(directory) / "out"
            try:
                self._receive(meta, out, _label(meta))
            except EulerbakeError as err:
                return err.message.split(": ", 1)[-1] if " refused: " in err.message else err.message
            tree = hashing.hash_tree(out, use_cache=False)
            if tree != meta["output"]["hash"]:
                return f"its unpacked tree hashes to {tree[:16]}…, not the signed {str(meta['output']['hash'])[:16]}…"
        return None

    def delete_entry(self, key: str) -> None:
        """Remove an entry's metadata (its archive goes at the next gc, once no entry names it)."""
        self.backend.delete(entry_name(key))
        self._absent.add(key)

    def gc(self, *, older_than: float | None = None, grace: float = 24 * 3600, dry_run: bool = False,
           now: float | None = None) -> tuple[list[str], list[str]]:
        """Delete entries not written for `older_than` seconds that no newer entry references, then archives
        and provenance envelopes no entry names that are older than `grace` (a push in flight has uploaded
        them but not yet its metadata). Returns (entry names, archive and envelope names) deleted (or that
        would be, with `dry_run`)."""
        now = time.time() if now is None else now
        entries = self.listing()
        by_key = {meta["key"]: (item, meta) for item, meta in entries if meta is not None}
        doomed_entries = [item.name for item, meta in entries if meta is None and now - item.modified > grace]
        if older_than is not None:
            keep = {key for key, (item, _meta) in by_key.items() if now - item.modified <= older_than}
            stack = list(keep)
            while stack:
                for ref in by_key[stack.pop()][1].get("references", []):
                    if ref in by_key and ref not in keep:
                        keep.add(ref)
                        stack.append(ref)
            doomed_entries += [entry_name(key) for key in sorted(set(by_key) - keep)]
            by_key = {key: value for key, value in by_key.items() if key in keep}
        live = {archive_name(str(meta["archive"]["hash"])) for _item, meta in by_key.values()}
        live |= {provenance_name(str(meta["provenance"]["sha256"])) for _item, meta in by_key.values()
                 if isinstance(meta.get("provenance"), dict) and "sha256" in meta["provenance"]}
        doomed_archives = [item.name for prefix in ("archives", PROVENANCE_DIR) for item in self.backend.listing(prefix)
                           if item.name not in live and now - item.modified > grace]
        if not dry_run:
            for name in doomed_entries:  # metadata first: no reader is ever pointed at a deleted archive
                self.backend.delete(name)
            for name in doomed_archives:
                self.backend.delete(name)
        return doomed_entries, doomed_archives


def dependency_order(metas: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Store entries sorted so that each comes after the entries it references."""
    by_key = {meta["key"]: meta for meta in metas}
    ordered: list[Mapping[str, Any]] = []
    state: dict[str, int] = {}

    def visit(key: str) -> None:
        if state.get(key):
            return
        state[key] = 1
        for ref in sorted(Store.references(dict(by_key[key]))):
            if ref in by_key:
                visit(ref)
        state[key] = 2
        ordered.append(by_key[key])

    for key in sorted(by_key):
        visit(key)
    return ordered


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# -- configuration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSettings:
    """Where caches are and whom to trust: `[tool.eulerbake]` in pyproject.toml, overridden by the environment.

    ```toml
    [tool.eulerbake]
    substituters = ["file:///mnt/cache?priority=10", "s3://bucket/prefix?region=eu-west-1"]
    trusted-public-keys = ["ci-1:Gv0…="]
    # require-signatures = false   # accept unsigned entries (a private directory cache only)
    # push-to = "s3://bucket/prefix"   # default: the first substituter
    ```
    Environment: EULERBAKE_SUBSTITUTERS and EULERBAKE_TRUSTED_PUBLIC_KEYS (space-separated; set empty to
    turn caching off), EULERBAKE_REQUIRE_SIGNATURES=0, EULERBAKE_PUSH_TO, and EULERBAKE_SIGNING_KEY_FILE (only
    for pushing: the signing key never goes into a checked-in file).
    """

    substituters: tuple[str, ...] = ()
    trusted_public_keys: tuple[str, ...] = ()
    require_signatures: bool = True
    push_to: str | None = None
    signing_key_file: str | None = None

    @classmethod
    def load(cls, project_root: Path | None, environ: Mapping[str, str] | None = None) -> CacheSettings:
        environ = os.environ if environ is None else environ
        table: dict[str, Any] = {}
        pyproject = project_root / "pyproject.toml" if project_root is not None else None
        if pyproject is not None and pyproject.is_file():
            try:
                table = tomllib.loads(pyproject.read_text()).get("tool", {}).get("eulerbake", {})
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise EulerbakeError(f"cannot read {pyproject}: {exc}", hint="fix the TOML syntax") from exc
        substituters = _string_list(table, "substituters", pyproject)
        trusted = _string_list(table, "trusted-public-keys", pyproject)
        require = table.get("require-signatures", True)
        push_to = table.get("push-to")
        if not isinstance(require, bool) or (push_to is not None and not isinstance(push_to, str)):
            raise EulerbakeError(f"{pyproject}: [tool.eulerbake] require-signatures must be true or false and "
                                 "push-to a URL")
        if SUBSTITUTERS_ENV in environ:
            substituters = environ[SUBSTITUTERS_ENV].split()
        if TRUSTED_KEYS_ENV in environ:
            trusted = environ[TRUSTED_KEYS_ENV].split()
        if REQUIRE_SIGNATURES_ENV in environ:
            require = _truthy(environ[REQUIRE_SIGNATURES_ENV])
        push_to = environ.get(PUSH_TO_ENV) or push_to
        return cls(tuple(substituters), tuple(trusted), require, push_to, environ.get(SIGNING_KEY_ENV) or None)

    def trusted_keys(self) -> list[PublicKey]:
        return parse_public_keys(self.trusted_public_keys)

    def open(self, url: str) -> Cache:
        backend, priority = parse_url(url)
        return Cache(backend, self.trusted_keys(), self.require_signatures, priority)

    def caches(self) -> list[Cache]:
        """The substituters, highest priority (lowest number) first; the configured order breaks ties."""
        return sorted((self.open(url) for url in self.substituters), key=lambda cache: cache.priority)

    def push_cache(self, url: str | None = None) -> Cache:
        target = url or self.push_to or (self.substituters[0] if self.substituters else None)
        if target is None:
            raise EulerbakeError("no cache to push to", hint="configure substituters in [tool.eulerbake], "
                                 f"set {PUSH_TO_ENV}, or pass --to URL")
        return self.open(target)

    def signing_key(self, path: str | None = None) -> SecretKey | None:
        chosen = path or self.signing_key_file
        return SecretKey.load(Path(chosen)) if chosen else None


def _string_list(table: Mapping[str, Any], name: str, source: Path | None) -> list[str]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise EulerbakeError(f"{source}: [tool.eulerbake] {name} must be a list of strings")
    return list(value)


_opened: dict[CacheSettings, list[Cache]] = {}


def caches_for(settings: CacheSettings) -> list[Cache]:
    """The caches of `settings`, opened once per process (doit workers rebuild them from the settings)."""
    if settings not in _opened:
        _opened[settings] = settings.caches()
    return _opened[settings]
