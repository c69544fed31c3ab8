"""Fixtures for the provenance tests: a git-committed copy of the engine's toy project with two more stages,
driven by real doit and `python -m eulerbake.cli.audit` processes, and a signing key pair.

The copy is tests/engine/toyproject with its wiring moved to `recipes/toy.py` and this folder's
`project/recipes` (digest:toy downstream of the patch; noisy:toy, non-deterministic on purpose) laid over
it; a pinned `seed.bin` adds a fixed-output source. The engine's toy project itself is not touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest

from eulerbake.store.signing import SecretKey
from tests.publish.conftest import aws, disks, moto_url, shim  # noqa: F401 - the AMI test's fixtures

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "tests" / "engine" / "toyproject"
OVERLAY = Path(__file__).resolve().parent / "project"
FAKE_AWS_SECRET = "eulerbake-provenance-secret-3b9d0c7e51"  # must appear in no provenance document
GIT = ["git", "-c", "user.name=eulerbake tests", "-c", "user.email=tests@eulerbake.invalid", "-c",
       "commit.gpgsign=false", "-c", "init.defaultBranch=main"]


@dataclass
class Keys:
    secret: SecretKey
    secret_file: Path
    public_file: Path

    @property
    def public(self) -> str:
        return str(self.secret.public())


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    folder = tmp_path / "keys"
    folder.mkdir()
    key = SecretKey.generate("ci-test-1")
    secret, public = key.write(folder)
    return Keys(key, secret, public)


@dataclass
class Project:
    root: Path
    bin: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOY_", "EULERBAKE_", "AWS_"))}
        env.update({"PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "TOY_FAKETOOL": "1",
                    "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET, "TOY_TRACE": str(self.root.parent / "trace")})
        env.update(extra)
        return env

    def _run(self, args: list[str], check: bool, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, *args], cwd=self.root, env=self.env(**env), capture_output=True,
                              text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def doit(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        return self._run(["-m", "doit", *args], check, env)

    def cli(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        """`python -m eulerbake.cli.audit ARGS` (what `eulerbake audit|provenance|build --check` dispatch to)."""
        return self._run(["-m", "eulerbake.cli.audit", *args], check, env)

    def entry(self, task: str, **env: str) -> Path:
        """The store path of the task's entry for the recipes as they are now (`eulerbake store path`)."""
        proc = self._run(["-m", "eulerbake.cli.main", "store", "path", task], True, env)
        return Path(proc.stdout.strip())

    def meta(self, task: str, **env: str) -> dict[str, Any]:
        meta: dict[str, Any] = json.loads(Path(f"{self.entry(task, **env)}.json").read_text())
        return meta

    def statement(self, task: str, **env: str) -> dict[str, Any]:
        from eulerbake.provenance import dsse, provenance_path

        _body, statement, problem = dsse.decode(dsse.read(provenance_path(self.entry(task, **env))))
        assert statement is not None, problem
        return statement

    def git(self, *args: str) -> str:
        return subprocess.run([*GIT, *args], cwd=self.root, check=True, capture_output=True, text=True).stdout


def _install_faketool(folder: Path) -> None:
    folder.mkdir()
    script = folder / "faketool"
    script.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'faketool 2.5'; exit 0; fi\n"
                      "shift; echo \"emitted $*\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = tmp_path / "project"
    shutil.copytree(TOY, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "recipes" / "__init__.py").rename(root / "recipes" / "toy.py")
    shutil.copytree(OVERLAY, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    seed = root / "seed.bin"
    seed.write_bytes(b"pinned upstream bytes\n" * 64)
    data = seed.read_bytes()
    (root / "seed.pins").write_text(f"{hashlib.sha256(data).hexdigest()} {blake3.blake3(data).hexdigest()} "
                                    f"{len(data)}\n")
    (root / ".gitignore").write_text("/store/\n.doit.db*\n__pycache__/\n")
    made = Project(root, tmp_path / "bin")
    _install_faketool(made.bin)
    made.git("init", "-q")
    made.git("add", "-A")
    made.git("commit", "-q", "-m", "toy recipes")
    return made
