"""Every release × arch cell of the matrix yields a valid doit task graph from the repo's dodo.py, and
building that graph is lazy: it runs no tool and reads no package database, so a missing cross compiler
only matters to the keys of the cross builds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

import recipes
from eulerbake.core.derivation import Derivation, walk
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store
from eulerbake.tasks.glue import task_dict, unique_nodes
from eulerbake.tools import versions
from recipes import releases, sample
from recipes.stages import kernel_headers

REPO = Path(__file__).resolve().parents[2]
CROSS_GCC = "aarch64-linux-gnu-gcc"


def _run(*args: str, store: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EULERBAKE_STORE": str(store)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _doit(*args: str, store: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    return _run("-m", "doit", *args, store=store, path=path)


def path_without_cross_compiler(tmp_path: Path) -> str:
    """A PATH with every command of the usual directories except the aarch64 cross compiler."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for tool in Path(directory).iterdir() if Path(directory).is_dir() else []:
            if not tool.name.startswith(CROSS_GCC) and not (bin_dir / tool.name).exists():
                os.symlink(tool, bin_dir / tool.name)
    return str(bin_dir)


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
            for stage in ("kernel-headers", "kmod-build", "kmod-check", "image-modules"):
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


def test_the_graph_loads_without_the_cross_compiler(tmp_path: Path) -> None:
    """Only a cross build's key needs aarch64-linux-gnu-gcc: listing every task and keying the x86_64 sample do not."""
    path = path_without_cross_compiler(tmp_path)
    store = tmp_path / "store"
    listed = _doit("list", "--all", "--quiet", store=store, path=path)
    assert listed.returncode == 0, listed.stderr
    assert "kmod-build:22.03-LTS-SP4:aarch64" in listed.stdout.split()
    # The sample's key covers its whole chain (kernel headers from dpkg, the ENA build with the host's gcc).
    shown = _run("-m", "eulerbake.cli.main", "store", "path", "--expected", "raw:sample:x86_64", store=store, path=path)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    entry = Path(shown.stdout.strip())
    assert entry.parent == store and entry.name.endswith("-raw-sample-x86_64")


def test_only_the_cross_build_key_needs_the_cross_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", path_without_cross_compiler(tmp_path))
    monkeypatch.setattr(versions, "_memory", {})  # versions probed earlier in this process would hide the gap
    rel = releases.matrix(["22.03-LTS-SP4"], ["aarch64"])[0]
    nodes = {node.task_name: node for node in walk(recipes.release_targets(rel))}
    for stage in ("unpack", "image-modules", "kernel-headers"):
        assert nodes[f"{stage}:{rel.label}"].key  # their tools are all there
    with pytest.raises(EulerbakeError) as caught:
        _ = nodes[f"kmod-build:{rel.label}"].key
    assert f"required tool '{CROSS_GCC}' was not found" in str(caught.value)
    assert caught.value.hint == "install it with: apt-get install gcc-aarch64-linux-gnu"


def test_building_the_graph_runs_nothing_and_computes_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What doit does on every run, `doit list` included: the recipes' targets and one task dict per node."""

    def forbidden(*args: Any, **_kwargs: Any) -> NoReturn:
        raise AssertionError(f"called while the task graph was built, with {args[:1]!r}")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(versions, "tool_version", forbidden)
    monkeypatch.setattr(kernel_headers, "dpkg_packages_for_headers", forbidden)
    monkeypatch.setattr(Derivation, "manifest", property(forbidden))
    sample._sample_targets.cache_clear()  # build the sample's nodes afresh, under the patches
    try:
        nodes = unique_nodes([*recipes.targets(), *recipes.default_targets()])
        dicts = [task_dict(node, Store(tmp_path / "store")) for node in nodes]
    finally:
        sample._sample_targets.cache_clear()
    assert {"raw:sample:x86_64", "kernel-headers:sample:x86_64", "kmod-build:24.03-LTS-SP4:aarch64"} <= {
        node.task_name for node in nodes}
    assert len(dicts) == len(nodes)
