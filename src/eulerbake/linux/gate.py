"""The kernel-module gate: would this kernel load this `.ko`? Answered with pyelftools, before an image is built.

A module is read from its ELF sections (`.modinfo` for vermagic/depends/license, `__versions` for the
modversions CRCs, `.symtab` for the symbols it imports). A kernel target is read from a kernel-devel /
headers tree (`include/generated/utsrelease.h`, `.config`, `Module.symvers`), from an installed
`lib/modules/<kver>/` directory (the vermagic of a module shipped there, modules.dep/modules.builtin), or
both. `check_module` replays the checks of the kernel's module loader (Linux 6.1 `kernel/module/`), in
its order and with its wording:

1. `check_modstruct_version`: the CRC of `module_layout` (when the kernel exports it with a CRC);
2. `check_modinfo`: `same_magic()` compares the vermagic strings, *skipping the release part when the
   module has a `__versions` section* (with modversions the CRCs decide, not the release);
3. `simplify_symbols` → `resolve_symbol`: each undefined symbol must be exported (GPL-only exports
   only to GPL-compatible modules, namespaced exports only when imported) with a matching CRC.

That is the *kernel verdict*. On top of it a separate, clearly labelled *policy* (strict by default)
rejects a release mismatch the kernel would tolerate: modprobe and depmod file a module under
/lib/modules/<kver>/, and a module built for another release is a packaging error waiting to happen.
"""

from __future__ import annotations

import gzip
import io
import lzma
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from eulerbake.core.errors import EulerbakeError

# arch name (uname -m style) → (ELF e_machine, ELF class, little endian, kbuild SRCARCH)
ARCHES: dict[str, tuple[str, int, bool, str]] = {
    "x86_64": ("EM_X86_64", 64, True, "x86"),
    "i686": ("EM_386", 32, True, "x86"),
    "aarch64": ("EM_AARCH64", 64, True, "arm64"),
    "aarch64_be": ("EM_AARCH64", 64, False, "arm64"),
    "armv7l": ("EM_ARM", 32, True, "arm"),
    "riscv64": ("EM_RISCV", 64, True, "riscv"),
    "loongarch64": ("EM_LOONGARCH", 64, True, "loongarch"),
    "ppc64le": ("EM_PPC64", 64, True, "powerpc"),
    "ppc64": ("EM_PPC64", 64, False, "powerpc"),
    "s390x": ("EM_S390", 64, False, "s390"),
}
# Names for ELF machines in messages; pyelftools spells them EM_*.
MACHINE_NAMES = {
    "EM_X86_64": "x86-64",
    "EM_386": "i386",
    "EM_AARCH64": "AArch64",
    "EM_ARM": "ARM",
    "EM_RISCV": "RISC-V",
    "EM_LOONGARCH": "LoongArch",
    "EM_PPC64": "PowerPC64",
    "EM_S390": "S/390",
}
# Kernel licenses that may use EXPORT_SYMBOL_GPL symbols (include/linux/license.h).
GPL_COMPATIBLE = {"GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL"}
MODULE_STRUCT_SIZE = 64  # struct modversion_info: unsigned long crc + char name[64 - sizeof(long)]
SIGNATURE_MAGIC = b"~Module signature appended~\n"
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def arch_of_elf(machine: str, elf_class: int, little_endian: bool) -> str:
    for arch, (em, cls, le, _srcarch) in ARCHES.items():
        if (em, cls, le) == (machine, elf_class, little_endian):
            return arch
    return f"{machine}/{elf_class}-bit/{'LE' if little_endian else 'BE'}"


def describe_elf(machine: str, elf_class: int, little_endian: bool) -> str:
    endian = "little-endian" if little_endian else "big-endian"
    return f"{MACHINE_NAMES.get(machine, machine)} ELF{elf_class} {endian}"


def normalise_module_name(name: str) -> str:
    """The kernel treats '-' and '_' in module names alike."""
    return name.replace("-", "_")


# -- reading a module ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelModule:
    """What the module loader looks at in one `.ko` file."""

    path: Path
    name: str
    machine: str
    elf_class: int
    little_endian: bool
    modinfo: dict[str, list[str]]
    versions: dict[str, int] | None  # the __versions CRCs; None when the loader would see no __versions
    versions_unallocated: bool  # a __versions section exists but without SHF_ALLOC: the loader ignores it
    undefined: tuple[tuple[str, bool], ...]  # (symbol, weak) the module imports, in symbol-table order
    signed: bool
    comment: str = ""  # the .comment section: which compiler built it ("GCC: (Debian 12.2.0-14) 12.2.0")

    @property
    def vermagic(self) -> str | None:
        values = self.modinfo.get("vermagic")
        return values[0] if values else None

    @property
    def release(self) -> str | None:
        return self.vermagic.split(" ", 1)[0] if self.vermagic else None

    @property
    def depends(self) -> tuple[str, ...]:
        values = self.modinfo.get("depends", [""])
        return tuple(dep for dep in values[0].split(",") if dep)

    @property
    def license(self) -> str:
        values = self.modinfo.get("license")
        return values[0] if values else "unspecified"

    @property
    def arch(self) -> str:
        return arch_of_elf(self.machine, self.elf_class, self.little_endian)


def parse_modinfo(data: bytes) -> dict[str, list[str]]:
    """`.modinfo` is NUL-separated `tag=value` strings (NUL padding allowed between them)."""
    info: dict[str, list[str]] = {}
    for raw in data.split(b"\0"):
        if not raw or b"=" not in raw:
            continue
        tag, _, value = raw.decode(errors="replace").partition("=")
        info.setdefault(tag, []).append(value)
    return info


def parse_versions(data: bytes, elf_class: int, little_endian: bool) -> dict[str, int]:
    """`__versions` is an array of {unsigned long crc; char name[64 - sizeof(long)]}."""
    crc_size = 8 if elf_class == 64 else 4
    order: Literal["little", "big"] = "little" if little_endian else "big"
    crcs: dict[str, int] = {}
    for offset in range(0, len(data) - MODULE_STRUCT_SIZE + 1, MODULE_STRUCT_SIZE):
        entry = data[offset : offset + MODULE_STRUCT_SIZE]
        name = entry[crc_size:].split(b"\0", 1)[0].decode(errors="replace")
        if name:
            crcs.setdefault(name, int.from_bytes(entry[:crc_size], order))
    return crcs


def _module_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EulerbakeError(f"cannot read kernel module {path}: {exc.strerror}", hint="check the path") from exc
    if path.name.endswith(".xz") or raw.startswith(b"\xfd7zXZ\0"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz") or raw.startswith(b"\x1f\x8b"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst") or raw.startswith(b"\x28\xb5\x2f\xfd"):
        try:
            import zstandard
        except ImportError as exc:
            raise EulerbakeError(f"{path} is zstd-compressed", hint="pip install zstandard") from exc
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(raw))
    return raw


def read_module(path: Path) -> KernelModule:
    """Parse a `.ko` (optionally .xz/.gz/.zst compressed) as the module loader would see it."""
    # pyelftools loads here, not at import: the recipes import this module on every doit run.
    from elftools.common.exceptions import ELFError
    from elftools.elf.constants import SH_FLAGS
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    data = _module_bytes(Path(path))
    try:
        elf = ELFFile(io.BytesIO(data))
    except ELFError as exc:
        raise EulerbakeError(
            f"{path} is not a kernel module: it is not an ELF file ({exc})",
            hint="pass the .ko that kbuild produced (make -C <headers> M=<dir> modules)",
        ) from exc
    if elf["e_type"] != "ET_REL":
        raise EulerbakeError(
            f"{path} is not a kernel module: its ELF type is {elf['e_type']}, modules are relocatable objects (ET_REL)",
            hint="pass the .ko that kbuild produced, not a program or shared library",
        )
    modinfo_section = elf.get_section_by_name(".modinfo")
    if modinfo_section is None:
        raise EulerbakeError(
            f"{path} is not a kernel module: it has no .modinfo section",
            hint="a plain object file (.o) is not a module: link it with kbuild into a .ko",
        )
    modinfo = parse_modinfo(modinfo_section.data())
    machine, elf_class = elf["e_machine"], elf.elfclass
    little_endian = elf.little_endian
    versions: dict[str, int] | None = None
    unallocated = False
    for section in elf.iter_sections():
        if section.name != "__versions":
            continue
        # The loader's find_sec() ignores sections without SHF_ALLOC ("Alloc bit cleared means ignore it").
        if section["sh_flags"] & SH_FLAGS.SHF_ALLOC:
            versions = parse_versions(section.data(), elf_class, little_endian)
            break
        unallocated = True
    undefined: list[tuple[str, bool]] = []
    symtab = elf.get_section_by_name(".symtab")
    if isinstance(symtab, SymbolTableSection):
        for index, symbol in enumerate(symtab.iter_symbols()):
            if index == 0 or symbol["st_shndx"] != "SHN_UNDEF" or not symbol.name:
                continue
            undefined.append((symbol.name, symbol["st_info"]["bind"] == "STB_WEAK"))
    name = modinfo.get("name", [""])[0] or _this_module_name(elf) or Path(path).name.split(".", 1)[0]
    comment_section = elf.get_section_by_name(".comment")
    comment = comment_section.data().replace(b"\0", b"\n").decode(errors="replace") if comment_section else ""
    return KernelModule(
        path=Path(path),
        name=name,
        machine=machine if isinstance(machine, str) else f"EM_{machine}",
        elf_class=elf_class,
        little_endian=little_endian,
        modinfo=modinfo,
        versions=versions,
        versions_unallocated=unallocated,
        undefined=tuple(undefined),
        signed=data.endswith(SIGNATURE_MAGIC),
        comment="\n".join(sorted({line for line in comment.splitlines() if line})),
    )


def _this_module_name(elf: Any) -> str:
    """struct module's name field in .gnu.linkonce.this_module (modules older than modinfo `name=`)."""
    section = elf.get_section_by_name(".gnu.linkonce.this_module")
    if section is None:
        return ""
    data = section.data()
    # `name` follows `state` (int) and `list` (two pointers), aligned to the pointer size.
    offset = 8 + 16 if elf.elfclass == 64 else 4 + 8
    return str(data[offset : offset + 56].split(b"\0", 1)[0].decode(errors="replace"))


# -- reading a kernel ---------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Finding:
    """One check: `status` is ok, fail, warn or unknown; `kernel_line` is what the kernel would print."""

    check: str
    status: str
    message: str
    kernel_line: str = ""


@dataclass
class Verdict:
    """The kernel's verdict (would it load?) and, separately, the strict-release policy's."""

    module: KernelModule
    target: KernelTarget
    kernel: list[Finding]
    policy: list[Finding]
    strict: bool

    @property
    def kernel_loads(self) -> bool | None:
        """True/False as the kernel would decide; None when the evidence cannot settle it."""
        if any(f.status == "fail" for f in self.kernel):
            return False
        if any(f.status == "unknown" for f in self.kernel):
            return None
        return True

    @property
    def kernel_refusal(self) -> str:
        """The first line the kernel would print when refusing ('' when it loads or prints nothing)."""
        return next((f.kernel_line for f in self.kernel if f.status == "fail" and f.kernel_line), "")

    @property
    def policy_ok(self) -> bool:
        return all(f.status != "fail" for f in self.policy)

    @property
    def passed(self) -> bool:
        return self.kernel_loads is True and (self.policy_ok or not self.strict)

    def reasons(self) -> list[str]:
        """Why the gate fails, kernel first, one line each."""
        lines = [f"kernel: {f.message}" for f in self.kernel if f.status in ("fail", "unknown")]
        if self.strict:
            lines += [f"policy (strict): {f.message}" for f in self.policy if f.status == "fail"]
        return lines

    def to_json(self) -> dict[str, Any]:
        def findings(items: list[Finding]) -> list[dict[str, str]]:
            return [{"check": f.check, "status": f.status, "message": f.message, "kernel_line": f.kernel_line}
                    for f in items]

        m = self.module
        return {
            "module": {"path": str(m.path), "name": m.name, "vermagic": m.vermagic, "arch": m.arch,
                       "depends": list(m.depends), "license": m.license, "signed": m.signed,
                       "versions": len(m.versions) if m.versions is not None else None},
            "target": self.target.summary(),
            "kernel": {"loads": self.kernel_loads, "refusal": self.kernel_refusal, "checks": findings(self.kernel)},
            "policy": {"strict": self.strict, "ok": self.policy_ok, "checks": findings(self.policy)},
            "passed": self.passed,
        }


def _check_version(module: KernelModule, target: KernelTarget, symbol: str, crc: int | None,
                   check: str) -> Finding:
    """kernel/module/version.c check_version(), for one symbol."""
    name = module.name
    if crc is None:
        return Finding(check, "ok", f"{symbol}: the kernel exports it without a CRC")
    if module.versions is None:
        hidden = " (its __versions lacks SHF_ALLOC, so the loader ignores it)" if module.versions_unallocated else ""
        if target.force_load:
            return Finding(check, "warn", f"{symbol}: the module has no CRC table{hidden}; "
                           "CONFIG_MODULE_FORCE_LOAD lets it through, tainting the kernel",
                           f"{name}: {symbol}: kernel tainted.")
        return Finding(check, "fail", f"{symbol}: the module has no CRC table{hidden} and the kernel "
                       "has no CONFIG_MODULE_FORCE_LOAD", "")
    if symbol not in module.versions:
        # Upstream only warns here; Debian (and this gate) fail closed, as a missing CRC could hide anything.
        return Finding(check, "fail", f"{symbol}: the module carries no CRC for it",
                       f"{name}: no symbol version for {symbol}")
    if module.versions[symbol] != crc:
        return Finding(check, "fail", f"{symbol}: module CRC 0x{module.versions[symbol]:08x} != kernel CRC "
                       f"0x{crc:08x}", f"{name}: disagrees about version of symbol {symbol}")
    return Finding(check, "ok", f"{symbol}: CRC 0x{crc:08x} matches")


def same_magic(module_magic: str, kernel_magic: str, has_crcs: bool) -> bool:
    """kernel/module/version.c same_magic(): with CRCs the release part (up to the first space) is skipped."""
    if has_crcs:
        module_magic = module_magic[module_magic.find(" "):] if " " in module_magic else ""
        kernel_magic = kernel_magic[kernel_magic.find(" "):] if " " in kernel_magic else ""
    return module_magic == kernel_magic


def check_module(ko: Path | KernelModule, target: KernelTarget, strict: bool = True) -> Verdict:
    """Would `target` load `ko`? Raises EulerbakeError for input that is not a module for this architecture."""
    module = ko if isinstance(ko, KernelModule) else read_module(Path(ko))
    if (module.machine, module.elf_class, module.little_endian) != (target.machine, target.elf_class,
                                                                    target.little_endian):
        raise EulerbakeError(
            f"{module.path} is a {describe_elf(module.machine, module.elf_class, module.little_endian)} module "
            f"({module.arch}) but kernel {target.release} is {target.arch} "
            f"({describe_elf(target.machine, target.elf_class, target.little_endian)})",
            hint="build the module for the target architecture (cross: ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-)",
        )
    name = module.name
    kernel: list[Finding] = [Finding("elf", "ok", f"{module.arch} "
                                     f"({describe_elf(module.machine, module.elf_class, module.little_endian)})")]

    # Symbols in the order the loader meets them: module_layout first (check_modstruct_version).
    imported = [s for s, _weak in module.undefined]
    crcs = target.crcs(["module_layout", *imported])
    if "module_layout" in crcs:
        kernel.append(_check_version(module, target, "module_layout", crcs["module_layout"], "module_layout"))
    elif target.exports is None and target.modversions:
        kernel.append(Finding("module_layout", "unknown", "the CRC of module_layout is unknown (no Module.symvers "
                              "and no shipped module records it)"))

    # check_modinfo(): vermagic.
    has_crcs = module.versions is not None
    if module.vermagic is None:
        if target.force_load:
            kernel.append(Finding("vermagic", "warn", "the module has no vermagic; CONFIG_MODULE_FORCE_LOAD lets it "
                                  "through, tainting the kernel", f"{name}: bad vermagic: kernel tainted."))
        else:
            kernel.append(Finding("vermagic", "fail", "the module has no vermagic"))
    elif same_magic(module.vermagic, target.vermagic, has_crcs):
        note = " (release part skipped: the module has CRCs)" if has_crcs and module.release != target.release else ""
        kernel.append(Finding("vermagic", "ok", f"'{module.vermagic}' matches '{target.vermagic}'{note}"))
    else:
        flags_differ = not same_magic(module.vermagic, target.vermagic, True)
        release_differs = module.release != target.release and not has_crcs
        what = " and ".join(w for w, on in (("release", release_differs), ("flags", flags_differ)) if on)
        kernel.append(Finding("vermagic", "fail", f"{what} differ: module '{module.vermagic}', kernel "
                              f"'{target.vermagic}'", f"{name}: version magic '{module.vermagic}' should be "
                              f"'{target.vermagic}'"))

    # simplify_symbols() → resolve_symbol(): every undefined symbol must be exported, usable and matching.
    gpl_ok = module.license in GPL_COMPATIBLE
    imported_ns = set(module.modinfo.get("import_ns", []))
    symbol_findings: list[Finding] = []
    unknown: list[str] = []
    for symbol, weak in module.undefined:
        export = target.exports.get(symbol) if target.exports is not None else None
        if target.exports is not None and (export is None or (export.gpl_only and not gpl_ok)):
            if weak or (symbol == "_GLOBAL_OFFSET_TABLE_" and target.arch in ("x86_64", "i686")):
                continue
            why = "is not exported by the kernel" if export is None else (
                f"is EXPORT_SYMBOL_GPL and the module's license '{module.license}' is not GPL-compatible")
            symbol_findings.append(Finding("symbols", "fail", f"{symbol} {why}",
                                           f"{name}: Unknown symbol {symbol} (err -2)"))
            continue
        if export is not None and export.namespace and export.namespace not in imported_ns:
            line = f"{name}: module uses symbol ({symbol}) from namespace {export.namespace}, but does not import it."
            status = "warn" if target.missing_namespace_allowed else "fail"
            symbol_findings.append(Finding("symbols", status, f"{symbol} is in namespace {export.namespace}, "
                                           "which the module does not import", line))
        if symbol in crcs:
            finding = _check_version(module, target, symbol, crcs[symbol], "symbols")
            # Without a CRC table the force-load taint is reported once, at module_layout, as the kernel does.
            if finding.status == "fail" or (finding.status == "warn" and module.versions is not None):
                symbol_findings.append(finding)
        elif target.exports is None and target.modversions:
            unknown.append(symbol)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        symbol_findings.append(Finding("symbols", "unknown", f"CRC unknown for {shown}: the target has no "
                                       "Module.symvers and no shipped module imports them"))
    failing = [f for f in symbol_findings if f.status == "fail"]
    if not failing and not unknown:
        how = "with matching CRCs" if module.versions is not None else "(no CRC table to compare)"
        kernel.append(Finding("symbols", "ok", f"{len(imported)} imported symbols exported {how}"))
    kernel.extend(f for f in symbol_findings if f.status != "ok")

    # depends=: modprobe loads these first; a missing one leaves its symbols unresolved.
    if target.modules is not None:
        missing = [d for d in module.depends if normalise_module_name(d) not in target.modules]
        if missing:
            kernel.append(Finding("depends", "fail", f"depends on {', '.join(missing)}, which kernel "
                                  f"{target.release} does not have (its symbols would stay unresolved)"))
        else:
            kernel.append(Finding("depends", "ok", ", ".join(module.depends) or "no dependencies"))

    policy: list[Finding] = []
    if module.release is not None:
        if module.release == target.release:
            policy.append(Finding("release", "ok", f"built for {module.release}, the kernel's release"))
        else:
            policy.append(Finding("release", "fail" if strict else "warn",
                                  f"built for release {module.release} but the kernel is {target.release}"
                                  " (modprobe/depmod file it under /lib/modules/"
                                  f"{target.release}/; build it against that kernel's headers)"))
    return Verdict(module=module, target=target, kernel=kernel, policy=policy, strict=strict)
