"""`eulerbake packer-key`: the one step that makes the Packer builder key, and so puts `packer-ami` in the graph."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from eulerbake.tools.run import run_text
from recipes.stages.builder_key import KEY_FILE_ENV, KEY_NAME
from tests.config.conftest import copy_project


def _eulerbake(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eulerbake.cli.main", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def test_packer_key_makes_the_key_once_and_turns_on_the_packer_tasks(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    env = {**os.environ, "EULERBAKE_STORE": str(tmp_path / "store"), "XDG_STATE_HOME": str(tmp_path / "state")}
    for name in (KEY_FILE_ENV, "EULERBAKE_PROJECT"):
        env.pop(name, None)
    before = _eulerbake(project, env, "list", "--all")
    assert before.returncode == 0, before.stderr
    assert "packer-ami:" not in before.stdout  # no key yet, and listing made none
    assert not (tmp_path / "state").exists()

    made = _eulerbake(project, env, "packer-key")
    assert made.returncode == 0, made.stderr
    private = tmp_path / "state" / "eulerbake" / KEY_NAME
    assert made.stdout.startswith(f"made the Packer builder key {private} ")
    assert private.stat().st_mode & 0o777 == 0o600
    public = made.stdout.splitlines()[1]
    assert public.split()[:2] == run_text(["ssh-keygen", "-y", "-f", private]).split()[:2]

    again = _eulerbake(project, env, "packer-key")
    assert again.stdout.startswith("using the Packer builder key") and again.stdout.splitlines()[1] == public
    after = _eulerbake(project, env, "list", "--all")
    assert "packer-ami:24.03-LTS-SP2:x86_64" in after.stdout, after.stderr
    assert not (tmp_path / "store").exists() or not [p for p in (tmp_path / "store").iterdir()
                                                      if not p.name.startswith(".")]


def test_packer_key_with_a_missing_key_file_is_one_message(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    env = {**os.environ, KEY_FILE_ENV: str(tmp_path / "missing"), "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("EULERBAKE_PROJECT", None)
    proc = _eulerbake(project, env, "packer-key")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"the Packer builder key {tmp_path / 'missing'} does not exist" in proc.stderr
    assert not (tmp_path / "missing").exists()
