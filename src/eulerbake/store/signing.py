"""ed25519 signing keys written `name:base64`, as Nix writes them: for cache entries and provenance envelopes.

A secret key is `name:base64(seed ‖ public)` (64 bytes, libsodium's layout, so `nix key generate-secret`
output works here and the other way round); a public key `name:base64(32 bytes)`; a signature
`name:base64(64 bytes)`. The name says which public key to try: a reader keeps a list of trusted public
keys and needs no secret at all. What gets signed is the caller's business (a cache entry's fingerprint,
a DSSE pre-authentication encoding): this module only signs and verifies bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from eulerbake.core.errors import EulerbakeError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _split(text: str, what: str) -> tuple[str, bytes]:
    name, sep, encoded = text.strip().partition(":")
    if not sep or not KEY_NAME_RE.match(name):
        raise EulerbakeError(f"not a {what} (expected NAME:BASE64): {text.strip()[:40]!r}",
                             hint="keys look like `ci-1:Gv0…=`; make them with `eulerbake cache keygen NAME`")
    try:
        return name, base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EulerbakeError(f"the {what} {name!r} is not valid base64", hint="copy the whole key line") from exc


@dataclass(frozen=True)
class PublicKey:
    """A named ed25519 public key: what a reader trusts."""

    name: str
    raw: bytes  # 32 bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, raw = _split(text, "public key")
        if len(raw) != 32:
            raise EulerbakeError(f"the public key {name!r} has {len(raw)} bytes, not 32",
                                 hint="a public key is the line `eulerbake cache keygen` wrote to NAME.public")
        return cls(name, raw)

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.raw).decode()}"

    def verify_raw(self, data: bytes, signature: bytes) -> bool:
        # cryptography is imported when a signature is made or checked: every doit run imports the store.
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def verify(self, data: bytes, signature: str) -> bool:
        """Whether `signature` (`name:base64`) is this key's signature of `data` (a name mismatch is False)."""
        try:
            name, raw = _split(signature, "signature")
        except EulerbakeError:
            return False
        return name == self.name and self.verify_raw(data, raw)


@dataclass(frozen=True)
class SecretKey:
    """A named ed25519 secret key: what the one writer (CI) signs with."""

    name: str
    seed: bytes  # 32 bytes

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        if not KEY_NAME_RE.match(name):
            raise EulerbakeError(f"invalid key name {name!r}",
                                 hint="use letters, digits and '._+-', e.g. the cache's host name and a number: "
                                 "cache.example.org-1")
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        seed = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                          serialization.NoEncryption())
        return cls(name, seed)

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, raw = _split(text, "secret key")
        if len(raw) not in (32, 64):
            raise EulerbakeError(f"the secret key {name!r} has {len(raw)} bytes, not 64",
                                 hint="a secret key is the line `eulerbake cache keygen` wrote to NAME.secret")
        key = cls(name, raw[:32])
        if len(raw) == 64 and raw[32:] != key.public().raw:
            raise EulerbakeError(f"the secret key {name!r} is damaged: its public half does not match its seed",
                                 hint="restore the key file from where it is kept (a CI secret)")
        return key

    @classmethod
    def load(cls, path: Path) -> SecretKey:
        """Read a secret key file; one that others may read is refused (it would sign for anyone)."""
        try:
            st = path.stat()
            text = path.read_text()
        except OSError as exc:
            raise EulerbakeError(f"cannot read the signing key {path}: {exc.strerror}",
                                 hint="point EULERBAKE_SIGNING_KEY_FILE at the NAME.secret file") from exc
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise EulerbakeError(f"the signing key {path} is readable by others (mode {st.st_mode & 0o777:03o})",
                                 hint=f"chmod 600 {path}")
        return cls.parse(text)

    def _private(self) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def public(self) -> PublicKey:
        from cryptography.hazmat.primitives import serialization

        raw = self._private().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PublicKey(self.name, raw)

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.seed + self.public().raw).decode()}"

    def __repr__(self) -> str:  # never print the secret by accident (a traceback, a log line)
        return f"SecretKey({self.name!r}, <secret>)"

    def sign_raw(self, data: bytes) -> bytes:
        return self._private().sign(data)

    def sign(self, data: bytes) -> str:
        """The signature of `data` as `name:base64`."""
        return f"{self.name}:{base64.b64encode(self.sign_raw(data)).decode()}"

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write `NAME.secret` (mode 600) and `NAME.public` into `directory`; never over a file or a link."""
        secret, public = directory / f"{self.name}.secret", directory / f"{self.name}.public"
        for path in (secret, public):
            if os.path.lexists(path):
                raise _exists(path)
        _create(secret, f"{self}\n", 0o600)
        try:
            _create(public, f"{self.public()}\n", 0o644)
        except BaseException:
            secret.unlink()  # a pair or nothing
            raise
        return secret, public


def _exists(path: Path) -> EulerbakeError:
    return EulerbakeError(f"{path} already exists; not overwriting a key",
                          hint="choose another name (keys are rotated by name: NAME-2)")


def _create(path: Path, text: str, mode: int) -> None:
    """Create `path` with `text`: a file or link that appeared there meanwhile is refused, never followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise _exists(path) from None
    with os.fdopen(fd, "w") as f:
        f.write(text)


def parse_public_keys(texts: Iterable[str]) -> list[PublicKey]:
    return [PublicKey.parse(text) for text in texts if text.strip()]


@dataclass(frozen=True)
class Verdict:
    """How a list of signatures fared against the trusted keys."""

    signer: str | None  # the trusted key that verified, None when none did
    reason: str  # why none did (empty when one did)


def check_signatures(data: bytes, signatures: Iterable[str], trusted: Iterable[PublicKey]) -> Verdict:
    """The first trusted key whose signature of `data` verifies; else a reason a person can act on."""
    by_name = {key.name: key for key in trusted}
    names, bad = [], []
    for signature in signatures:
        name = str(signature).partition(":")[0]
        names.append(name)
        key = by_name.get(name)
        if key is None:
            continue
        if key.verify(data, signature):
            return Verdict(name, "")
        bad.append(name)
    if bad:
        return Verdict(None, f"the signature by trusted key {', '.join(bad)} does not match (the metadata was "
                       "changed after it was signed)")
    if names:
        return Verdict(None, f"signed only by keys not trusted here ({', '.join(sorted(set(names)))})")
    return Verdict(None, "it is not signed")
