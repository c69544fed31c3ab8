"""Rootless work on ext2/3/4 filesystem images: check, shrink, read and write files, never mounting.

A filesystem image here is a plain file holding exactly one filesystem: a partition copied out of a
disk image. Tools that change a filesystem only ever get such a standalone file, never
`disk.raw?offset=N`: resize2fs truncates the *whole file* to the new filesystem size when given an
offset (seen with e2fsprogs 1.47.0), wiping every later partition. Read-only tools (debugfs
without -w, e2fsck -n) may look inside a disk with `?offset=`.

Reproducibility: e2fsprogs 1.47.0 ignores SOURCE_DATE_EPOCH, but libext2fs takes every inode and
superblock time from E2FSPROGS_FAKE_TIME and e2fsck its "now" (last-check time) from E2FSCK_TIME.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from eulerbake.core.errors import EulerbakeError
from eulerbake.fs.disk import deallocate_zeroes
from eulerbake.tools.run import run

SUPERBLOCK_OFFSET = 1024
EXT_MAGIC = b"\x53\xef"  # s_magic 0xEF53, little-endian, at byte 0x38 of the superblock
MAX_SYMLINK_HOPS = 40  # like the kernel's limit
_BANNER_RE = re.compile(r"^(debugfs|e2fsck|resize2fs|tune2fs|mke2fs|dumpe2fs) \d+\.\d+")
# rdump restores owners; run as an ordinary user that fails, and the extracted copy does not need it.
_RDUMP_BENIGN = ("while changing ownership of",)


def fs_env(epoch: int) -> dict[str, str]:
    """Environment that pins every time e2fsprogs 1.47.0 writes to `epoch`."""
    return {"E2FSPROGS_FAKE_TIME": str(epoch), "E2FSCK_TIME": str(epoch), "SOURCE_DATE_EPOCH": str(epoch)}


def inside(disk: Path, offset: int) -> str:
    """`disk?offset=N`: a read-only view of the filesystem that starts at `offset` in a disk file."""
    return f"{disk}?offset={offset}" if offset else str(disk)


def _standalone(image: str | Path) -> Path:
    if "?" in str(image):
        raise EulerbakeError(
            f"refusing to modify {image}: filesystem changes need a standalone copy of the partition",
            hint="copy the partition out of the disk first (resize2fs truncates 'file?offset=' images)",
        )
    return Path(image)


def is_ext_filesystem(path: Path, offset: int = 0) -> bool:
    """True when an ext2/3/4 superblock starts at `offset` in `path`."""
    with path.open("rb") as handle:
        handle.seek(offset + SUPERBLOCK_OFFSET + 0x38)
        return handle.read(2) == EXT_MAGIC


def quote(path: str) -> str:
    """`path` as one debugfs command argument."""
    # debugfs splits its command lines on blanks and understands double quotes, nothing more.
    if '"' in path or "\n" in path:
        raise EulerbakeError(f"path {path!r} contains a double quote or newline, which debugfs cannot address")
    return f'"{path}"'


def _problems(stderr: str, benign: Iterable[str] = ()) -> list[str]:
    lines = [line.strip() for line in stderr.splitlines()]
    return [line for line in lines if line and not _BANNER_RE.match(line) and not any(b in line for b in benign)]


# -- superblock, check, resize ---------------------------------------------------------------


@dataclass(frozen=True)
class FilesystemInfo:
    uuid: str
    block_size: int
    block_count: int
    free_blocks: int
    features: tuple[str, ...]
    state: str
    journal_blocks: int = 0  # blocks of the internal journal (inode 8); 0 without one
    journal_features: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.block_size * self.block_count

    @property
    def used_bytes(self) -> int:
        return self.block_size * (self.block_count - self.free_blocks)


def info(image: str | Path) -> FilesystemInfo:
    """Superblock facts from `dumpe2fs -h`."""
    proc = run(["dumpe2fs", "-h", image], check=False)
    text = proc.stdout.decode(errors="replace")
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    if proc.returncode != 0 or "Block count" not in fields:
        reason = _problems(proc.stderr.decode(errors="replace"))
        raise EulerbakeError(f"{image} holds no readable ext2/3/4 filesystem: {'; '.join(reason) or 'dumpe2fs failed'}")
    return FilesystemInfo(
        uuid=fields.get("Filesystem UUID", ""),
        block_size=int(fields["Block size"]),
        block_count=int(fields["Block count"]),
        free_blocks=int(fields["Free blocks"]),
        features=tuple(fields.get("Filesystem features", "").split()),
        state=fields.get("Filesystem state", ""),
        journal_blocks=int(fields.get("Total journal blocks", "0")) if "Journal inode" in fields else 0,
        journal_features=tuple(f for f in fields.get("Journal features", "").split() if f != "(none)"),
    )


def check(image: str | Path, epoch: int, *, repair: bool) -> None:
    """Full e2fsck: `repair` fixes what preen mode may fix (a standalone copy only), else read-only."""
    if repair:
        _standalone(image)
    flags = ["-f", "-p"] if repair else ["-f", "-n"]
    proc = run(["e2fsck", *flags, image], env=fs_env(epoch), check=False)
    # Exit 1: errors corrected; 0: clean. Read-only mode must be clean.
    allowed = (0, 1) if repair else (0,)
    if proc.returncode not in allowed:
        output = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
        raise EulerbakeError(
            f"the filesystem in {image} has errors e2fsck {'could not fix' if repair else 'reports'} "
            f"(exit {proc.returncode}): " + " | ".join(output[-6:]),
            hint="repair the image with `e2fsck -f` by hand or start from a fresh download",
        )


def minimum_size(image: str | Path) -> int:
    """The smallest size resize2fs can shrink the filesystem to, in bytes (`resize2fs -P`)."""
    proc = run(["resize2fs", "-P", image])
    match = re.search(rb"minimum size of the filesystem:\s*(\d+)", proc.stdout)
    if not match:
        raise EulerbakeError(f"resize2fs -P gave no estimate for {image}: {proc.stdout.decode(errors='replace')}")
    return int(match.group(1)) * info(image).block_size


JOURNAL_INODE = 8
_EXTENT_RE = re.compile(r"\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?")


def resize(image: Path, size: int, epoch: int) -> None:
    """Resize the filesystem in a standalone image file to exactly `size` bytes (file included).

    The filesystem must have been checked with `check(repair=True)` just before, as resize2fs demands.
    When shrinking, an internal journal is dropped first and made again afterwards (same size,
    placed where mke2fs would place it): resize2fs would otherwise copy it block by block out of
    the cut-off end, writing hundreds of MiB of zeros. The new journal's zero blocks are left
    unallocated, so the image stays sparse.
    """
    image = _standalone(image)
    before = info(image)
    block_size = before.block_size
    if size % block_size:
        raise EulerbakeError(f"filesystem size {size} is not a multiple of the block size {block_size}")
    journal_bytes = before.journal_blocks * block_size
    remake_journal = (
        size < before.size
        and "has_journal" in before.features
        and before.journal_blocks > 0
        and not before.journal_features
        and "fast_commit" not in before.features  # its area would have to be carried over too
        and journal_bytes % 2**20 == 0
    )
    if image.stat().st_size < size:
        with image.open("r+b") as handle:  # resize2fs only grows into space the file already has
            handle.truncate(size)
    if remake_journal:
        run(["tune2fs", "-O", "^has_journal", image], env=fs_env(epoch))
    run(["resize2fs", image, f"{size // 1024}K"], env=fs_env(epoch))
    with image.open("r+b") as handle:
        handle.truncate(size)
    if remake_journal:
        run(["tune2fs", "-J", f"size={journal_bytes // 2**20}", image], env=fs_env(epoch))
        for first, count in block_ranges(image, JOURNAL_INODE):
            # The journal superblock is data; the rest is zero and may be left unallocated.
            deallocate_zeroes(image, first * block_size, count * block_size)


def block_ranges(image: str | Path, inode: int) -> list[tuple[int, int]]:
    """(first physical block, block count) of each extent of `inode` (`debugfs stat`)."""
    proc = run(["debugfs", "-R", f"stat <{inode}>", image])
    text = proc.stdout.decode(errors="replace")
    if "EXTENTS:" not in text:
        return []
    ranges = []
    for match in _EXTENT_RE.finditer(text.split("EXTENTS:", 1)[1]):  # index blocks "(ETB0):N" do not match
        first, last = int(match.group(3)), int(match.group(4) or match.group(3))
        ranges.append((first, last - first + 1))
    return ranges


def make_filesystem(
    image: Path,
    size: int,
    *,
    uuid: str,
    hash_seed: str,
    epoch: int,
    source: Path | None = None,
    label: str | None = None,
) -> None:
    """mkfs.ext4 into a new sparse file, reproducibly (fixed UUID, hash seed and times).

    Inode tables and the journal are initialised lazily, so a big, nearly empty filesystem costs
    only its metadata; the kernel zeroes the rest in the background on first mount.
    """
    image = _standalone(image)
    with image.open("wb") as handle:
        handle.truncate(size)
    extended = f"hash_seed={hash_seed},lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0"
    cmd: list[str | Path] = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", uuid, "-E", extended]
    if label:
        cmd += ["-L", label]
    if source is not None:
        cmd += ["-d", source]
    run([*cmd, image, f"{size // 1024}k"], env=fs_env(epoch))


# -- reading and writing files with debugfs ----------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A directory entry as `debugfs ls -p` shows it."""

    name: str
    inode: int
    mode: int
    uid: int
    gid: int
    size: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass(frozen=True)
class FileAttrs:
    """Permission bits and owner for a file or directory written into a filesystem."""

    mode: int
    uid: int = 0
    gid: int = 0


class Ext4Image:
    """One ext2/3/4 filesystem, read and changed through debugfs (no mount, no root needed).

    `scratch` is a directory for the temporary files debugfs reads from and writes to. Writes are
    refused for `?offset=` specs.
    """

    def __init__(self, image: str | Path, epoch: int, scratch: Path) -> None:
        self.image = str(image)
        self.epoch = epoch
        self.scratch = scratch
        self._listings: dict[str, dict[str, Entry] | None] = {}
        self._counter = 0

    def __repr__(self) -> str:
        return f"Ext4Image({self.image!r})"

    # -- raw debugfs sessions ----------------------------------------------------------------
    def _forget_listings(self, touched: Iterable[str] | None) -> None:
        """Drop cached listings a change may have made stale: all of them, or those of the parents
        of `touched` paths and of anything at or below them."""
        if touched is None:
            self._listings.clear()
            return
        for path in touched:
            self._listings.pop(posixpath.dirname(path) or "/", None)
            for cached in [c for c in self._listings if c == path or c.startswith(path.rstrip("/") + "/")]:
                del self._listings[cached]

    def _session(self, commands: Sequence[str], *, write: bool) -> tuple[bytes, str]:
        if write:
            _standalone(self.image)
        cmd = ["debugfs", *(["-w"] if write else []), "-f", "/dev/stdin", self.image]
        proc = run(cmd, input=("\n".join(commands) + "\n").encode(), env=fs_env(self.epoch))
        return proc.stdout, proc.stderr.decode(errors="replace")

    def execute(
        self,
        commands: Sequence[str],
        *,
        write: bool = True,
        benign: Iterable[str] = (),
        touched: Iterable[str] | None = None,
    ) -> bytes:
        """Run debugfs commands in one session; any error message fails the whole call.

        debugfs exits 0 even when a command fails, so its stderr is the only reliable signal.
        A writing session names the paths it creates, changes or removes in `touched` so that
        only the directory listings those show up in are read again (default: all of them).
        """
        if not commands:
            return b""
        if write:
            self._forget_listings(touched)
        stdout, stderr = self._session(commands, write=write)
        problems = _problems(stderr, benign)
        if problems:
            shown = "\n  ".join(problems[:8])
            first_cmds = "\n  ".join(commands[:6]) + ("\n  …" if len(commands) > 6 else "")
            raise EulerbakeError(
                f"debugfs reported errors on {Path(self.image.split('?')[0]).name}:\n  {shown}\n"
                f"while running:\n  {first_cmds}"
            )
        return stdout

    def _request(self, command: str) -> tuple[bytes, list[str]]:
        """One read-only command via `-R` (no echo of the command in stdout)."""
        proc = run(["debugfs", "-R", command, self.image], env=fs_env(self.epoch))
        return proc.stdout, _problems(proc.stderr.decode(errors="replace"))

    def _temp(self, stem: str) -> Path:
        self._counter += 1
        self.scratch.mkdir(parents=True, exist_ok=True)
        return self.scratch / f"debugfs-{self._counter}-{stem}"

    # -- queries ------------------------------------------------------------------------------
    def list_dir(self, path: str) -> dict[str, Entry] | None:
        """Entries of the directory at canonical `path` (no symlinks in it), or None if it is missing."""
        if path in self._listings:
            return self._listings[path]
        stdout, problems = self._request(f"ls -p {quote(path)}")
        listing: dict[str, Entry] | None
        if problems:
            listing = None
        else:
            listing = {}
            for line in stdout.decode(errors="surrogateescape").splitlines():
                fields = line.strip().strip("/").split("/")
                if len(fields) < 5 or fields[4] in (".", ".."):
                    continue
                ino, mode, uid, gid, name = fields[:5]
                size = int(fields[5]) if len(fields) > 5 and fields[5] else 0
                listing[name] = Entry(name, int(ino), int(mode, 8), int(uid), int(gid), size)
        self._listings[path] = listing
        return listing

    def read_link(self, path: str) -> str:
        stdout, problems = self._request(f"stat {quote(path)}")
        if problems:
            raise EulerbakeError(f"cannot read symlink {path} in {self.image}: {'; '.join(problems)}")
        match = re.search(rb'Fast link dest: "(.*)"', stdout)
        if match:
            return match.group(1).decode(errors="surrogateescape")
        # A long target lives in a data block, which `cat` prints.
        target, problems = self._request(f"cat {quote(path)}")
        if problems:
            raise EulerbakeError(f"cannot read symlink {path} in {self.image}: {'; '.join(problems)}")
        return target.decode(errors="surrogateescape")

    def resolve(self, path: str, *, follow_last: bool = True) -> tuple[str, list[str]]:
        """Canonical form of `path`: (deepest existing directory or entry, components still missing).

        Symlinks are followed relative to the filesystem root, as they would be inside the image.
        """
        pending = [part for part in path.split("/") if part]
        current = "/"
        hops = 0
        while pending:
            name = pending.pop(0)
            if name == ".":
                continue
            if name == "..":
                current = posixpath.dirname(current) or "/"
                continue
            listing = self.list_dir(current)
            entry = listing.get(name) if listing is not None else None
            if entry is None:
                return current, [name, *pending]
            child = posixpath.join(current, name)
            if entry.is_symlink and (pending or follow_last):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise EulerbakeError(f"too many symlinks resolving {path} in {self.image}")
                target = self.read_link(child)
                if target.startswith("/"):
                    current = "/"
                pending = [part for part in target.split("/") if part] + pending
                continue
            if pending and not entry.is_dir:
                raise EulerbakeError(f"{child} in {self.image} is not a directory (resolving {path})")
            current = child
        return current, []

    def realpath(self, path: str) -> str | None:
        """Canonical path of an existing entry (symlinks followed), or None."""
        found, missing = self.resolve(path)
        return None if missing else found

    def lstat(self, path: str) -> Entry | None:
        """The entry at `path` itself (a final symlink is not followed), or None."""
        parent, missing = self.resolve(posixpath.dirname(path) or "/")
        if missing:
            return None
        listing = self.list_dir(parent)
        return listing.get(posixpath.basename(path)) if listing else None

    def exists(self, path: str) -> bool:
        return self.realpath(path) is not None

    def read_file(self, path: str) -> bytes:
        """Contents of a regular file (symlinks followed)."""
        real = self.realpath(path)
        entry = self.lstat(real) if real else None
        if real is None or entry is None or not entry.is_file:
            raise EulerbakeError(f"{path} is not a regular file in {self.image}")
        stdout, problems = self._request(f"cat {quote(real)}")
        if problems:
            raise EulerbakeError(f"cannot read {path} from {self.image}: {'; '.join(problems)}")
        return stdout

    def xattrs(self, path: str) -> dict[str, bytes]:
        """Extended attributes (SELinux labels, ACLs) of the entry at canonical `path`."""
        stdout, problems = self._request(f"ea_list {quote(path)}")
        if problems:
            raise EulerbakeError(f"cannot list extended attributes of {path}: {'; '.join(problems)}")
        names = re.findall(rb"^\s+(\S+) \(\d+\)", stdout, flags=re.MULTILINE)
        values = {}
        for raw_name in names:
            name = raw_name.decode()
            dest = self._temp("xattr")
            self.execute([f"ea_get -f {quote(str(dest))} {quote(path)} {name}"], write=False)
            values[name] = dest.read_bytes()
            dest.unlink()
        return values

    def dump_tree(self, path: str, dest_dir: Path) -> Path:
        """Copy the directory at `path` (symlinks resolved) to `dest_dir/<its name>` with rdump."""
        real = self.realpath(path)
        if real is None:
            raise EulerbakeError(f"{path} does not exist in {self.image}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        self.execute([f"rdump {quote(real)} {quote(str(dest_dir))}"], write=False, benign=_RDUMP_BENIGN)
        return dest_dir / posixpath.basename(real)

    # -- changes ------------------------------------------------------------------------------
    def make_dirs(self, path: str, attrs: FileAttrs = FileAttrs(0o755)) -> str:
        """`mkdir -p` inside the filesystem; returns the canonical path of the directory."""
        found, missing = self.resolve(path)
        if not missing:
            entry = self.lstat(found)
            if found != "/" and (entry is None or not entry.is_dir):
                raise EulerbakeError(f"{path} exists in {self.image} but is not a directory")
            return found
        commands = []
        current = found
        for name in missing:
            current = posixpath.join(current, name)
            commands += [f"mkdir {quote(current)}", *self._attr_commands(current, attrs)]
        self.execute(commands, touched=[posixpath.join(found, missing[0])])
        return current

    def _attr_commands(self, path: str, attrs: FileAttrs, file_type: int | None = None) -> list[str]:
        # debugfs `sif ... mode` replaces the whole i_mode, file type bits included.
        if file_type is None:
            file_type = stat.S_IFDIR
        quoted = quote(path)
        return [
            f"sif {quoted} mode 0{file_type | stat.S_IMODE(attrs.mode):o}",
            f"sif {quoted} uid {attrs.uid}",
            f"sif {quoted} gid {attrs.gid}",
        ]

    def _remove_commands(self, path: str, entry: Entry) -> list[str]:
        if not entry.is_dir:
            return [f"rm {quote(path)}"]
        commands: list[str] = []
        for child in sorted((self.list_dir(path) or {}).values(), key=lambda e: e.name):
            commands += self._remove_commands(posixpath.join(path, child.name), child)
        return [*commands, f"rmdir {quote(path)}"]

    def remove(self, path: str) -> bool:
        """Remove a file, symlink or whole directory tree (like `rm -rf`); False if it was absent."""
        parent, missing = self.resolve(posixpath.dirname(path) or "/")
        entry = None if missing else (self.list_dir(parent) or {}).get(posixpath.basename(path))
        if entry is None:
            return False
        target = posixpath.join(parent, entry.name)
        self.execute(self._remove_commands(target, entry), touched=[target])
        return True

    def write_file(
        self,
        path: str,
        content: bytes | Path,
        attrs: FileAttrs | None = None,
        *,
        keep_existing_attrs: bool = True,
    ) -> str:
        """Create or replace a regular file; returns its canonical path.

        Replacing keeps the old file's mode, owner and extended attributes (SELinux label) unless
        `attrs` is given or `keep_existing_attrs` is False. A symlink at `path` is replaced by the
        file, as tar does. Parent directories must exist.
        """
        parent, missing = self.resolve(posixpath.dirname(path) or "/")
        if missing:
            raise EulerbakeError(f"directory {posixpath.dirname(path)} does not exist in {self.image}")
        name = posixpath.basename(path)
        target = posixpath.join(parent, name)
        existing = (self.list_dir(parent) or {}).get(name)
        if existing is not None and existing.is_dir:
            raise EulerbakeError(f"cannot write file {path}: it is a directory in {self.image}")
        xattrs: dict[str, bytes] = {}
        if existing is not None and existing.is_file and keep_existing_attrs:
            xattrs = self.xattrs(target)
            if attrs is None:
                attrs = FileAttrs(stat.S_IMODE(existing.mode), existing.uid, existing.gid)
        if attrs is None:
            attrs = FileAttrs(0o644)
        source = content if isinstance(content, Path) else self._temp(name)
        if not isinstance(content, Path):
            source.write_bytes(content)
        commands = [f"cd {quote(parent)}"]
        if existing is not None:
            commands.append(f"rm {quote(name)}")
        # `write` links the literal name into the current directory, hence the `cd` above.
        commands += [f"write {quote(str(source))} {quote(name)}", *self._attr_commands(target, attrs, stat.S_IFREG)]
        for xname, value in sorted(xattrs.items()):
            value_file = self._temp("xattr")
            value_file.write_bytes(value)
            commands.append(f"ea_set -f {quote(str(value_file))} {quote(target)} {xname}")
        self.execute(commands, touched=[target])
        if not isinstance(content, Path):
            source.unlink()
        return target

    def symlink(self, path: str, target: str, owner: FileAttrs = FileAttrs(0o777)) -> str:
        """Create (or replace a non-directory with) a symlink; parent directories must exist."""
        parent, missing = self.resolve(posixpath.dirname(path) or "/")
        if missing:
            raise EulerbakeError(f"directory {posixpath.dirname(path)} does not exist in {self.image}")
        link = posixpath.join(parent, posixpath.basename(path))
        existing = (self.list_dir(parent) or {}).get(posixpath.basename(path))
        commands = []
        if existing is not None:
            if existing.is_dir:
                raise EulerbakeError(f"cannot create symlink {path}: it is a directory in {self.image}")
            commands.append(f"rm {quote(link)}")
        commands += [
            f"symlink {quote(link)} {quote(target)}",
            f"sif {quote(link)} uid {owner.uid}",
            f"sif {quote(link)} gid {owner.gid}",
        ]
        self.execute(commands, touched=[link])
        return link

    def set_attrs(self, path: str, attrs: FileAttrs) -> None:
        """Set mode bits and owner of an existing entry (its type is kept)."""
        entry = self.lstat(path)
        if entry is None:
            raise EulerbakeError(f"{path} does not exist in {self.image}")
        parent, _ = self.resolve(posixpath.dirname(path) or "/")
        # A file's other hard links show the new mode too: only a directory's change stays local.
        touched = [posixpath.join(parent, posixpath.basename(path))] if entry.is_dir else None
        self.execute(self._attr_commands(path, attrs, stat.S_IFMT(entry.mode)), touched=touched)

    def pin_times(self, paths: Iterable[str]) -> None:
        """Set access, change, modify and creation times of every path to the epoch.

        mkfs.ext4 -d copies times from the source files, including ctime, which no one can set on
        the host: this makes a filesystem built from a fresh checkout reproducible.
        """
        commands = []
        for path in paths:
            for field in ("atime", "ctime", "mtime", "crtime"):
                commands.append(f"sif {quote(path)} {field} @{self.epoch}")
        self.execute(commands, touched=())  # listings show no times


def inject_tree(
    image: Ext4Image,
    source: Path,
    *,
    dest: str = "/",
    attrs: Mapping[str, FileAttrs] | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Lay the tree `source` onto the filesystem at `dest`; return the canonical paths written.

    Directories that exist are kept as they are; new ones are 0755 root:root. A new file is
    root:root, 0755 if executable at the source and 0644 otherwise (the only mode bit a checkout
    keeps); a replaced file keeps its mode, owner and extended attributes. `attrs` (keys relative
    to `source`, like `etc/sudoers.d/x`) overrides both. Paths in `skip` are not copied.
    """
    attrs = dict(attrs or {})
    skipped = set(skip)
    written: list[str] = []
    for directory, dirnames, filenames in _walk_sorted(source):
        rel_dir = directory.relative_to(source).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        image_dir = posixpath.join(dest, rel_dir)
        canonical_dir = image.make_dirs(image_dir, attrs.get(rel_dir, FileAttrs(0o755)))
        if rel_dir in attrs and rel_dir:
            image.set_attrs(canonical_dir, attrs[rel_dir])
        for name in filenames + [d for d in dirnames if (directory / d).is_symlink()]:
            rel = posixpath.join(rel_dir, name) if rel_dir else name
            if rel in skipped:
                continue
            local = directory / name
            if local.is_symlink():
                written.append(image.symlink(posixpath.join(canonical_dir, name), str(local.readlink())))
                continue
            given = attrs.get(rel)
            default = FileAttrs(0o755 if local.stat().st_mode & stat.S_IXUSR else 0o644)
            existing = image.lstat(posixpath.join(canonical_dir, name))
            keep = existing is not None and existing.is_file and given is None
            chosen = given or (None if keep else default)
            written.append(image.write_file(posixpath.join(canonical_dir, name), local, chosen))
    return written


def _walk_sorted(root: Path) -> Iterable[tuple[Path, list[str], list[str]]]:
    """os.walk in sorted order that does not descend into symlinked directories."""
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        real_dirs = [d for d in dirnames if not os.path.islink(os.path.join(directory, d))]
        yield Path(directory), sorted(dirnames), sorted(filenames)
        dirnames[:] = real_dirs
