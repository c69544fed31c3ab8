"""The gate against reality: boot Debian's kernel under QEMU (TCG) and let it load every variant.

A static init (C, `finit_module` as kmod's insmod calls it) loads each module of `variants.py`,
prints the errno and the kernel log of that attempt between markers on the serial console, unloads
what loaded, and powers off: 35 variants in one boot of ~20 s, the signature-enforcing cases in a
second. For every variant the test first holds the variant's expectation to what the kernel did (the
oracle), then the gate's `--no-strict` verdict to it, against two descriptions of the kernel: the
headers plus the kernel image (through the CLI, JSON), and the installed modules directory (which
reads /boot/vmlinuz beside it). A refusal must name the kernel's errno and the very line it logged.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from eulerbake.cli.kmod import kmod_main
from eulerbake.linux.gate import check_module
from eulerbake.linux.kernels import load_target
from eulerbake.tools.run import run
from tests.kmod.conftest import HEADERS_DIR, MODULES_DIR, SHIPPED_ENA, VMLINUZ, KmodBuilds, debian_kernel
from tests.kmod.variants import (
    Variant,
    arch_variants,
    built_ena_variants,
    debian_ena_variants,
    enforcing_variants,
    hello_variants,
)

pytestmark = [debian_kernel, pytest.mark.slow]

INIT_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/klog.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <unistd.h>

/* For each "<case> <module>" line of /cases: finit_module(/m/<case>.ko), print the errno (0: loaded)
 * and the kernel log of that attempt between markers, and unload what loaded. */
int main(void)
{
	static char log[1 << 17];
	char line[512], kase[256], name[256], path[300];
	FILE *cases = fopen("/cases", "r");

	klogctl(5, 0, 0);
	while (cases && fgets(line, sizeof(line), cases)) {
		if (sscanf(line, "%255s %255s", kase, name) != 2)
			continue;
		snprintf(path, sizeof(path), "/m/%s.ko", kase);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		int err = syscall(SYS_finit_module, fd, "", 0) ? errno : 0;
		close(fd);
		printf("@@case %s\n@@rc %d\n", kase, err);
		int n = klogctl(4, log, sizeof(log) - 1);
		if (n > 0) { log[n] = 0; fputs(log, stdout); }
		if (err == 0 && syscall(SYS_delete_module, name, O_NONBLOCK) != 0)
			printf("@@unload-failed %s %d\n", name, errno);
		printf("@@end %s\n", kase);
		fflush(stdout);
		klogctl(5, 0, 0);
	}
	printf("@@done\n");
	fflush(stdout);
	reboot(RB_POWER_OFF);
	return 0;
}
"""
LOG_PREFIX = re.compile(r"^<\d+>(\[\s*\d+\.\d+\]\s)?")


@dataclass
class Outcome:
    errno: str  # "" when it loaded
    log: list[str]  # kernel log lines of this load, without level and timestamp

    @property
    def loaded(self) -> bool:
        return self.errno == ""


def boot_and_load(workdir: Path, variants: list[Variant], append: str = "") -> dict[str, Outcome]:
    """Boot Debian's kernel once with an initramfs that loads every variant in order."""
    root = workdir / "initramfs"
    (root / "m").mkdir(parents=True)
    (workdir / "init.c").write_text(INIT_C)
    run(["gcc", "-static", "-O2", "-o", root / "init", workdir / "init.c"])
    (root / "cases").write_text("".join(f"{v.case} {v.name}\n" for v in variants))
    for variant in variants:
        (root / "m" / f"{variant.case}.ko").write_bytes(variant.data)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=("\n".join(files) + "\n").encode())
    initrd = workdir / "initrd.cpio"
    initrd.write_bytes(archive.stdout)
    shutil.rmtree(root)
    # TCG: /dev/kvm here is a software virtualiser under which a normal kernel stalls.
    proc = run(["qemu-system-x86_64", "-accel", "tcg", "-m", "512M", "-nodefaults", "-display", "none",
                "-serial", "stdio", "-no-reboot", "-kernel", VMLINUZ, "-initrd", initrd,
                "-append", f"console=ttyS0 loglevel=1 panic=-1 rdinit=/init {append}".strip()], timeout=600)
    console = proc.stdout.decode(errors="replace").replace("\r", "")
    assert "@@done" in console, console[-3000:]
    outcomes: dict[str, Outcome] = {}
    for variant in variants:
        section = console.split(f"@@case {variant.case}\n", 1)[1].split(f"@@end {variant.case}\n", 1)[0]
        code = int(re.search(r"^@@rc (\d+)$", section, re.M).group(1))  # type: ignore[union-attr]
        log = [LOG_PREFIX.sub("", line) for line in section.splitlines() if LOG_PREFIX.match(line)]
        outcomes[variant.case] = Outcome(errno.errorcode.get(code, str(code)) if code else "", log)
    return outcomes


def assert_oracle(variants: list[Variant], outcomes: dict[str, Outcome]) -> None:
    """Each variant's expectation is what the kernel did."""
    for variant in variants:
        outcome = outcomes[variant.case]
        assert outcome.loaded is variant.loads, (variant.case, outcome)
        assert outcome.errno == variant.errno, (variant.case, outcome)
        assert not variant.line or variant.line in outcome.log, (variant.case, variant.line, outcome.log)


def gate_row(case: str, loads: bool | None, error: str, refusal: str, outcome: Outcome) -> str:
    kernel = "loads" if outcome.loaded else f"refuses {outcome.errno}"
    gate = "loads" if loads else ("cannot tell" if loads is None else f"refuses {error}")
    return f"| {case} | {kernel} | {gate} | {refusal or '-'} |"


def test_gate_verdicts_equal_what_the_kernel_does(kmod_builds: KmodBuilds, hello_family: dict[str, Path],
                                                  foreign_key: tuple[object, object, bytes], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    variants = [*hello_variants(hello_family, foreign_key), *debian_ena_variants(SHIPPED_ENA.read_bytes()),
                *built_ena_variants(kmod_builds.ena_ko.read_bytes()), *arch_variants(tmp_path / "arch")]
    assert len({v.case for v in variants}) == len(variants)
    cases = tmp_path / "cases"
    cases.mkdir()
    for variant in variants:
        (cases / f"{variant.case}.ko").write_bytes(variant.data)

    outcomes = boot_and_load(tmp_path, variants)
    assert_oracle(variants, outcomes)

    # The installed modules directory, read as one (its vmlinuz beside it, no build symlink).
    installed = load_target([MODULES_DIR])
    assert [s["kind"] for s in installed.sources] == ["modules-dir", "kernel-image"]
    rows = []
    for variant in variants:
        outcome = outcomes[variant.case]
        path = cases / f"{variant.case}.ko"
        # Headers + kernel image, through the CLI: `eulerbake kmod check --json --no-strict`.
        code = kmod_main(["check", str(path), "--kernel", str(HEADERS_DIR), "--kernel", str(VMLINUZ), "--json",
                          "--no-strict"])
        report = json.loads(capsys.readouterr().out)
        assert code == (0 if outcome.loaded else 1), (variant.case, report["kernel"], outcome)
        assert report["kernel"]["loads"] is outcome.loaded, (variant.case, report["kernel"], outcome)
        assert report["kernel"]["errno"] == outcome.errno, (variant.case, report["kernel"], outcome)
        if report["kernel"]["refusal"]:
            assert report["kernel"]["refusal"] in outcome.log, (variant.case, report["kernel"], outcome)
        if not outcome.loaded:
            assert report["fixes"], (variant.case, report)
        verdict = check_module(path, installed, strict=False)
        assert (verdict.passed, verdict.errno) == (outcome.loaded, outcome.errno), (variant.case, verdict.reasons())
        assert not verdict.kernel_refusal or verdict.kernel_refusal in outcome.log, (variant.case, outcome)
        rows.append(gate_row(variant.case, report["kernel"]["loads"], report["kernel"]["errno"],
                             report["kernel"]["refusal"], outcome))
    assert "ena: Elastic Network Adapter (ENA) v2.1.0K" in outcomes["ena"].log
    (tmp_path / "agreement.md").write_text("| variant | kernel | gate | line |\n|---|---|---|---|\n" + "\n".join(rows))
    print("\n".join(rows))


def test_signature_enforcement_as_the_kernel_enforces_it(hello_family: dict[str, Path],
                                                         foreign_key: tuple[object, object, bytes],
                                                         tmp_path: Path) -> None:
    """module.sig_enforce=1: unsigned and unknown-key modules are refused, Debian's signed one loads."""
    variants = enforcing_variants(hello_family, SHIPPED_ENA.read_bytes(), foreign_key)
    outcomes = boot_and_load(tmp_path, variants, append="module.sig_enforce=1")
    assert_oracle(variants, outcomes)
    enforcing = replace(load_target([HEADERS_DIR, VMLINUZ]), sig_enforce=True)
    for variant in variants:
        path = tmp_path / f"{variant.case}.ko"
        path.write_bytes(variant.data)
        verdict = check_module(path, enforcing, strict=False)
        outcome = outcomes[variant.case]
        assert (verdict.passed, verdict.errno) == (outcome.loaded, outcome.errno), (variant.case, verdict.reasons())
        assert not verdict.kernel_refusal or verdict.kernel_refusal in outcome.log, (variant.case, outcome)
