"""A kernel target: what a kernel exports and expects, read from a headers tree (`utsrelease.h`, `.config`,
`Module.symvers`), an installed `lib/modules/<kver>/` directory, or both.
"""

from __future__ import annotations

import gzip
import lzma
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.module import ARCHES, MODULE_SUFFIXES, normalise_module_name, read_module


@dataclass(frozen=True)
class Export:
    """One exported kernel symbol, as Module.symvers lists it."""

    crc: int | None
    owner: str  # "vmlinux" or the module's name
    gpl_only: bool = False
    namespace: str = ""


def parse_module_symvers(text: str) -> dict[str, Export]:
    """Module.symvers: `0xCRC<TAB>symbol<TAB>module[<TAB>EXPORT_SYMBOL[_GPL][<TAB>namespace]]`."""
    exports: dict[str, Export] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or not fields[0].startswith("0x"):
            continue
        crc = int(fields[0], 16)
        owner = fields[2]
        owner = "vmlinux" if owner == "vmlinux" else normalise_module_name(owner.rsplit("/", 1)[-1])
        gpl_only = len(fields) > 3 and fields[3].endswith("_GPL")
        namespace = fields[4].strip() if len(fields) > 4 else ""
        # An all-zero CRC is what modpost writes for a kernel built without modversions.
        exports[fields[1]] = Export(crc=crc or None, owner=owner, gpl_only=gpl_only, namespace=namespace)
    return exports


def read_text_maybe_compressed(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(b"\x1f\x8b"):
        raw = gzip.decompress(raw)
    elif raw.startswith(b"\xfd7zXZ\0"):
        raw = lzma.decompress(raw)
    return raw.decode(errors="replace")


def parse_kconfig(text: str) -> dict[str, str]:
    """`CONFIG_FOO=y` lines of .config / include/config/auto.conf, unquoted."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            config[key] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return config


def arch_from_config(config: dict[str, str]) -> str:
    big_endian = config.get("CONFIG_CPU_BIG_ENDIAN") == "y"
    if config.get("CONFIG_X86_64") == "y":
        return "x86_64"
    if config.get("CONFIG_X86_32") == "y":
        return "i686"
    if config.get("CONFIG_ARM64") == "y":
        return "aarch64_be" if big_endian else "aarch64"
    if config.get("CONFIG_ARM") == "y":
        return "armv7l"
    if config.get("CONFIG_RISCV") == "y" and config.get("CONFIG_64BIT") == "y":
        return "riscv64"
    if config.get("CONFIG_LOONGARCH") == "y":
        return "loongarch64"
    if config.get("CONFIG_PPC64") == "y":
        return "ppc64le" if config.get("CONFIG_CPU_LITTLE_ENDIAN") == "y" else "ppc64"
    if config.get("CONFIG_S390") == "y":
        return "s390x"
    raise EulerbakeError(
        "cannot tell the target architecture from the kernel config (no CONFIG_X86_64, CONFIG_ARM64, …)",
        hint="check that the headers' .config is the kernel's real configuration",
    )


def arch_vermagic(headers: Path, arch: str, config: dict[str, str]) -> str:
    """MODULE_ARCH_VERMAGIC (asm/vermagic.h) for the kernels eulerbake targets."""
    srcarch = ARCHES[arch][3]
    if srcarch == "x86":
        if arch == "x86_64":
            return ""  # "X86_64 does not define MODULE_PROC_FAMILY"
    elif srcarch == "powerpc":
        flags = "mprofile-kernel " if config.get("CONFIG_MPROFILE_KERNEL") == "y" else ""
        return flags + ("relocatable " if config.get("CONFIG_RELOCATABLE") == "y" else "")
    header = headers / "arch" / srcarch / "include" / "asm" / "vermagic.h"
    if not header.is_file():
        return ""  # include/linux/vermagic.h defaults MODULE_ARCH_VERMAGIC to ""
    match = re.search(r'^#define\s+MODULE_ARCH_VERMAGIC\s+"([^"]*)"\s*$', header.read_text(errors="replace"), re.M)
    if match:
        return match.group(1)
    raise EulerbakeError(
        f"cannot derive the {arch} vermagic suffix from {header} (it depends on CPU-family options)",
        hint="give the image's own modules directory as well (its modules carry the kernel's exact vermagic)",
    )


def vermagic_from_config(release: str, config: dict[str, str], arch_suffix: str) -> str:
    """VERMAGIC_STRING of include/linux/vermagic.h, from the kernel's configuration."""
    def enabled(option: str) -> bool:
        return config.get(option) == "y"

    parts = [release + " "]
    parts.append("SMP " if enabled("CONFIG_SMP") else "")
    # 5.10 spells it CONFIG_PREEMPT, 6.x CONFIG_PREEMPT_BUILD (selected by PREEMPT and PREEMPT_DYNAMIC).
    if enabled("CONFIG_PREEMPT_BUILD") or enabled("CONFIG_PREEMPT"):
        parts.append("preempt ")
    elif enabled("CONFIG_PREEMPT_RT"):
        parts.append("preempt_rt ")
    parts.append("mod_unload " if enabled("CONFIG_MODULE_UNLOAD") else "")
    parts.append("modversions " if enabled("CONFIG_MODVERSIONS") else "")
    parts.append(arch_suffix)
    return "".join(parts)


def _randstruct_suffix(headers: Path, config: dict[str, str]) -> str:
    if config.get("CONFIG_RANDSTRUCT") != "y" and config.get("CONFIG_GCC_PLUGIN_RANDSTRUCT") != "y":
        return ""
    seed_header = headers / "include" / "generated" / "randstruct_hash.h"
    match = re.search(r'RANDSTRUCT_HASHED_SEED\s+"([^"]*)"', seed_header.read_text() if seed_header.is_file() else "")
    if not match:
        raise EulerbakeError(f"the kernel uses RANDSTRUCT but {seed_header} is missing", hint="use complete headers")
    prefix = "RANDSTRUCT_" if config.get("CONFIG_RANDSTRUCT") == "y" else "RANDSTRUCT_PLUGIN_"
    return prefix + match.group(1)


class CrcEvidence:
    """CRCs of kernel symbols learnt from the `__versions` of the modules a kernel ships.

    Used when a modules directory comes without Module.symvers/symvers.gz: every shipped module records
    the kernel's CRC of each symbol it imports, `module_layout` included. Scanning thousands of modules
    costs ~4 ms each, so modules are read lazily, only until every symbol asked for is found.
    """

    def __init__(self, modules: Iterable[Path]) -> None:
        self._pending: Iterator[Path] = iter(modules)
        self.crcs: dict[str, int] = {}
        self.modules_read = 0

    def lookup(self, symbols: Iterable[str]) -> dict[str, int]:
        wanted = set(symbols)
        while not wanted <= self.crcs.keys():
            path = next(self._pending, None)
            if path is None:
                break
            try:
                module = read_module(path)
            except EulerbakeError:
                continue
            self.modules_read += 1
            for name, crc in (module.versions or {}).items():
                self.crcs.setdefault(name, crc)
        return {name: self.crcs[name] for name in wanted if name in self.crcs}


@dataclass
class KernelTarget:
    """The kernel a module must load into: its vermagic, architecture and exported symbols."""

    release: str
    vermagic: str
    arch: str
    modversions: bool
    force_load: bool  # CONFIG_MODULE_FORCE_LOAD: a module without __versions/vermagic loads, tainting
    missing_namespace_allowed: bool = False  # CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS
    exports: dict[str, Export] | None = None  # complete export table (Module.symvers), when known
    evidence: CrcEvidence | None = None  # CRCs seen in shipped modules, when no export table is known
    modules: frozenset[str] | None = None  # loadable + built-in module names, when known
    origin: dict[str, str] = field(default_factory=dict)  # fact → where it was read from

    @property
    def machine(self) -> str:
        return ARCHES[self.arch][0] if self.arch in ARCHES else self.arch

    @property
    def elf_class(self) -> int:
        return ARCHES[self.arch][1] if self.arch in ARCHES else 0

    @property
    def little_endian(self) -> bool:
        return ARCHES[self.arch][2] if self.arch in ARCHES else True

    def summary(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "vermagic": self.vermagic,
            "arch": self.arch,
            "modversions": self.modversions,
            "exports": len(self.exports) if self.exports is not None else None,
            "modules": len(self.modules) if self.modules is not None else None,
            "origin": dict(self.origin),
        }

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_headers(cls, headers: Path) -> KernelTarget:
        """Read a kernel-devel tree (`make -C <it> M=…` works with it), or a store output holding one in build/."""
        headers = find_headers_tree(Path(headers))
        uts = headers / "include" / "generated" / "utsrelease.h"
        match = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts.read_text())
        if not match:
            raise EulerbakeError(f"{uts} does not define UTS_RELEASE", hint="use the headers of a built kernel")
        release = match.group(1)
        config_file = headers / "include" / "config" / "auto.conf"
        if not config_file.is_file():
            config_file = headers / ".config"
        if not config_file.is_file():
            raise EulerbakeError(
                f"kernel headers {headers} have neither include/config/auto.conf nor .config",
                hint="use complete kernel-devel headers: the module flags (SMP, preempt, modversions) come from them",
            )
        config = parse_kconfig(config_file.read_text(errors="replace"))
        arch = arch_from_config(config)
        vermagic = vermagic_from_config(release, config, arch_vermagic(headers, arch, config))
        vermagic += _randstruct_suffix(headers, config)
        symvers = headers / "Module.symvers"
        if not symvers.is_file():
            raise EulerbakeError(
                f"kernel headers {headers} have no Module.symvers: the kernel's symbol CRCs are unknown",
                hint="use the kernel-devel package of the exact kernel build (it ships Module.symvers)",
            )
        exports = parse_module_symvers(symvers.read_text(errors="replace"))
        return cls(
            release=release,
            vermagic=vermagic,
            arch=arch,
            modversions=config.get("CONFIG_MODVERSIONS") == "y",
            force_load=config.get("CONFIG_MODULE_FORCE_LOAD") == "y",
            missing_namespace_allowed=config.get("CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS") == "y",
            exports=exports,
            modules=frozenset(e.owner for e in exports.values() if e.owner != "vmlinux"),
            origin={
                "release": str(uts),
                "flags": str(config_file),
                "exports": str(symvers),
                "modules": f"{symvers} (exporting modules only)",
            },
        )

    @classmethod
    def from_modules_dir(cls, path: Path) -> KernelTarget:
        """Read an installed `lib/modules/<kver>/` (or a root/store output holding exactly one)."""
        moddir, root = find_modules_dir(Path(path))
        release = moddir.name
        modules = list(installed_modules(moddir))
        if not modules:
            raise EulerbakeError(
                f"{moddir} holds no kernel module to read the kernel's vermagic from",
                hint="give the kernel headers too (--kernel HEADERS), or an image whose kernel ships modules",
            )
        sample = read_module(modules[0])
        if not sample.vermagic:
            raise EulerbakeError(f"{modules[0]} has no vermagic", hint="the modules directory looks damaged")
        names = {normalise_module_name(p.name.split(".", 1)[0]) for p in modules}
        builtin = moddir / "modules.builtin"
        if builtin.is_file():
            names |= {normalise_module_name(Path(line).name.split(".", 1)[0])
                      for line in builtin.read_text().split() if line}
        origin = {"release": str(moddir), "flags": f"vermagic of {modules[0]}", "modules": f"{moddir}/modules.*"}
        exports = None
        evidence = None
        symvers = find_symvers(moddir, root, release)
        if symvers is not None:
            exports = parse_module_symvers(read_text_maybe_compressed(symvers))
            origin["exports"] = str(symvers)
        else:
            evidence = CrcEvidence(modules)
            origin["exports"] = f"__versions of the modules in {moddir} (no Module.symvers shipped)"
        flags = sample.vermagic.split(" ")[1:]
        # The installed kernel's config (/boot/config-<kver>, or RHEL-style lib/modules/<kver>/config) says
        # whether a module without CRCs is force-loaded; without it, the loader refusing is the safe guess.
        config: dict[str, str] = {}
        for candidate in ([root / "boot" / f"config-{release}"] if root is not None else []) + [moddir / "config"]:
            if candidate.is_file():
                config = parse_kconfig(candidate.read_text(errors="replace"))
                origin["config"] = str(candidate)
                break
        return cls(
            release=release,
            vermagic=sample.vermagic,
            arch=sample.arch,
            modversions="modversions" in flags,
            force_load=config.get("CONFIG_MODULE_FORCE_LOAD") == "y",
            missing_namespace_allowed=config.get("CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS") == "y",
            exports=exports,
            evidence=evidence,
            modules=frozenset(names),
            origin=origin,
        )

    def with_image(self, image: KernelTarget) -> KernelTarget:
        """These headers checked against an image's own modules: the image's facts win, headers add CRCs."""
        if image.release != self.release or image.vermagic != self.vermagic:
            raise EulerbakeError(
                f"the headers are for kernel '{self.vermagic}' but the image's kernel is '{image.vermagic}'",
                hint="build against the kernel-devel of the image's own kernel release",
            )
        return KernelTarget(
            release=image.release,
            vermagic=image.vermagic,
            arch=image.arch,
            modversions=self.modversions,
            force_load=self.force_load,
            missing_namespace_allowed=self.missing_namespace_allowed,
            exports=self.exports if self.exports is not None else image.exports,
            evidence=None if self.exports is not None else image.evidence,
            modules=image.modules,
            origin={**image.origin, "exports": self.origin.get("exports", ""), "flags": self.origin.get("flags", "")},
        )

    def crcs(self, symbols: Iterable[str]) -> dict[str, int | None]:
        """Kernel CRC per symbol (None: exported without a CRC); symbols not known to be exported are left out."""
        symbols = list(symbols)
        if self.exports is not None:
            return {s: self.exports[s].crc for s in symbols if s in self.exports}
        if self.evidence is not None:
            return dict(self.evidence.lookup(symbols))
        return {}


def find_headers_tree(path: Path) -> Path:
    for candidate in (path, path / "build"):
        if (candidate / "include" / "generated" / "utsrelease.h").is_file():
            return candidate
    raise EulerbakeError(
        f"{path} is not a kernel headers tree (no include/generated/utsrelease.h)",
        hint="give a kernel-devel tree such as /usr/src/kernels/<kver> or /usr/src/linux-headers-<kver>",
    )


def find_modules_dir(path: Path) -> tuple[Path, Path | None]:
    """(lib/modules/<kver>, the root above it if any) for a modules dir, lib/modules, a root or a store output."""
    if (path / "modules.dep").is_file() or (path / "modules.order").is_file():
        root = path.parents[2] if path.parent.name == "modules" and path.parent.parent.name == "lib" else None
        return path, root
    for base, root in ((path / "lib" / "modules", path), (path, None)):
        if not base.is_dir():
            continue
        releases = sorted(p.name for p in base.iterdir() if (p / "modules.dep").is_file())
        wanted = (path / "kernel-release").read_text().strip() if (path / "kernel-release").is_file() else None
        if wanted and wanted in releases:
            return base / wanted, root
        if len(releases) == 1:
            return base / releases[0], root
        if len(releases) > 1:
            raise EulerbakeError(
                f"{base} holds modules for several kernels: {', '.join(releases)}",
                hint="point --kernel at one of them: lib/modules/<kver>",
            )
    raise EulerbakeError(
        f"{path} is not a kernel modules directory (no modules.dep under it)",
        hint="give lib/modules/<kver> of the target system (run depmod there if modules.dep is missing)",
    )


def installed_modules(moddir: Path) -> Iterator[Path]:
    """Modules listed in modules.dep (in its order), or every module file when it lists none."""
    listed = False
    dep = moddir / "modules.dep"
    if dep.is_file():
        for line in dep.read_text().splitlines():
            relative = line.split(":", 1)[0].strip()
            if relative and (moddir / relative).is_file():
                listed = True
                yield moddir / relative
    if not listed:
        for found in sorted(moddir.rglob("*")):
            if found.name.endswith(MODULE_SUFFIXES) and found.is_file():
                yield found


def _within_root(root: Path | None, link: Path) -> Path:
    """Resolve `link` as the target system would: absolute symlinks point inside its root."""
    if root is None or not link.is_symlink():
        return link
    target = link.readlink()
    return root / target.relative_to("/") if target.is_absolute() else link.parent / target


def find_symvers(moddir: Path, root: Path | None, release: str) -> Path | None:
    """A symbol version table shipped with an installed kernel (RHEL/openEuler ship symvers.gz)."""
    candidates = [moddir / "symvers.gz", moddir / "symvers.xz", moddir / "symvers"]
    if root is not None:
        candidates += [root / "boot" / f"symvers-{release}.gz", root / "boot" / f"symvers-{release}.xz"]
    candidates.append(_within_root(root, moddir / "build") / "Module.symvers")
    return next((c for c in candidates if c.is_file()), None)


def load_target(kernels: Iterable[Path]) -> KernelTarget:
    """A target from headers trees and/or modules directories (already extracted from images)."""
    headers: KernelTarget | None = None
    image: KernelTarget | None = None
    for path in kernels:
        path = Path(path)
        if not path.exists():
            raise EulerbakeError(f"kernel {path} does not exist", hint="give a headers dir, modules dir or image")
        is_headers = any((c / "include" / "generated" / "utsrelease.h").is_file() for c in (path, path / "build"))
        if is_headers and headers is None:
            headers = KernelTarget.from_headers(path)
        elif image is None:
            image = KernelTarget.from_modules_dir(path)
        else:
            raise EulerbakeError("give at most one headers tree and one modules directory or image", hint=str(path))
    if headers and image:
        return headers.with_image(image)
    if headers or image:
        return headers or image  # type: ignore[return-value]
    raise EulerbakeError("no kernel given to check against", hint="--kernel HEADERS|MODULES-DIR|IMAGE")


# -- the verdict --------------------------------------------------------------------------------------


