"""Stage `kmod-build`: an out-of-tree kernel module built against kernel headers, patches applied in order.

    kmod-build:<label>  source (tree or tarball) + patch series + kernel-headers → <module>.ko + build-info.json

The ENA seed: openEuler's aarch64 kernel lacked the AWS ENA driver, so the instance had no network.
The fix by hand was to build amzn-drivers' ENA against `kernel-devel-$(uname -r)` with a patched
ena_ethtool.c and copy ena.ko into the image; a module the kernel refuses is only discovered at boot,
on a machine nobody can reach. Here the build is cached by everything that decides its bytes (source,
patches, headers, compiler and linker versions, make variables), and `kmod-check` refuses, before the
image is built, a module the image's kernel would not load.

The compiler and linker are the stage's declared tools, so their versions are part of the key without
running them when the graph is built: a cross build for aarch64 needs gcc-aarch64-linux-gnu only when
its key is computed, and `doit list` or the x86_64 sample never ask for it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalFile, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.module import ARCHES, read_module
from eulerbake.tools.run import CommandError, run
from eulerbake.tools.versions import tool_version

PATCHES = Path(__file__).resolve().parents[2] / "overlays" / "patches"
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
# Run by the builder whatever the target; the compiler, linker and strip of the target come on top (`toolchain`).
TOOLS = ("make", "patch", "tar")


@dataclass(frozen=True)
class Params:
    module: str  # builds <module>.ko
    arch: str  # the target architecture (uname -m style)
    make_vars: dict[str, str]  # ARCH, CROSS_COMPILE, CC, … passed to kbuild
    patches: tuple[str, ...]  # file names of the patch series, in the order applied
    strip_debug: bool


def patch_series(name: str) -> list[LocalFile]:
    """The patches of `overlays/patches/<name>/`, in the order they apply (sorted by file name)."""
    directory = PATCHES / name
    patches = sorted(directory.glob("*.patch")) if directory.is_dir() else []
    if not patches:
        raise EulerbakeError(f"no patch series {directory}", hint="add NNNN-description.patch files there")
    return [LocalFile(path) for path in patches]


def host_arch() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def toolchain(make_vars: Mapping[str, str]) -> dict[str, str]:
    """{"cc", "ld", "strip"}: the commands kbuild and the builder run for these make variables (nothing runs)."""
    cross = make_vars.get("CROSS_COMPILE", "")
    return {"cc": make_vars.get("CC", f"{cross}gcc"), "ld": make_vars.get("LD", f"{cross}ld"), "strip": f"{cross}strip"}


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
    """Stage `kmod-build:<label>`: apply `patches` in order, build `<module>.ko` against `headers`, for `arch`.

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
    variables.setdefault("CC", f"{variables.get('CROSS_COMPILE', '')}gcc")
    inputs: dict[str, Derivation | FixedOutput | LocalTree | LocalFile] = {"source": source, "headers": headers}
    for index, patch in enumerate(patches, 1):
        inputs[f"patch-{index:03d}"] = patch
    return Derivation(
        stage="kmod-build",
        label=label,
        builder=build,
        inputs=inputs,
        params=Params(module=module, arch=arch, make_vars=dict(sorted(variables.items())),
                      patches=tuple(patch.path.name for patch in patches), strip_debug=strip_debug),
        tools=(*TOOLS, *toolchain(variables).values()),
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
    """The module's source directory, copied (or unpacked) into the work dir: patches and kbuild write there."""
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


def build(ctx: BuildContext) -> None:
    """Patch the source, run kbuild against the headers, check and strip the module."""
    params: Params = ctx.params
    module = params.module
    tools = toolchain(params.make_vars)
    compiler = {"cc": tool_version(tools["cc"]), "ld": tool_version(tools["ld"])}  # as in the key's `tools`
    headers = ctx.inputs["headers"] / "build"
    release = (ctx.inputs["headers"] / "kernel-release").read_text().strip()
    source = _materialise_source(ctx, module).resolve()
    for index in range(1, len(params.patches) + 1):
        patch = ctx.inputs[f"patch-{index:03d}"]
        ctx.log(f"applying {patch.name}")
        apply_patch(patch, source)
    # Map the build paths (random temp dir, store location) to fixed ones: __FILE__ strings and debug
    # info then carry no trace of where the build ran, and two stores build the same bytes.
    prefix_maps = f"-ffile-prefix-map={source}={MAPPED_SOURCE_DIR}/{module} " \
                  f"-ffile-prefix-map={headers.resolve()}={MAPPED_HEADERS_DIR}/{release}"
    command: list[str | os.PathLike[str]] = ["make", "-C", headers, f"M={source}", f"-j{os.cpu_count() or 1}",
               *[f"{name}={value}" for name, value in params.make_vars.items()], f"KCFLAGS={prefix_maps}", "modules"]
    env = {"SOURCE_DATE_EPOCH": str(ctx.source_date_epoch), "KBUILD_BUILD_TIMESTAMP": "@" + str(ctx.source_date_epoch),
           "KBUILD_BUILD_USER": "eulerbake", "KBUILD_BUILD_HOST": "eulerbake"}
    ctx.log(f"building {module}.ko against {release} ({params.arch}, {compiler['cc']})")
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
    if params.strip_debug:
        run([tools["strip"], "--strip-debug", ko])
    _check_built_module(ko, params.arch, compiler["cc"])
    shutil.copyfile(ko, ctx.out / ko.name)
    built_module = read_module(ctx.out / ko.name)
    info = {"module": module, "arch": params.arch, "vermagic": built_module.vermagic,
            "srcversion": built_module.modinfo.get("srcversion", [""])[0],
            "version": built_module.modinfo.get("version", [""])[0], "toolchain": compiler,
            "patches": list(params.patches), "kernel_release": release}
    (ctx.out / "build-info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _check_built_module(ko: Path, arch: str, compiler: str) -> None:
    """The module is for the requested arch and was compiled by the compiler named in the key."""
    built = read_module(ko)
    if built.arch != arch:
        raise EulerbakeError(f"{ko.name} came out as {built.arch}, not {arch}",
                             hint="check ARCH/CROSS_COMPILE in make_vars and the headers' architecture")
    # `gcc --version` says "gcc (Debian 12.2.0-14) 12.2.0"; .comment says "GCC: (Debian 12.2.0-14) 12.2.0".
    compiler_id = compiler.split(" ", 1)[-1]
    if compiler_id not in built.comment:
        raise EulerbakeError(
            f"{ko.name} was not compiled by '{compiler}', the compiler in its key ({built.comment!r})",
            hint="the headers force another compiler: pass CC= in make_vars",
        )
