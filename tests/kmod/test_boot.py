"""The gate against reality: boot Debian's kernel under QEMU (TCG) and let it insmod every case.

A busybox-static initramfs insmods each module, prints the exit status and the kernel log of that
attempt between markers on the serial console, and powers off. For every case the gate's kernel
verdict must be what the kernel did, and a refusal must be the very line the kernel printed.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from eulerbake.linux.gate import Verdict, check_module
from eulerbake.linux.target import KernelTarget
from eulerbake.tools.run import run
from tests.kmod import modedit
from tests.kmod.conftest import KREL, OTHER_KREL, SHIPPED_ENA, VMLINUZ, KmodBuilds, debian_kernel

pytestmark = [debian_kernel, pytest.mark.slow]
KERNEL_MAGIC = f"{KREL} SMP preempt mod_unload modversions "

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys
mount -t proc proc /proc
mount -t sysfs sysfs /sys
dmesg -c > /dev/null
for case in $(cat /cases); do
    echo "@@case $case"
    insmod /m/$case.ko
    echo "@@rc $case $?"
    dmesg -c
    echo "@@end $case"
    name=$(cat /m/$case.name)
    if [ -d /sys/module/$name ]; then rmmod $name; fi
    dmesg -c > /dev/null
done
echo "@@done"
poweroff -f
"""
TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s")


@dataclass
class Outcome:
    rc: int
    log: list[str]  # kernel log lines of this insmod, without timestamps


def boot_and_insmod(workdir: Path, modules: dict[str, tuple[str, bytes]]) -> dict[str, Outcome]:
    """Boot once with an initramfs that insmods `modules` (case → (module name, .ko bytes)) in order."""
    root = workdir / "initramfs"
    (root / "bin").mkdir(parents=True)
    (root / "m").mkdir()
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    (root / "cases").write_text("\n".join(modules) + "\n")
    for case, (name, data) in modules.items():
        (root / "m" / f"{case}.ko").write_bytes(data)
        (root / "m" / f"{case}.name").write_text(name)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=("\n".join(files) + "\n").encode())
    initrd = workdir / "initrd.cpio"
    initrd.write_bytes(archive.stdout)
    # TCG: /dev/kvm here is a software virtualiser under which a normal kernel stalls.
    proc = run(["qemu-system-x86_64", "-accel", "tcg", "-m", "256M", "-nodefaults", "-display", "none",
                "-serial", "stdio", "-no-reboot", "-kernel", VMLINUZ, "-initrd", initrd,
                "-append", "console=ttyS0 loglevel=1 panic=-1 rdinit=/init"], timeout=300)
    console = proc.stdout.decode(errors="replace").replace("\r", "")
    assert "@@done" in console, console[-3000:]
    outcomes: dict[str, Outcome] = {}
    for case in modules:
        section = console.split(f"@@case {case}\n", 1)[1].split(f"@@end {case}\n", 1)[0]
        rc = int(re.search(rf"^@@rc {re.escape(case)} (\d+)$", section, re.M).group(1))  # type: ignore[union-attr]
        log = [TIMESTAMP.sub("", line) for line in section.splitlines() if TIMESTAMP.match(line)]
        outcomes[case] = Outcome(rc, log)
    return outcomes


def test_gate_verdicts_equal_what_the_kernel_does(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    hello = kmod_builds.hello_ko.read_bytes()
    ena = kmod_builds.ena_ko.read_bytes()
    other_release = KERNEL_MAGIC.replace(KREL, OTHER_KREL)
    modules = {
        "ena": ("ena", ena),  # built from linux-source with overlays/patches/ena-linux-6.1
        "debian-ena": ("ena", SHIPPED_ENA.read_bytes()),
        "hello": ("hello", hello),
        "hello-flags": ("hello", modedit.set_modinfo(hello, "vermagic", f"{KREL} SMP mod_unload modversions ")),
        "hello-crc-layout": ("hello", modedit.set_version_crc(hello, "module_layout", 0x12345678)),
        "hello-crc-printk": ("hello", modedit.set_version_crc(hello, "_printk", 0x12345678)),
        "hello-release-noversions": ("hello", modedit.drop_versions_alloc(
            modedit.set_modinfo(hello, "vermagic", other_release))),
        "hello-release": ("hello", modedit.set_modinfo(hello, "vermagic", other_release)),
        "ena-license": ("ena", modedit.set_modinfo(ena, "license", "GP")),
    }
    target = KernelTarget.from_headers(kmod_builds.path("headers"))
    verdicts: dict[str, Verdict] = {}
    for case, (_name, data) in modules.items():
        path = tmp_path / "cases" / f"{case}.ko"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        verdicts[case] = check_module(path, target)

    outcomes = boot_and_insmod(tmp_path, modules)

    for case, outcome in outcomes.items():
        verdict = verdicts[case]
        loaded = outcome.rc == 0
        assert verdict.kernel_loads is loaded, (case, verdict.reasons(), outcome.log)
        if not loaded:
            assert verdict.kernel_refusal in outcome.log, (case, verdict.kernel_refusal, outcome.log)
    expected_refusals = {
        "hello-flags": f"hello: version magic '{KREL} SMP mod_unload modversions ' should be '{KERNEL_MAGIC}'",
        "hello-crc-layout": "hello: disagrees about version of symbol module_layout",
        "hello-crc-printk": "hello: disagrees about version of symbol _printk",
        "hello-release-noversions": f"hello: version magic '{other_release}' should be '{KERNEL_MAGIC}'",
    }
    for case, line in expected_refusals.items():
        assert outcomes[case].rc != 0 and line in outcomes[case].log and verdicts[case].kernel_refusal == line
    assert outcomes["ena-license"].rc != 0 and verdicts["ena-license"].kernel_refusal.startswith("ena: Unknown symbol")
    # Loaded: our patched ENA (its init prints the version patch 0002 added), Debian's, hello, and the
    # release-only change, which the kernel accepts on its CRCs while the strict policy still refuses it.
    assert "ena: Elastic Network Adapter (ENA) v2.1.0K" in outcomes["ena"].log
    for case in ("ena", "debian-ena", "hello", "hello-release"):
        assert outcomes[case].rc == 0, (case, outcomes[case].log)
    assert verdicts["hello-release"].kernel_loads is True and not verdicts["hello-release"].passed
    assert [v.passed for c, v in verdicts.items() if c in ("ena", "debian-ena", "hello")] == [True] * 3
