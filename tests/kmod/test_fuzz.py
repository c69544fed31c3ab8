"""Fuzzing a real ena.ko: truncations and single-byte flips never make the gate raise anything but one
EulerbakeError message, and damage to the section table is refused with the kernel's words.

The oracle for the refusals is the kernel's `elf_validity_check` (Linux 6.1): a truncated module
loses its section header table, which sits at the end ("Invalid ELF section header overflow"), and a
section whose bytes no longer lie inside the file is "Invalid ELF section in module (section N type
T)" — `test_boot.py` loads one of each (ena-truncated, ena-section-bounds) into the real kernel. The
expected line is computed here from the unmutated section table, not by the gate's code. On the signed
module, against the kernel image's keys, every flip of a signed byte is EKEYREJECTED, as the kernel
refused debian-ena-vermagic and debian-ena-crc.
"""

from __future__ import annotations

import io
import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from eulerbake.cli.kmod import kmod_main
from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.gate import Verdict, check_module
from eulerbake.linux.kernels import load_target
from eulerbake.linux.target import KernelTarget
from tests.kmod import modedit
from tests.kmod.conftest import HEADERS_DIR, SHIPPED_ENA, VMLINUZ, debian_kernel

pytestmark = debian_kernel
SHT_NULL, SHT_NOBITS = 0, 8


def section_table(data: bytes) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    """(e_shoff, e_shnum, e_shstrndx, [(sh_type, sh_offset, sh_size)]) of an intact Elf64 LE file."""
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shnum, e_shstrndx = struct.unpack_from("<HH", data, 0x3C)
    sections = []
    for index in range(e_shnum):
        base = e_shoff + 64 * index
        sh_type, = struct.unpack_from("<I", data, base + 4)
        sh_offset, sh_size = struct.unpack_from("<QQ", data, base + 24)
        sections.append((sh_type, sh_offset, sh_size))
    return e_shoff, e_shnum, e_shstrndx, sections


def run_gate(path: Path, data: bytes, target: KernelTarget) -> Verdict | EulerbakeError:
    path.write_bytes(data)
    try:
        return check_module(path, target, strict=False)
    except EulerbakeError as err:
        assert "\n" not in err.message and err.hint, err
        return err


def truncations(data: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    e_shoff = section_table(data)[0]
    lengths = {0, 1, 3, 4, 5, 16, 18, 20, 51, 52, 63, 64, 65, 100, 1000, 5000, len(data) // 4, len(data) // 2,
               e_shoff - 1, e_shoff, e_shoff + 1, e_shoff + 64, len(data) - 64, len(data) - 2, len(data) - 1}
    lengths |= {rng.randrange(len(data)) for _ in range(20)}
    for length in sorted(lengths):
        yield f"truncated to {length}", data[:length]


def flips(data: bytes, rng: random.Random) -> Iterator[tuple[str, int, bytes]]:
    """(what, offset, data): every byte of the ELF header, every byte of each sh_offset/sh_size, random bytes."""
    e_shoff, e_shnum, _strndx, _sections = section_table(data)
    positions = list(range(64))
    for index in range(e_shnum):
        positions += range(e_shoff + 64 * index + 24, e_shoff + 64 * index + 40)
    positions += [rng.randrange(len(data)) for _ in range(300)]
    for position in positions:
        for mask in (0xFF, 0x10) if position >= e_shoff else (0xFF,):
            yield f"byte {position} ^ 0x{mask:02x}", position, modedit.flip(data, position, mask)


def expected_bounds_line(original: bytes, position: int, mutated: bytes) -> str | None:
    """The kernel's line when the flipped byte is in one section's sh_offset/sh_size and puts it outside the file."""
    e_shoff, e_shnum, e_shstrndx, sections = section_table(original)
    if not e_shoff + 24 <= position < e_shoff + 64 * e_shnum:
        return None
    index, field = divmod(position - e_shoff, 64)
    if not 24 <= field < 40 or index == 0:
        return None
    sh_type = sections[index][0]
    sh_offset, sh_size = struct.unpack_from("<QQ", mutated, e_shoff + 64 * index + 24)
    end = sh_offset + sh_size
    if sh_type in (SHT_NULL, SHT_NOBITS) or (end < 1 << 64 and end <= len(mutated)):
        return None
    if index == e_shstrndx:
        return f"Invalid ELF section hdr(type {sh_type})"
    return f"Invalid ELF section in module (section {index} type {sh_type})"


@pytest.fixture(scope="module")
def headers() -> KernelTarget:
    return KernelTarget.from_headers(HEADERS_DIR)


def test_damaged_unsigned_ena_is_refused_as_the_kernel_refuses_it(headers: KernelTarget, tmp_path: Path) -> None:
    rng = random.Random(20261204)
    plain = modedit.unsigned(SHIPPED_ENA.read_bytes())
    e_shoff, e_shnum, _strndx, _sections = section_table(plain)
    assert e_shoff + 64 * e_shnum == len(plain)  # the section header table is the end of the file
    path = tmp_path / "ena.ko"
    bounds_checked = 0
    for what, data in truncations(plain, rng):
        outcome = run_gate(path, data, headers)
        if len(data) < 4:
            assert isinstance(outcome, EulerbakeError) and "not an ELF file" in outcome.message, what
        elif len(data) < 64:
            assert isinstance(outcome, Verdict) and outcome.kernel_refusal == f"Invalid ELF header len {len(data)}"
        elif len(data) < len(plain):
            assert isinstance(outcome, Verdict), what
            assert outcome.kernel_refusal == "Invalid ELF section header overflow", (what, outcome.reasons())
            assert outcome.errno == "ENOEXEC" and outcome.fixes(), what
    for what, position, data in flips(plain, rng):
        outcome = run_gate(path, data, headers)
        line = expected_bounds_line(plain, position, data)
        if line is not None:
            bounds_checked += 1
            assert isinstance(outcome, Verdict) and not outcome.passed, what
            assert outcome.kernel_refusal == line, (what, outcome.reasons())
    assert bounds_checked > 100


def test_damaged_signed_ena_never_raises_and_signed_bytes_are_rejected(tmp_path: Path) -> None:
    rng = random.Random(7)
    shipped = SHIPPED_ENA.read_bytes()
    blob_at, _blob_len = modedit.signature_blob(shipped)
    with_keys = load_target([HEADERS_DIR, VMLINUZ])
    path = tmp_path / "ena.ko"
    for what, data in truncations(shipped, rng):
        outcome = run_gate(path, data, with_keys)
        if len(data) >= 64 and len(data) < blob_at:  # no marker left: an unsigned, truncated module
            assert isinstance(outcome, Verdict), what
            assert outcome.kernel_refusal == "Invalid ELF section header overflow", what
    rejected = 0
    for what, position, data in flips(shipped, rng):
        outcome = run_gate(path, data, with_keys)
        if position < blob_at:  # a signed byte: whatever else it breaks, the signature check comes first
            assert isinstance(outcome, Verdict | EulerbakeError), what
            if isinstance(outcome, Verdict):
                assert outcome.errno == "EKEYREJECTED" and outcome.refusal is not None, what
                rejected += 1
    assert rejected > 300
    # The trailer and the PKCS#7 blob, every byte: anything but an exception.
    for position in range(blob_at, len(shipped)):
        run_gate(path, modedit.flip(shipped, position, 0x01), with_keys)


def test_cli_json_on_damaged_modules_is_always_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(11)
    plain = modedit.unsigned(SHIPPED_ENA.read_bytes())
    path = tmp_path / "ena.ko"
    samples = [data for _what, data in truncations(plain, rng)][::3] + [
        data for _what, _pos, data in flips(plain, rng)][::97]
    for data in samples:
        path.write_bytes(data)
        code = kmod_main(["check", str(path), "--kernel", str(HEADERS_DIR), "--json", "--no-strict"])
        report = json.load(io.StringIO(capsys.readouterr().out))
        assert code in (0, 1, 2) and ("error" in report) == (code == 2)
