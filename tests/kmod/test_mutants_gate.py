"""The gate's decisions on hand-made module and kernel descriptions: no module is built (found by scripts/mutation)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from eulerbake.linux.gate import (
    NO_CONFIG,
    Finding,
    Verdict,
    _force_load,
    _policy,
    check_version,
    flags_difference,
    same_magic,
)
from eulerbake.linux.module import KernelModule
from eulerbake.linux.target import KernelTarget

RELEASE = "6.1.0-57-amd64"
MAGIC = f"{RELEASE} SMP preempt mod_unload modversions "
REBUILD = f"rebuild the module against the headers of kernel {RELEASE} (make -C <headers> M=$PWD modules)"


def module(versions: dict[str, int] | None = None, vermagic: str = MAGIC, **changes: object) -> KernelModule:
    made = KernelModule(
        path=Path("/tmp/hello.ko"), name="hello", machine="EM_X86_64", elf_class=64, little_endian=True,
        modinfo={"vermagic": [vermagic], "name": ["hello"], "license": ["GPL"]}, versions=versions,
        versions_unallocated=False, undefined=(), signed=False, modinfo_name="hello", struct_name="hello")
    return replace(made, **changes)  # type: ignore[arg-type]


def target(force_load: bool | None = False) -> KernelTarget:
    return KernelTarget(release=RELEASE, vermagic=MAGIC, arch="x86_64", modversions=True, force_load=force_load)


@pytest.mark.parametrize(("mine", "theirs", "crcs", "same"), [
    (MAGIC, MAGIC, False, True),
    ("6.1.0-58-amd64 SMP mod_unload", "6.1.0-57-amd64 SMP mod_unload", False, False),
    ("6.1.0-58-amd64 SMP mod_unload", "6.1.0-57-amd64 SMP mod_unload", True, True),  # CRCs: release skipped
    ("6.1.0-58-amd64 SMP", "6.1.0-57-amd64 SMP mod_unload", True, False),
    ("6.1.0-58-amd64", "6.1.0-57-amd64", True, True),  # no flags at all: both empty
    ("6.1.0-58-amd64", "6.1.0-57-amd64 SMP", True, False),
    ("6.1.0-58-amd64 SMP", "6.1.0-57-amd64", True, False),
])
def test_same_magic_skips_the_release_only_with_crcs(mine: str, theirs: str, crcs: bool, same: bool) -> None:
    assert same_magic(mine, theirs, crcs) is same


def test_flags_difference_in_words() -> None:
    assert flags_difference("r SMP mod_unload", "r SMP preempt mod_unload modversions") == \
        "the module lacks 'preempt', 'modversions'"
    assert flags_difference("r SMP  preempt mod_unload", "r SMP mod_unload") == \
        "the module has 'preempt' the kernel has not"
    assert flags_difference("r a b", "r a c") == "the module lacks 'c' and the module has 'b' the kernel has not"
    assert flags_difference("r a b c", "r a") == "the module has 'b', 'c' the kernel has not"
    assert flags_difference("r a b", "r b a") == "the flags differ in order or spacing"
    assert flags_difference("a b", "b b") == "the flags differ in order or spacing"  # the release is not a flag


def test_check_version_ok_missing_and_mismatching_crcs() -> None:
    mod = module({"printk": 0x1234, "kfree": 0xABCD})
    assert check_version(mod, target(), "printk", 0x1234, "symbols") == \
        Finding("symbols", "ok", "printk: CRC 0x00001234 matches")
    assert check_version(mod, target(), "kmalloc", 0x1, "symbols", "EINVAL") == Finding(
        "symbols", "fail", "kmalloc: the module carries no CRC for it", "hello: no symbol version for kmalloc",
        REBUILD, "EINVAL")
    assert check_version(mod, target(), "kfree", 0x1, "layout") == Finding(
        "layout", "fail", "kfree: module CRC 0x0000abcd != kernel CRC 0x00000001: the module was built against "
        "another build of the kernel", "hello: disagrees about version of symbol kfree", REBUILD, "ENOEXEC")


def test_an_export_without_a_crc_needs_none() -> None:
    assert check_version(module(None), target(), "printk", None, "symbols") == \
        Finding("symbols", "ok", "printk: the kernel exports it without a CRC")


def test_without_a_crc_table_only_force_load_lets_a_module_in() -> None:
    mod = module(None, struct_name="hello_s")
    assert check_version(mod, target(True), "module_layout", 0x1, "layout") == Finding(
        "layout", "warn", "module_layout: the module has no CRC table; CONFIG_MODULE_FORCE_LOAD lets it through, "
        "tainting the kernel", "hello_s: module_layout: kernel tainted.")
    assert check_version(mod, target(None), "module_layout", 0x1, "layout") == Finding(
        "layout", "unknown", f"{NO_CONFIG}: module_layout: the module has no CRC table, which only "
        "CONFIG_MODULE_FORCE_LOAD lets through",
        fix="give the kernel config (/boot/config-<kver> in the image, or the headers)")
    assert check_version(mod, target(False), "module_layout", 0x1, "layout") == Finding(
        "layout", "fail", "module_layout: the module has no CRC table, and the kernel has no "
        "CONFIG_MODULE_FORCE_LOAD", "", REBUILD + " so it carries __versions and a vermagic")
    hidden = replace(mod, versions_unallocated=True)
    assert check_version(hidden, target(False), "module_layout", 0x1, "layout").message == (
        "module_layout: the module has no CRC table (its __versions lacks SHF_ALLOC, so the loader ignores it), "
        "and the kernel has no CONFIG_MODULE_FORCE_LOAD")


def test_force_load_names_the_check_and_the_module() -> None:
    assert _force_load(target(True), "vermagic", "hello", "bad vermagic", "no vermagic") == Finding(
        "vermagic", "warn", "no vermagic; CONFIG_MODULE_FORCE_LOAD lets it through, tainting the kernel",
        "hello: bad vermagic: kernel tainted.")


def test_the_release_policy() -> None:
    assert _policy(module(vermagic="oops"), target(), True)[0].status == "fail"  # release 'oops' != the kernel's
    other = module(vermagic="6.1.0-58-amd64 SMP")
    [strict] = _policy(other, target(), True)
    [lenient] = _policy(other, target(), False)
    assert (strict.check, strict.status, lenient.status) == ("release", "fail", "warn")
    assert strict.message.startswith(f"built for release 6.1.0-58-amd64 but the kernel is {RELEASE}")
    assert strict.fix.startswith(f"rebuild against kernel {RELEASE}'s headers")
    assert _policy(module(), target(), True) == [Finding("release", "ok", f"built for {RELEASE}, the kernel's release")]
    no_release = module()
    no_release.modinfo.pop("vermagic")
    assert _policy(no_release, target(), True) == []


def verdict(kernel: list[Finding], policy: list[Finding], strict: bool) -> Verdict:
    return Verdict(module(), target(), kernel, policy, strict)


def test_reasons_and_fixes_list_kernel_first_and_the_policy_only_when_strict() -> None:
    kernel = [Finding("elf", "ok", "fine", fix="never shown"), Finding("vermagic", "fail", "bad magic", fix="F1"),
              Finding("symbols", "unknown", "no config", fix="F2"), Finding("symbols", "warn", "meh", fix="F3"),
              Finding("depends", "fail", "again", fix="F1")]
    policy = [Finding("release", "fail", "other release", fix="F4"), Finding("release", "ok", "x", fix="F5"),
              Finding("release", "fail", "no fix")]
    strict = verdict(kernel, policy, True)
    assert strict.reasons() == ["kernel: bad magic", "kernel: no config", "kernel: again",
                                "policy (strict): other release", "policy (strict): no fix"]
    assert strict.fixes() == ["F1", "F2", "F4"]
    lenient = verdict(kernel, policy, False)
    assert lenient.reasons() == ["kernel: bad magic", "kernel: no config", "kernel: again"]
    assert lenient.fixes() == ["F1", "F2"]
