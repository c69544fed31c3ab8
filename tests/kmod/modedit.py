"""Length-preserving edits of a `.ko`, at the sections pyelftools locates: the broken modules of the tests.

Each edit changes the bytes the kernel's module loader reads (a vermagic string, one CRC, the
SHF_ALLOC flag of __versions) and nothing else, so what the kernel then says is about that one change.
"""

from __future__ import annotations

import io

from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile


def _section(data: bytes, name: str) -> tuple[int, int, int]:
    """(index, file offset, size) of section `name`."""
    elf = ELFFile(io.BytesIO(data))
    for index, section in enumerate(elf.iter_sections()):
        if section.name == name:
            return index, section["sh_offset"], section["sh_size"]
    raise AssertionError(f"no section {name}")


def set_modinfo(data: bytes, tag: str, value: str) -> bytes:
    """Replace `tag=…` in .modinfo by `tag=value`, NUL-padded to the old length (the loader skips NULs)."""
    _index, offset, size = _section(data, ".modinfo")
    section = data[offset : offset + size]
    start = section.index(f"{tag}=".encode())
    end = section.index(b"\0", start)
    new = f"{tag}={value}".encode()
    assert len(new) <= end - start, f"{tag}={value} is longer than the original"
    section = section[:start] + new + b"\0" * (end - start - len(new)) + section[end:]
    return data[:offset] + section + data[offset + size :]


def set_version_crc(data: bytes, symbol: str, crc: int) -> bytes:
    """Overwrite the CRC of `symbol` in __versions (64-bit little-endian modules)."""
    _index, offset, size = _section(data, "__versions")
    for entry in range(offset, offset + size, 64):
        if data[entry + 8 : entry + 64].split(b"\0", 1)[0] == symbol.encode():
            return data[:entry] + crc.to_bytes(8, "little") + data[entry + 8 :]
    raise AssertionError(f"{symbol} not in __versions")


def drop_versions_alloc(data: bytes) -> bytes:
    """Clear SHF_ALLOC on __versions: the loader's find_sec() then ignores it ("modprobe --force" style)."""
    index, _offset, _size = _section(data, "__versions")
    elf = ELFFile(io.BytesIO(data))
    header = elf["e_shoff"] + index * elf["e_shentsize"]
    flags_at = header + 8  # Elf64_Shdr: sh_name (4), sh_type (4), sh_flags (8)
    flags = int.from_bytes(data[flags_at : flags_at + 8], "little") & ~SH_FLAGS.SHF_ALLOC
    return data[:flags_at] + flags.to_bytes(8, "little") + data[flags_at + 8 :]
