"""A key covers the versions of the tools a stage runs: an entry built with another version of a tool is
another key, so a runner with a different e2fsprogs or qemu-img never takes it from the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from eulerbake.store.signing import SecretKey
from eulerbake.tools import versions
from tests.cache.conftest import Runner
from tests.cache.graph import faketool_node


def _faketool(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tool = directory / "faketool"
    tool.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "faketool {version}"; else echo said; fi\n')
    tool.chmod(0o755)
    return directory


def _use(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    monkeypatch.setenv("PATH", f"{directory}:/usr/bin:/bin")
    monkeypatch.setattr(versions, "_memory", {})  # this process probed faketool already: probe it again


def test_another_tool_version_is_another_key(make_runner: Any, dir_url: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, ci_key: SecretKey) -> None:
    old, new = _faketool(tmp_path / "v1", "1.46.5"), _faketool(tmp_path / "v2", "1.47.0")
    _use(monkeypatch, old)
    a: Runner = make_runner("a", [dir_url])
    built = faketool_node()
    a.realise([built])
    assert a.ran() == ["faketool"] and a.meta(built)["manifest"]["tools"] == {"faketool": "faketool 1.46.5"}
    a.push([built], ci_key)

    _use(monkeypatch, new)
    b: Runner = make_runner("b", [dir_url])
    other = faketool_node()
    assert other.key != built.key
    results = b.realise([other])
    assert b.ran() == ["faketool"] and results[other.key].built  # not a hit: built with the tool it has
    assert b.meta(other)["manifest"]["tools"] == {"faketool": "faketool 1.47.0"}

    _use(monkeypatch, old)  # the same version as A: the same key, taken from the cache
    c: Runner = make_runner("c", [dir_url])
    same = faketool_node()
    assert same.key == built.key
    assert c.realise([same])[same.key].substituted and c.ran() == []
