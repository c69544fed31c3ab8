"""ed25519 keys written `name:base64` like Nix's: generate, parse, sign, verify, and the reasons a
signature list fails."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from eulerbake.core.errors import EulerbakeError
from eulerbake.store.signing import PublicKey, SecretKey, Verdict, check_signatures, parse_public_keys


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
    umask = os.umask(0)
    try:
        secret, public = key.write(tmp_path)
    finally:
        os.umask(umask)
    assert (secret.stat().st_mode & 0o777, public.stat().st_mode & 0o777) == (0o600, 0o644)
    assert SecretKey.load(secret) == key and PublicKey.parse(public.read_text()) == key.public()
    with pytest.raises(EulerbakeError, match=f"^{secret} already exists"):
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


def test_a_seed_only_secret_key_is_accepted() -> None:
    """A 32-byte secret (the seed alone, as some tools write it) is the same key as seed ‖ public."""
    key = SecretKey.generate("ci-1")
    assert SecretKey.parse(f"ci-1:{base64.b64encode(key.seed).decode()}") == key


@pytest.mark.parametrize(("kind", "parse"), [("public key", PublicKey.parse), ("secret key", SecretKey.parse)])
def test_a_bad_key_is_named_for_what_it_should_be(kind: str, parse: Callable[[str], object]) -> None:
    with pytest.raises(EulerbakeError) as shape:
        parse("no-colon")
    assert str(shape.value).startswith(f"not a {kind} (expected NAME:BASE64): 'no-colon'")
    with pytest.raises(EulerbakeError) as encoding:
        parse("ci-1:AAAA:AAAA")  # the name ends at the first colon: the rest is bad base64, not a bad name
    assert str(encoding.value).startswith(f"the {kind} 'ci-1' is not valid base64")


def test_a_malformed_signature_never_verifies() -> None:
    public = SecretKey.generate("ci-1").public()
    for signature in ("ci-1", "ci-1:!!!", "ci-1:" + base64.b64encode(b"short").decode(), ""):
        assert not public.verify(b"d", signature), signature


def test_verdict_reasons_in_full() -> None:
    ci, ci2 = SecretKey.generate("ci-1"), SecretKey.generate("ci-2")
    evil, evil2 = SecretKey.generate("evil-1"), SecretKey.generate("evil-2")
    trusted = [ci.public(), ci2.public()]
    assert check_signatures(b"d", [ci.sign(b"d")], trusted) == Verdict("ci-1", "")
    assert check_signatures(b"d", [], trusted) == Verdict(None, "it is not signed")
    assert check_signatures(b"d", [evil2.sign(b"d"), evil.sign(b"d"), evil.sign(b"e")], trusted) \
        == Verdict(None, "signed only by keys not trusted here (evil-1, evil-2)")
    assert check_signatures(b"d", [ci.sign(b"x"), ci2.sign(b"y")], trusted) == Verdict(
        None, "the signature by trusted key ci-1, ci-2 does not match (the metadata was changed after it was signed)")
    # a trusted key's name before a garbled signature is that key's signature, and it does not match
    assert "by trusted key ci-1 does not match" in check_signatures(b"d", ["ci-1:AAAA:AAAA"], trusted).reason


def test_trusted_key_lists_skip_blank_lines() -> None:
    keys = [SecretKey.generate("ci-1").public(), SecretKey.generate("ci-2").public()]
    assert parse_public_keys(["", str(keys[0]), "  \n", str(keys[1])]) == keys
    with pytest.raises(EulerbakeError, match="not a public key"):
        parse_public_keys([str(keys[0]), "garbage"])


@pytest.mark.parametrize("race", [False, True])
def test_a_dangling_link_where_a_key_goes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      race: bool) -> None:
    """A symlink planted at NAME.secret or NAME.public (even to nowhere) is not followed, also when it appears
    after the existence check (`race`): the key would land at the link's target."""
    target = tmp_path / "elsewhere" / "stolen"
    target.parent.mkdir()
    for name in ("ci-1.secret", "ci-2.public"):
        os.symlink(target, tmp_path / name)
    if race:
        monkeypatch.setattr(os.path, "lexists", lambda _path: False)
    for name, where in (("ci-1", "ci-1.secret"), ("ci-2", "ci-2.public")):
        with pytest.raises(EulerbakeError, match=f"^{tmp_path / where} already exists; not overwriting a key"):
            SecretKey.generate(name).write(tmp_path)
    monkeypatch.undo()
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ci-1.secret", "ci-2.public",
                                                                                   "elsewhere"]  # a pair or nothing
