"""Reading a kernel module: its ELF machine, `.modinfo` (vermagic, depends, license), `__versions` CRCs,
undefined symbols and signature, with pyelftools; compressed modules (.ko.xz/.gz/.zst) are read too.
"""

from __future__ import annotations

import gzip
import io
import lzma
from dataclasses import dataclass
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


