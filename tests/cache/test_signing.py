"""ed25519 keys written `name:base64` like Nix's: generate, parse, sign, verify, and the reasons a
signature list fails."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from eulerbake.core.errors import EulerbakeError
from eulerbake.store.signing import PublicKey, SecretKey, check_signatures


def test_keys_round_trip_in_nix_format(tmp_path: Path) -> None:
    key = SecretKey.generate("cache.example.org-1")
    text = str(key)
    name, encoded = text.split(":")
    assert name == "cache.example.org-1" and len(base64.b64decode(encoded)) == 64  # seed ‖ public, like Nix
    assert SecretKey.parse(text) == key
    public = PublicKey.parse(str(key.public()))
    signature = key.sign(b"fingerprint")
    assert signature.startswith("cache.example.org-1:") and len(base64.b64decode(signature.split(":")[1])) == 64
    assert public.verify(b"fingerprint", signature)
    assert not public.verify(b"fingerprinT", signature)
    assert not PublicKey("other", public.raw).verify(b"fingerprint", signature)  # the name must match
    assert encoded not in repr(key)  # a traceback or a log line never shows the secret


def test_key_files(tmp_path: Path) -> None:
    key = SecretKey.generate("ci-1")
    secret, public = key.write(tmp_path)
    assert secret.stat().st_mode & 0o777 == 0o600
    assert SecretKey.load(secret) == key and PublicKey.parse(public.read_text()) == key.public()
    with pytest.raises(EulerbakeError, match="already exists"):
        key.write(tmp_path)
    secret.chmod(0o644)
    with pytest.raises(EulerbakeError, match="readable by others"):
        SecretKey.load(secret)


@pytest.mark.parametrize(("text", "message"), [
    ("no-colon", "expected NAME:BASE64"),
    ("bad name:AAAA", "expected NAME:BASE64"),
    ("ci-1:!!!", "not valid base64"),
    ("ci-1:" + base64.b64encode(b"short").decode(), "has 5 bytes"),
])
def test_bad_public_keys(text: str, message: str) -> None:
    with pytest.raises(EulerbakeError, match=message):
        PublicKey.parse(text)


def test_a_damaged_secret_key_is_refused() -> None:
    key, other = SecretKey.generate("ci-1"), SecretKey.generate("ci-1")
    mixed = base64.b64encode(key.seed + other.public().raw).decode()
    with pytest.raises(EulerbakeError, match="public half does not match"):
        SecretKey.parse(f"ci-1:{mixed}")


def test_verdicts() -> None:
    ci, evil = SecretKey.generate("ci-1"), SecretKey.generate("evil-1")
    trusted = [ci.public()]
    assert check_signatures(b"d", [evil.sign(b"d"), ci.sign(b"d")], trusted).signer == "ci-1"
    assert "not signed" in check_signatures(b"d", [], trusted).reason
    assert "not trusted here (evil-1)" in check_signatures(b"d", [evil.sign(b"d")], trusted).reason
    assert "does not match" in check_signatures(b"d", [ci.sign(b"other")], trusted).reason
    assert check_signatures(b"d", ["garbage"], trusted).signer is None
