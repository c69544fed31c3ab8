"""The module signature check, as `module_sig_check()` runs it first thing in the kernel's load_module().

A signed module ends with a PKCS#7 (CMS) detached signature, a `struct module_signature` trailer
(12 bytes, `sig_len` big-endian) and the marker "~Module signature appended~\\n". Linux 6.1
(`kernel/module/signing.c`, `crypto/asymmetric_keys/pkcs7_*.c`) decides:

- no marker: "unsigned module" (ENODATA) — loads, tainting, unless signatures are enforced;
- a trailer that does not fit, or a PKCS#7 the kernel cannot parse: EBADMSG, fatal even when not
  enforcing; an `id_type` that is not PKCS#7: ENOPKG, not fatal;
- signed attributes or a content type other than `data`: EKEYREJECTED before any key is looked up;
- the signer (issuer + serial, or subject key id) is a key the kernel trusts: the RSA/ECDSA signature
  over the module's bytes must verify, else EKEYREJECTED ("Key was rejected by service", nothing in
  dmesg) — so editing one byte of a distro-signed module makes the kernel refuse it;
- the signer is not a trusted key: ENOKEY, not fatal: the module loads and taints the kernel.

The trusted keys are the certificates built into the kernel image (`kimage.read_kernel_image`) and
any `--signing-cert`; without any, a signed module is "signed, not verifiable here". The DER walk below
reads only what the kernel reads; cryptography verifies the signature (imported on first use).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MODULE_SIG_STRING = b"~Module signature appended~\n"
TRAILER_SIZE = 12  # struct module_signature: algo, hash, id_type, signer_len, key_id_len, __pad[3], be32 sig_len
PKEY_ID_PKCS7 = 2

OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_DATA = "1.2.840.113549.1.7.1"
HASHES = {
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "1.2.156.10197.1.401": "sm3",
}
RSA_OIDS = {"1.2.840.113549.1.1.1", "1.2.840.113549.1.1.5", "1.2.840.113549.1.1.11", "1.2.840.113549.1.1.12",
            "1.2.840.113549.1.1.13", "1.2.840.113549.1.1.14"}
ECDSA_OIDS = {"1.2.840.10045.2.1", "1.2.840.10045.4.1", "1.2.840.10045.4.3.1", "1.2.840.10045.4.3.2",
              "1.2.840.10045.4.3.3", "1.2.840.10045.4.3.4"}


class BadMessage(Exception):
    """The PKCS#7 blob is not what the kernel's ASN.1 decoder accepts (EBADMSG)."""


@dataclass(frozen=True)
class SignatureCheck:
    """What module_sig_check() concludes.

    status: unsigned | verified | rejected | badmsg | unknown-key | unsupported | unverifiable.
    `length` is info->len afterwards: the bytes elf_validity_check() then looks at.
    """

    status: str
    length: int
    detail: str
    kernel_line: str = ""  # what the kernel prints (most signature refusals print nothing)
    signer: str = ""
    errno: str = ""  # the errno a refusal returns (EKEYREJECTED, EBADMSG)

    @property
    def fatal(self) -> bool:
        """Refused even when the kernel does not enforce signatures."""
        return self.status in ("rejected", "badmsg")

    @property
    def signed(self) -> bool:
        return self.status != "unsigned"


@dataclass(frozen=True)
class _Tlv:
    tag: int
    content: bytes
    raw: bytes  # tag + length + content


def _tlvs(data: bytes) -> list[_Tlv]:
    """Split DER `data` into its top-level TLVs (definite lengths only, as the kernel's decoder wants)."""
    items = []
    offset = 0
    while offset < len(data):
        if offset + 2 > len(data):
            raise BadMessage("truncated DER element")
        tag = data[offset]
        if tag & 0x1F == 0x1F:
            raise BadMessage("multi-byte DER tags are not used in module signatures")
        length = data[offset + 1]
        header = 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4 or offset + 2 + count > len(data):
                raise BadMessage("bad DER length")
            length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
            header += count
        end = offset + header + length
        if end > len(data):
            raise BadMessage("DER element runs past the signature")
        items.append(_Tlv(tag, data[offset + header : end], data[offset:end]))
        offset = end
    return items


def _one(data: bytes, tag: int, what: str) -> _Tlv:
    items = _tlvs(data)
    if len(items) != 1 or items[0].tag != tag:
        raise BadMessage(f"{what} is not a single DER element with tag 0x{tag:02x}")
    return items[0]


def _oid(tlv: _Tlv) -> str:
    if tlv.tag != 0x06 or not tlv.content:
        raise BadMessage("expected an OBJECT IDENTIFIER")
    first = tlv.content[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    value = 0
    for byte in tlv.content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


def _algorithm(tlv: _Tlv) -> str:
    if tlv.tag != 0x30:
        raise BadMessage("expected an AlgorithmIdentifier")
    items = _tlvs(tlv.content)
    if not items:
        raise BadMessage("empty AlgorithmIdentifier")
    return _oid(items[0])


@dataclass(frozen=True)
class SignerInfo:
    issuer: bytes  # DER of the issuer Name ("" when the signer is named by subject key id)
    serial: int | None
    key_id: bytes  # subjectKeyIdentifier ("" with issuer + serial)
    digest: str  # OID of the digest algorithm
    algorithm: str  # OID of the signature algorithm
    signature: bytes
    has_authattrs: bool


@dataclass(frozen=True)
class Pkcs7:
    content_type: str
    detached: bool
    certificates: tuple[bytes, ...]  # DER certificates the message carries (sign-file puts none)
    signers: tuple[SignerInfo, ...]


def parse_pkcs7(blob: bytes) -> Pkcs7:
    """The parts of a PKCS#7 SignedData the kernel's pkcs7_parser reads."""
    content_info = _tlvs(_one(blob, 0x30, "the signature").content)
    if len(content_info) < 2 or _oid(content_info[0]) != OID_SIGNED_DATA or content_info[1].tag != 0xA0:
        raise BadMessage("not a PKCS#7 SignedData")
    signed = _tlvs(_one(content_info[1].content, 0x30, "SignedData").content)
    if len(signed) < 4 or signed[0].tag != 0x02 or signed[1].tag != 0x31 or signed[2].tag != 0x30:
        raise BadMessage("SignedData lacks version, digestAlgorithms or contentInfo")
    inner = _tlvs(signed[2].content)
    if not inner:
        raise BadMessage("empty contentInfo")
    content_type = _oid(inner[0])
    certificates: list[bytes] = []
    rest = signed[3:]
    while rest and rest[0].tag in (0xA0, 0xA1):
        if rest[0].tag == 0xA0:
            certificates += [cert.raw for cert in _tlvs(rest[0].content)]
        rest = rest[1:]
    if len(rest) != 1 or rest[0].tag != 0x31:
        raise BadMessage("SignedData lacks signerInfos")
    signers = []
    for info in _tlvs(rest[0].content):
        if info.tag != 0x30:
            raise BadMessage("a SignerInfo is not a SEQUENCE")
        fields = _tlvs(info.content)
        if len(fields) < 5 or fields[0].tag != 0x02:
            raise BadMessage("a SignerInfo is incomplete")
        issuer, serial, key_id = b"", None, b""
        if fields[1].tag == 0x30:
            sid = _tlvs(fields[1].content)
            if len(sid) != 2 or sid[0].tag != 0x30 or sid[1].tag != 0x02:
                raise BadMessage("bad issuerAndSerialNumber")
            issuer, serial = sid[0].raw, int.from_bytes(sid[1].content, "big", signed=True)
        elif fields[1].tag == 0x80:
            key_id = fields[1].content
        else:
            raise BadMessage("unknown SignerIdentifier")
        digest = _algorithm(fields[2])
        position = 3
        has_authattrs = fields[position].tag == 0xA0
        if has_authattrs:
            position += 1
        if len(fields) < position + 2 or fields[position + 1].tag != 0x04:
            raise BadMessage("a SignerInfo lacks its signature")
        signers.append(SignerInfo(issuer, serial, key_id, digest, _algorithm(fields[position]),
                                  fields[position + 1].content, has_authattrs))
    if not signers:
        raise BadMessage("no SignerInfo")
    return Pkcs7(content_type, detached=len(inner) == 1, certificates=tuple(certificates), signers=tuple(signers))


def _load_certificate(der: bytes) -> Any:
    from cryptography import x509

    return x509.load_der_x509_certificate(der)


def certificate_name(der: bytes) -> str:
    """'CN=…' of a DER certificate, for messages."""
    try:
        return str(_load_certificate(der).subject.rfc4514_string())
    except ValueError:
        return "an unreadable certificate"


def _matches(signer: SignerInfo, cert: Any) -> bool:
    from cryptography import x509

    if signer.serial is not None:
        return bool(cert.serial_number == signer.serial and cert.issuer.public_bytes() == signer.issuer)
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return False
    return bool(ski == signer.key_id)


def _verify(signer: SignerInfo, cert: Any, content: bytes) -> bool | None:
    """True/False: the signature over `content` checks out with `cert`'s key; None: cannot check that here."""
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    algorithms: dict[str, hashes.HashAlgorithm] = {"sha1": hashes.SHA1(), "sha224": hashes.SHA224(),
                                                   "sha256": hashes.SHA256(), "sha384": hashes.SHA384(),
                                                   "sha512": hashes.SHA512()}
    algorithm = algorithms.get(HASHES.get(signer.digest, ""))
    if algorithm is None:
        return None
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey) and signer.algorithm in RSA_OIDS:
            key.verify(signer.signature, content, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and signer.algorithm in ECDSA_OIDS:
            key.verify(signer.signature, content, ec.ECDSA(algorithm))
        else:
            return None
    except InvalidSignature:
        return False
    except (UnsupportedAlgorithm, ValueError):
        return None
    return True


def _describe(signer: SignerInfo) -> str:
    if signer.serial is None:
        return f"key id {signer.key_id.hex()}"
    try:
        return f"'{_name_from_der(signer.issuer).rfc4514_string()}' (serial {signer.serial:x})"
    except (BadMessage, ValueError, TypeError):
        return f"serial {signer.serial:x}"


def _name_from_der(der: bytes) -> Any:
    """A cryptography Name from DER, via the attributes the DER holds (cryptography has no Name loader)."""
    from cryptography import x509
    from cryptography.x509.oid import ObjectIdentifier

    attributes = []
    for rdn in _tlvs(_one(der, 0x30, "a Name").content):
        for attribute in _tlvs(rdn.content):
            oid_tlv, value = _tlvs(attribute.content)[:2]
            text = value.content.decode(errors="replace")
            attributes.append(x509.NameAttribute(ObjectIdentifier(_oid(oid_tlv)), text))
    return x509.Name(attributes)


def module_sig_check(data: bytes, trusted: Sequence[bytes]) -> SignatureCheck:
    """module_sig_check() without enforcement (the caller applies CONFIG_MODULE_SIG_FORCE)."""
    length = len(data)
    markerlen = len(MODULE_SIG_STRING)
    if length <= markerlen or not data.endswith(MODULE_SIG_STRING):
        return SignatureCheck("unsigned", length, "unsigned")
    length -= markerlen
    if length <= TRAILER_SIZE:
        return SignatureCheck("badmsg", length, "the signature marker is there but no signature fits before it",
                              errno="EBADMSG")
    trailer = data[length - TRAILER_SIZE : length]
    sig_len = int.from_bytes(trailer[8:12], "big")
    # mod_check_sig(): the order of its checks decides which error a damaged trailer gets.
    if sig_len >= length - TRAILER_SIZE:
        return SignatureCheck("badmsg", length, f"the signature trailer says {sig_len} bytes of signature, more than "
                              "the file holds", errno="EBADMSG")
    if trailer[2] != PKEY_ID_PKCS7:
        return SignatureCheck("unsupported", length, f"the signature is not PKCS#7 (id_type {trailer[2]})",
                              kernel_line="module: not signed with expected PKCS#7 message")
    if any(trailer[:2]) or any(trailer[3:8]):
        return SignatureCheck("badmsg", length, "the signature trailer has unexpected non-zero fields",
                              kernel_line="module: PKCS#7 signature info has unexpected non-zero params",
                              errno="EBADMSG")
    content_length = length - TRAILER_SIZE - sig_len
    content = data[:content_length]
    blob = data[content_length : length - TRAILER_SIZE]
    try:
        message = parse_pkcs7(blob)
    except BadMessage as exc:
        return SignatureCheck("badmsg", content_length, f"the PKCS#7 signature cannot be parsed ({exc})",
                              errno="EBADMSG")
    if not message.detached:
        return SignatureCheck("badmsg", content_length, "the PKCS#7 signature carries its own data",
                              kernel_line="PKCS#7 signature with non-detached data", errno="EBADMSG")
    if message.content_type != OID_DATA:
        return SignatureCheck("rejected", content_length, "the PKCS#7 content type is not 'data'",
                              kernel_line="Invalid module sig (not pkcs7-data)", errno="EKEYREJECTED")
    if any(s.has_authattrs for s in message.signers):
        return SignatureCheck("rejected", content_length, "the PKCS#7 signature has signed attributes",
                              kernel_line="Invalid module sig (has authattrs)", errno="EKEYREJECTED")
    signer = message.signers[0]
    who = _describe(signer)
    if signer.digest not in HASHES:
        return SignatureCheck("unsupported", content_length, f"signed by {who} with an unknown digest algorithm",
                              signer=who)
    # pkcs7_verify_one(): a signer certificate inside the message is checked against it, trusted or not.
    for der in message.certificates:
        try:
            cert = _load_certificate(der)
        except ValueError:
            continue
        if _matches(signer, cert) and _verify(signer, cert, content) is False:
            return SignatureCheck("rejected", content_length, f"signed by {who}, and the signature does not match "
                                  "the certificate the module carries", errno="EKEYREJECTED", signer=who)
    if not trusted:
        return SignatureCheck("unverifiable", content_length, f"signed by {who}, not verifiable here (no certificate "
                              "of the kernel at hand)", signer=who)
    for der in trusted:
        try:
            cert = _load_certificate(der)
        except ValueError:
            continue
        if not _matches(signer, cert):
            continue
        outcome = _verify(signer, cert, content)
        if outcome is None:
            return SignatureCheck("unverifiable", content_length, f"signed by {who}, a key the kernel trusts, with "
                                  "an algorithm this gate cannot verify", signer=who)
        if outcome:
            digest = hashlib.sha256(content).hexdigest()[:16]
            return SignatureCheck("verified", content_length, f"signed by {who}, a key the kernel trusts: the "
                                  f"signature matches (sha256 {digest}…)", signer=who)
        return SignatureCheck("rejected", content_length, f"signed by {who}, a key the kernel trusts, but the module "
                              "does not match its signature (changed after signing)", errno="EKEYREJECTED", signer=who)
    return SignatureCheck("unknown-key", content_length, f"signed by {who}, a key the kernel does not trust",
                          signer=who)
