"""Fixtures for the engine tests: a throw-away copy of the toy project, driven by real doit processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOY = Path(__file__).resolve().parent / "toyproject"


@dataclass
class ToyProject:
    root: Path
    trace: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOY_", "EULERBAKE_"))}
        env["TOY_TRACE"] = str(self.trace)
        env.update(extra)
        return env

    def _run(self, module: str, args: tuple[str, ...], check: bool, env: dict[str, str]
             ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=self.root, env=self.env(**env),
            capture_output=True, text=True, timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{module} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def doit(self, *args: str, check: bool = True, environ: Mapping[str, str] | None = None, **env: str
             ) -> subprocess.CompletedProcess[str]:
        """`python -m doit ARGS` in the project, with `environ` and `env` added to the environment."""
        return self._run("doit", args, check, {**(environ or {}), **env})

    def eulerbake(self, *args: str, check: bool = True, environ: Mapping[str, str] | None = None, **env: str
                  ) -> subprocess.CompletedProcess[str]:
        return self._run("eulerbake.cli.main", args, check, {**(environ or {}), **env})

    def ran(self) -> list[str]:
        """Builders that ran since the last call (in order), then reset the trace."""
        if not self.trace.exists():
            return []
        names = self.trace.read_text().split()
        self.trace.unlink()
        return names

    def entries(self) -> set[str]:
        if not self.store.is_dir():
            return set()
        return {p.name for p in self.store.iterdir() if not p.name.startswith(".")}


@pytest.fixture
def toy(tmp_path: Path) -> ToyProject:
    root = tmp_path / "project"
    shutil.copytree(TOY, root)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return ToyProject(root, tmp_path / "trace")
