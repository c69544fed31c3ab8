"""Stage `authorized-key-overlay`: the overlay that lets Packer log in to the base AMI as root with the builder key.

Image hygiene (stage `raw`) locks root's password and writes `PermitRootLogin no` at the very top of
sshd_config, where sshd's first-value-wins rule makes it beat any sshd_config.d drop-in. So the overlay
does not touch sshd_config: it puts the builder's *public* key in `/root/.ssh/authorized_keys` (0600,
`.ssh` 0700, via `.eulerbake-attrs`, since the store keeps no modes) and a systemd drop-in that starts
sshd with `-o PermitRootLogin=prohibit-password` — command-line options come before the config file, so
they win, and passwords stay refused. The Packer provisioner's last step (`install-cloudinit.sh`) removes
both and checks `PermitRootLogin no` is back. Same key, same bytes: the output is a pure function of it.

Lay it on the raw image Packer starts from: `raw(label, qcow2, [..., authorized_key_overlay(label)])`.
Until Packer has run, an instance of that base AMI lets the key's holder in as root: keep it private.
"""

from __future__ import annotations

from dataclasses import dataclass

from eulerbake.core.derivation import BuildContext, Derivation

from recipes.stages.builder_key import SSHD_DROP_IN, builder_public_key, normalise_public_key

TOOLS: tuple[str, ...] = ()
AUTHORIZED_KEYS = "root/.ssh/authorized_keys"
ATTRS_FILE = ".eulerbake-attrs"  # read by stage `raw` (`read_attrs_manifest`): "<mode> <uid> <gid> <path>"

SSHD_DROP_IN_TEXT = """\
# eulerbake: lets Packer log in as root with the builder key while it bakes the AMI (never a password).
# sshd keeps the first value it reads, and its command line comes before sshd_config (which image hygiene
# starts with "PermitRootLogin no"), so the override is an -o option. install-cloudinit.sh, the Packer
# provisioner, deletes this file and the builder key as its last step.
[Service]
ExecStart=
ExecStart=/usr/sbin/sshd -D -o PermitRootLogin=prohibit-password $OPTIONS $CRYPTO_POLICY
"""


@dataclass(frozen=True)
class Params:
    public_key: str  # normalised: "<type> <blob> eulerbake-packer-builder"


def build(ctx: BuildContext) -> None:
    params: Params = ctx.params
    keys = ctx.out / AUTHORIZED_KEYS
    keys.parent.mkdir(parents=True)
    keys.write_text(params.public_key + "\n")
    drop_in = ctx.out / SSHD_DROP_IN.lstrip("/")
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text(SSHD_DROP_IN_TEXT)
    (ctx.out / ATTRS_FILE).write_text(
        "# <octal mode> <uid> <gid> <path>: what the store cannot keep (it makes every file read-only)\n"
        "0700 0 0 root/.ssh\n"
        f"0600 0 0 {AUTHORIZED_KEYS}\n"
        f"0644 0 0 {SSHD_DROP_IN.lstrip('/')}\n"
    )


def authorized_key_overlay(label: str, public_key: str | None = None) -> Derivation:
    """Stage `authorized-key-overlay:<label>`: root may log in with `public_key` (default: the builder key)."""
    key = normalise_public_key(public_key) if public_key is not None else builder_public_key()
    return Derivation(
        stage="authorized-key-overlay",
        label=label,
        builder=build,
        params=Params(public_key=key),
        tools=TOOLS,
        doc="overlay: the Packer builder's public key in root's authorized_keys (prohibit-password)",
    )
