"""Linters are tests: ruff and mypy run over the whole project as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    proc = _run("ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy() -> None:
    proc = _run("mypy")  # files and strictness come from pyproject.toml
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _ruff_on(path: str, source: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--stdin-filename", path, "-"], cwd=REPO,
                          input=source, capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def test_recipes_may_not_import_doit() -> None:
    assert "TID251" in _ruff_on("recipes/stages/example.py", "from doit.action import TaskFailed\n")
    assert "TID251" not in _ruff_on("recipes/stages/example.py", "from eulerbake.core.derivation import Derivation\n")


def test_engine_may_not_import_recipes() -> None:
    assert "TID251" in _ruff_on("src/eulerbake/store/example.py", "from recipes import releases\n")
    assert "TID251" not in _ruff_on("src/eulerbake/tasks/example.py", "from doit.action import TaskFailed\n")
