"""The Packer builder's SSH key pair: a helper of `authorized-key-overlay`, `packer-template` and `packer-ami`.

Image hygiene locks root's password and forbids password logins, so Packer cannot log in the seed's way
(`ssh_password`). It logs in with this key instead. The private key lives OUTSIDE the store: in
`$EULERBAKE_PACKER_KEY_FILE` (a CI secret written to a file), or else in the user's state directory
(`$XDG_STATE_HOME/eulerbake/packer-builder-key`, `~/.local/state/…` by default), made on first use with
`ssh-keygen -t ed25519`, mode 0600. Only the *public* key is ever a stage parameter, normalised (type, blob,
a fixed comment) so the same key gives the same bytes and keys on every machine.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import re
import stat
from pathlib import Path

from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.run import run, run_text

KEY_FILE_ENV = "EULERBAKE_PACKER_KEY_FILE"
KEY_NAME = "packer-builder-key"
COMMENT = "eulerbake-packer-builder"
# The systemd drop-in that lets Packer in as root (authorized-key-overlay writes it, install-cloudinit.sh removes it).
SSHD_DROP_IN = "/etc/systemd/system/sshd.service.d/90-eulerbake-packer-builder.conf"
_PUBLIC_KEY_RE = re.compile(
    r"^(?P<type>ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa)\s+(?P<blob>[A-Za-z0-9+/]+={0,2})(?:\s|$)"
)


def state_dir() -> Path:
    """`$XDG_STATE_HOME/eulerbake` (XDG base directory spec), `~/.local/state/eulerbake` without it."""
    base = os.environ.get("XDG_STATE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "eulerbake"


def normalise_public_key(text: str, where: str = "the public key") -> str:
    """`<type> <blob> eulerbake-packer-builder` from an OpenSSH public key line (any comment dropped)."""
    match = _PUBLIC_KEY_RE.match(text.strip().splitlines()[0] if text.strip() else "")
    if match is None:
        raise EulerbakeError(f"{where} is not an OpenSSH public key (ssh-ed25519 AAAA…)",
                             hint="give the contents of a .pub file, or let eulerbake make the builder key")
    key_type, blob = match.group("type"), match.group("blob")
    try:
        raw = base64.b64decode(blob, validate=True)
    except binascii.Error:
        raise EulerbakeError(f"{where}: the key blob is not base64", hint="copy the key line again") from None
    length = int.from_bytes(raw[:4], "big")
    if raw[4:4 + length].decode(errors="replace") != key_type:
        raise EulerbakeError(f"{where}: the blob is not a {key_type} key", hint="copy the key line again")
    return f"{key_type} {blob} {COMMENT}"


def key_blob(public_key: str) -> str:
    """The base64 blob of a normalised public key: what identifies the key in authorized_keys."""
    return public_key.split()[1]


def _check_private_key_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise EulerbakeError(f"the Packer builder key {path} does not exist",
                             hint=f"point {KEY_FILE_ENV} at an existing private key, or unset it to have "
                             "eulerbake make one in the state directory") from None
    if not stat.S_ISREG(st.st_mode):
        raise EulerbakeError(f"the Packer builder key {path} is not a regular file", hint="give a private key file")
    if st.st_mode & 0o077:
        raise EulerbakeError(
            f"the Packer builder key {path} is readable by others (mode {st.st_mode & 0o777:04o})",
            hint=f"chmod 600 {path}",
        )


def _generate(path: Path) -> None:
    """Make the key pair at `path` (+ `.pub`), once, even with several graph loads racing."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    lock = os.open(path.parent / f"{KEY_NAME}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        for stale in (partial, partial.with_name(partial.name + ".pub")):
            stale.unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", COMMENT, "-f", partial])
        os.chmod(partial, 0o600)
        os.rename(partial.with_name(partial.name + ".pub"), path.with_name(path.name + ".pub"))
        os.rename(partial, path)  # the private key's name appearing is the commit point
    finally:
        os.close(lock)


def builder_key_path(*, create: bool = True) -> Path:
    """The private key Packer logs in with: `$EULERBAKE_PACKER_KEY_FILE`, or the state directory's (made
    there on first use when `create`). Refused when others can read it."""
    given = os.environ.get(KEY_FILE_ENV, "")
    if given:
        path = Path(given).expanduser().absolute()
    else:
        path = state_dir() / KEY_NAME
        if create and not path.exists():
            _generate(path)
    _check_private_key_file(path)
    return path


def public_key_of(private_key: Path) -> str:
    """The normalised public key of `private_key`, asked of ssh-keygen (the .pub file may be stale)."""
    try:
        # -P "": a key with a passphrase fails here instead of prompting (Packer could not use it either).
        text = run_text(["ssh-keygen", "-y", "-P", "", "-f", private_key])
    except EulerbakeError as err:
        raise EulerbakeError(f"cannot read the Packer builder key {private_key}: {err.message}",
                             hint="the key must be an OpenSSH private key without a passphrase") from None
    return normalise_public_key(text, f"the public half of {private_key}")


def builder_public_key(*, create: bool = True) -> str:
    """The builder's normalised public key: what the overlay authorizes and the templates name."""
    private = builder_key_path(create=create)
    public = private.with_name(private.name + ".pub")
    if public.is_file():
        return normalise_public_key(public.read_text(), str(public))
    return public_key_of(private)
