"""Every release × arch cell of the matrix yields a valid doit task graph from the repo's dodo.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from recipes import releases

REPO = Path(__file__).resolve().parents[2]


def _doit(*args: str, store: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EULERBAKE_STORE": str(store)}
    return subprocess.run([sys.executable, "-m", "doit", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_doit_list_shows_every_cell(tmp_path: Path) -> None:
    proc = _doit("list", "--all", "--quiet", store=tmp_path / "store")
    assert proc.returncode == 0, proc.stderr
    tasks = set(proc.stdout.split())
    cells = releases.matrix()
    assert len(cells) >= 20
    for rel in cells:
        for stage in ("fetch", "unpack", "raw"):
            prefix = f"{stage}:{rel.label}"
            assert any(task == prefix or task.startswith(prefix + ":") for task in tasks), prefix
        if rel.arch == "aarch64":  # the seed: these kernels lack ENA, so the module is built and gated
            for stage in ("kernel-headers", "kmod-ena", "kmod-check", "image-modules"):
                assert f"{stage}:{rel.label}" in tasks
    # The graph is consistent: doit resolves every dependency of a real cell.
    info = _doit("info", "raw:22.03-LTS-SP4:aarch64", store=tmp_path / "store").stdout
    assert "kmod-check:22.03-LTS-SP4:aarch64" in info and "unpack:22.03-LTS-SP4:aarch64" in info


def test_unpinned_cell_fails_with_lock_hint(tmp_path: Path) -> None:
    lock = releases.read_lock()
    rel = releases.matrix(["22.03-LTS-SP4"], ["aarch64"])[0]
    if lock.get(f"{rel.label}:qcow2") is not None:  # a pinned lock would try the network
        return
    store = tmp_path / "store"
    proc = _doit("fetch:22.03-LTS-SP4:aarch64:qcow2", store=store)
    assert proc.returncode != 0
    assert "not pinned" in proc.stdout + proc.stderr and "eulerbake lock" in proc.stdout + proc.stderr
    assert [p for p in store.iterdir() if not p.name.startswith(".")] == []
