"""The seed's case, aarch64, end to end: cross-build a module, gate it, boot an arm64 kernel that loads it.

Debian ships no arm64 headers for an x86_64 host, and a module's CRCs can only be checked against the
Module.symvers of a built kernel. So this test builds one: a tinyconfig arm64 6.1 kernel with modules
and modversions from Debian's linux-source (~30 s to extract, ~3.5 min to build on 2 cores), packs the
files a kernel-devel package carries, and runs the real stages on it: kernel_headers, kmod_build
(arch="aarch64": ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-) and the gate, then boots the kernel
under qemu-system-aarch64 (TCG) with a static init that loads each case.

It takes ~4 minutes, so it runs only when EULERBAKE_ARM64_PROOF=1 (CI: set it on a nightly job).
Needs gcc-aarch64-linux-gnu (+ libc6-dev-arm64-cross), qemu-system-arm, flex, bison, bc.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from eulerbake.core.derivation import LocalTree
from eulerbake.linux.gate import check_module
from eulerbake.linux.module import read_module
from eulerbake.linux.target import KernelTarget
from eulerbake.store.local import Store
from eulerbake.tools.run import run
from recipes.stages.kernel_headers import kernel_headers
from recipes.stages.kmod_build import kmod_build
from recipes.stages.kmod_check import kmod_check
from tests.kmod import modedit
from tests.kmod.conftest import HELLO_C, LINUX_SOURCE, write_hello_source

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("EULERBAKE_ARM64_PROOF") != "1",
                       reason="builds an arm64 kernel (~4 min): set EULERBAKE_ARM64_PROOF=1"),
    pytest.mark.skipif(not LINUX_SOURCE.is_file(), reason="needs Debian's linux-source-6.1"),
]
CROSS = ["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"]
TINY_OPTIONS = ["MODULES", "MODVERSIONS", "MODULE_UNLOAD", "PRINTK", "BLK_DEV_INITRD", "TTY", "SERIAL_AMBA_PL011",
                "SERIAL_AMBA_PL011_CONSOLE", "BINFMT_ELF"]
INIT_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/klog.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Load each /m/<case>.ko, print its result and the kernel log it caused between markers. */
int main(int argc, char **argv)
{
	static char log[65536];
	const char *cases[] = { @CASES@ 0 };

	klogctl(5, 0, 0);
	for (int i = 0; cases[i]; i++) {
		char path[128];
		snprintf(path, sizeof(path), "/m/%s.ko", cases[i]);
		int fd = open(path, O_RDONLY);
		long rc = syscall(SYS_finit_module, fd, "", 0);
		printf("@@case %s\n@@rc %d\n", cases[i], rc ? errno : 0);
		int n = klogctl(4, log, sizeof(log) - 1);
		if (n > 0) { log[n] = 0; fputs(log, stdout); }
		printf("@@end %s\n", cases[i]);
		if (rc == 0)
			syscall(SYS_delete_module, "hello", O_NONBLOCK);
		klogctl(5, 0, 0);
		close(fd);
	}
	printf("@@done\n");
	fflush(stdout);
	reboot(RB_POWER_OFF);
	return 0;
}
"""


def build_tiny_arm64_kernel(workdir: Path) -> tuple[Path, Path]:
    """(kernel-devel-style tree, object dir) of a tinyconfig arm64 kernel with modules and modversions."""
    run(["tar", "-xf", LINUX_SOURCE, "-C", workdir])
    source = next(workdir.glob("linux-source-*"))
    obj = workdir / "obj"
    run(["make", "-C", source, f"O={obj}", *CROSS, "tinyconfig"])
    run([source / "scripts/config", "--file", obj / ".config", *[a for o in TINY_OPTIONS for a in ("--enable", o)]])
    run(["make", "-C", source, f"O={obj}", *CROSS, "olddefconfig"])
    run(["make", "-C", source, f"O={obj}", *CROSS, f"-j{os.cpu_count() or 1}"], timeout=3600)
    # What a kernel-devel package carries: the build system and headers, plus the build's outputs.
    devel = workdir / "kernel-devel"
    devel.mkdir()
    for name in ("Makefile", "Kbuild", "Kconfig", "scripts", "include"):
        src = source / name
        (shutil.copytree(src, devel / name, symlinks=True) if src.is_dir() else shutil.copy(src, devel / name))
    shutil.copytree(source / "arch/arm64", devel / "arch/arm64", symlinks=True,
                    ignore=lambda d, names: ["dts"] if d.endswith("boot") else [])
    shutil.copy(source / "arch/Kconfig", devel / "arch/Kconfig")
    for name in (".config", "Module.symvers", "include/generated", "include/config", "arch/arm64/include/generated",
                 "scripts"):
        src = obj / name
        (shutil.copytree(src, devel / name, symlinks=True, dirs_exist_ok=True) if src.is_dir()
         else shutil.copy(src, devel / name))
    return devel, obj


def test_cross_built_module_gated_and_loaded_by_an_arm64_kernel(tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("arm64")
    devel, obj = build_tiny_arm64_kernel(workdir)
    store = Store(workdir / "store")
    headers = kernel_headers("tiny:aarch64", LocalTree(devel))
    hello = kmod_build("tiny:aarch64", source=LocalTree(write_hello_source(workdir / "hello", HELLO_C)),
                       headers=headers, patches=[], module="hello", arch="aarch64")
    assert hello.params.make_vars["CROSS_COMPILE"] == "aarch64-linux-gnu-"
    overlay = store.realise(kmod_check("tiny:aarch64", hello, headers, None), log=lambda _m: None)
    release = (store.path(headers) / "kernel-release").read_text().strip()
    ko = overlay.path / "lib/modules" / release / "extra/hello.ko"
    module = read_module(ko)
    assert (module.arch, module.vermagic) == ("aarch64", f"{release} SMP mod_unload modversions aarch64")
    assert hello.manifest["tools"]["aarch64-linux-gnu-gcc"].split()[0].startswith("aarch64-linux-gnu-gcc")

    data = ko.read_bytes()
    cases = {
        "hello": data,
        "hello-crc": modedit.set_version_crc(data, "_printk", 0x12345678),
        "hello-flags": modedit.set_modinfo(data, "vermagic", f"{release} SMP modversions aarch64"),
        # Another release of the same length (edits keep the section size).
        "hello-release": modedit.set_modinfo(data, "vermagic", f"{release[:-1]}{'1' if release[-1] == '0' else '0'}"
                                             " SMP mod_unload modversions aarch64"),
    }
    target = KernelTarget.from_headers(store.path(headers))
    verdicts = {}
    spec = ["dir /dev 0755 0 0", "nod /dev/console 0600 0 0 c 5 1", "dir /m 0755 0 0",
            f"file /init {workdir / 'init'} 0755 0 0"]
    for case, content in cases.items():
        (workdir / f"{case}.ko").write_bytes(content)
        verdicts[case] = check_module(workdir / f"{case}.ko", target)
        spec.append(f"file /m/{case}.ko {workdir / f'{case}.ko'} 0644 0 0")
    init_c = workdir / "init.c"
    init_c.write_text(INIT_C.replace("@CASES@", " ".join(f'"{c}",' for c in cases)))
    run(["aarch64-linux-gnu-gcc", "-static", "-O2", "-o", workdir / "init", init_c])
    (workdir / "initramfs.list").write_text("\n".join(spec) + "\n")
    # The kernel's own gen_init_cpio makes /dev/console without root.
    initrd = run([obj / "usr/gen_init_cpio", workdir / "initramfs.list"]).stdout
    (workdir / "initrd.cpio").write_bytes(initrd)
    proc = run(["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-m", "256M", "-accel", "tcg",
                "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
                "-kernel", obj / "arch/arm64/boot/Image", "-initrd", workdir / "initrd.cpio",
                "-append", "console=ttyAMA0 loglevel=1 rdinit=/init panic=-1"], timeout=300)
    console = proc.stdout.decode(errors="replace").replace("\r", "")
    assert "@@done" in console, console[-3000:]
    for case, verdict in verdicts.items():
        section = console.split(f"@@case {case}\n", 1)[1].split(f"@@end {case}\n", 1)[0]
        errno = int(re.search(r"^@@rc (\d+)$", section, re.M).group(1))  # type: ignore[union-attr]
        log = [re.sub(r"^<\d>", "", line) for line in section.splitlines() if line.startswith("<")]
        assert verdict.kernel_loads is (errno == 0), (case, verdict.reasons(), log)
        if errno:
            assert verdict.kernel_refusal in log, (case, verdict.kernel_refusal, log)
    assert verdicts["hello"].passed and not verdicts["hello-release"].passed
