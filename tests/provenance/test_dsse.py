"""DSSE envelopes: the PAE bytes, signatures by the cache's ed25519 keys, and every way verification must fail."""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from eulerbake.provenance import dsse
from eulerbake.store.signing import SecretKey

STATEMENT = {"_type": "https://in-toto.io/Statement/v1", "predicateType": "https://slsa.dev/provenance/v1",
             "subject": [{"name": "release.txt", "digest": {"sha256": "ab" * 32}}], "predicate": {}}


def test_pae_is_the_dsse_v1_encoding() -> None:
    # The DSSE spec's own example, and the in-toto payload type.
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert dsse.pae(dsse.PAYLOAD_TYPE, b"{}") == b"DSSEv1 28 application/vnd.in-toto+json 2 {}"
    assert dsse.pae("t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"  # lengths in bytes, not characters


def test_a_signed_envelope_verifies_and_its_signature_is_plain_ed25519_over_the_pae() -> None:
    key = SecretKey.generate("ci-1")
    envelope = dsse.sign(STATEMENT, [key])
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    body = base64.b64decode(envelope["payload"])
    assert json.loads(body) == STATEMENT
    (signature,) = envelope["signatures"]
    assert signature["keyid"] == "ci-1"
    # Any DSSE verifier can check it: ed25519 over PAE(payloadType, payload).
    Ed25519PublicKey.from_public_bytes(key.public().raw).verify(base64.b64decode(signature["sig"]),
                                                               dsse.pae(dsse.PAYLOAD_TYPE, body))
    verified = dsse.verify(envelope, [key.public()])
    assert verified.ok and verified.signer == "ci-1" and verified.statement == STATEMENT


def _tampered_payload(envelope: dict[str, Any]) -> dict[str, Any]:
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["subject"][0]["digest"]["sha256"] = "cd" * 32
    return {**envelope, "payload": base64.b64encode(json.dumps(statement).encode()).decode()}


def test_a_tampered_payload_a_tampered_signature_and_an_untrusted_key_each_fail() -> None:
    key, other = SecretKey.generate("ci-1"), SecretKey.generate("ci-2")
    envelope = dsse.sign(STATEMENT, [key])

    forged = dsse.verify(_tampered_payload(envelope), [key.public()])
    assert not forged.ok and "does not match" in forged.reason

    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[10] ^= 0x01
    bad_sig = {**envelope, "signatures": [{"keyid": "ci-1", "sig": base64.b64encode(bytes(sig)).decode()}]}
    assert not dsse.verify(bad_sig, [key.public()]).ok

    untrusted = dsse.verify(envelope, [other.public()])
    assert not untrusted.ok and "not trusted here (ci-1)" in untrusted.reason
    # A signature by an untrusted key that claims a trusted key's name does not verify either.
    impostor = dsse.sign(STATEMENT, [SecretKey("ci-1", other.seed)])
    assert not dsse.verify(impostor, [key.public()]).ok

    nobody = dsse.verify(envelope, [])
    assert not nobody.ok and "no public key is trusted here" in nobody.reason
    assert "not signed" in dsse.verify(dsse.sign(STATEMENT), [key.public()]).reason


def test_the_payload_type_is_covered_by_the_signature() -> None:
    key = SecretKey.generate("ci-1")
    envelope = dsse.sign(STATEMENT, [key])
    assert not dsse.verify({**envelope, "payloadType": "application/json"}, [key.public()]).ok
    assert "not valid base64" in dsse.verify({**envelope, "payload": "%%%"}, [key.public()]).reason
