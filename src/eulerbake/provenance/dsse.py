"""DSSE envelopes (the in-toto attestation wrapper) signed with the cache's ed25519 `name:base64` keys.

An envelope is `{"payloadType", "payload" (base64), "signatures": [{"keyid", "sig" (base64)}]}`. What is
signed is the pre-authentication encoding, never the JSON around it:

    PAE(type, body) = "DSSEv1" SP len(type) SP type SP len(body) SP body   (lengths in bytes, ASCII decimal)

so a changed payload type, a changed payload or a signature moved to another payload all fail. The key
name is the DSSE `keyid`: readers keep the same list of trusted public keys as for the cache
(`store.signing.check_signatures` decides).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eulerbake.core import hashing
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.signing import PublicKey, SecretKey, check_signatures

PAYLOAD_TYPE = "application/vnd.in-toto+json"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding of `payload` (what the signature covers)."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def payload_bytes(statement: Mapping[str, Any]) -> bytes:
    """The statement as signed: canonical JSON (sorted keys, no whitespace, UTF-8)."""
    return hashing.canonical_json(statement)


def sign(statement: Mapping[str, Any], keys: Iterable[SecretKey] = ()) -> dict[str, Any]:
    """The envelope of `statement`, signed by each of `keys` (none: an unsigned envelope)."""
    body = payload_bytes(statement)
    signatures = []
    for key in keys:
        name, _, sig = key.sign(pae(PAYLOAD_TYPE, body)).partition(":")
        signatures.append({"keyid": name, "sig": sig})
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(body).decode(), "signatures": signatures}


def dumps(envelope: Mapping[str, Any]) -> bytes:
    """The envelope file's bytes (stable: its sha256 is what an AMI tag points at)."""
    return (json.dumps(envelope, indent=2, sort_keys=True) + "\n").encode()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, envelope: Mapping[str, Any]) -> str:
    """Write the envelope atomically (a temp file in the same folder, fsynced, renamed); its sha256."""
    data = dumps(envelope)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def read(path: Path) -> dict[str, Any]:
    """An envelope file; a garbled one is one error naming it."""
    try:
        envelope = json.loads(path.read_text())
    except FileNotFoundError:
        raise EulerbakeError(f"no provenance at {path}",
                             hint="sign provenance when building (EULERBAKE_SIGNING_KEY_FILE), or write it now: "
                             "eulerbake provenance TASK --sign-key FILE") from None
    except (OSError, ValueError) as exc:
        raise EulerbakeError(f"the provenance {path} is unreadable: {exc}",
                             hint="write it again: eulerbake provenance TASK --sign-key FILE") from exc
    if not isinstance(envelope, dict) or not {"payloadType", "payload", "signatures"} <= set(envelope):
        raise EulerbakeError(f"{path} is not a DSSE envelope (needs payloadType, payload, signatures)",
                             hint="write it again: eulerbake provenance TASK --sign-key FILE")
    return envelope


@dataclass(frozen=True)
class Verified:
    """What checking an envelope found: the statement (parsed even when untrusted) and who signed it."""

    statement: dict[str, Any] | None
    signer: str | None  # the trusted key whose signature verified; None when none did
    reason: str  # why it does not verify ("" when it does)

    @property
    def ok(self) -> bool:
        return self.signer is not None and self.statement is not None


def decode(envelope: Mapping[str, Any]) -> tuple[bytes, dict[str, Any] | None, str]:
    """(payload bytes, the statement or None, a problem or "")."""
    try:
        body = base64.b64decode(str(envelope.get("payload", "")), validate=True)
    except (binascii.Error, ValueError):
        return b"", None, "its payload is not valid base64"
    try:
        statement = json.loads(body)
    except ValueError:
        return body, None, "its payload is not JSON"
    if not isinstance(statement, dict):
        return body, None, "its payload is not a JSON object"
    return body, statement, ""


def verify(envelope: Mapping[str, Any], trusted: Iterable[PublicKey]) -> Verified:
    """Check `envelope`'s signatures over PAE(payloadType, payload) against `trusted` keys."""
    payload_type = envelope.get("payloadType")
    body, statement, problem = decode(envelope)
    if problem:
        return Verified(None, None, problem)
    if payload_type != PAYLOAD_TYPE:
        return Verified(statement, None, f"its payloadType is {payload_type!r}, not {PAYLOAD_TYPE!r}")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list):
        return Verified(statement, None, "its signatures are not a list")
    texts = [f"{s.get('keyid', '')}:{s.get('sig', '')}" for s in signatures if isinstance(s, dict)]
    keys = list(trusted)
    verdict = check_signatures(pae(PAYLOAD_TYPE, body), texts, keys)
    if verdict.signer is None:
        reason = verdict.reason
        if not keys and texts:
            reason += "; no public key is trusted here (pass --trusted-key, or set trusted-public-keys)"
        return Verified(statement, None, reason)
    return Verified(statement, verdict.signer, "")
