"""Fixtures for the cache tests: moto's S3 in server mode on 127.0.0.1 (a real HTTP server in its own
process), a directory cache, signing keys, and runners — each a separate store, like two CI machines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from eulerbake.core.derivation import Node
from eulerbake.store.local import Realised, Store
from eulerbake.store.signing import SecretKey
from eulerbake.store.substituters import Cache, CacheSettings
from eulerbake.tasks import planning
from tests.cache.graph import Graph, make_graph, upstream_file

REPO = Path(__file__).resolve().parents[2]
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    endpoint: str
    process: subprocess.Popen[bytes]

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"cache-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def start_moto(log: Path) -> MotoServer:
    port = free_port()
    env = {**os.environ, **AWS_ENV}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(endpoint + "/moto-api/", timeout=1)
            return MotoServer(endpoint, process)
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"moto.server exited: {log.read_text()}") from None
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto.server did not start in 30 s")


@pytest.fixture(scope="session", autouse=True)
def aws_env() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in AWS_ENV}
    os.environ.update(AWS_ENV)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture
def s3_url(moto: MotoServer) -> str:
    return f"s3://{moto.new_bucket()}/eulerbake?endpoint_url={moto.endpoint}&region=us-east-1"


@pytest.fixture
def dir_url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'cache'}"


@pytest.fixture(params=["dir", "s3"])
def cache_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs against the directory cache and against S3."""
    if request.param == "dir":
        return str(request.getfixturevalue("dir_url"))
    return str(request.getfixturevalue("s3_url"))


@pytest.fixture(scope="session")
def ci_key() -> SecretKey:
    return SecretKey.generate("ci-1")


@pytest.fixture(scope="session")
def evil_key() -> SecretKey:
    return SecretKey.generate("evil-1")


@dataclass
class Runner:
    """One machine: its own store, its caches, and the builders it ran."""

    name: str
    root: Path
    trace: Path
    settings: CacheSettings
    caches: list[Cache] = field(default_factory=list)

    @property
    def store(self) -> Store:
        return Store(self.root / "store", substituters=self.caches)

    def realise(self, roots: list[Node], monkeypatch: pytest.MonkeyPatch | None = None) -> dict[str, Realised]:
        messages: list[str] = []
        self.log = messages
        os.environ["CACHE_TRACE"] = str(self.trace)
        try:
            return planning.realise(self.store, roots, log=messages.append)
        finally:
            os.environ.pop("CACHE_TRACE", None)

    def ran(self) -> list[str]:
        if not self.trace.exists():
            return []
        names = self.trace.read_text().split()
        self.trace.unlink()
        return names

    def meta(self, node: Node) -> dict[str, Any]:
        return dict(json.loads(self.store.meta_path(node).read_text()))

    def entries(self) -> set[str]:
        root = self.root / "store"
        return {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.is_dir() else set()

    def leftovers(self) -> list[str]:
        """What a clean store must not hold: temp dirs, orphans, strays."""
        store = self.store
        found = [str(p) for p in (store.root / ".tmp").glob("*")] if (store.root / ".tmp").is_dir() else []
        return found + [f"{path}: {why}" for path, why in store.anomalies()]

    def push(self, nodes: list[Node], key: SecretKey | None, url: str | None = None) -> list[str]:
        cache = self.settings.push_cache(url)
        store = self.store
        metas = [store.read_meta(store.meta_path(node)) for node in nodes if store.has(node)]
        return [result.status for result in cache.push_all(store, metas, key, log=lambda _m: None)]


@pytest.fixture
def make_runner(tmp_path: Path, ci_key: SecretKey):  # type: ignore[no-untyped-def]
    def make(name: str, urls: list[str], *, trusted: list[str] | None = None, require: bool = True) -> Runner:
        settings = CacheSettings(tuple(urls), tuple(trusted if trusted is not None else [str(ci_key.public())]),
                                 require)
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        return Runner(name, root, root / "trace", settings, settings.caches())

    return make


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    return upstream_file(tmp_path / "upstream")


@pytest.fixture
def graph(upstream: Path) -> Graph:
    return make_graph(upstream)
