"""Length-preserving edits of a `.ko`, at the sections pyelftools locates: the broken modules of the tests.

Each edit changes the bytes the kernel's module loader reads (a vermagic string, one CRC, the
SHF_ALLOC flag of __versions, a .modinfo tag, one byte of a section header or of the signature) and
nothing else, so what the kernel then says is about that one change. `sign` appends a signature as
scripts/sign-file does (detached PKCS#7 without attributes or certificates, the module_signature
trailer, the marker), with a key `make_signing_key` makes.
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


def rewrite_modinfo(data: bytes, values: dict[str, str | None]) -> bytes:
    """Lay .modinfo out again with `values` applied (None drops the tag, a new tag is appended), NUL-padded
    to the old size; `description=` is dropped when the rest needs its room (the loader never reads it)."""
    _index, offset, size = _section(data, ".modinfo")
    entries = [e.decode() for e in data[offset : offset + size].split(b"\0") if e]
    pairs = [entry.partition("=") for entry in entries]
    result = [(tag, value) for tag, _eq, value in pairs if values.get(tag, value) is not None]
    result = [(tag, values.get(tag, value) or "") for tag, value in result]
    result += [(tag, value) for tag, value in values.items() if value is not None and tag not in dict(result)]
    packed = b"".join(f"{tag}={value}".encode() + b"\0" for tag, value in result)
    if len(packed) > size:
        result = [(tag, value) for tag, value in result if tag != "description"]
        packed = b"".join(f"{tag}={value}".encode() + b"\0" for tag, value in result)
    assert len(packed) <= size, f"{values} does not fit in .modinfo ({size} bytes)"
    return data[:offset] + packed.ljust(size, b"\0") + data[offset + size :]


def section_header_field(data: bytes, index: int, field: str) -> int:
    """The file offset of `field` (sh_offset, sh_size) in section `index`'s Elf64_Shdr."""
    elf = ELFFile(io.BytesIO(data))
    return elf["e_shoff"] + index * elf["e_shentsize"] + {"sh_offset": 24, "sh_size": 32}[field]


def sections_of_type(data: bytes, sh_type: str) -> list[tuple[int, str, int, int]]:
    """(index, name, sh_offset, sh_size) of every section of an ELF type (SHT_RELA, …)."""
    elf = ELFFile(io.BytesIO(data))
    return [(i, s.name, s["sh_offset"], s["sh_size"]) for i, s in enumerate(elf.iter_sections())
            if s["sh_type"] == sh_type]


def flip(data: bytes, offset: int, mask: int = 0xFF) -> bytes:
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1 :]


def signature_blob(data: bytes) -> tuple[int, int]:
    """(offset, length) of the PKCS#7 blob of a signed module."""
    marker = b"~Module signature appended~\n"
    assert data.endswith(marker)
    end = len(data) - len(marker)
    sig_len = int.from_bytes(data[end - 4 : end], "big")
    return end - 12 - sig_len, sig_len


def unsigned(data: bytes) -> bytes:
    """The module without its appended signature (what `strip --strip-debug` or sign-file's input was)."""
    offset, _length = signature_blob(data)
    return data[:offset]


def sign(data: bytes, key: object, cert: object) -> bytes:
    """Append a signature as scripts/sign-file does: detached PKCS#7, no attributes, no certificates."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs7

    options = [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.NoAttributes,
               pkcs7.PKCS7Options.NoCerts, pkcs7.PKCS7Options.Binary]
    blob = (pkcs7.PKCS7SignatureBuilder().set_data(data)
            .add_signer(cert, key, hashes.SHA256())  # type: ignore[arg-type]
            .sign(serialization.Encoding.DER, options))
    trailer = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + len(blob).to_bytes(4, "big")
    return data + blob + trailer + b"~Module signature appended~\n"


def make_signing_key(common_name: str = "eulerbake test signing key") -> tuple[object, object, bytes]:
    """(private key, certificate, DER certificate) of a fresh self-signed RSA key, like certs/signing_key.pem."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert, cert.public_bytes(serialization.Encoding.DER)
