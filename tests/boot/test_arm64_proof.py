"""The aarch64 boot proof (opt-in: `EULERBAKE_ARM64_PROOF=1`): an arm64 Debian image booted like the x86_64 one.

The image (`tests/boot/arm64_image.py`) is openEuler aarch64-shaped (GPT: ESP with EFI/openEuler/grubaa64.efi,
/boot, root) and cached in the same persistent image store as the x86_64 one. Each session hands it to its
own store as a pinned local source and runs the real stages of an aarch64 cell: image-modules, the ENA
chain (kernel-headers from Debian's arm64 headers, ena-source from linux-source, kmod-build cross-compiled
with gcc-aarch64-linux-gnu, kmod-check), raw (shrink to 6 GiB, ENA overlay, hygiene) and boot, which starts
qemu-system-aarch64 under TCG with AAVMF: the firmware finds EFI/BOOT/BOOTAA64.EFI, GRUB reads the ESP's
EFI/openEuler/grub.cfg (edited by hygiene for ttyAMA0) and boots the kernel from /boot.

Opted in, every prerequisite is checked first and a missing one fails with the Debian package to install.
Seen here (2 cores, TCG, 2026-12-04): the image ~8 min when its code changed (else cached), the pipeline
~50-80 s (the ENA cross-build 10 s), the boot ~210-220 s (the report after ~200 s; systemd at ~40 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from eulerbake.core import hashing
from eulerbake.core.derivation import Derivation, FixedOutput, LocalFile, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store
from recipes.sample import ENA_OVERLAY, LINUX_SOURCE, sample_kernel_release
from recipes.stages.boot import FIRMWARE
from recipes.stages.boot import boot as boot_stage
from recipes.stages.ena_source import ena_source
from recipes.stages.image_modules import image_modules
from recipes.stages.kernel_headers import kernel_headers
from recipes.stages.kmod_build import kmod_build, patch_series
from recipes.stages.kmod_check import kmod_check
from recipes.stages.raw import raw
from tests.boot.arm64_image import (
    SOURCES,
    arm64_kernel_release,
    debian_arm64_headers,
    debian_arm64_image,
)
from tests.boot.conftest import IMAGE_STORE, assert_ena_and_hygiene, file_state

OPT_IN = "EULERBAKE_ARM64_PROOF"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get(OPT_IN) != "1",
                       reason=f"the aarch64 boot proof is opt-in: set {OPT_IN}=1 (a TCG boot takes minutes)"),
]
LABEL = "debian:aarch64"
GIB = 1024**3
BOOT_TIMEOUT = 1800  # seconds: ~200 s seen under TCG on 2 cores; room for a loaded CI runner
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
# (tool, its Debian package): checked in this order before anything is built.
TOOLS = (("mmdebstrap", "mmdebstrap"), ("arch-test", "arch-test"), ("qemu-aarch64-static", "qemu-user-static"),
         ("grub-mkimage", "grub-common"), ("mkfs.vfat", "dosfstools"), ("mcopy", "mtools"),
         ("dpkg-deb", "dpkg"), ("apt-get", "apt"), ("sfdisk", "fdisk"), ("mkfs.ext4", "e2fsprogs"),
         ("qemu-img", "qemu-utils"), ("qemu-system-aarch64", "qemu-system-arm"),
         ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"), ("aarch64-linux-gnu-ld", "binutils-aarch64-linux-gnu"),
         ("make", "make"))


def missing_prerequisite() -> str:
    """The first thing the proof needs that this host lacks, with the package to install ("" if none)."""
    if os.geteuid() != 0:
        return "the arm64 image is made with mmdebstrap in root mode: run the proof as root"
    for tool, package in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is missing: apt-get install {package}"
    if not BINFMT.is_file() or "enabled" not in BINFMT.read_text():
        return (f"no binfmt_misc handler for aarch64 ({BINFMT}): arm64 maintainer scripts cannot run; "
                "apt-get install qemu-user-static binfmt-support (and mount binfmt_misc on /proc/sys/fs/binfmt_misc "
                "if it is not mounted)")
    firmware, _variables, package = FIRMWARE["aarch64"]
    if not firmware.is_file():
        return f"the AAVMF firmware {firmware} is missing: apt-get install {package}"
    if not SOURCES.is_file():
        return f"no Debian archive configured: {SOURCES} is missing (mmdebstrap's MIRROR argument)"
    if not LINUX_SOURCE.is_file():
        return f"the ENA driver is built from {LINUX_SOURCE}: apt-get install linux-source"
    return ""


@pytest.fixture(scope="module")
def kernel_release() -> str:
    """Debian's arm64 kernel of the host's ABI (the linux-source the ENA module is built from is the same)."""
    problem = missing_prerequisite()
    if problem:
        pytest.fail(f"{OPT_IN}=1 but {problem}", pytrace=False)
    try:
        return arm64_kernel_release(sample_kernel_release())
    except EulerbakeError as err:
        pytest.fail(f"{OPT_IN}=1 but {err.message}: apt-get install linux-headers-amd64", pytrace=False)


TIMES: dict[str, float] = {}  # seconds per step of this session, printed with the boot (pytest -s)


def _realise(store: Store, drv: Derivation, what: str) -> Path:
    started = time.monotonic()
    path: Path = store.realise(drv, log=lambda _message: None).path
    TIMES[what] = TIMES.get(what, 0.0) + round(time.monotonic() - started, 1)
    return path


@pytest.fixture(scope="module")
def arm64_qcow2(kernel_release: str) -> tuple[FixedOutput, LocalTree]:
    """The openEuler-shaped aarch64 qcow2 and its kernel's headers, built once in the persistent image store."""
    store = Store(IMAGE_STORE)
    image = debian_arm64_image(kernel_release)
    entry = _realise(store, image, "image")
    headers = _realise(store, debian_arm64_headers(image), "headers")
    qcow2 = next(entry.glob("*.qcow2"))
    b3, sha = hashing.hash_file_pair(qcow2)
    return (FixedOutput(filename=qcow2.name, urls=(str(qcow2),), sha256=sha, blake3=b3, size=qcow2.stat().st_size,
                        label="debian-aarch64"), LocalTree(headers))


@dataclass
class Arm64Pipeline:
    store: Store
    kernel_release: str
    ko: Derivation
    raw: Derivation
    boot: Derivation


@pytest.fixture(scope="module")
def pipeline(arm64_qcow2: tuple[FixedOutput, LocalTree], kernel_release: str,
             tmp_path_factory: pytest.TempPathFactory) -> Arm64Pipeline:
    """The stages of an aarch64 cell with the ENA module (as recipes/__init__.py wires them), on this image."""
    qcow2, headers_tree = arm64_qcow2
    modules = image_modules(LABEL, qcow2)
    headers = kernel_headers(LABEL, headers_tree)
    source = ena_source(LABEL, LocalFile(LINUX_SOURCE))
    ko = kmod_build(LABEL, source=source, headers=headers, patches=patch_series("ena-linux-6.1"), module="ena",
                    arch="aarch64", make_vars={"CONFIG_ENA_ETHERNET": "m"})
    overlay = kmod_check(LABEL, ko, headers, modules)
    raw_drv = raw(LABEL, qcow2, [LocalTree(ENA_OVERLAY), overlay], arch="aarch64")
    boot_drv = boot_stage(LABEL, raw_drv, arch="aarch64", timeout=BOOT_TIMEOUT)
    store = Store(tmp_path_factory.mktemp("arm64-boot") / "store")
    return Arm64Pipeline(store, kernel_release, ko, raw_drv, boot_drv)


@dataclass
class Arm64Boot:
    raw_dir: Path
    raw_before: tuple[int, int, str]
    boot_dir: Path


@pytest.fixture(scope="module")
def good_boot(pipeline: Arm64Pipeline) -> Arm64Boot:
    raw_dir = _realise(pipeline.store, pipeline.raw, "pipeline")
    before = file_state(raw_dir / "disk.raw")
    boot_dir = _realise(pipeline.store, pipeline.boot, "boot")
    print(f"\narm64 proof seconds: {json.dumps(TIMES)}")
    return Arm64Boot(raw_dir, before, boot_dir)


def _marker(report: dict, name: str) -> str:  # type: ignore[type-arg]
    return str(report["markers"][name][-1])


def test_the_arm64_image_boots_through_aavmf_and_its_own_grub_and_every_check_passes(
        good_boot: Arm64Boot, pipeline: Arm64Pipeline) -> None:
    report = json.loads((good_boot.boot_dir / "report.json").read_text())
    assert report["verdict"] == "pass", json.dumps(report["checks"], indent=1)
    assert all(check["ok"] for check in report["checks"])
    assert report["qemu"]["accel"] == "tcg"  # an aarch64 guest on an x86_64 host
    assert report["qemu"]["arch"] == "aarch64"
    assert report["qemu"]["disk"] == "nvme"  # the initramfs carries nvme
    assert report["image"]["nvme_driver"] == "initramfs"
    assert report["image"]["root_number"] == 3  # ESP, /boot, root: openEuler's aarch64 layout
    console = (good_boot.boot_dir / "console.log").read_text(errors="replace")
    # AAVMF with an empty variable store → the NVMe disk's removable path EFI/BOOT/BOOTAA64.EFI (GRUB) →
    # EFI/openEuler/grub.cfg on the ESP, edited by hygiene → the kernel's EFI stub.
    assert re.search(r"BdsDxe: starting Boot\d+ \"UEFI QEMU NVMe Ctrl", console)
    assert "Booting `openEuler (" in console and "EFI stub: Booting Linux Kernel" in console
    assert re.search(r"Kernel command line: BOOT_IMAGE=/vmlinuz-\S+ root=UUID=\S+ ro .*console=ttyAMA0,115200n8",
                     console)
    assert "quiet" not in re.search(r"Kernel command line: (.*)", console).group(1).split()  # type: ignore[union-attr]
    assert "reboot: Power down" in console  # the seed's user-data powered it off

    assert _marker(report, "kernel") == pipeline.kernel_release
    assert _marker(report, "root-device") == "/dev/nvme0n1p3"
    assert _marker(report, "root-fstype") == "ext4"
    assert int(_marker(report, "root-device-bytes")) == 6 * GIB  # the raw stage's shrunk root (no growpart here)
    assert 5.5 * GIB < int(_marker(report, "root-fs-bytes")) <= 6 * GIB
    assert report["image"]["disk_bytes"] == 8 * GIB  # disk_size auto: 512 MiB ESP + 1 GiB /boot + 6 GiB root
    assert {"vfat", "nls_cp437"} <= set(_marker(report, "lsmod").split())  # /boot/efi mounted from the ESP
    assert _marker(report, "failed-units") == ""

    assert_ena_and_hygiene(report, pipeline.kernel_release)


def test_the_ena_module_is_an_aarch64_module(pipeline: Arm64Pipeline, good_boot: Arm64Boot) -> None:
    ko_dir = pipeline.store.realise(pipeline.ko, log=lambda _m: None).path
    info = json.loads((ko_dir / "build-info.json").read_text())
    assert info["arch"] == "aarch64"
    assert (ko_dir / "ena.ko").read_bytes()[18:20] == (183).to_bytes(2, "little")  # e_machine EM_AARCH64


def test_the_store_copy_of_the_arm64_disk_is_never_written(good_boot: Arm64Boot, pipeline: Arm64Pipeline) -> None:
    assert file_state(good_boot.raw_dir / "disk.raw") == good_boot.raw_before
    assert pipeline.store.seal_problems(pipeline.raw.key, good_boot.raw_dir) == []
