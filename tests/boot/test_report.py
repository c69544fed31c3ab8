"""The boot stage's pure parts, without QEMU: initramfs listing, console markers, fatal lines, checks.

Fast (no image, no boot), so not marked slow: the real boot is in test_boot.py.
"""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from eulerbake.core.derivation import Derivation
from eulerbake.core.errors import EulerbakeError
from recipes.stages import boot as stage

NONCE = "0123456789abcdef"


def _cpio(names: list[str]) -> bytes:
    """A newc cpio archive of empty files (what the kernel unpacks from an initramfs)."""
    out = b""
    for index, name in enumerate([*names, "TRAILER!!!"]):
        encoded = name.encode() + b"\0"
        fields = [index + 1, 0o100644, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
        out += header + encoded
        out += b"\0" * (-len(out) % 4)
    return out + b"\0" * (-len(out) % 512)


def test_initramfs_members_reads_an_early_cpio_then_a_compressed_one() -> None:
    early = _cpio(["kernel/x86/microcode/GenuineIntel.bin"])
    main = _cpio(["init", "usr/lib/modules/6.1.0-57-amd64/kernel/drivers/nvme/host/nvme.ko"])
    for compress in (gzip.compress, zstandard.ZstdCompressor().compress):
        members = stage.initramfs_members(early + compress(main))
        assert members == ["kernel/x86/microcode/GenuineIntel.bin", "init",
                           "usr/lib/modules/6.1.0-57-amd64/kernel/drivers/nvme/host/nvme.ko"]
        assert any(stage.NVME_MODULE.search(name) for name in members)
    assert not stage.NVME_MODULE.search("usr/lib/modules/x/kernel/drivers/nvme/host/nvme-core.ko")


def test_markers_count_only_with_this_boots_nonce() -> None:
    lines = stage.clean_console(f"\x1b[0m@@eulerbake begin {NONCE}\r\n[  5.1] noise\n@@eulerbake kernel 6.1\n"
                                f"@@eulerbake lsmod ena nvme \n@@eulerbake end {NONCE}\n")
    assert stage.read_markers(lines, NONCE) == {"begin": [NONCE], "kernel": ["6.1"], "lsmod": ["ena nvme"],
                                                "end": [NONCE]}
    assert stage.read_markers(lines, "another-boot") == {}


def test_a_fatal_console_line_is_recognised_with_the_lines_that_explain_it() -> None:
    console = [
        "Begin: Running /scripts/local-premount ... done.",
        "Gave up waiting for root file system device.  Common problems:",
        " - Boot args (cat /proc/cmdline)",
        "ALERT!  UUID=2b2ac6e0-6d43-4c0b-b1a5-30c63f5b1d38 does not exist.  Dropping to a shell!",
        "(initramfs)",
    ]
    assert stage._fatal(console) == "root filesystem"
    run = stage.VmRun(returncode=0, seconds=40.0, seconds_to_report=None, stopped="root filesystem", stderr="")
    evidence = stage.failure_evidence(console, run, [])
    assert console[1] in evidence and console[3] in evidence
    assert stage._fatal(["[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs"]) == "kernel panic"
    assert stage._fatal(["@@eulerbake kmsg Kernel panic - not syncing"]) == ""  # a marker quoting it is not one


def _facts(**overrides: str) -> dict[str, list[str]]:
    facts = {"begin": NONCE, "kernel": "6.1.0-57-amd64", "root-device": "/dev/nvme0n1p2", "root-fstype": "ext4",
             "root-fs-bytes": str(6039339008), "lsmod": "ena nvme ext4", "modprobe-path":
             "/lib/modules/6.1.0-57-amd64/extra/ena.ko", "modules-load-d": "/etc/modules-load.d/ena.conf",
             "modprobe-install": "", "modules-load-log": "Inserted module 'ena'",
             "machine-id": "84b577513aac4639b762aeedcc5408e0", "root-password": "locked",
             "sshd-permitrootlogin": "no", "sshd-passwordauthentication": "no",
             "cloud-init-result": json.dumps({"v1": {"datasource": "DataSourceNoCloud [seed=/dev/nvme1n1]",
                                                     "errors": []}}), "end": NONCE}
    facts.update(overrides)
    return {name: [value] for name, value in facts.items()}


IMAGE = stage.ImageFacts(kernels={"6.1.0-57-amd64": "partition 1:/vmlinuz-6.1.0-57-amd64"},
                         module_releases=["6.1.0-57-amd64"], initramfs="partition 1:/initramfs-6.1.0-57-amd64.img",
                         nvme_driver="initramfs", shipped_machine_id="", root_number=2, root_bytes=6 * 1024**3,
                         disk_bytes=8 * 1024**3)
PARAMS = stage.Params(arch="x86_64", disk="auto", expect_module="ena", hygiene=True, timeout=0, memory_mib=1024,
                      cpus=2)


def test_every_check_passes_on_a_good_report() -> None:
    checks = stage.evaluate(_facts(), [], IMAGE, PARAMS, "nvme")
    assert [c.name for c in checks if not c.ok] == []
    assert len(checks) == 12


def test_a_refused_module_fails_with_the_kernels_words() -> None:
    refusal = "[   19.6] ena: disagrees about version of symbol module_layout"
    facts = _facts(lsmod="nvme ext4", **{"modules-load-log": "Failed to insert module 'ena': Exec format error"})
    checks = stage.evaluate(facts, ["[   19.5] nvme nvme0: 1/0/0 queues", refusal], IMAGE, PARAMS, "nvme")
    failed = {c.name: c for c in checks if not c.ok}
    assert set(failed) == {"ena loaded"}
    assert failed["ena loaded"].evidence == [refusal, "Failed to insert module 'ena': Exec format error"]


@pytest.mark.parametrize(("marker", "value", "check"), [
    ("root-password", "usable", "root password locked"),
    ("sshd-permitrootlogin", "yes", "sshd permitrootlogin"),
    ("machine-id", "", "machine-id regenerated"),
    ("modprobe-install", "install ena /sbin/insmod /opt/ena.ko", "no install hook for ena"),
    ("root-device", "/dev/nvme0n1p1", "root device"),
    ("cloud-init-result", '{"v1": {"datasource": "DataSourceNone", "errors": []}}', "cloud-init result"),
])
def test_each_check_fails_on_its_own(marker: str, value: str, check: str) -> None:
    checks = stage.evaluate(_facts(**{marker: value}), [], IMAGE, PARAMS, "nvme")
    assert [c.name for c in checks if not c.ok] == [check]


def test_the_shipped_machine_id_is_not_a_regenerated_one() -> None:
    image = stage.ImageFacts(**{**IMAGE.__dict__, "shipped_machine_id": "84b577513aac4639b762aeedcc5408e0"})
    checks = stage.evaluate(_facts(), [], image, PARAMS, "nvme")
    assert [c.name for c in checks if not c.ok] == ["machine-id regenerated"]


def test_accelerator_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(stage.ACCEL_ENV, "tcg")
    assert stage.pick_accel("x86_64") == ("tcg", f"{stage.ACCEL_ENV}=tcg")
    monkeypatch.setenv(stage.ACCEL_ENV, "hvf")
    with pytest.raises(EulerbakeError, match="neither kvm nor tcg"):
        stage.pick_accel("x86_64")
    monkeypatch.delenv(stage.ACCEL_ENV)
    assert stage.pick_accel("aarch64" if stage.host_arch() == "x86_64" else "x86_64")[0] == "tcg"


def _raw(params: object) -> Derivation:
    return Derivation(stage="raw", label="t", builder=stage.build, params=params)


def test_factory() -> None:
    drv = stage.boot("t", _raw({}), arch="x86_64")
    assert drv.task_name == "boot:t" and "qemu-system-x86_64" in drv.tools and drv.params.hygiene is True
    assert stage.boot("t", _raw(PARAMS.__class__(**{**PARAMS.__dict__, "hygiene": False})),
                      arch="x86_64").params.hygiene is False
    assert "firmware-vars" in stage.boot("t", _raw({}), arch="aarch64").inputs
    installed = Derivation(stage="packer-maas", label="t", builder=stage.build, params={})
    assert stage.boot("t", installed, arch="x86_64").params.hygiene is False  # only a raw stage did hygiene
    with pytest.raises(EulerbakeError, match="unknown boot disk"):
        stage.boot("t", _raw({}), arch="x86_64", disk="sata")
    with pytest.raises(EulerbakeError, match="unknown architecture"):
        stage.boot("t", _raw({}), arch="riscv64")
