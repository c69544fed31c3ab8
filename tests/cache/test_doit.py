"""Through real doit processes: runner A builds and pushes, runner B's `doit` plans against the cache and
runs no builder; what lies below the hit is not even selected."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from eulerbake.store.signing import SecretKey
from tests.cache.conftest import REPO
from tests.cache.graph import upstream_file

PROJECT = Path(__file__).resolve().parent / "project"


@dataclass
class Checkout:
    root: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def ran(self) -> list[str]:
        trace = Path(self.env["CACHE_TRACE"])
        names = trace.read_text().split() if trace.exists() else []
        trace.unlink(missing_ok=True)
        return names

    def meta(self, prefix: str) -> dict[str, object]:
        found = [p for p in (self.root / "store").glob("*.json") if p.name.split("-", 1)[1].startswith(prefix)]
        assert len(found) == 1, found
        return dict(json.loads(found[0].read_text()))

    def entries(self) -> list[str]:
        return sorted(p.name.split("-", 1)[1] for p in (self.root / "store").glob("*.json"))


def _checkout(tmp_path: Path, name: str, url: str, public: str, upstream: Path) -> Checkout:
    root = tmp_path / name
    shutil.copytree(PROJECT, root)
    (root / "pyproject.toml").write_text(
        f'[tool.eulerbake]\nsubstituters = ["{url}"]\ntrusted-public-keys = ["{public}"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("EULERBAKE_")}
    env.update(PYTHONPATH=str(REPO), CACHE_UPSTREAM=str(upstream), CACHE_TRACE=str(tmp_path / f"{name}.trace"))
    return Checkout(root, env)


def test_doit_on_runner_b_builds_nothing(tmp_path: Path, cache_url: str, ci_key: SecretKey) -> None:
    upstream = upstream_file(tmp_path / "upstream")
    public = str(ci_key.public())
    a = _checkout(tmp_path, "a", cache_url, public, upstream)
    a.run("doit")
    assert sorted(a.ran()) == ["image", "kmod", "raw", "unpack"]
    key_file = tmp_path / "ci-1.secret"
    key_file.write_text(str(ci_key))
    key_file.chmod(0o600)
    pushed = a.run("eulerbake.cli.cache", "push", "raw:sample", "kmod:sample", "image:sample", "--key", str(key_file))
    assert "5 pushed" in pushed.stdout, pushed.stdout + pushed.stderr

    b = _checkout(tmp_path, "b", cache_url, public, upstream)
    run = b.run("doit", "-n", "2")
    assert b.ran() == [], run.stderr
    assert "plan: 5 nodes, 0 in the store, 1 from caches, 0 to build, 4 not needed" in run.stderr, run.stderr
    assert b.entries() == ["image-sample.json"]  # raw, unpack and the upstream file were cut below the hit
    assert b.meta("image-sample")["substituted_from"] == a.run("eulerbake.cli.cache", "ls").stdout.split()[-1]

    raw = b.run("doit", "raw:sample")
    assert b.ran() == [] and "1 from caches" in raw.stderr
    assert b.entries() == ["image-sample.json", "raw-sample.json"]
    assert not any(name.startswith(("unpack", "upstream")) for name in b.entries())

    again = b.run("doit")  # all there: nothing asked, nothing run
    assert b.ran() == [] and "0 keys asked" in again.stderr


def test_commands_that_run_nothing_ask_no_cache(tmp_path: Path, ci_key: SecretKey) -> None:
    unreachable = f"s3://nowhere/x?endpoint_url=http://127.0.0.1:{_closed_port()}&region=us-east-1"
    checkout = _checkout(tmp_path, "c", unreachable, str(ci_key.public()), upstream_file(tmp_path / "upstream"))
    started = time.monotonic()
    listed = checkout.run("doit", "list", "--all")
    assert "image:sample" in listed.stdout and "plan:" not in listed.stderr
    assert time.monotonic() - started < 20
    # A run with the cache down: a warning, then an ordinary build.
    run = checkout.run("doit", "kmod:sample")
    assert "is not available" in run.stderr and checkout.ran() == ["kmod"]


def _closed_port() -> int:
    from tests.cache.conftest import free_port

    return free_port()


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
