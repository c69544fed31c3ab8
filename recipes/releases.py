"""The openEuler release matrix: which releases and arches exist, where upstream publishes their files, and
what each release is expected to look like.

Every cell (release × arch) has three upstream sources, laid out on every mirror as on repo.openeuler.org:

- VM image  `{mirror}/openEuler-{VER}/virtual_machine_img/{arch}/openEuler-{VER}-{arch}.qcow2.xz` (+ `.sha256sum`)
- DVD ISO   `{mirror}/openEuler-{VER}/ISO/{arch}/openEuler-{VER}-{arch}-dvd.iso` (+ `.sha256sum`)
- kernel-devel RPM matching the image's kernel, under `OS/{arch}/Packages/`, or `update/{arch}/Packages/`
  when the kernel came from an update

plus one source shared by all cells: the amzn-drivers ENA source tarball (a GitHub tag archive).

Mirrors come from `EULERBAKE_MIRRORS` (comma or space separated, tried in order; `file:///path` for
air-gapped sites holding a copy of the same layout), default `https://repo.openeuler.org`. Pins come
from `recipes/sources.lock`, written by `eulerbake lock` for the sources a cell's stages reach (`pin_requests`
is the catalogue it picks from): an unpinned source cannot be fetched.

The per-release facts are *expected* values, taken from systems running each release: the build reads
the real kernel release from the image's /usr/lib/modules and the kernel-module gate refuses a
mismatch, and the stages inspect the real partition table. The expected kernel does name the
kernel-devel RPM, so a wrong entry shows up as a 404 when pinning.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from eulerbake.core.derivation import Derivation, FixedOutput
from eulerbake.core.errors import EulerbakeError
from eulerbake.fetch.lock import LockFile, PinRequest

from recipes.stages.unpack import unpack

ARCHES = ("x86_64", "aarch64")
DEFAULT_MIRROR = "https://repo.openeuler.org"
MIRRORS_ENV = "EULERBAKE_MIRRORS"
LOCK_PATH = Path(__file__).resolve().with_name("sources.lock")
CHECKSUM_SUFFIX = ".sha256sum"  # upstream's `<sha256>  <filename>` beside the VM image and the ISO

# The amzn-drivers tag whose ENA driver the AMI stages build (github.com/amzn/amzn-drivers tags
# `ena_linux_<version>`; 2.14.0 is named in the repository's own rpm README, 2.14.1 followed in May 2025).
ENA_TAG = "ena_linux_2.14.1"
ENA_URL = f"https://github.com/amzn/amzn-drivers/archive/refs/tags/{ENA_TAG}.tar.gz"


@dataclass(frozen=True)
class Layout:
    """The partition table the VM image is expected to carry: table type and partition roles in disk order."""

    table: str  # "dos" (MBR) or "gpt"
    partitions: tuple[str, ...]  # "esp" (EFI system, vfat), "boot" (/boot, ext4), "root" (/, ext4)

    @property
    def root_number(self) -> int:
        """1-based partition number of the root file system."""
        return self.partitions.index("root") + 1


BIOS_LAYOUT = Layout("dos", ("boot", "root"))  # x86_64: 2 GB /boot + root, as upstream's 40 GB image shows
UEFI_LAYOUT = Layout("gpt", ("esp", "boot", "root"))  # aarch64 boots UEFI only: an ESP comes first


@dataclass(frozen=True)
class Release:
    """One cell of the matrix: an openEuler release on one architecture."""

    version: str  # e.g. "22.03-LTS-SP4"
    arch: str  # "x86_64" or "aarch64"
    default_user: str  # the login cloud-init creates (its `default_user`)
    layout: Layout
    expected_kernel: str  # `uname -r` without the arch, e.g. "5.10.0-60.18.0.50.oe2203"

    @property
    def label(self) -> str:
        return f"{self.version}:{self.arch}"

    @property
    def expected_kernel_release(self) -> str:
        """The directory name expected under /usr/lib/modules, e.g. `5.10.0-60.18.0.50.oe2203.x86_64`."""
        return f"{self.expected_kernel}.{self.arch}"

    @property
    def qcow2_xz_filename(self) -> str:
        return f"openEuler-{self.version}-{self.arch}.qcow2.xz"

    @property
    def iso_filename(self) -> str:
        return f"openEuler-{self.version}-{self.arch}-dvd.iso"

    @property
    def kernel_devel_filename(self) -> str:
        return f"kernel-devel-{self.expected_kernel}.{self.arch}.rpm"


@dataclass(frozen=True)
class _VersionFacts:
    version: str
    expected_kernel: str
    default_user: str
    arches: tuple[str, ...] = ARCHES


# cloud-init named its openEuler default user after the distro variant: "openEuler" up to 23.2, "openeuler"
# since the variant was lower-cased (cloud-init 23.3); 20.03 and 22.03 ship older cloud-init, 24.03 ships 23.x.
_RELEASE_FACTS = (
    _VersionFacts("20.03-LTS-SP1", "4.19.90-2012.4.0.0053.oe1", "openEuler"),
    _VersionFacts("20.03-LTS-SP2", "4.19.90-2106.3.0.0095.oe1", "openEuler"),
    _VersionFacts("20.03-LTS-SP3", "4.19.90-2112.8.0.0131.oe1", "openEuler"),
    _VersionFacts("20.03-LTS-SP4", "4.19.90-2312.1.0.0255.oe2003sp4", "openEuler"),
    _VersionFacts("22.03-LTS", "5.10.0-60.18.0.50.oe2203", "openEuler"),
    _VersionFacts("22.03-LTS-SP1", "5.10.0-136.12.0.86.oe2203sp1", "openEuler"),
    _VersionFacts("22.03-LTS-SP2", "5.10.0-153.12.0.92.oe2203sp2", "openEuler"),
    _VersionFacts("22.03-LTS-SP3", "5.10.0-182.0.0.95.oe2203sp3", "openEuler"),
    _VersionFacts("22.03-LTS-SP4", "5.10.0-216.0.0.115.oe2203sp4", "openEuler"),
    _VersionFacts("24.03-LTS", "6.6.0-28.0.0.34.oe2403", "openeuler"),
    _VersionFacts("24.03-LTS-SP1", "6.6.0-72.0.0.76.oe2403sp1", "openeuler"),
    _VersionFacts("24.03-LTS-SP2", "6.6.0-98.0.0.103.oe2403sp2", "openeuler"),
    _VersionFacts("24.03-LTS-SP3", "6.6.0-132.0.0.111.oe2403sp3", "openeuler"),
    _VersionFacts("24.03-LTS-SP4", "6.6.0-159.4.3.154.oe2403sp4", "openeuler"),
)
_LAYOUTS = {"x86_64": BIOS_LAYOUT, "aarch64": UEFI_LAYOUT}

RELEASES: tuple[str, ...] = tuple(facts.version for facts in _RELEASE_FACTS)


def matrix(releases: Sequence[str] | None = None, arches: Sequence[str] | None = ARCHES) -> list[Release]:
    """The cells for `releases` (default: all) × `arches` (default: both) that upstream publishes."""
    wanted_arches = tuple(arches or ARCHES)
    if unknown := [arch for arch in wanted_arches if arch not in ARCHES]:
        raise EulerbakeError(f"unknown architecture {', '.join(unknown)}", hint=f"use one of {', '.join(ARCHES)}")
    by_version = {facts.version: facts for facts in _RELEASE_FACTS}
    wanted = list(releases) if releases else list(RELEASES)
    if unknown := [version for version in wanted if version not in by_version]:
        raise EulerbakeError(
            f"unknown openEuler release {', '.join(unknown)}",
            hint=f"known releases: {', '.join(RELEASES)} (add new ones to recipes/releases.py)",
        )
    cells = []
    for version in wanted:
        facts = by_version[version]
        for arch in wanted_arches:
            if arch in facts.arches:
                cells.append(Release(version, arch, facts.default_user, _LAYOUTS[arch], facts.expected_kernel))
    return cells


def mirrors() -> list[str]:
    """Mirror roots from EULERBAKE_MIRRORS (comma/space separated), default upstream; each checked."""
    raw = os.environ.get(MIRRORS_ENV, "")
    roots = [item.rstrip("/") for item in re.split(r"[,\s]+", raw) if item.strip()] or [DEFAULT_MIRROR]
    for root in roots:
        parsed = urllib.parse.urlparse(root)
        local_ok = parsed.scheme == "file" and parsed.netloc in ("", "localhost") and parsed.path.startswith("/")
        if not (local_ok or (parsed.scheme in ("http", "https") and parsed.netloc)):
            raise EulerbakeError(
                f"{MIRRORS_ENV} holds {root!r}, which is not an http(s):// URL or a file:///absolute/path",
                hint=f"e.g. {MIRRORS_ENV}='file:///srv/openeuler {DEFAULT_MIRROR}'",
            )
    return roots


def _candidate_urls(relative_paths: Sequence[str], locked_url: str = "") -> tuple[str, ...]:
    """Every mirror × path, mirrors first; the path that served the pinned bytes goes first on each mirror."""
    preferred = [path for path in relative_paths if locked_url.endswith("/" + path)]
    ordered = preferred + [path for path in relative_paths if path not in preferred]
    urls = [f"{root}/{path}" for root in mirrors() for path in ordered]
    if locked_url and locked_url not in urls:
        urls.append(locked_url)  # where it was pinned from, as a last resort
    return tuple(urls)


@cache
def _read_lock(path: Path, mtime_ns: int, size: int) -> LockFile:
    return LockFile.read(path)


def read_lock(path: Path = LOCK_PATH) -> LockFile:
    """recipes/sources.lock, read once per change."""
    st = path.stat() if path.exists() else None
    return _read_lock(path, st.st_mtime_ns if st else 0, st.st_size if st else -1)


def _pinned(lock_id: str, filename: str, relative_paths: Sequence[str], lock: LockFile | None) -> FixedOutput:
    lock = lock if lock is not None else read_lock()
    entry = lock.get(lock_id)
    urls = _candidate_urls(relative_paths, entry.url if entry else "")
    return lock.apply(FixedOutput(filename=filename, urls=urls, sha256="", blake3="", size=-1, label=lock_id), lock_id)


def _release_dir(rel: Release) -> str:
    return f"openEuler-{rel.version}"


def qcow2_xz_paths(rel: Release) -> list[str]:
    return [f"{_release_dir(rel)}/virtual_machine_img/{rel.arch}/{rel.qcow2_xz_filename}"]


def iso_paths(rel: Release) -> list[str]:
    return [f"{_release_dir(rel)}/ISO/{rel.arch}/{rel.iso_filename}"]


def kernel_devel_paths(rel: Release) -> list[str]:
    return [f"{_release_dir(rel)}/{repo}/{rel.arch}/Packages/{rel.kernel_devel_filename}" for repo in ("OS", "update")]


def qcow2_xz_source(rel: Release, lock: LockFile | None = None) -> FixedOutput:
    """The compressed upstream VM image (task `fetch:<ver>:<arch>:qcow2`)."""
    return _pinned(f"{rel.label}:qcow2", rel.qcow2_xz_filename, qcow2_xz_paths(rel), lock)


def iso_source(rel: Release, lock: LockFile | None = None) -> FixedOutput:
    """The DVD ISO (task `fetch:<ver>:<arch>:iso`)."""
    return _pinned(f"{rel.label}:iso", rel.iso_filename, iso_paths(rel), lock)


def kernel_devel_source(rel: Release, lock: LockFile | None = None) -> FixedOutput:
    """The kernel-devel RPM for the image's expected kernel (task `fetch:<ver>:<arch>:kernel-devel`)."""
    return _pinned(f"{rel.label}:kernel-devel", rel.kernel_devel_filename, kernel_devel_paths(rel), lock)


ENA_LOCK_ID = f"amzn-drivers:{ENA_TAG}"
ENA_FILENAME = f"amzn-drivers-{ENA_TAG}.tar.gz"


def ena_source(lock: LockFile | None = None) -> FixedOutput:
    """The amzn-drivers source tarball at ENA_TAG (task `fetch:amzn-drivers:<tag>`).

    GitHub publishes no checksum for tag archives, so the pin is what `eulerbake lock` downloaded:
    review it. file:// mirrors may carry a copy as `<mirror>/amzn-drivers/<filename>`.
    """
    lock = lock if lock is not None else read_lock()
    entry = lock.get(ENA_LOCK_ID)
    local_copies = [f"{root}/amzn-drivers/{ENA_FILENAME}" for root in mirrors() if root.startswith("file:")]
    urls = tuple(dict.fromkeys([*local_copies, ENA_URL, *([entry.url] if entry else [])]))
    source = FixedOutput(filename=ENA_FILENAME, urls=urls, sha256="", blake3="", size=-1, label=ENA_LOCK_ID)
    return lock.apply(source, ENA_LOCK_ID)


def qcow2_image(rel: Release, lock: LockFile | None = None) -> Derivation:
    """The decompressed upstream VM image (task `unpack:<ver>:<arch>`, output `openEuler-<ver>-<arch>.qcow2`)."""
    return unpack(rel.label, qcow2_xz_source(rel, lock), doc=f"decompress the openEuler VM image for {rel.label}")


def pin_requests(releases: Sequence[str] | None = None, arches: Sequence[str] | None = None) -> list[PinRequest]:
    """Every source `eulerbake lock` can pin for these cells (default: all), the ENA tarball included.

    This is the catalogue, not what gets pinned: `eulerbake lock` pins the sources its targets reach
    (recipes.lock_targets) and the ones named on its command line, each with the request made here (the
    candidate locations whatever the lock says, and upstream's checksum convention). The DVD ISO is here for
    the stages that will need it (MAAS Packer); no stage does yet, so only naming it pins it.
    """
    empty = LockFile(LOCK_PATH)  # candidate locations only; lock_main decides what is already pinned
    requests = []
    for rel in matrix(releases, arches):
        requests.append(PinRequest(f"{rel.label}:qcow2", qcow2_xz_source(rel, empty), CHECKSUM_SUFFIX))
        requests.append(PinRequest(f"{rel.label}:iso", iso_source(rel, empty), CHECKSUM_SUFFIX))
        # Upstream publishes checksums for single RPMs only inside the repodata; the lock records what was fetched.
        requests.append(PinRequest(f"{rel.label}:kernel-devel", kernel_devel_source(rel, empty)))
    requests.append(PinRequest(ENA_LOCK_ID, ena_source(empty)))
    return requests
