"""Fixtures for the publication tests: moto's server on 127.0.0.1, the shim in front of it, fake credentials
and the test disks.

moto runs as its own process (`python -m moto.server`) for the whole session: the uploader's 64 threads
and the shim then do not share one interpreter with it, and a test can kill a publishing process while
moto keeps the state. Each test starts from an empty moto (POST /moto-api/reset) and a fresh shim state.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.publish.disks import REGION, RawDisk, make_disk, make_garbage
from tests.publish.shim import AwsShim

ACCESS_KEY = "AKIAEULERBAKETEST7Q2Z"
SECRET_KEY = "eulerbake-test-secret-5f0c9e2d7a41b8"  # distinctive: grepped for in every file of the store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m moto.server` on a free port of 127.0.0.1; returns the process and its URL once it answers."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        # Without its ~600 default AMIs (and their snapshots) moto answers the first EC2 call of a test in
        # milliseconds instead of seconds; the tests only look at what they made.
        env = {**os.environ, "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto.server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)


def reset_moto(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).read()


def fake_credentials_env(tmp: Path) -> dict[str, str]:
    """Environment for boto3: fake keys, no host ~/.aws, no instance-metadata lookups."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": str(tmp / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-creds"),
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    import boto3

    # moto builds its EC2 backend on the first EC2 call (~5 s); pay that here, not in whichever test runs first.
    boto3.client("ec2", endpoint_url=url, region_name=REGION, aws_access_key_id="warm",
                 aws_secret_access_key="warm").describe_images(Owners=["self"])
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def shim(moto_url: str) -> Iterator[AwsShim]:
    started = AwsShim(moto_url).start()
    yield started
    started.stop()


@dataclass
class Aws:
    """One test's AWS: the shim (counts, injections) and clients straight to moto (not counted)."""

    shim: AwsShim
    moto_url: str

    @property
    def endpoint(self) -> str:
        return self.shim.url

    def direct(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.moto_url, region_name=REGION)

    def client(self, service: str) -> Any:
        """A client through the shim (counted; DescribeSnapshots shows the true states)."""
        import boto3

        return boto3.client(service, endpoint_url=self.shim.url, region_name=REGION)


@pytest.fixture
def aws(shim: AwsShim, moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Aws:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in fake_credentials_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    reset_moto(moto_url)
    shim.reset()
    return Aws(shim, moto_url)


@pytest.fixture(scope="session")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RawDisk]:
    where = tmp_path_factory.mktemp("disks")
    return {"x86_64": make_disk(where / "dos-x86_64.raw", label="dos", arch="x86_64", seed=1),
            "aarch64": make_disk(where / "gpt-aarch64.raw", label="gpt", arch="aarch64", seed=2),
            "garbage": make_garbage(where / "garbage.raw")}
