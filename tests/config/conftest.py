"""Fixtures for the config tests: a pyproject.toml of the test's own, read by the recipes in place of the project's."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `recipes` is imported from the repository, as the CLI does
    sys.path.insert(0, str(REPO))

from recipes import config, sample  # noqa: E402

WriteConfig = Callable[[str], Path]


@pytest.fixture
def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteConfig]:
    """write_config(toml) -> the path of a pyproject.toml holding `toml`, which the recipes now read."""
    path = tmp_path / "pyproject.toml"
    monkeypatch.setattr(config, "PYPROJECT", path)

    def write(text: str) -> Path:
        path.write_text(text)
        return path

    sample._sample_targets.cache_clear()
    yield write
    sample._sample_targets.cache_clear()


def copy_project(dest: Path, pyproject_extra: str = "") -> Path:
    """The project's recipes, overlays, dodo.py and pyproject.toml (+ `pyproject_extra`) copied to `dest`."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("recipes", "overlays"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore, symlinks=True)
    shutil.copy2(REPO / "dodo.py", dest / "dodo.py")
    (dest / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + pyproject_extra)
    return dest
