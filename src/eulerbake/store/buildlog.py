"""The log kept beside each store entry: what a build ran, with which tool versions, and how it ended.

`store/<key>-<name>.log` is written for every build, failed ones included, so a failure on a CI runner
can be read afterwards (`eulerbake store log TASK`) and provenance can name the tools that really ran.
It holds command lines, never the environment: credentials reach tools through the environment only.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from eulerbake.core.derivation import Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.run import Recorder


class BuildLog:
    """Collects a build's messages; the commands come from the `tools.run` recorder of the build."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.started = time.monotonic()
        self.messages: list[tuple[int, str]] = []  # (commands run before the message, text)
        self.recorder: Recorder | None = None
        self.error = ""

    def message(self, text: str) -> None:
        done = len(self.recorder.commands) if self.recorder else 0
        self.messages.append((done, text))

    def failure(self, text: str) -> None:
        self.error = text

    def render(self, ok: bool) -> str:
        node = self.node
        lines = [f"task {node.task_name}", f"key {node.key}", f"kind {node.kind}"]
        try:
            versions = node.manifest.get("tools", {})
        except Exception:  # the manifest itself failed (e.g. a tool is missing): the log still says so
            versions = {}
        commands = self.recorder.commands if self.recorder else []
        used = sorted({Path(c.argv[0]).name for c in commands})
        if used:
            lines.append("tools")
            lines += [f"  {tool}: {versions.get(tool, '(not declared)')}" for tool in used]
        messages = list(self.messages)
        for index, command in enumerate(commands):
            while messages and messages[0][0] <= index:
                lines.append(f"# {messages.pop(0)[1]}")
            lines.append(f"+ {shlex.join(command.argv)}  [exit {command.returncode}, {command.seconds:.2f}s]")
            lines += [f"  | {line}" for line in command.stderr_tail.splitlines()]
        lines += [f"# {text}" for _, text in messages]
        seconds = time.monotonic() - self.started
        if ok:
            lines.append(f"result: built in {seconds:.2f}s")
        else:
            lines.append(f"result: FAILED after {seconds:.2f}s")
            lines += [f"  {line}" for line in (self.error or _handled_error() or "interrupted").splitlines()]
        return "\n".join(lines) + "\n"

    def write(self, path: Path, ok: bool) -> None:
        """Write the log; a failed one written while its exception is handled says what that exception was."""
        path.write_text(self.render(ok))


def _handled_error() -> str:
    """The exception being handled, as the user sees it (the store refused the output after the builder
    ran: an undeclared tool, an input edited mid-build, a secret in a receipt); "" for an interrupt."""
    exc = sys.exc_info()[1]
    if exc is None or isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return ""
    return str(exc) if isinstance(exc, EulerbakeError) else f"{type(exc).__name__}: {exc}"
