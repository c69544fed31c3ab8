"""The boot proof on a real image: raw → boot of a Debian-made, openEuler-shaped disk under QEMU (TCG here).

Every marker the seed's user-data prints is asserted from the report and the console; the negative
proofs are an image whose ENA module was built for another kernel release with other CRCs (the
kernel's own refusal must be in the failure, the very line the gate predicts) and an image whose
partition table was damaged after the build (GRUB's own words on the console, QEMU stopped early).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from eulerbake.core.derivation import LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.gate import check_module
from eulerbake.linux.target import KernelTarget
from recipes.sample import ENA_OVERLAY
from recipes.stages.raw import raw
from tests.boot.conftest import LABEL, GoodBoot, Pipeline, assert_ena_and_hygiene, damaged_disk, file_state
from tests.kmod import modedit

pytestmark = pytest.mark.slow
GIB = 1024**3


def _report(boot_dir: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((boot_dir / "report.json").read_text())


def _marker(report: dict, name: str) -> str:  # type: ignore[type-arg]
    return str(report["markers"][name][-1])


def test_the_image_boots_through_its_own_grub_and_every_check_passes(good_boot: GoodBoot, pipeline: Pipeline) -> None:
    report = _report(good_boot.boot_dir)
    assert report["verdict"] == "pass", json.dumps(report["checks"], indent=1)
    assert all(check["ok"] for check in report["checks"])
    assert report["qemu"]["accel"] == "tcg"  # /dev/kvm here is kvm_pvm
    assert report["qemu"]["disk"] == "nvme"  # the initramfs carries nvme, as a Nitro instance needs
    assert report["image"]["nvme_driver"] == "initramfs"
    console = (good_boot.boot_dir / "console.log").read_text(errors="replace")
    # SeaBIOS → the MBR's GRUB → grub2/grub.cfg on /boot, edited by hygiene for the serial console.
    assert "Booting from Hard Disk" in console and "GRUB loading" in console
    assert re.search(r"Command line: BOOT_IMAGE=/vmlinuz-\S+ root=UUID=\S+ ro .*console=ttyS0,115200n8", console)
    assert "reboot: Power down" in console  # the seed's user-data powered it off

    assert _marker(report, "kernel") == pipeline.kernel_release
    assert _marker(report, "root-device") == "/dev/nvme0n1p2"
    assert _marker(report, "root-fstype") == "ext4"
    assert int(_marker(report, "root-device-bytes")) == 6 * GIB  # the raw stage's shrunk root
    assert 5.5 * GIB < int(_marker(report, "root-fs-bytes")) <= 6 * GIB

    assert_ena_and_hygiene(report, pipeline.kernel_release)


def test_the_store_copy_of_the_disk_is_never_written(good_boot: GoodBoot, pipeline: Pipeline) -> None:
    assert file_state(good_boot.raw_dir / "disk.raw") == good_boot.raw_before
    assert pipeline.store.seal_problems(pipeline.raw.key, good_boot.raw_dir) == []
    assert pipeline.store.has(pipeline.raw)


def test_a_module_built_for_another_kernel_fails_the_boot_with_the_kernels_refusal(
        pipeline: Pipeline, good_boot: GoodBoot, tmp_path: Path) -> None:
    """ena.ko as if built against another kernel (release 6.1.0-99, other CRCs), put in past the gate."""
    release = pipeline.kernel_release
    other = re.sub(r"-\d+-", "-99-", release, count=1)
    ko = pipeline.store.realise(pipeline.chain["ko"], log=lambda _m: None).path / "ena.ko"
    data = ko.read_bytes()
    magic = next(v for v in data.split(b"\0") if v.startswith(b"vermagic=")).decode()[len("vermagic="):]
    wrong = modedit.set_version_crc(modedit.set_modinfo(data, "vermagic", magic.replace(release, other)),
                                    "module_layout", 0x12345678)
    overlay = tmp_path / "wrong-ena"
    wrong_ko = overlay / "lib" / "modules" / release / "extra" / "ena.ko"
    wrong_ko.parent.mkdir(parents=True)
    wrong_ko.write_bytes(wrong)
    # What the gate says the kernel will print, checked against what the kernel prints.
    headers = pipeline.store.realise(pipeline.chain["headers"], log=lambda _m: None).path / "build"
    verdict = check_module(wrong_ko, KernelTarget.from_headers(headers))
    assert verdict.kernel_loads is False
    assert verdict.kernel_refusal == "ena: disagrees about version of symbol module_layout"

    bad_raw = raw("wrong-ena:x86_64", pipeline.qcow2, [LocalTree(ENA_OVERLAY), LocalTree(overlay)], arch="x86_64")
    with pytest.raises(EulerbakeError) as failure:
        pipeline.store.realise(pipeline.boot(bad_raw), log=lambda _m: None)
    message = str(failure.value)
    assert "FAILED ena loaded: expected in lsmod; found not loaded" in message
    assert verdict.kernel_refusal in message  # the kernel's own words, quoted from the console
    assert "Failed to insert module 'ena': Exec format error" in message
    # Everything else about the image still passed: the failure is about the module alone.
    assert re.search(r"(\d+) of (\d+) boot checks failed", message).group(1) in ("1", "2")  # type: ignore[union-attr]


def test_a_damaged_partition_table_fails_fast_with_grubs_own_words(pipeline: Pipeline, good_boot: GoodBoot) -> None:
    damaged = damaged_disk(pipeline.raw)
    with pytest.raises(EulerbakeError) as failure:
        pipeline.store.realise(pipeline.boot(damaged), log=lambda _m: None)
    message = str(failure.value)
    assert message.startswith("the boot failed (bootloader)")
    assert "console lines that show why:" in message
    assert "error: no such device" in message  # GRUB's core image cannot find /boot by its UUID
    assert "grub rescue>" in message or "Entering rescue mode" in message
    seconds = float(re.search(r"disk, (\d+) s\)", message).group(1))  # type: ignore[union-attr]
    assert seconds < 60, "QEMU must be stopped at the first fatal line, not at the timeout"


def test_an_image_without_a_kernel_says_so_in_one_line(tmp_path: Path) -> None:
    """The offline aarch64 sample is a skeleton: boot:sample:aarch64 fails before QEMU starts."""
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("the aarch64 boot stage needs qemu-system-aarch64 (apt-get install qemu-system-arm)")
    from eulerbake.store.local import Store
    from recipes.sample import sample_qcow2
    from recipes.stages.boot import boot

    store = Store(tmp_path / "store")
    skeleton = raw("sample:aarch64", sample_qcow2("aarch64"), [LocalTree(ENA_OVERLAY)], arch="aarch64")
    with pytest.raises(EulerbakeError) as failure:
        store.realise(boot("sample:aarch64", skeleton, arch="aarch64"), log=lambda _m: None)
    assert failure.value.message.count("\n") == 0
    assert "has no kernel to boot" in failure.value.message
    assert LABEL not in failure.value.message
