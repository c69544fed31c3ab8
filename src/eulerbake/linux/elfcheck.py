"""ELF sanity as the kernel's module loader checks it, before it reads anything else of a module.

`elf_validity_check()` and `setup_load_info()` of Linux 6.1 `kernel/module/main.c`, check for check and
with their messages: the header (length, magic, ET_REL, `elf_check_arch`, `e_shentsize`), the section
header table inside the file, the section name table (in the file, non-empty, NUL-terminated), section
0, every section's bytes inside the file ("Invalid ELF section in module (section 43 type 4)" — the
fuzzed ena.ko whose RELA `sh_size` reached 16 MB past a 241 KB file), then a symbol table ("module has
no symbols (stripped?)") and `.gnu.linkonce.this_module` ("No module found in object": a plain `.o`).

The loader reads the header in the *kernel's* class and byte order and never looks at e_ident's class
or data bytes: a big-endian AArch64 object reaches an arm64 kernel as ELF type 256, a 32-bit i386
object reaches x86_64 as machine 3. `ElfView` reads the same way, every read bounded, so any damage
becomes a refusal with the kernel's words, never an exception.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

SHT_NULL, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS = 0, 2, 3, 8
SHT_NAMES = {1: "PROGBITS", 2: "SYMTAB", 3: "STRTAB", 4: "RELA", 5: "HASH", 6: "DYNAMIC", 7: "NOTE", 8: "NOBITS",
             9: "REL", 11: "DYNSYM", 14: "INIT_ARRAY", 15: "FINI_ARRAY", 17: "GROUP", 18: "SYMTAB_SHNDX"}
SHF_ALLOC = 0x2
SHN_UNDEF, SHN_LIVEPATCH, SHN_ABS, SHN_COMMON = 0, 0xFF20, 0xFFF1, 0xFFF2
STB_WEAK = 2
ET_REL = 1
MACHINE_NUMBERS = {"EM_386": 3, "EM_MIPS": 8, "EM_PPC": 20, "EM_PPC64": 21, "EM_S390": 22, "EM_ARM": 40,
                   "EM_SPARCV9": 43, "EM_IA_64": 50, "EM_X86_64": 62, "EM_AARCH64": 183, "EM_RISCV": 243,
                   "EM_LOONGARCH": 258}
MACHINE_BY_NUMBER = {number: name for name, number in MACHINE_NUMBERS.items()}
# Names for ELF machines in messages.
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


def describe_elf(machine: str, elf_class: int, little_endian: bool) -> str:
    endian = "little-endian" if little_endian else "big-endian"
    return f"{MACHINE_NAMES.get(machine, machine)} ELF{elf_class} {endian}"


@dataclass(frozen=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int

    @property
    def alloc(self) -> bool:
        return bool(self.flags & SHF_ALLOC)


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int
    bind: int
    shndx: int


class ElfView:
    """The header, section table and symbols of an ELF object in a *given* class and byte order.

    Reads are bounded by the data: fields past the end read as zero, strings stop at the end. Whether
    the structure is valid (sections inside the file and so on) is `elfcheck.elf_validity_check`'s call.
    """

    def __init__(self, data: bytes, elf_class: int, little_endian: bool) -> None:
        self.data = data
        self.elf_class = elf_class
        self.little_endian = little_endian
        self.order = "<" if little_endian else ">"
        wide = elf_class == 64
        self.ehdr_size = 64 if wide else 52
        self.shdr_size = 64 if wide else 40
        self.sym_size = 24 if wide else 16
        self.word = 8 if wide else 4
        header = self.data[: self.ehdr_size].ljust(self.ehdr_size, b"\0")
        if wide:
            (self.e_type, self.e_machine, _version, _entry, _phoff, self.e_shoff, _flags, _ehsize, _phentsize,
             _phnum, self.e_shentsize, self.e_shnum, self.e_shstrndx) = struct.unpack(
                self.order + "HHIQQQIHHHHHH", header[16:64])
        else:
            (self.e_type, self.e_machine, _version, _entry, _phoff, self.e_shoff, _flags, _ehsize, _phentsize,
             _phnum, self.e_shentsize, self.e_shnum, self.e_shstrndx) = struct.unpack(
                self.order + "HHIIIIIHHHHHH", header[16:52])
        self._sections: list[Section] | None = None

    def _bytes(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size].ljust(size, b"\0") if offset >= 0 else b"\0" * size

    def section_header(self, index: int) -> tuple[int, int, int, int, int, int, int]:
        """(sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link) of section `index`."""
        raw = self._bytes(self.e_shoff + index * self.shdr_size, self.shdr_size)
        if self.elf_class == 64:
            name, type_, flags, addr, offset, size, link = struct.unpack_from(self.order + "IIQQQQI", raw)
        else:
            name, type_, flags, addr, offset, size, link = struct.unpack_from(self.order + "IIIIIII", raw)
        return name, type_, flags, addr, offset, size, link

    @property
    def sections(self) -> list[Section]:
        if self._sections is None:
            count = self.e_shnum if self.e_shoff < len(self.data) else 0
            count = min(count, max(0, (len(self.data) - self.e_shoff) // self.shdr_size))
            names: bytes = b""
            if 0 < self.e_shstrndx < count:
                _n, _t, _f, _a, offset, size, _l = self.section_header(self.e_shstrndx)
                names = self.data[offset : offset + size]
            sections = []
            for index in range(count):
                name_at, type_, flags, addr, offset, size, link = self.section_header(index)
                sections.append(Section(index, cstring(names, name_at), type_, flags, addr, offset, size, link))
            self._sections = sections
        return self._sections

    def contents(self, section: Section) -> bytes:
        if section.type == SHT_NOBITS:
            return b""
        return self.data[section.offset : section.offset + section.size]

    def find_sec(self, name: str) -> Section | None:
        """find_sec(): the first section of that name *with SHF_ALLOC* ("Alloc bit cleared means ignore it")."""
        return next((s for s in self.sections[1:] if s.alloc and s.name == name), None)

    def by_name(self, name: str) -> Section | None:
        return next((s for s in self.sections[1:] if s.name == name), None)

    def symtab(self) -> Section | None:
        """The first SHT_SYMTAB, as setup_load_info() picks it."""
        return next((s for s in self.sections[1:] if s.type == SHT_SYMTAB), None)

    def symbols(self) -> Iterator[Symbol]:
        """Symbols 1.. of the symbol table, sh_size / sizeof(Elf_Sym) of them, names from its sh_link table."""
        table = self.symtab()
        if table is None:
            return
        strings = self.contents(self.sections[table.link]) if table.link < len(self.sections) else b""
        data = self.contents(table)
        for offset in range(self.sym_size, len(data) - self.sym_size + 1, self.sym_size):
            if self.elf_class == 64:
                name, info, _other, shndx, value, _size = struct.unpack_from(self.order + "IBBHQQ", data, offset)
            else:
                name, value, _size, info, _other, shndx = struct.unpack_from(self.order + "IIIBBH", data, offset)
            yield Symbol(cstring(strings, name), value, info >> 4, shndx)


def cstring(table: bytes, offset: int) -> str:
    """The NUL-terminated string at `offset` of `table` ('' when out of range; cut at the table's end)."""
    if offset >= len(table):
        return ""
    end = table.find(b"\0", offset)
    return table[offset : end if end >= 0 else len(table)].decode(errors="replace")


# -- the checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElfProblem:
    """Why the loader refuses the object: `kind` names the check, `kernel_line` is what it prints."""

    kind: str  # header-len, magic, type, arch, shentsize, shoff, shstrndx, shstrtab, section0, sh_link,
    # section, section-name, symtab, this-module
    kernel_line: str
    message: str


def _section_type(type_: int) -> str:
    return f"type {type_}" + (f", {SHT_NAMES[type_]}" if type_ in SHT_NAMES else "")


def elf_validity_check(data: bytes, elf_class: int, little_endian: bool, machine: int | None) -> ElfProblem | None:
    """elf_validity_check() on `data` (info->len bytes) read as a kernel of this class and byte order would.

    `machine` is the kernel's e_machine (elf_check_arch); None skips that check (reading a file for itself).
    """
    view = ElfView(data, elf_class, little_endian)
    length = len(data)
    if length < view.ehdr_size:
        return ElfProblem("header-len", f"Invalid ELF header len {length}",
                          f"the file is {length} bytes, shorter than an ELF header ({view.ehdr_size})")
    if not data.startswith(b"\x7fELF"):
        return ElfProblem("magic", "Invalid ELF header magic: != \x7fELF", "no ELF magic")
    if view.e_type != ET_REL:
        return ElfProblem("type", f"Invalid ELF header type: {view.e_type} != {ET_REL}",
                          f"the ELF type reads as {view.e_type}, not ET_REL (1)")
    if machine is not None and view.e_machine != machine:
        return ElfProblem("arch", f"Invalid architecture in ELF header: {view.e_machine}",
                          f"the ELF machine reads as {view.e_machine}, the kernel's is {machine}")
    if view.e_shentsize != view.shdr_size:
        return ElfProblem("shentsize", "Invalid ELF section header size",
                          f"e_shentsize is {view.e_shentsize}, not {view.shdr_size}")
    if view.e_shoff >= length or view.e_shnum * view.shdr_size > length - view.e_shoff:
        return ElfProblem("shoff", "Invalid ELF section header overflow",
                          f"the section header table ({view.e_shnum} entries at byte {view.e_shoff}) does not fit "
                          f"in the file ({length} bytes)")
    if view.e_shstrndx == SHN_UNDEF or view.e_shstrndx >= view.e_shnum:
        return ElfProblem("shstrndx", f"Invalid ELF section name index: {view.e_shstrndx} || e_shstrndx "
                          f"({view.e_shstrndx}) >= e_shnum ({view.e_shnum})",
                          f"the section name table index {view.e_shstrndx} is not a section (e_shnum {view.e_shnum})")
    _name, str_type, _flags, _addr, str_offset, str_size, _link = view.section_header(view.e_shstrndx)
    if not _inside(str_offset, str_size, length):
        return ElfProblem("shstrtab", f"Invalid ELF section hdr(type {str_type})",
                          f"the section name table (section {view.e_shstrndx}) lies outside the file")
    if str_size == 0:
        return ElfProblem("shstrtab", "empty section name table", "the section name table is empty")
    if data[str_offset + str_size - 1] != 0:
        return ElfProblem("shstrtab", "ELF Spec violation: section name table isn't null terminated",
                          "the section name table does not end with a NUL")
    _name, type0, _flags, addr0, _offset, size0, _link = view.section_header(0)
    if type0 != SHT_NULL or size0 != 0 or addr0 != 0:
        return ElfProblem("section0", f"ELF Spec violation: section 0 type({_signed(type0)})!=SH_NULL or non-zero "
                          "len or addr", "section 0 is not an empty SHT_NULL section")
    for index in range(1, view.e_shnum):
        name, type_, flags, _addr, offset, size, link = view.section_header(index)
        if type_ in (SHT_NULL, SHT_NOBITS):
            continue
        if type_ == SHT_SYMTAB and (link == SHN_UNDEF or link >= view.e_shnum):
            shown = _signed(link)
            return ElfProblem("sh_link", f"Invalid ELF sh_link!=SHN_UNDEF({shown}) or (sh_link({shown}) "
                              f">= hdr->e_shnum({view.e_shnum})",
                              f"the symbol table (section {index}) links to string table {link}, which does not exist")
        if not _inside(offset, size, length):
            return ElfProblem("section", f"Invalid ELF section in module (section {index} type {type_})",
                              f"section {index} ({_section_type(type_)}) spans bytes {offset}..{offset + size}, "
                              f"past the end of the file ({length} bytes)")
        if flags & SHF_ALLOC and name >= str_size:
            return ElfProblem("section-name", f"Invalid ELF section name in module (section {index} type {type_})",
                              f"section {index} names itself at {name}, past the section name table ({str_size} bytes)")
    return None


def _inside(offset: int, size: int, length: int) -> bool:
    """validate_section_offset(): offset + size neither overflows (64-bit) nor passes info->len."""
    end = offset + size
    return end < 1 << 64 and end <= length


def _signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def setup_load_info(view: ElfView, modinfo_name: str) -> ElfProblem | None:
    """setup_load_info(): the module needs a symbol table and an SHF_ALLOC .gnu.linkonce.this_module."""
    name = modinfo_name or "(missing .modinfo section or name field)"
    if view.symtab() is None:
        return ElfProblem("symtab", f"{name}: module has no symbols (stripped?)",
                          "the module has no symbol table (stripped with --strip-all?)")
    if view.find_sec(".gnu.linkonce.this_module") is None:
        return ElfProblem("this-module", f"{name}: No module found in object",
                          "it has no .gnu.linkonce.this_module section: an object file, not a linked module")
    return None
