"""Image hygiene, a helper of the `raw` stage: what makes a stock openEuler cloud image safe to publish.

Root's known password locked (the stock image ships `openEuler12#$`), the machine id emptied, cloud-init's
state dropped, root and password logins over ssh refused, and the kernel command line edited for a serial
console (`quiet`/`rhgb` out, `console=<tty>,115200n8` and `rd.multipath=0` in) in every grub.cfg found and in
/etc/default/grub, so a later grub2-mkconfig keeps the change. The text edits are pure functions of the
file's text, tested on their own; `apply_hygiene` applies them inside the image, each item (`ITEMS`) on or
off as the user's config says (recipes/config.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import ext4
from eulerbake.fs.bootfs import BootFilesystem, GrubConfig

KERNEL_ARGS_REMOVED = ("quiet", "rhgb")
ROOT_LOCKED = "!!"  # shadow's "locked, no password": nothing a known password could match
# Where openEuler keeps a grub.cfg on the root filesystem itself (BIOS, and the UEFI vendor directory).
ROOT_GRUB_CONFIGS = ("/boot/grub2/grub.cfg", "/boot/efi/EFI/openEuler/grub.cfg")
# The items a user can turn on or off one by one (`hygiene.<item>` in [tool.eulerbake], recipes/config.py).
ITEMS = ("root_password", "machine_id", "cloud_init_state", "sshd", "serial_console")


def lock_password(shadow: str, user: str = "root") -> str:
    """/etc/shadow text with `user`'s password replaced by a lock (no hash remains to match)."""
    lines = []
    for line in shadow.splitlines(keepends=True):
        fields = line.rstrip("\n").split(":")
        if len(fields) > 1 and fields[0] == user:
            fields[1] = ROOT_LOCKED
            line = ":".join(fields) + ("\n" if line.endswith("\n") else "")
        lines.append(line)
    return "".join(lines)


SSHD_SETTINGS = {"PermitRootLogin": "no", "PasswordAuthentication": "no", "ChallengeResponseAuthentication": "no"}
SSHD_MARKER = "# eulerbake image hygiene"


def harden_sshd_config(text: str) -> str:
    """No root login and no passwords for sshd.

    sshd keeps the first value it reads for a keyword, so the settings go at the very top (before
    any Include), and the file's own global lines are rewritten to agree.
    """
    if SSHD_MARKER in text:
        return text
    out = []
    in_match = False
    for line in text.splitlines(keepends=True):
        words = line.split()
        if words and words[0].lower() == "match":
            in_match = True
        if not in_match and len(words) >= 2:
            for keyword, value in SSHD_SETTINGS.items():
                if words[0].lower() == keyword.lower():
                    line = f"{keyword} {value}\n"
        out.append(line)
    header = [f"{SSHD_MARKER}: first value wins, so these come first\n"]
    header += [f"{keyword} {value}\n" for keyword, value in SSHD_SETTINGS.items()]
    return "".join(header) + "\n" + "".join(out)


KERNEL_LINE_RE = re.compile(r"^(\s*)(linux|linuxefi|linux16)(\s+)(\S+)(.*)$")


def _edit_args(args: list[str], remove: Sequence[str], add: Sequence[str]) -> list[str]:
    def same_console(arg: str) -> bool:
        # console=ttyS0,9600 and console=ttyS0,115200n8 are the same device: keep only ours.
        return any(
            arg.startswith("console=") and new.startswith("console=") and arg.split(",")[0] == new.split(",")[0]
            for new in add
        )

    kept = [arg for arg in args if arg not in remove and arg not in add and not same_console(arg)]
    return kept + list(add)


def edit_kernel_command_lines(grub_cfg: str, remove: Sequence[str], add: Sequence[str]) -> tuple[str, int]:
    """grub.cfg with every `linux` line's arguments edited; returns (text, lines edited)."""
    out = []
    edited = 0
    for line in grub_cfg.splitlines(keepends=True):
        match = KERNEL_LINE_RE.match(line.rstrip("\n"))
        if match:
            indent, command, space, kernel, rest = match.groups()
            args = _edit_args(rest.split(), remove, add)
            line = f"{indent}{command}{space}{kernel} {' '.join(args)}" + ("\n" if line.endswith("\n") else "")
            edited += 1
        out.append(line)
    return "".join(out), edited


GRUB_DEFAULT_RE = re.compile(r'^(GRUB_CMDLINE_LINUX=)(["\']?)(.*?)\2\s*$')


def edit_grub_defaults(text: str, remove: Sequence[str], add: Sequence[str]) -> str:
    """/etc/default/grub with GRUB_CMDLINE_LINUX edited, so a later grub2-mkconfig keeps the change."""
    out = []
    for line in text.splitlines(keepends=True):
        match = GRUB_DEFAULT_RE.match(line.rstrip("\n"))
        if match:
            prefix, quote, value = match.groups()
            line = f'{prefix}"{" ".join(_edit_args(value.split(), remove, add))}"\n'
        out.append(line)
    return "".join(out)


def apply_hygiene(
    root: ext4.Ext4Image,
    boot_filesystems: Sequence[BootFilesystem],
    *,
    serial_console: str,
    items: Sequence[str] = ITEMS,
) -> list[str]:
    """Make a stock cloud image safe to publish; returns what was changed, one line each.

    Each of `items` (default: all of ITEMS) is one step: lock root's known password (`root_password`),
    empty the machine id (`machine_id`), drop cloud-init state (`cloud_init_state`), forbid root and
    password logins over ssh (`sshd`), put the kernel log on the serial console (`serial_console`).
    """
    if unknown := [item for item in items if item not in ITEMS]:
        raise EulerbakeError(f"unknown hygiene item(s) {', '.join(unknown)}", hint=f"use {', '.join(ITEMS)}")
    changes = []
    for shadow in ("/etc/shadow", "/etc/shadow-") if "root_password" in items else ():
        if root.exists(shadow):
            text = root.read_file(shadow).decode()
            locked = lock_password(text)
            if locked != text:
                root.write_file(shadow, locked.encode())
                changes.append(f"{shadow}: root password locked")
    if "machine_id" in items:
        if root.lstat("/etc/machine-id") is not None:
            root.write_file("/etc/machine-id", b"")
        else:
            root.write_file("/etc/machine-id", b"", ext4.FileAttrs(0o444))
        changes.append("/etc/machine-id: emptied (systemd generates a new id on first boot)")
    if "cloud_init_state" in items and root.remove("/var/lib/cloud"):
        changes.append("/var/lib/cloud: removed (cloud-init runs afresh on first boot)")
    sshd = "/etc/ssh/sshd_config"
    if "sshd" in items and root.exists(sshd):
        root.write_file(sshd, harden_sshd_config(root.read_file(sshd).decode()).encode())
        changes.append(f"{sshd}: PermitRootLogin no, PasswordAuthentication no")
    if "serial_console" in items:
        changes += _serial_console(root, boot_filesystems, serial_console)
    return changes


def _serial_console(root: ext4.Ext4Image, boot_filesystems: Sequence[BootFilesystem], serial_console: str) -> list[str]:
    """The kernel command line edited in every grub.cfg found, and in /etc/default/grub."""
    changes = []
    add = [f"console={serial_console},115200n8", "rd.multipath=0"]
    configs = [GrubConfig(f"root:{path}", root, None, path) for path in ROOT_GRUB_CONFIGS if root.exists(path)]
    for boot in boot_filesystems:
        configs += [GrubConfig(f"partition {boot.number}:{path}", None, boot, path) for path in boot.grub_configs()]
    edited_any = False
    for config in configs:
        text, count = edit_kernel_command_lines(config.read().decode(), KERNEL_ARGS_REMOVED, add)
        if count:
            config.write(text.encode())
            edited_any = True
            removed = " ".join(f"-{arg}" for arg in KERNEL_ARGS_REMOVED)
            changes.append(f"{config.where}: {count} kernel command line(s): {removed} +{' +'.join(add)}")
    if not edited_any:
        raise EulerbakeError(
            "no grub.cfg with a kernel command line found (looked for grub2/grub.cfg and EFI/<vendor>/grub.cfg "
            "on /boot, the EFI system partition and the root filesystem)",
            hint="the serial console cannot be enabled; check the image, or turn the item off in pyproject.toml: "
            'tool.eulerbake.defaults.hygiene.serial_console = "off" (or per release, see `eulerbake config show`)',
        )
    if root.exists("/etc/default/grub"):
        text = root.read_file("/etc/default/grub").decode()
        root.write_file("/etc/default/grub", edit_grub_defaults(text, KERNEL_ARGS_REMOVED, add).encode())
    return changes


def selinux_enabled(root: ext4.Ext4Image) -> bool:
    """Whether the image runs SELinux (enforcing or permissive): new files then need a relabel."""
    if not root.exists("/etc/selinux/config"):
        return False
    config = root.read_file("/etc/selinux/config").decode(errors="replace")
    return re.search(r"^\s*SELINUX\s*=\s*(enforcing|permissive)\s*$", config, flags=re.MULTILINE) is not None
