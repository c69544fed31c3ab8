"""Kernel modules as derivations: kernel headers, a module's source, its out-of-tree build, and the gate.

    kernel-headers:<label>  kernel-devel RPM or installed headers dir → a self-contained kbuild tree
    ena-source:<label>      drivers/net/ethernet/amazon/ena out of a kernel source tarball
    kmod-ena:<label>        patches applied in order, `make -C <headers> M=<src> modules` → ena.ko
    kmod-check:<label>      the pyelftools gate (eulerbake.kmod) → lib/modules/<kver>/extra/ena.ko + report

The ENA seed: openEuler's aarch64 kernel lacked the AWS ENA driver, so the instance had no network.
The fix by hand was to build amzn-drivers' ENA against `kernel-devel-$(uname -r)` with a patched
ena_ethtool.c and copy ena.ko into the image; a module the kernel refuses is only discovered at boot,
on a machine nobody can reach. Here the build is cached by everything that decides its bytes (source,
patches, headers, compiler and linker versions, make variables) and the gate refuses, before the image
is built, a module the image's kernel would not load.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path

import eulerbake.linux.gate
from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalFile, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.gate import ARCHES, KernelTarget, check_module, find_headers_tree, read_module
from eulerbake.tools.run import CommandError, run, run_text

PROJECT = Path(__file__).resolve().parent.parent
PATCHES = PROJECT / "overlays" / "patches"
DPKG_INFO = Path("/var/lib/dpkg/info")
RPM_MAGIC = b"\xed\xab\xee\xdb"
ENA_SUBDIR = "drivers/net/ethernet/amazon/ena"
# The GNU triplet prefix of a cross toolchain per target arch (Debian's gcc-<triplet> packages).
CROSS_PREFIXES = {
    "x86_64": "x86_64-linux-gnu-",
    "aarch64": "aarch64-linux-gnu-",
    "riscv64": "riscv64-linux-gnu-",
    "ppc64le": "powerpc64le-linux-gnu-",
    "loongarch64": "loongarch64-linux-gnu-",
    "s390x": "s390x-linux-gnu-",
}
# Where the build paths are mapped in the module (debug info, __FILE__), so two stores give the same bytes.
MAPPED_SOURCE_DIR = "/usr/src/eulerbake-kmod"
MAPPED_HEADERS_DIR = "/usr/src/kernels"
_GATE_CODE = (Path(eulerbake.linux.gate.__file__),)


def patch_series(name: str) -> list[LocalFile]:
    """The patches of `overlays/patches/<name>/`, in the order they apply (sorted by file name)."""
    directory = PATCHES / name
    patches = sorted(directory.glob("*.patch")) if directory.is_dir() else []
    if not patches:
        raise EulerbakeError(f"no patch series {directory}", hint="add NNNN-description.patch files there")
    return [LocalFile(path) for path in patches]


# -- kernel headers -----------------------------------------------------------------------------------


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
    """{package: root dir} when every part of `headers_dir` is dpkg-installed, else None.

    Why dpkg's md5sums make the key: the md5sums files fingerprint every file of the packages, so three
    small files (1.6 MB, 13 ms to hash) stand for the ~16,000 files of a Debian headers dir, whose
    canonical tree hash costs 0.8 s cold, 3.5 s the first time through the stat cache and 0.35 s warm
    (measured here) on every `doit` run. The builder checks each copied file against those md5sums, so a
    locally edited header cannot hide behind a stale key.
    """
    if not DPKG_INFO.is_dir():
        return None
    owners: dict[str, str] = {}
    for root in _external_roots(headers_dir):
        owner = _dpkg_owner(root)
        if owner is None:
            return None
        owners[owner] = str(root)
    return owners


def kernel_headers(label: str, source: FixedOutput | LocalTree | LocalFile | Derivation) -> Derivation:
    """Stage `kernel-headers`: a kernel-devel RPM or a headers dir → a self-contained tree in `out/build/`.

    The output holds `build/` (`make -C build M=…` works with it), `kernel-release` and `headers.json`.
    """
    inputs: dict[str, FixedOutput | LocalTree | LocalFile | Derivation] = {}
    params: dict[str, object] = {}
    if isinstance(source, LocalTree) and not source.path.is_dir():
        raise EulerbakeError(f"kernel headers directory {source.path} does not exist",
                             hint="install the headers (apt-get install linux-headers-<kver>) or fix the path")
    packages = dpkg_packages_for_headers(source.path) if isinstance(source, LocalTree) else None
    if isinstance(source, LocalTree) and packages:
        for package in sorted(packages):
            inputs[f"dpkg-{package}-md5sums"] = LocalFile(DPKG_INFO / f"{package}.md5sums")
            inputs[f"dpkg-{package}-list"] = LocalFile(DPKG_INFO / f"{package}.list")
        params = {"headers_dir": str(source.path), "dpkg_roots": packages}
    else:
        inputs["headers"] = source
    return Derivation(
        stage="kernel-headers",
        label=label,
        builder=build_kernel_headers,
        inputs=inputs,
        params=params,
        extra_code=_GATE_CODE,
        doc="kernel headers as a self-contained kbuild tree",
    )


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


def build_kernel_headers(ctx: BuildContext) -> None:
    """Copy the headers into `out/build`, check they can build and gate modules, record their release."""
    tree = ctx.out / "build"
    origin: str
    if "headers_dir" in ctx.params:
        source_dir = Path(ctx.params["headers_dir"])
        origin = str(source_dir)
        ctx.log(f"copying {source_dir} (dpkg: {', '.join(sorted(ctx.params['dpkg_roots']))})")
        _check_headers_source(source_dir, origin)
        files, notes = assemble_headers_tree(source_dir, tree)
        _verify_dpkg_md5sums(files, ctx.params["dpkg_roots"])
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
                    hint="pass a dpkg-installed headers dir (keyed by dpkg's md5sums) or a self-contained copy",
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


# -- module sources -----------------------------------------------------------------------------------


def ena_source_from_linux_tarball(label: str, tarball: LocalFile | FixedOutput) -> Derivation:
    """Stage `ena-source`: drivers/net/ethernet/amazon/ena out of a kernel source tarball (Debian linux-source)."""
    return Derivation(
        stage="ena-source",
        label=label,
        builder=build_tree_from_tarball,
        inputs={"tarball": tarball},
        params={"subdir": ENA_SUBDIR},
        doc=f"extract {ENA_SUBDIR} from the kernel source tarball",
    )


def build_tree_from_tarball(ctx: BuildContext) -> None:
    """Extract one directory of a kernel tarball (tar with a wildcard: ~10 s for Debian's 132 MB .tar.xz)."""
    tarball = ctx.inputs["tarball"]
    subdir = ctx.params["subdir"].strip("/")
    ctx.log(f"extracting {subdir} from {tarball.name}")
    proc = run(["tar", "-xf", tarball, "-C", ctx.work, "--wildcards", f"*/{subdir}/*"], check=False)
    found = sorted(ctx.work.glob(f"*/{subdir}"))
    if proc.returncode != 0 or len(found) != 1:
        raise EulerbakeError(
            f"{tarball.name} has no {subdir}/ (tar: {proc.stderr.decode(errors='replace').strip()[-300:]})",
            hint="use a kernel source tarball such as Debian's /usr/src/linux-source-<ver>.tar.xz",
        )
    shutil.copytree(found[0], ctx.out, dirs_exist_ok=True, symlinks=True)
    ctx.log(f"{len(list(ctx.out.iterdir()))} files from {found[0].relative_to(ctx.work)}")


# -- building a module --------------------------------------------------------------------------------


def host_arch() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@cache
def tool_version(tool: str) -> str:
    """First line of `tool --version`: part of the key, so a compiler upgrade rebuilds the module."""
    return run_text([tool, "--version"]).splitlines()[0].strip()


def kmod_build(
    label: str,
    *,
    source: Derivation | FixedOutput | LocalTree,
    headers: Derivation,
    patches: Sequence[LocalFile],
    module: str = "ena",
    arch: str = "x86_64",
    make_vars: Mapping[str, str] | None = None,
    strip_debug: bool = True,
) -> Derivation:
    """Stage `kmod-<module>`: apply `patches` in order, build `<module>.ko` against `headers`, for `arch`.

    Cross builds (arch differs from the host) use ARCH=<kbuild arch> CROSS_COMPILE=<triplet>-. The
    output is `out/<module>.ko` (debug info stripped, as `modules_install INSTALL_MOD_STRIP=1` does)
    plus `out/build-info.json`.
    """
    if arch not in ARCHES:
        raise EulerbakeError(f"unknown architecture {arch!r} for {module}.ko", hint=f"use one of {', '.join(ARCHES)}")
    variables = {"ARCH": ARCHES[arch][3]}
    if arch != host_arch():
        if arch not in CROSS_PREFIXES:
            raise EulerbakeError(f"no cross toolchain known for {arch}", hint="pass CROSS_COMPILE in make_vars")
        variables["CROSS_COMPILE"] = CROSS_PREFIXES[arch]
    variables.update(make_vars or {})
    cross = variables.get("CROSS_COMPILE", "")
    variables.setdefault("CC", f"{cross}gcc")
    toolchain = {"cc": tool_version(variables["CC"]), "ld": tool_version(variables.get("LD", f"{cross}ld"))}
    inputs: dict[str, Derivation | FixedOutput | LocalTree | LocalFile] = {"source": source, "headers": headers}
    for index, patch in enumerate(patches, 1):
        inputs[f"patch-{index:03d}"] = patch
    return Derivation(
        stage=f"kmod-{module}",
        label=label,
        builder=build_kmod,
        inputs=inputs,
        params={
            "module": module,
            "arch": arch,
            "make_vars": dict(sorted(variables.items())),
            "toolchain": toolchain,
            "patches": [patch.path.name for patch in patches],
            "strip_debug": strip_debug,
        },
        extra_code=_GATE_CODE,
        doc=f"build {module}.ko for {arch} ({len(patches)} patches)",
    )


def _module_source_dir(root: Path, module: str) -> Path:
    """The directory whose Makefile/Kbuild builds `<module>.o` (amzn-drivers: kernel/linux/ena)."""
    rule = re.compile(rf"^\s*obj-[^\n=]*\+?=[^\n]*\b{re.escape(module)}\.o\b", re.M)
    candidates = []
    for makefile in sorted(root.rglob("*")):
        if makefile.name in ("Makefile", "Kbuild") and makefile.is_file() and rule.search(
                makefile.read_text(errors="replace")):
            candidates.append(makefile.parent)
    if not candidates:
        raise EulerbakeError(f"no Makefile/Kbuild in the source builds {module}.o",
                             hint=f"the source must contain a kbuild Makefile with obj-… += {module}.o")
    return min(candidates, key=lambda p: (len(p.parts), str(p)))


def _materialise_source(ctx: BuildContext, module: str) -> Path:
    given = ctx.inputs["source"]
    unpacked = ctx.work / "unpacked"
    if given.is_dir():
        shutil.copytree(given, unpacked, symlinks=True)
    else:
        unpacked.mkdir()
        run(["tar", "-xf", given, "-C", unpacked])
    found = _module_source_dir(unpacked, module)
    # One fixed place, whatever the archive's layout: the path is mapped away in the module anyway.
    source = ctx.work / "src" / module
    source.parent.mkdir()
    found.rename(source)
    for path in source.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return source


def _hunk_header(patch: Path, filename: str, hunk: int) -> str:
    """The `@@ … @@` line of hunk number `hunk` (1-based) for `filename` in `patch`."""
    current = ""
    count = 0
    for line in patch.read_text(errors="replace").splitlines():
        if line.startswith("+++ "):
            current = line[4:].split("\t")[0]
            count = 0
        elif line.startswith("@@") and current.endswith(filename):
            count += 1
            if count == hunk:
                return line
    return ""


def apply_patch(patch: Path, source: Path) -> None:
    """`patch -p1 --batch --forward`; a failure names the patch, the file and the hunk."""
    proc = run(["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "--reject-file=-", "-i", patch],
               cwd=source, check=False)
    if proc.returncode == 0:
        return
    output = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    problems = []
    current = ""
    for line in output.splitlines():
        if line.startswith(("patching file ", "checking file ")):
            current = line.split(" ", 2)[2].strip("'")
        elif match := re.match(r"Hunk #(\d+) FAILED at (\d+)", line):
            header = _hunk_header(patch, current, int(match.group(1)))
            problems.append(f"{current}: hunk #{match.group(1)} (at line {match.group(2)}) failed: {header}")
        elif "can't find file to patch" in line or "No file to patch" in line:
            problems.append("a file it patches does not exist in the source")
        elif "Reversed (or previously applied) patch detected" in line:
            problems.append(f"{current}: looks already applied (reversed patch)")
    detail = "\n  ".join(problems or output.strip().splitlines()[-10:])
    raise EulerbakeError(
        f"patch {patch.name} does not apply:\n  {detail}",
        hint=f"refresh {patch} against this source (patch -p1 inside the module directory)",
    )


def build_kmod(ctx: BuildContext) -> None:
    """Patch the source, run kbuild against the headers, check and strip the module."""
    module = ctx.params["module"]
    variables: dict[str, str] = ctx.params["make_vars"]
    headers = ctx.inputs["headers"] / "build"
    release = (ctx.inputs["headers"] / "kernel-release").read_text().strip()
    source = _materialise_source(ctx, module).resolve()
    for index in range(1, len(ctx.params["patches"]) + 1):
        patch = ctx.inputs[f"patch-{index:03d}"]
        ctx.log(f"applying {patch.name}")
        apply_patch(patch, source)
    # Map the build paths (random temp dir, store location) to fixed ones: __FILE__ strings and debug
    # info then carry no trace of where the build ran, and two stores build the same bytes.
    prefix_maps = f"-ffile-prefix-map={source}={MAPPED_SOURCE_DIR}/{module} " \
                  f"-ffile-prefix-map={headers.resolve()}={MAPPED_HEADERS_DIR}/{release}"
    command: list[str | os.PathLike[str]] = ["make", "-C", headers, f"M={source}", f"-j{os.cpu_count() or 1}",
               *[f"{name}={value}" for name, value in variables.items()], f"KCFLAGS={prefix_maps}", "modules"]
    env = {"SOURCE_DATE_EPOCH": str(ctx.source_date_epoch), "KBUILD_BUILD_TIMESTAMP": "@" + str(ctx.source_date_epoch),
           "KBUILD_BUILD_USER": "eulerbake", "KBUILD_BUILD_HOST": "eulerbake"}
    ctx.log(f"building {module}.ko against {release} ({ctx.params['arch']}, {ctx.params['toolchain']['cc']})")
    try:
        run(command, env=env, timeout=1800)
    except CommandError as err:
        raise EulerbakeError(
            f"building {module}.ko against kernel headers {release} failed (kbuild exit {err.returncode}); "
            f"end of the compiler output:\n" + "\n".join("  | " + line for line in err.output_tail.splitlines()),
            hint=f"fix the source or add a patch to the series; rerun by hand: {' '.join(map(str, command))}",
        ) from err
    ko = source / f"{module}.ko"
    if not ko.is_file():
        built = ", ".join(p.name for p in source.rglob("*.ko")) or "none"
        raise EulerbakeError(f"kbuild did not produce {module}.ko (built: {built})",
                             hint="check the module name and make_vars (e.g. CONFIG_ENA_ETHERNET=m)")
    if ctx.params["strip_debug"]:
        run([f"{variables.get('CROSS_COMPILE', '')}strip", "--strip-debug", ko])
    _check_built_module(ko, ctx.params)
    shutil.copyfile(ko, ctx.out / ko.name)
    built_module = read_module(ctx.out / ko.name)
    info = {"module": module, "arch": ctx.params["arch"], "vermagic": built_module.vermagic,
            "srcversion": built_module.modinfo.get("srcversion", [""])[0],
            "version": built_module.modinfo.get("version", [""])[0], "toolchain": ctx.params["toolchain"],
            "patches": ctx.params["patches"], "kernel_release": release}
    (ctx.out / "build-info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _check_built_module(ko: Path, params: Mapping[str, object]) -> None:
    """The module is for the requested arch and was compiled by the compiler named in the key."""
    built = read_module(ko)
    arch = str(params["arch"])
    if built.arch != arch:
        raise EulerbakeError(f"{ko.name} came out as {built.arch}, not {arch}",
                             hint="check ARCH/CROSS_COMPILE in make_vars and the headers' architecture")
    toolchain = params["toolchain"]
    assert isinstance(toolchain, dict)
    # `gcc --version` says "gcc (Debian 12.2.0-14) 12.2.0"; .comment says "GCC: (Debian 12.2.0-14) 12.2.0".
    compiler_id = str(toolchain["cc"]).split(" ", 1)[-1]
    if compiler_id not in built.comment:
        raise EulerbakeError(
            f"{ko.name} was not compiled by '{toolchain['cc']}', the compiler in its key ({built.comment!r})",
            hint="the headers force another compiler: pass CC= in make_vars",
        )


# -- the gate -----------------------------------------------------------------------------------------


def kmod_overlay(label: str, ko: Derivation, headers: Derivation, image_modules: Derivation | None, *,
                 strict: bool = True) -> Derivation:
    """Stage `kmod-check`: gate the module against the headers (and the image's own modules).

    On pass the output is an overlay tree `lib/modules/<kver>/extra/<module>.ko` plus `gate-report.json`;
    on failure the build stops with the gate's reasons (and nothing enters the store).
    """
    inputs: dict[str, Derivation] = {"ko": ko, "headers": headers}
    if image_modules is not None:
        inputs["image"] = image_modules
    return Derivation(
        stage="kmod-check",
        label=label,
        builder=build_kmod_overlay,
        inputs=inputs,
        params={"module": ko.params.get("module", ko.stage.removeprefix("kmod-")), "strict": strict},
        extra_code=_GATE_CODE,
        doc="check the module against the target kernel (pyelftools gate) and lay it out as an overlay",
    )


def build_kmod_overlay(ctx: BuildContext) -> None:
    module = ctx.params["module"]
    ko = ctx.inputs["ko"] / f"{module}.ko"
    target = KernelTarget.from_headers(ctx.inputs["headers"] / "build")
    if "image" in ctx.inputs:
        target = target.with_image(KernelTarget.from_modules_dir(ctx.inputs["image"]))
    verdict = check_module(ko, target, strict=ctx.params["strict"])
    report = json.dumps(verdict.to_json(), indent=2, sort_keys=True)
    # Store paths differ between stores: name inputs by role so the report is reproducible.
    for role, path in sorted(ctx.inputs.items(), key=lambda item: -len(str(item[1]))):
        report = report.replace(str(path), f"<{role}>")
    if not verdict.passed:
        raise EulerbakeError(
            f"{module}.ko would not be accepted by kernel {target.release}:\n  " + "\n  ".join(verdict.reasons()),
            hint="rebuild the module against the image's own kernel headers"
            + ("" if verdict.kernel_loads is False or not ctx.params["strict"] else
               "; the kernel itself would load it: strict=False accepts the release mismatch"),
        )
    extra = ctx.out / "lib" / "modules" / target.release / "extra"
    extra.mkdir(parents=True)
    shutil.copyfile(ko, extra / ko.name)
    (ctx.out / "gate-report.json").write_text(report + "\n")
    ctx.log(f"{module}.ko passes the gate for {target.release}: lib/modules/{target.release}/extra/{ko.name}")


# -- the offline sample ---------------------------------------------------------------------------------


def debian_ena_chain(label: str, kernel_release: str, image_modules: Derivation | None = None, *,
                     linux_source: Path = Path("/usr/src/linux-source-6.1.tar.xz")) -> dict[str, Derivation]:
    """The sample's ENA chain on the host's Debian kernel (headers + linux-source): no download needed.

    Returns the derivations by role: headers, source, ko, overlay.
    """
    headers_dir = Path(f"/usr/src/linux-headers-{kernel_release}")
    if not headers_dir.is_dir():
        raise EulerbakeError(f"the sample needs the headers of kernel {kernel_release} ({headers_dir})",
                             hint=f"apt-get install linux-headers-{kernel_release} linux-source")
    if not linux_source.is_file():
        raise EulerbakeError(f"the sample builds ENA from {linux_source}", hint="apt-get install linux-source")
    headers = kernel_headers(label, LocalTree(headers_dir))
    source = ena_source_from_linux_tarball(label, LocalFile(linux_source))
    ko = kmod_build(label, source=source, headers=headers, patches=patch_series("ena-linux-6.1"),
                    module="ena", arch=host_arch(), make_vars={"CONFIG_ENA_ETHERNET": "m"})
    overlay = kmod_overlay(label, ko, headers, image_modules)
    return {"headers": headers, "source": source, "ko": ko, "overlay": overlay}
