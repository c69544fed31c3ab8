"""Stage `kernel-headers`: a kernel-devel RPM or an installed headers dir → a self-contained kbuild tree.

The output holds `build/` (`make -C build M=…` works with it, and the gate reads its Module.symvers,
.config and generated headers), `kernel-release` and `headers.json`. Debian splits its headers over
two packages and links scripts/ and tools/ into a third; openEuler's kernel-devel is one tree: both
come out as one in-tree style directory with no link leaving it.

Debian's headers are keyed by dpkg (`DpkgHeaders`), never by hashing their ~16,000 files, and nothing
about them is looked up while the task graph is built: dpkg's lists are read the first time a key is
needed, and again by the builder, which checks every file it copies against dpkg's md5sums.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalFile, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.target import KernelTarget, find_headers_tree
from eulerbake.tools.run import run

DPKG_INFO = Path("/var/lib/dpkg/info")
RPM_MAGIC = b"\xed\xab\xee\xdb"
# What unpacking a kernel-devel RPM runs; a headers directory is only copied (no tool at all).
TOOLS = ("rpm2cpio", "cpio")


@dataclass(frozen=True)
class Params:
    from_dpkg: bool  # the input is a DpkgHeaders dir: every copied file is checked against dpkg's md5sums


# -- dpkg-installed headers ---------------------------------------------------------------------------


def _wrapper_source_dir(build_dir: Path) -> Path | None:
    """The source tree a kbuild output dir's Makefile includes (`include <srctree>/Makefile`, as O= writes)."""
    makefile = build_dir / "Makefile"
    if not makefile.is_file():
        return None
    match = re.search(r"^include\s+(/\S+)/Makefile\s*$", makefile.read_text(errors="replace"), re.M)
    if match and (Path(match.group(1)) / "scripts").exists():
        return Path(match.group(1))
    return None


def _external_roots(headers_dir: Path) -> list[Path]:
    """The directories a headers dir is made of: itself, its wrapped source tree, top-level links out of them."""
    roots = [headers_dir]
    source = _wrapper_source_dir(headers_dir)
    if source is not None:
        roots.append(source)
    for root in list(roots):
        for entry in sorted(root.iterdir()):
            if entry.is_symlink() and entry.exists():
                target = entry.resolve()
                if not any(target.is_relative_to(r.resolve()) for r in roots):
                    roots.append(target.parent if target.name in ("scripts", "tools") else target)
    return roots


def _dpkg_owner(path: Path) -> str | None:
    """The Debian package whose file list holds directory `path` (fast path: the package named like it)."""
    line = f"\n{path}\n".encode()
    # A direct lookup first: globbing /var/lib/dpkg/info (thousands of files) costs ~15 ms per pattern.
    exact = DPKG_INFO / f"{path.name}.list"
    likely = [exact] if exact.is_file() else sorted(DPKG_INFO.glob(f"{path.name}:*.list"))

    def every_list() -> Iterator[Path]:  # a generator, so the directory is only listed when needed
        yield from (p for p in sorted(DPKG_INFO.glob("*.list")) if p not in likely)

    # Scanning every package's list is the slow fallback: only when no package is named like the directory.
    for listing in itertools.chain(likely, every_list()):
        if line in b"\n" + listing.read_bytes():
            return listing.name[: -len(".list")]
    return None


def dpkg_packages_for_headers(headers_dir: Path) -> dict[str, str] | None:
    """{package: root dir} when every part of `headers_dir` is dpkg-installed, else None (reads dpkg's lists)."""
    if not DPKG_INFO.is_dir():
        return None
    owners: dict[str, str] = {}
    for root in _external_roots(headers_dir):
        owner = _dpkg_owner(root)
        if owner is None:
            return None
        owners[owner] = str(root)
    return owners


def dpkg_roots(headers_dir: Path) -> dict[str, str]:
    """{package: root dir} of a dpkg-installed headers dir, or an error saying what to pass instead."""
    packages = dpkg_packages_for_headers(headers_dir)
    if not packages:
        raise EulerbakeError(
            f"{headers_dir} is not made of dpkg-installed packages only ({DPKG_INFO} does not list all of it)",
            hint="pass LocalTree(<a self-contained copy of the headers>) instead of DpkgHeaders, or reinstall "
            "them with apt-get install linux-headers-<kver>",
        )
    return packages


class DpkgHeaders:
    """A headers dir installed by dpkg (Debian's linux-headers-<kver>), keyed by dpkg's own records.

    Why dpkg's md5sums make the key: the md5sums files fingerprint every file of the packages, so three
    small files (1.6 MB, 13 ms to hash) stand for the ~16,000 files of a Debian headers dir, whose
    canonical tree hash costs 0.8 s cold, 3.5 s the first time through the stat cache and 0.35 s warm
    (measured here) on every `doit` run. The builder checks each copied file against those md5sums, so a
    locally edited header cannot hide behind a stale key.

    A local input (see `LocalInput`) that reads nothing until `fingerprint()` is called, i.e. when a key
    is needed: which packages make up the dir is looked up once per instance; the md5sums and list files
    are hashed on every call (through the stat cache), so the store's check after the build still sees a
    package upgraded while the build ran. `files()` is empty: doit watches no file, the key decides.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._packages: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"DpkgHeaders({str(self._path)!r})"

    @property
    def path(self) -> Path:
        return self._path

    def packages(self) -> dict[str, str]:
        """{package: root dir} of the packages the dir is made of (dpkg's lists are read on the first call)."""
        if self._packages is None:
            self._packages = dpkg_roots(self._path)
        return self._packages

    def fingerprint(self) -> dict[str, Any]:
        packages = {
            package: {
                "root": root,
                "md5sums": hashing.hash_file(DPKG_INFO / f"{package}.md5sums"),
                "list": hashing.hash_file(DPKG_INFO / f"{package}.list"),
            }
            for package, root in sorted(self.packages().items())
        }
        return {"kind": "dpkg-headers", "path": str(self._path), "packages": packages}

    def files(self) -> list[Path]:
        return []


HeadersSource = FixedOutput | LocalTree | LocalFile | Derivation | DpkgHeaders


def kernel_headers(label: str, source: HeadersSource) -> Derivation:
    """Stage `kernel-headers:<label>`: a kernel-devel RPM or a headers dir → a self-contained tree in `out/build/`.

    `source` is a kernel-devel RPM (a FixedOutput, a LocalFile, or a derivation whose output holds one),
    a self-contained headers dir (LocalTree, hashed whole) or a dpkg-installed one (DpkgHeaders).
    """
    if isinstance(source, (LocalTree, DpkgHeaders)) and not source.path.is_dir():
        raise EulerbakeError(f"kernel headers directory {source.path} does not exist",
                             hint="install the headers (apt-get install linux-headers-<kver>) or fix the path")
    directory = isinstance(source, (LocalTree, DpkgHeaders))
    return Derivation(
        stage="kernel-headers",
        label=label,
        builder=build,
        inputs={"headers": source},
        params=Params(from_dpkg=isinstance(source, DpkgHeaders)),
        tools=() if directory else TOOLS,
        doc="kernel headers as a self-contained kbuild tree",
    )


# -- the builder --------------------------------------------------------------------------------------


def _copy_file(source: Path, dest: Path) -> None:
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    shutil.copyfile(source, dest)
    os.chmod(dest, 0o755 if os.access(source, os.X_OK) else 0o644)


def _copy_layer(layer: Path, dest: Path, *, skip: set[str], copied: dict[Path, Path], files: list[Path],
                log: list[str], fs_root: Path | None = None) -> None:
    """Copy `layer` into `dest`: links inside it stay links, links out of it are copied in (materialised).

    `copied` maps directories already materialised (so the build dir's `scripts` link to the same kbuild
    dir as the source tree's is copied once); `files` collects the real paths of copied files.
    """
    layer_real = layer.resolve()
    for dirpath, dirnames, filenames in os.walk(layer):
        here = Path(dirpath)
        relative_dir = here.relative_to(layer)
        (dest / relative_dir).mkdir(parents=True, exist_ok=True)
        for name in sorted(dirnames + filenames):
            source = here / name
            relative = relative_dir / name
            if str(relative) in skip:
                continue
            if source.is_symlink():
                link = source.readlink()
                if fs_root is not None and link.is_absolute():
                    target = (fs_root / link.relative_to("/")).resolve()
                else:
                    target = source.resolve()
                if target.is_relative_to(layer_real) and not link.is_absolute():
                    if not (dest / relative).is_symlink():
                        (dest / relative).symlink_to(link)
                elif target.is_dir():
                    if copied.get(target) != dest / relative:
                        copied[target] = dest / relative
                        _copy_layer(target, dest / relative, skip=set(), copied=copied, files=files, log=log,
                                    fs_root=fs_root)
                elif target.is_file():
                    _copy_file(target, dest / relative)
                    files.append(target)
                else:
                    log.append(f"skipped dangling link {source} -> {link}")
            elif source.is_file():
                _copy_file(source, dest / relative)
                files.append(source.resolve())
        # os.walk does not enter symlinked directories: they were handled above.
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink() and str(relative_dir / d) not in skip]


def assemble_headers_tree(headers_dir: Path, dest: Path, fs_root: Path | None = None) -> tuple[list[Path], list[str]]:
    """Merge a headers dir (and the source tree its Makefile wraps, O=-style) into one in-tree style dir.

    Debian splits headers into linux-headers-<kver> (config, generated headers, Module.symvers, a
    wrapper Makefile) and linux-headers-<ver>-common (the sources), with scripts/ and tools/ linking
    to /usr/lib/linux-kbuild-<ver>; openEuler's kernel-devel is already one tree. The result looks
    like the latter: srctree == objtree, no link leaving it. Returns (copied files, notes).
    """
    files: list[Path] = []
    notes: list[str] = []
    copied: dict[Path, Path] = {}
    source = _wrapper_source_dir(headers_dir) if fs_root is None else None
    if source is not None:
        _copy_layer(source, dest, skip=set(), copied=copied, files=files, log=notes)
        # The wrapper Makefile would include the host's source tree: the merged tree uses the real one.
        _copy_layer(headers_dir, dest, skip={"Makefile"}, copied=copied, files=files, log=notes)
    else:
        _copy_layer(headers_dir, dest, skip=set(), copied=copied, files=files, log=notes, fs_root=fs_root)
    return files, notes


def _verify_dpkg_md5sums(files: Sequence[Path], packages: Mapping[str, str]) -> None:
    """Every copied file must be one dpkg installed, unchanged: the key only covers what dpkg vouches for."""
    expected: dict[str, str] = {}
    for package in packages:
        for line in (DPKG_INFO / f"{package}.md5sums").read_text().splitlines():
            digest, _, relative = line.partition("  ")
            expected["/" + relative] = digest
    for path in files:
        vouched = expected.get(str(path))
        if vouched is None:
            raise EulerbakeError(
                f"{path} is not a file of the dpkg packages {', '.join(sorted(packages))}",
                hint="the derivation key only covers dpkg-installed files: remove the stray file or copy the "
                "headers into a directory of their own and pass that",
            )
        if hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest() != vouched:
            raise EulerbakeError(
                f"{path} differs from what dpkg installed (md5sums mismatch)",
                hint="reinstall the package (apt-get install --reinstall …) or pass a copy of the headers instead",
            )


def _extract_kernel_devel_rpm(rpm: Path, work: Path) -> Path:
    """Unpack a kernel-devel RPM without root (rpm2cpio | cpio) and return its /usr/src/kernels/<kver>."""
    root = work / "rpm-root"
    root.mkdir()
    payload = work / "payload.cpio"
    with payload.open("wb") as out:
        run(["rpm2cpio", rpm], stdout=out.fileno())
    run(["cpio", "-idm", "--quiet", "--no-absolute-filenames", "-F", payload], cwd=root)
    payload.unlink()
    kernels = sorted(p for p in (root / "usr" / "src" / "kernels").glob("*") if (p / "Makefile").is_file())
    if len(kernels) != 1:
        found = ", ".join(p.name for p in kernels) or "none"
        raise EulerbakeError(
            f"{rpm.name} is not a kernel-devel RPM: expected one usr/src/kernels/<kver>/ tree, found {found}",
            hint="pass the kernel-devel-<kver>.<arch>.rpm matching the image's kernel",
        )
    return kernels[0]


def build(ctx: BuildContext) -> None:
    """Copy the headers into `out/build`, check they can build and gate modules, record their release."""
    params: Params = ctx.params
    tree = ctx.out / "build"
    origin: str
    if params.from_dpkg:
        source_dir = ctx.inputs["headers"]
        origin = str(source_dir)
        packages = dpkg_roots(source_dir)  # looked up again: the builder never trusts what the graph saw
        ctx.log(f"copying {source_dir} (dpkg: {', '.join(sorted(packages))})")
        _check_headers_source(source_dir, origin)
        files, notes = assemble_headers_tree(source_dir, tree)
        _verify_dpkg_md5sums(files, packages)
    else:
        given = ctx.inputs["headers"]
        rpms = sorted(given.glob("*.rpm")) if given.is_dir() else []
        rpm = rpms[0] if len(rpms) == 1 else given
        if rpm.is_file():
            with rpm.open("rb") as handle:
                if handle.read(4) != RPM_MAGIC:
                    raise EulerbakeError(f"{rpm.name} is not an RPM (no RPM lead magic)",
                                         hint="pass a kernel-devel RPM or a headers directory")
            origin = rpm.name
            ctx.log(f"unpacking {rpm.name}")
            source_dir = _extract_kernel_devel_rpm(rpm, ctx.work)
            _check_headers_source(source_dir, f"{rpm.name}:/usr/src/kernels/{source_dir.name}")
            files, notes = assemble_headers_tree(source_dir, tree, fs_root=ctx.work / "rpm-root")
        else:
            given = find_headers_tree(given) if given.is_dir() else given
            origin = str(given)
            _check_headers_source(given, origin)
            outside = _external_roots(given)[1:]
            if outside:
                raise EulerbakeError(
                    f"headers dir {given} refers to files outside itself ({', '.join(map(str, outside))}), "
                    "which its key would not cover",
                    hint="pass DpkgHeaders(<dir>) for a dpkg-installed headers dir (keyed by dpkg's md5sums) "
                    "or a self-contained copy",
                )
            files, notes = assemble_headers_tree(given, tree)
    for note in notes:
        ctx.log(note)
    target = KernelTarget.from_headers(tree)
    (ctx.out / "kernel-release").write_text(target.release + "\n")
    info = {"release": target.release, "vermagic": target.vermagic, "arch": target.arch, "origin": origin,
            "files": len(files), "exports": len(target.exports or {})}
    (ctx.out / "headers.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    ctx.log(f"kernel headers {target.release} ({target.arch}): {len(files)} files, "
            f"{len(target.exports or {})} exported symbols")


def _check_headers_source(directory: Path, origin: str) -> None:
    """Fail early, naming the input, when headers cannot build or gate modules."""
    for relative, why in (("include/generated/utsrelease.h", "the kernel release"),
                          ("Module.symvers", "the kernel's symbol CRCs (modversions)")):
        if not (directory / relative).is_file():
            raise EulerbakeError(
                f"kernel headers {origin} have no {relative}: {why} cannot be known",
                hint="use the complete kernel-devel/linux-headers package of the exact kernel build",
            )
    if not (directory / ".config").is_file() and not (directory / "include/config/auto.conf").is_file():
        raise EulerbakeError(f"kernel headers {origin} have no .config", hint="use complete kernel headers")
