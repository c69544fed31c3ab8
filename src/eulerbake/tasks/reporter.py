"""A doit reporter that shows rich progress while tasks run and a summary table at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from eulerbake.store.local import Store
from eulerbake.tools.units import human_size


class RichReporter:
    """doit reporter API: initialize, execute_task, add_success/add_failure/skip_*, complete_run."""

    desc = "eulerbake rich progress + summary"

    def __init__(self, outstream: Any, options: dict[str, Any]) -> None:
        self.console = Console(file=outstream, highlight=False, soft_wrap=True)
        if not self.console.is_terminal:
            self.console.width = 200  # logs and CI: never fold store paths
        self.errors = Console(stderr=True, highlight=False, soft_wrap=True)
        self.options = options
        self.rows: dict[str, tuple[str, str]] = {}  # task name -> (status, store path)
        self.seconds: dict[str, float] = {}  # task name -> seconds its action took (built or substituted)
        self.failures: list[tuple[str, str]] = []
        self.started: dict[str, float] = {}
        self.total = 0
        self.done = 0
        self.status: Status | None = None
        self.run_started = time.monotonic()

    @staticmethod
    def _is_build_task(task: Any) -> bool:
        return bool(task.actions) and bool(getattr(task, "meta", None)) and "node" in task.meta

    @staticmethod
    def _store_path(task: Any) -> str:
        return str(Store(Path(task.meta["store_root"])).path(task.meta["node"]))

    def initialize(self, tasks: dict[str, Any], selected_tasks: list[str]) -> None:
        self.total = sum(1 for task in tasks.values() if self._is_build_task(task))

    def get_status(self, task: Any) -> None:
        pass

    def _progress(self, text: str) -> None:
        if not self.console.is_terminal:
            return
        if self.status is None:
            self.status = self.console.status(text)
            self.status.start()
        else:
            self.status.update(text)

    def execute_task(self, task: Any) -> None:
        if not self._is_build_task(task):
            return
        self.started[task.name] = time.monotonic()
        self.console.print(f"[bold cyan]▶[/] {task.name} [dim]building…[/]")
        self._progress(f"[{self.done}/{self.total}] building {task.name}")

    def add_success(self, task: Any) -> None:
        if not self._is_build_task(task):
            return
        self.done += 1
        built = bool(task.values.get("built")) if task.values else True
        substituted = bool(task.values.get("substituted")) if task.values else False
        seconds = time.monotonic() - self.started.get(task.name, time.monotonic())
        status = "substituted" if substituted else "built" if built else "cached"
        self.rows[task.name] = (status, self._store_path(task))
        if built or substituted:
            self.seconds[task.name] = seconds
        verb = {"built": f"built in {seconds:.1f}s", "substituted": f"substituted from a cache in {seconds:.1f}s",
                "cached": "found in store"}[status]
        self.console.print(f"[bold green]✔[/] {task.name} [dim]{verb}[/]")
        self._progress(f"[{self.done}/{self.total}] …")

    def add_failure(self, task: Any, fail: Any) -> None:
        message = fail.get_msg() if hasattr(fail, "get_msg") else str(fail)
        self.failures.append((task.name, message))
        if self._is_build_task(task):
            self.rows[task.name] = ("FAILED", self._store_path(task))
        self.console.print(f"[bold red]✘[/] {task.name} failed")

    def skip_uptodate(self, task: Any) -> None:
        if self._is_build_task(task):
            self.done += 1
            self.rows[task.name] = ("cached", self._store_path(task))

    def skip_ignore(self, task: Any) -> None:
        if self._is_build_task(task):
            self.rows[task.name] = ("ignored", self._store_path(task))

    def cleanup_error(self, exception: Any) -> None:
        self.errors.print(f"[red]cleanup error:[/] {escape(str(exception))}")

    def runtime_error(self, msg: str) -> None:
        self._stop_status()
        self.errors.print(f"[bold red]error:[/] {escape(msg)}")

    def teardown_task(self, task: Any) -> None:
        pass

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def complete_run(self) -> None:
        self._stop_status()
        for name, message in self.failures:
            self.errors.print(f"[bold red]{escape(name)} failed:[/]\n{escape(message.rstrip())}")
        if not self.rows:
            return
        table = Table(title=None, show_edge=False, pad_edge=False)
        table.add_column("task")
        table.add_column("store path", no_wrap=True)
        table.add_column("size", justify="right")
        table.add_column("time", justify="right")
        table.add_column("status")
        styles = {"built": "green", "substituted": "cyan", "cached": "dim", "FAILED": "bold red", "ignored": "yellow"}
        for name, (status, path) in self.rows.items():
            took = f"{self.seconds[name]:.1f}s" if name in self.seconds else "-"
            table.add_row(name, _display_path(path), _entry_size(path), took, f"[{styles.get(status, '')}]{status}[/]")
        self.console.print(table)
        counts = {status: sum(1 for s, _ in self.rows.values() if s == status)
                  for status in ("built", "substituted", "cached")}
        summary = f"{counts['built']} built, {counts['cached']} cached"
        if counts["substituted"]:
            fetched = sum(_entry_bytes(path) for s, path in self.rows.values() if s == "substituted")
            fetching = sum(self.seconds.get(name, 0.0) for name, (s, _) in self.rows.items() if s == "substituted")
            summary += f", {counts['substituted']} substituted ({human_size(fetched)} in {fetching:.1f}s)"
        if self.failures:
            summary += f", {len(self.failures)} failed"
        elapsed = time.monotonic() - self.run_started
        self.console.print(f"[bold]{summary}[/] [dim]in {elapsed:.2f}s[/]")


def _display_path(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _entry_size(path: str) -> str:
    try:
        with open(f"{path}.json") as f:
            return human_size(int(json.load(f)["output"]["size"]))
    except (OSError, ValueError, KeyError):
        return "-"


def _entry_bytes(path: str) -> int:
    """Bytes a substituted entry brought over the wire (its archive), 0 when unknown."""
    try:
        with open(f"{path}.json") as f:
            return int(json.load(f)["substitution"]["archive_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
