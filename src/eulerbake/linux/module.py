"""Reading a kernel module the way the kernel's module loader reads it.

The loader (Linux 6.1 `kernel/module/main.c`) reads a `.ko` with its *own* struct layout — the
kernel's ELF class and byte order, `sizeof(Elf_Shdr)`, `sizeof(Elf_Sym)` — never trusting `e_ident`
or `sh_entsize`, and finds sections by name only among those with SHF_ALLOC (`find_sec`). So does
this reader, on `elfcheck.ElfView` (a struct-level view with every read bounded, so a damaged file
cannot make it raise; pyelftools honours `sh_entsize` and `e_ident` and raises on truncation — 16 of
20 truncated ena.ko copies crashed the first gate). It gives what the loader looks at: `.modinfo`
(vermagic, depends, license, name, import_ns), `__versions` CRCs, the symbol table (undefined, weak
and common symbols, bad section indexes), `.gnu.linkonce.this_module`, and the module's own exports
(`__ksymtab*`, `__kcrctab*`, `__kstrtabns_*`). Compressed modules (.ko.xz/.gz/.zst) are read too;
~1.5 ms a module. Whether a structure is valid at all is `elfcheck.elf_validity_check`'s call.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.elfcheck import (
    MACHINE_BY_NUMBER,
    SHN_ABS,
    SHN_COMMON,
    SHN_LIVEPATCH,
    SHN_UNDEF,
    STB_WEAK,
    ElfView,
    Section,
    Symbol,
    cstring,
    elf_validity_check,
)

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
# The GNU cross toolchain prefix per arch (Debian's gcc-<triplet> packages), for cross-build hints.
CROSS_PREFIXES = {
    "x86_64": "x86_64-linux-gnu-", "i686": "i686-linux-gnu-", "aarch64": "aarch64-linux-gnu-",
    "aarch64_be": "aarch64_be-linux-gnu-", "armv7l": "arm-linux-gnueabihf-", "riscv64": "riscv64-linux-gnu-",
    "loongarch64": "loongarch64-linux-gnu-", "ppc64le": "powerpc64le-linux-gnu-", "ppc64": "powerpc64-linux-gnu-",
    "s390x": "s390x-linux-gnu-",
}
# Kernel licenses that may use EXPORT_SYMBOL_GPL symbols (include/linux/license.h).
GPL_COMPATIBLE = {"GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL"}
MODULE_STRUCT_SIZE = 64  # struct modversion_info: unsigned long crc + char name[64 - sizeof(long)]
SIGNATURE_MAGIC = b"~Module signature appended~\n"
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
ELF_MAGIC = b"\x7fELF"
ET_REL = 1
ELF_TYPES = {2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
MISSING_NAME = "(missing .modinfo section or name field)"  # what setup_load_info() prints without a name


def arch_of_elf(machine: str, elf_class: int, little_endian: bool) -> str:
    for arch, (em, cls, le, _srcarch) in ARCHES.items():
        if (em, cls, le) == (machine, elf_class, little_endian):
            return arch
    return f"{machine}/{elf_class}-bit/{'LE' if little_endian else 'BE'}"


def normalise_module_name(name: str) -> str:
    """The kernel treats '-' and '_' in module names alike."""
    return name.replace("-", "_")


# -- the bytes of a module ---------------------------------------------------------------------------


def module_bytes(path: Path) -> bytes:
    """The module file as the loader gets it: compressed modules are inflated (kmod does it in userspace)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EulerbakeError(f"cannot read kernel module {path}: {exc.strerror}", hint="check the path") from exc
    try:
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
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, EulerbakeError):
            raise
        raise EulerbakeError(f"{path} is damaged: its compressed stream does not decompress ({exc})",
                             hint="copy the module again from where it was built or packaged") from exc
    return raw


def not_a_module(path: Path, data: bytes) -> EulerbakeError | None:
    """The error for input that is no relocatable ELF object at all (the wrong file), else None."""
    if not data.startswith(ELF_MAGIC):
        return EulerbakeError(
            f"{path} is not a kernel module: it is not an ELF file (no \\x7fELF magic)",
            hint="pass the .ko that kbuild produced (make -C <headers> M=<dir> modules)",
        )
    order: Literal["little", "big"] = "big" if len(data) > 5 and data[5] == 2 else "little"
    e_type = int.from_bytes(data[16:18], order) if len(data) >= 18 else ET_REL
    if e_type in ELF_TYPES:
        return EulerbakeError(
            f"{path} is not a kernel module: its ELF type is {ELF_TYPES[e_type]}, modules are relocatable objects "
            "(ET_REL)",
            hint="pass the .ko that kbuild produced, not a program or shared library",
        )
    return None


def own_layout(data: bytes) -> tuple[int, bool]:
    """(ELF class, little endian) the file claims in e_ident (64-bit little-endian when it claims nonsense)."""
    elf_class = 32 if len(data) > 4 and data[4] == 1 else 64
    little_endian = not (len(data) > 5 and data[5] == 2)
    return elf_class, little_endian


# -- reading a module ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleExport:
    """A symbol the module exports (EXPORT_SYMBOL*), as its own __ksymtab/__kcrctab/__kstrtabns_ record it."""

    crc: int | None
    gpl_only: bool
    namespace: str


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
    has_symtab: bool = True  # an SHT_SYMTAB: stripped modules have none ("module has no symbols (stripped?)")
    linked: bool = True  # an SHF_ALLOC .gnu.linkonce.this_module: a plain .o has none
    modinfo_name: str = ""  # `name=` of an SHF_ALLOC .modinfo (what the loader calls info->name)
    struct_name: str = ""  # struct module's name in .gnu.linkonce.this_module (mod->name)
    common: tuple[str, ...] = ()  # SHN_COMMON symbols ("please compile with -fno-common")
    bad_shndx: tuple[tuple[str, int], ...] = ()  # symbols pointing at a section that does not exist
    exports: dict[str, ModuleExport] = field(default_factory=dict)
    exports_without_crcs: bool = False  # __ksymtab entries but no __kcrctab (modversions: force-load only)
    shnum: int = 0

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

    @property
    def loader_name(self) -> str:
        """info->name in the loader's messages: modinfo `name=`, else struct module's name."""
        return self.modinfo_name or self.struct_name or MISSING_NAME


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


def _struct_name(view: ElfView, section: Section | None) -> str:
    """struct module's `name`: after `state` (int) and `list` (two pointers), aligned to the pointer size."""
    if section is None:
        return ""
    offset = 8 + 16 if view.elf_class == 64 else 4 + 8
    return cstring(view.contents(section)[offset : offset + 56], 0)


def _exports(view: ElfView, symbols: list[Symbol]) -> tuple[dict[str, ModuleExport], bool]:
    sections = view.sections
    ksymtab, ksymtab_gpl = view.find_sec("__ksymtab"), view.find_sec("__ksymtab_gpl")
    if ksymtab is None and ksymtab_gpl is None:
        return {}, False
    crc_values: dict[str, int] = {}
    namespaces: dict[str, str] = {}
    gpl: dict[str, bool] = {}
    for symbol in symbols:
        if not 0 < symbol.shndx < len(sections):
            continue
        where = sections[symbol.shndx]
        if symbol.name.startswith("__ksymtab_") and where.name in ("__ksymtab", "__ksymtab_gpl"):
            gpl[symbol.name[len("__ksymtab_"):]] = where.name == "__ksymtab_gpl"
        elif symbol.name.startswith("__crc_") and where.name in ("__kcrctab", "__kcrctab_gpl"):
            raw = view.contents(where)[symbol.value : symbol.value + 4]
            if len(raw) == 4:
                crc_values[symbol.name[len("__crc_"):]] = struct.unpack(view.order + "I", raw)[0]
        elif symbol.name.startswith("__kstrtabns_") and where.name == "__ksymtab_strings":
            namespaces[symbol.name[len("__kstrtabns_"):]] = cstring(view.contents(where), symbol.value)
    exports = {name: ModuleExport(crc_values.get(name), gpl_only, namespaces.get(name, ""))
               for name, gpl_only in gpl.items()}
    no_crcs = (bool(ksymtab and ksymtab.size) and view.find_sec("__kcrctab") is None) or (
        bool(ksymtab_gpl and ksymtab_gpl.size) and view.find_sec("__kcrctab_gpl") is None)
    return exports, no_crcs


def parse_module(path: Path, data: bytes, elf_class: int, little_endian: bool, *, signed: bool) -> KernelModule:
    """The loader's view of a module whose structure passed elf_validity_check (any bytes are read safely)."""
    view = ElfView(data, elf_class, little_endian)
    modinfo_section = view.find_sec(".modinfo")
    modinfo = parse_modinfo(view.contents(modinfo_section)) if modinfo_section is not None else {}
    versions_section = view.find_sec("__versions")
    versions = (parse_versions(view.contents(versions_section), elf_class, little_endian)
                if versions_section is not None else None)
    unallocated = versions_section is None and view.by_name("__versions") is not None
    symbols = list(view.symbols())
    undefined = tuple((s.name, s.bind == STB_WEAK) for s in symbols if s.shndx == SHN_UNDEF and s.name)
    common = tuple(s.name for s in symbols if s.shndx == SHN_COMMON and not s.name.startswith("__gnu_lto"))
    special = (SHN_UNDEF, SHN_ABS, SHN_COMMON, SHN_LIVEPATCH)
    bad = tuple((s.name, s.shndx) for s in symbols if s.shndx not in special and s.shndx >= view.e_shnum)
    exports, no_crcs = _exports(view, symbols)
    this_module = view.find_sec(".gnu.linkonce.this_module")
    modinfo_name = modinfo.get("name", [""])[0]
    struct_name = _struct_name(view, this_module)
    comment_section = view.by_name(".comment")
    comment = view.contents(comment_section).replace(b"\0", b"\n").decode(errors="replace") if comment_section else ""
    machine = MACHINE_BY_NUMBER.get(view.e_machine, f"EM_{view.e_machine}")
    return KernelModule(
        path=Path(path),
        name=modinfo_name or struct_name or Path(path).name.split(".", 1)[0],
        machine=machine,
        elf_class=elf_class,
        little_endian=little_endian,
        modinfo=modinfo,
        versions=versions,
        versions_unallocated=unallocated,
        undefined=undefined,
        signed=signed,
        comment="\n".join(sorted({line for line in comment.splitlines() if line})),
        has_symtab=view.symtab() is not None,
        linked=this_module is not None,
        modinfo_name=modinfo_name,
        struct_name=struct_name,
        common=common,
        bad_shndx=bad,
        exports=exports,
        exports_without_crcs=no_crcs,
        shnum=view.e_shnum,
    )


def header_only_module(path: Path, data: bytes) -> KernelModule:
    """A module too damaged to read further: only what e_ident and e_machine say (for reports)."""
    elf_class, little_endian = own_layout(data)
    view = ElfView(data, elf_class, little_endian)
    machine = MACHINE_BY_NUMBER.get(view.e_machine, f"EM_{view.e_machine}")
    return KernelModule(path=Path(path), name=Path(path).name.split(".", 1)[0], machine=machine,
                        elf_class=elf_class, little_endian=little_endian, modinfo={}, versions=None,
                        versions_unallocated=False, undefined=(), signed=data.endswith(SIGNATURE_MAGIC),
                        has_symtab=False, linked=False)


def strip_signature(data: bytes) -> bytes:
    """The module without an appended signature (as module_sig_check() leaves info->len), if it parses."""
    if not data.endswith(SIGNATURE_MAGIC) or len(data) < len(SIGNATURE_MAGIC) + 12:
        return data
    end = len(data) - len(SIGNATURE_MAGIC)
    sig_len = int.from_bytes(data[end - 4 : end], "big")
    if sig_len >= end - 12:
        return data[:end]
    return data[: end - 12 - sig_len]


def read_module(path: Path) -> KernelModule:
    """Parse a `.ko` (optionally .xz/.gz/.zst compressed) as the module loader would see it.

    Raises EulerbakeError (one message) for a file that is not a relocatable ELF object or whose
    structure the kernel would refuse; what a kernel makes of a readable module is `gate.check_module`'s.
    """
    data = module_bytes(Path(path))
    error = not_a_module(Path(path), data)
    if error is not None:
        raise error
    elf_class, little_endian = own_layout(data)
    content = strip_signature(data)
    problem = elf_validity_check(content, elf_class, little_endian, machine=None)
    if problem is not None:
        raise EulerbakeError(f"{path} is damaged: {problem.message} (the kernel says: {problem.kernel_line})",
                             hint="copy the module again from where it was built or packaged")
    return parse_module(Path(path), content, elf_class, little_endian, signed=data.endswith(SIGNATURE_MAGIC))
