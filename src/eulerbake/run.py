"""The one place that runs external commands.

Every tool is started with stdin from /dev/null (unless input is given), a clean, explicit
environment, the command logged with `shlex.join`, and stderr kept so a failure can show its tail
together with a copy-pasteable command line. A missing tool names the Debian package to install.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from eulerbake.errors import EulerbakeError

log = logging.getLogger("eulerbake.run")

# Debian package providing each external tool the engine or the recipes call.
TOOL_PACKAGES: dict[str, str] = {
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "sfdisk": "fdisk",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "tune2fs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mdir": "mtools",
    "b3sum": "b3sum",
    "sha256sum": "coreutils",
    "dd": "coreutils",
    "truncate": "coreutils",
    "gcc": "gcc",
    "make": "make",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "ld": "binutils",
    "strip": "binutils",
    "aarch64-linux-gnu-ld": "binutils-aarch64-linux-gnu",
    "aarch64-linux-gnu-strip": "binutils-aarch64-linux-gnu",
    "rpmbuild": "rpm",
    "patch": "patch",
    "tar": "tar",
    "xz": "xz-utils",
    "cpio": "cpio",
    "rpm2cpio": "rpm2cpio",
    "depmod": "kmod",
    "modinfo": "kmod",
    "busybox": "busybox-static",
    "packer": "packer",
    "cloud-init": "cloud-init",
    "git": "git",
}

STDERR_TAIL_LINES = 25

# Variables passed through from the caller's environment; everything else is dropped so a build
# sees the same environment on every machine.
PASSTHROUGH_ENV = ("PATH", "HOME", "TMPDIR", "TERM")


class CommandError(EulerbakeError):
    """An external command failed; carries the command line and the tail of its output."""

    def __init__(self, cmd: Sequence[str], returncode: int, output_tail: str, cwd: Path | None) -> None:
        where = f"(cd {shlex.quote(str(cwd))} && {shlex.join(cmd)})" if cwd else shlex.join(cmd)
        message = f"command failed with exit code {returncode}: {where}"
        if output_tail.strip():
            message += "\n" + "\n".join("  | " + line for line in output_tail.rstrip().splitlines())
        super().__init__(message)
        self.cmd = list(cmd)
        self.returncode = returncode
        self.output_tail = output_tail


def require_tool(tool: str) -> str:
    """Return the absolute path of `tool`, or fail naming the Debian package that provides it."""
    found = shutil.which(tool)
    if found is None:
        package = TOOL_PACKAGES.get(tool, tool)
        raise EulerbakeError(
            f"required tool '{tool}' was not found on PATH",
            hint=f"install it with: apt-get install {package}",
        )
    return found


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["LC_ALL"] = "C.UTF-8"
    env["TZ"] = "UTC"
    if extra:
        env.update(extra)
    return env


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    check: bool = True,
    stdout: int | None = subprocess.PIPE,
) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd` and return the completed process; raise `CommandError` on failure.

    stdout is captured unless `stdout` says otherwise; stderr is always captured. `env` adds to
    the clean environment (see `clean_env`).
    """
    argv = [os.fspath(part) for part in cmd]
    argv[0] = require_tool(argv[0]) if os.sep not in argv[0] else argv[0]
    log.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=clean_env(env),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise EulerbakeError(
            f"command timed out after {timeout}s: {shlex.join(argv)}",
            hint="check the tool's input; raise the timeout if the work is legitimately long",
        ) from exc
    if check and proc.returncode != 0:
        output = proc.stderr.decode(errors="replace")
        if not output.strip() and isinstance(proc.stdout, bytes):
            output = proc.stdout.decode(errors="replace")
        raise CommandError([os.path.basename(argv[0]), *argv[1:]], proc.returncode, tail(output), cwd)
    return proc


def run_text(cmd: Sequence[str | os.PathLike[str]], **kwargs: object) -> str:
    """Run `cmd` and return its stdout decoded as UTF-8."""
    proc = run(cmd, **kwargs)  # type: ignore[arg-type]
    return proc.stdout.decode()
