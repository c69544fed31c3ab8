"""Fixtures for the boot proof: a real bootable Debian-made, openEuler-shaped image, and the real pipeline on it.

The image (`tests/boot/image.py`) is a derivation in a store that outlives the session
(`EULERBAKE_BOOT_IMAGE_STORE`, default `$TMPDIR/eulerbake-boot-image-store`): built once, rebuilt when its
code changes. Each session hands it to its own store as a pinned local source, as a fetched upstream
qcow2 would be, and runs the real stages there: image-modules, the Debian ENA chain of the sample
(headers, linux-source, kmod-build, kmod-check), raw (shrink to 6 GiB, overlays, hygiene) and boot.
The fixtures skip, saying why, only when no Debian archive is reachable (or, since mmdebstrap runs in
root mode, when not run as root: the product itself stays rootless).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store
from recipes.sample import ENA_OVERLAY, debian_ena_chain, sample_kernel_release
from recipes.stages.boot import boot
from recipes.stages.image_modules import image_modules
from recipes.stages.raw import raw
from tests.boot.image import SOURCES, STOCK_MACHINE_ID, debian_image

LABEL = "debian:x86_64"
IMAGE_STORE = Path(os.environ.get("EULERBAKE_BOOT_IMAGE_STORE")
                   or Path(tempfile.gettempdir()) / "eulerbake-boot-image-store")
# What apt and mmdebstrap print when the archive cannot be reached (the one reason to skip).
NO_ARCHIVE = re.compile(r"Temporary failure resolving|Could not resolve|Failed to fetch|Unable to connect"
                        r"|Network is unreachable|Connection timed out|Could not connect|No route to host")


def _kernel_release() -> str:
    try:
        return sample_kernel_release()
    except EulerbakeError as err:
        pytest.skip(f"needs Debian's kernel headers and image on the host: {err.message}")


@pytest.fixture(scope="session")
def kernel_release() -> str:
    return _kernel_release()


@pytest.fixture(scope="session")
def debian_qcow2(kernel_release: str) -> FixedOutput:
    """The openEuler-shaped qcow2 from Debian packages, as a pinned local source."""
    if os.geteuid() != 0:
        pytest.skip("the Debian image fixture runs mmdebstrap in root mode (the boot stage itself is rootless)")
    if not SOURCES.is_file():
        pytest.skip(f"no Debian archive configured: {SOURCES} is missing")
    try:
        entry = Store(IMAGE_STORE).realise(debian_image(kernel_release), log=lambda _message: None).path
    except EulerbakeError as err:
        unreachable = next((line for line in str(err).splitlines() if NO_ARCHIVE.search(line)), None)
        if unreachable:
            pytest.skip(f"no Debian archive reachable: {unreachable.strip(' |')}")
        raise
    qcow2 = next(entry.glob("*.qcow2"))
    b3, sha = hashing.hash_file_pair(qcow2)
    return FixedOutput(filename=qcow2.name, urls=(str(qcow2),), sha256=sha, blake3=b3, size=qcow2.stat().st_size,
                       label="debian-x86_64")


@pytest.fixture(scope="session")
def boot_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("boot") / "store")


@dataclass
class Pipeline:
    """The stages of the Debian cell, as the sample wires them (ENA built against the image's kernel)."""

    store: Store
    qcow2: FixedOutput
    kernel_release: str
    chain: dict[str, Derivation]
    raw: Derivation

    def boot(self, raw_drv: Derivation | None = None, **options: object) -> Derivation:
        return boot(LABEL, raw_drv or self.raw, arch="x86_64", **options)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pipeline(debian_qcow2: FixedOutput, boot_store: Store, kernel_release: str) -> Pipeline:
    modules = image_modules(LABEL, debian_qcow2)
    chain = debian_ena_chain(LABEL, kernel_release, image_modules=modules)
    raw_drv = raw(LABEL, debian_qcow2, [LocalTree(ENA_OVERLAY), chain["overlay"]], arch="x86_64")
    return Pipeline(boot_store, debian_qcow2, kernel_release, chain, raw_drv)


@dataclass
class GoodBoot:
    raw_dir: Path
    raw_before: tuple[int, int, str]  # disk.raw (size, mtime_ns, blake3) before the boot
    boot_dir: Path


def file_state(path: Path) -> tuple[int, int, str]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, hashing.hash_file(path, use_cache=False)


@pytest.fixture(scope="session")
def good_boot(pipeline: Pipeline) -> GoodBoot:
    """raw → boot of the Debian cell (the boot itself runs once per session)."""
    raw_dir = pipeline.store.realise(pipeline.raw, log=lambda _message: None).path
    before = file_state(raw_dir / "disk.raw")
    boot_dir = pipeline.store.realise(pipeline.boot(), log=lambda _message: None).path
    return GoodBoot(raw_dir, before, boot_dir)


# -- broken images ------------------------------------------------------------------------------------


def build_damaged_disk(ctx: BuildContext) -> None:
    """Test builder: a raw stage's output with the four dos partition entries of disk.raw zeroed
    (boot code and the 0x55AA signature kept): the table damaged after the build."""
    shutil.copyfile(ctx.inputs["raw"] / "disk.json", ctx.out / "disk.json")
    # A sparse copy (qemu-img, as everywhere else): 6 GiB of mostly holes.
    from eulerbake.fs.disk import copy_sparse

    copy_sparse(ctx.inputs["raw"] / "disk.raw", ctx.out / "disk.raw")
    with (ctx.out / "disk.raw").open("r+b") as handle:
        handle.seek(446)
        handle.write(bytes(64))


def damaged_disk(raw_drv: Derivation) -> Derivation:
    return Derivation(stage="test-damaged", label=LABEL, builder=build_damaged_disk, inputs={"raw": raw_drv},
                      params={"damage": "dos partition entries zeroed"}, tools=("qemu-img",))


def marker(report: dict[str, Any], name: str) -> str:
    """The last value the seed's user-data printed for marker `name`."""
    return str(report["markers"][name][-1])


def assert_ena_and_hygiene(report: dict[str, Any], kernel_release: str) -> None:
    """What every boot proof of a raw image asserts from inside the running system, on either arch: ena
    loaded at boot from depmod's index (the overlay's extra/ena.ko) through modules-load.d, the hygiene
    items, cloud-init's own result, and QEMU stopping after the report."""
    assert "ena" in marker(report, "lsmod").split()
    assert marker(report, "modprobe-path") == f"/lib/modules/{kernel_release}/extra/ena.ko"
    assert marker(report, "modules-load-d") == "/etc/modules-load.d/ena.conf"
    assert marker(report, "modprobe-install") == ""
    assert "Inserted module 'ena'" in report["markers"]["modules-load-log"]
    assert any("ena: Elastic Network Adapter (ENA)" in line for line in report["markers"]["kmsg"])
    machine_id = marker(report, "machine-id")
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id) and machine_id != STOCK_MACHINE_ID
    assert marker(report, "root-password") == "locked"
    assert marker(report, "sshd-permitrootlogin") == "no"
    assert marker(report, "sshd-passwordauthentication") == "no"
    result = json.loads(marker(report, "cloud-init-result"))["v1"]
    assert result["errors"] == [] and result["datasource"].startswith("DataSourceNoCloud")
    assert report["qemu"]["seconds_to_report"] < report["qemu"]["seconds"] <= report["qemu"]["timeout"]
