"""The one place that runs external commands.

Every tool is started with stdin from /dev/null (unless input is given), a clean, explicit
environment, the command logged with `shlex.join`, and stderr kept so a failure can show its tail
together with a copy-pasteable command line. A missing tool names the Debian package to install.
`on_line` streams a long tool's stdout line by line while it runs (progress for hour-long builds).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.packages import package_of

log = logging.getLogger("eulerbake.tools.run")

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
        raise EulerbakeError(
            f"required tool '{tool}' was not found on PATH",
            hint=f"install it with: apt-get install {package_of(tool)}",
        )
    return found


@dataclass
class CommandRecord:
    """One command a build ran, for its log: argv, exit code, duration and the tail of its stderr."""

    argv: list[str]
    returncode: int
    seconds: float
    stderr_tail: str


@dataclass
class Recorder:
    """What ran during one build: the commands, in order, and the tool names they started."""

    commands: list[CommandRecord] = field(default_factory=list)
    tmpdir: Path | None = None  # the build's own scratch directory: TMPDIR of every command it runs

    @property
    def tools(self) -> set[str]:
        return {os.path.basename(record.argv[0]) for record in self.commands}


_recorder: Recorder | None = None


@contextmanager
def recording(tmpdir: Path | None = None) -> Iterator[Recorder]:
    """Record every command `run` starts inside the block (the store wraps each build in one).

    With `tmpdir`, commands get it as TMPDIR, so a killed build leaves no compiler temp files in the
    caller's /tmp: they go with the build's scratch directory.
    """
    global _recorder
    previous, _recorder = _recorder, Recorder(tmpdir=tmpdir)
    try:
        yield _recorder
    finally:
        _recorder = previous


def probe(binary: Path, args: Sequence[str]) -> tuple[str, str]:
    """(stdout, stderr) of `binary args`, never raising: how `tools.versions` asks a tool its version."""
    try:
        proc = subprocess.run([str(binary), *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                              env=clean_env())
    except (OSError, subprocess.TimeoutExpired):
        return "", ""
    return proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if _recorder is not None and _recorder.tmpdir is not None:
        env["TMPDIR"] = str(_recorder.tmpdir)
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
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd` and return the completed process; raise `CommandError` on failure.

    stdout is captured unless `stdout` says otherwise; stderr is always captured. `env` adds to
    the clean environment (see `clean_env`). With `on_line`, each stdout line (without its newline)
    is handed to it as it arrives, and the whole stdout is still returned.
    """
    argv = [os.fspath(part) for part in cmd]
    argv[0] = require_tool(argv[0]) if os.sep not in argv[0] else argv[0]
    log.debug("+ %s", shlex.join(argv))
    started = time.monotonic()
    try:
        if on_line is not None:
            if input is not None:
                raise ValueError("run(): on_line and input cannot be combined")
            proc = _streamed(argv, cwd, clean_env(env), timeout, on_line)
        else:
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
    if _recorder is not None:
        stderr_text = proc.stderr.decode(errors="replace")
        shown = [os.path.basename(argv[0]), *argv[1:]]
        _recorder.commands.append(CommandRecord(shown, proc.returncode, round(time.monotonic() - started, 3),
                                                tail(stderr_text, 10)))
    if check and proc.returncode != 0:
        output = proc.stderr.decode(errors="replace")
        if not output.strip() and isinstance(proc.stdout, bytes):
            output = proc.stdout.decode(errors="replace")
        raise CommandError([os.path.basename(argv[0]), *argv[1:]], proc.returncode, tail(output), cwd)
    return proc


def _streamed(argv: list[str], cwd: Path | None, env: dict[str, str], timeout: float | None,
              on_line: Callable[[str], None]) -> subprocess.CompletedProcess[bytes]:
    """subprocess.run for `run(on_line=…)`: stdout read line by line, stderr drained by a thread."""
    # Its own process group, so a timeout or an interrupt stops the tool's children too (they hold stdout).
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)

    stdout, stderr = child.stdout, child.stderr
    assert stdout is not None and stderr is not None
    errors: list[bytes] = []
    drain = threading.Thread(target=lambda: errors.append(stderr.read()), daemon=True)
    drain.start()
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        kill()

    timer = threading.Timer(timeout, expire) if timeout else None
    if timer is not None:
        timer.start()
    lines: list[bytes] = []
    try:
        for raw in stdout:
            lines.append(raw)
            on_line(raw.decode(errors="replace").rstrip("\r\n"))
    finally:
        if timer is not None:
            timer.cancel()
        if sys.exc_info()[0] is not None:  # on_line raised, or an interrupt: do not leave the tool running
            kill()
        child.wait()
        drain.join()
    if expired.is_set():
        raise subprocess.TimeoutExpired(argv, timeout or 0)
    return subprocess.CompletedProcess(argv, child.returncode, b"".join(lines), b"".join(errors))


def run_text(cmd: Sequence[str | os.PathLike[str]], **kwargs: object) -> str:
    """Run `cmd` and return its stdout decoded as UTF-8."""
    proc = run(cmd, **kwargs)  # type: ignore[arg-type]
    return proc.stdout.decode()
