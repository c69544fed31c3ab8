"""Builds do not depend on the caller: the sample built by real doit under umask 077, another TZ and locale, from
a copy of the project in another directory into another store, is bit for bit the normal build, key by key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eulerbake.core import hashing
from tests.config.conftest import REPO, copy_project

TARGETS = ("raw:sample:x86_64", "raw:sample:aarch64")  # and with them both sample qcow2s and the ENA chain


def build(project: Path, store: Path, *, umask: int, tz: str, locale: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EULERBAKE_STORE": str(store), "TZ": tz, "LC_ALL": locale, "LANG": locale}
    env.pop("EULERBAKE_PROJECT", None)
    return subprocess.run([sys.executable, "-m", "doit", *TARGETS], cwd=project, env=env, capture_output=True,
                          text=True, timeout=1200, preexec_fn=lambda: os.umask(umask))


def entries(store: Path) -> dict[str, str]:
    """{entry name (key + name): output tree hash} of every committed entry."""
    return {meta.stem: json.loads(meta.read_text())["output"]["hash"] for meta in sorted(store.glob("*.json"))}


@pytest.mark.slow
def test_umask_tz_locale_and_checkout_path_change_no_byte(tmp_path: Path) -> None:
    normal_store, odd_store = tmp_path / "store-normal", tmp_path / "elsewhere" / "store"
    normal = build(REPO, normal_store, umask=0o022, tz="UTC", locale="C")
    assert normal.returncode == 0, normal.stdout + normal.stderr
    checkout = copy_project(tmp_path / "elsewhere" / "a checkout")  # another path, with a space in it
    odd = build(checkout, odd_store, umask=0o077, tz="Pacific/Chatham", locale="C.UTF-8")
    assert odd.returncode == 0, odd.stdout + odd.stderr

    built = entries(normal_store)
    assert {name.split("-", 1)[1] for name in built} >= {"qcow2-sample-x86_64", "qcow2-sample-aarch64",
                                                          "raw-sample-x86_64", "raw-sample-aarch64"}
    assert entries(odd_store) == built  # the same keys, and under each the same output
    for name in built:  # and re-hashed from disk, not only as recorded
        assert hashing.hash_tree(odd_store / name, use_cache=False) == hashing.hash_tree(normal_store / name,
                                                                                          use_cache=False), name
