"""The pyelftools gate against Debian's real kernel: its headers, its installed modules, edited copies of them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import cast

import pytest

from eulerbake.cli.kmod import kmod_main
from eulerbake.core.errors import EulerbakeError
from eulerbake.linux import module as kmod
from eulerbake.linux.gate import check_module
from eulerbake.linux.module import read_module
from eulerbake.linux.target import KernelTarget
from eulerbake.tools.run import run
from tests.kmod import modedit
from tests.kmod.conftest import HEADERS_DIR, KREL, MODULES_DIR, OTHER_KREL, SHIPPED_ENA, debian_kernel

pytestmark = debian_kernel
KERNEL_MAGIC = f"{KREL} SMP preempt mod_unload modversions "


@pytest.fixture(scope="module")
def headers() -> KernelTarget:
    return KernelTarget.from_headers(HEADERS_DIR)


def edited(tmp_path: Path, source: Path, *edits: tuple[str, object]) -> Path:
    data = source.read_bytes()
    for edit, argument in edits:
        if edit == "vermagic":
            data = modedit.set_modinfo(data, "vermagic", str(argument))
        elif edit == "license":
            data = modedit.set_modinfo(data, "license", str(argument))
        elif edit == "crc":
            symbol, crc = cast(tuple[str, int], argument)
            data = modedit.set_version_crc(data, symbol, crc)
        elif edit == "noversions":
            data = modedit.drop_versions_alloc(data)
    out = tmp_path / f"{source.stem}-edited.ko"
    out.write_bytes(data)
    return out


def test_headers_give_the_vermagic_of_the_shipped_modules(headers: KernelTarget) -> None:
    # Debian's include/config/kernel.release says the upstream version, not the kernel release.
    assert (HEADERS_DIR / "include/config/kernel.release").read_text().strip() != KREL
    assert headers.release == KREL
    assert headers.vermagic == read_module(SHIPPED_ENA).vermagic == KERNEL_MAGIC
    installed = KernelTarget.from_modules_dir(MODULES_DIR)
    assert (installed.release, installed.vermagic, installed.arch) == (KREL, KERNEL_MAGIC, "x86_64")
    assert installed.force_load and installed.origin["config"] == f"/boot/config-{KREL}"
    assert headers.exports is not None and headers.exports["module_layout"].owner == "vmlinux"
    assert headers.force_load and headers.modversions


def test_shipped_ena_passes_against_headers_modules_and_both(headers: KernelTarget) -> None:
    module = read_module(SHIPPED_ENA)
    assert module.signed and module.modinfo["intree"] == ["Y"] and module.depends == ()
    assert module.versions is not None and "module_layout" in module.versions
    for target in (headers, KernelTarget.from_modules_dir(MODULES_DIR),
                   headers.with_image(KernelTarget.from_modules_dir(MODULES_DIR))):
        verdict = check_module(module, target)
        assert verdict.kernel_loads is True and verdict.passed, verdict.reasons()
        assert verdict.kernel_refusal == ""


def first_gpl_only_import(module: kmod.KernelModule, target: KernelTarget) -> str:
    assert target.exports is not None
    return next(symbol for symbol, _weak in module.undefined if target.exports[symbol].gpl_only)


@pytest.mark.parametrize("case", ["flags", "crc-layout", "crc-symbol", "release-noversions", "release-only",
                                  "license"])
def test_edited_modules_get_the_kernels_verdict(case: str, headers: KernelTarget, tmp_path: Path) -> None:
    shipped = read_module(SHIPPED_ENA)
    a_symbol = shipped.undefined[0][0]
    edits: dict[str, tuple[tuple[str, object], ...]] = {
        "flags": (("vermagic", f"{KREL} SMP mod_unload modversions "),),
        "crc-layout": (("crc", ("module_layout", 0x12345678)),),
        "crc-symbol": (("crc", (a_symbol, 0x12345678)),),
        "release-noversions": (("vermagic", KERNEL_MAGIC.replace(KREL, OTHER_KREL)), ("noversions", None)),
        "release-only": (("vermagic", KERNEL_MAGIC.replace(KREL, OTHER_KREL)),),
        "license": (("license", "GP"),),
    }
    verdict = check_module(edited(tmp_path, SHIPPED_ENA, *edits[case]), headers)
    expected = {
        "flags": f"ena: version magic '{KREL} SMP mod_unload modversions ' should be '{KERNEL_MAGIC}'",
        "crc-layout": "ena: disagrees about version of symbol module_layout",
        "crc-symbol": f"ena: disagrees about version of symbol {a_symbol}",
        "release-noversions": f"ena: version magic '{KERNEL_MAGIC.replace(KREL, OTHER_KREL)}' should be "
                              f"'{KERNEL_MAGIC}'",
        "release-only": "",
        "license": f"ena: Unknown symbol {first_gpl_only_import(shipped, headers)} (err -2)",
    }[case]
    assert verdict.kernel_refusal == expected
    if case == "release-only":
        # The kernel loads it (CRCs decide); the strict policy still refuses, and says it is policy.
        assert verdict.kernel_loads is True and not verdict.policy_ok and not verdict.passed
        assert verdict.reasons() == [next(f"policy (strict): {f.message}" for f in verdict.policy)]
        assert "6.1.0-99-amd64" in verdict.reasons()[0]
        relaxed = check_module(verdict.module, headers, strict=False)
        assert relaxed.passed and relaxed.kernel_loads is True
    else:
        assert verdict.kernel_loads is False and not verdict.passed
    if case == "release-noversions":
        # No CRC table: CONFIG_MODULE_FORCE_LOAD lets module_layout through (tainting) and vermagic decides.
        assert verdict.module.versions is None and verdict.module.versions_unallocated
        assert any(f.kernel_line == "ena: module_layout: kernel tainted." for f in verdict.kernel)


def test_crcs_from_shipped_modules_when_no_symvers(headers: KernelTarget, tmp_path: Path) -> None:
    """An image without Module.symvers: the CRCs its own modules imported are the evidence."""
    root = tmp_path / "root"
    for relative in ("kernel/drivers/net/mdio.ko", "kernel/drivers/net/ethernet/intel/e1000/e1000.ko"):
        (root / "lib/modules" / KREL / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "lib/modules" / KREL / relative).write_bytes((MODULES_DIR / relative).read_bytes())
    run(["depmod", "-b", root, KREL])
    image = KernelTarget.from_modules_dir(root)
    assert image.exports is None and image.evidence is not None and image.release == KREL
    # mii.ko is not in that image, but every symbol it imports is imported by e1000 or mdio too.
    mii = MODULES_DIR / "kernel/drivers/net/mii.ko"
    assert check_module(mii, image).kernel_loads is True
    symbol = read_module(mii).undefined[-1][0]
    wrong = check_module(edited(tmp_path, mii, ("crc", (symbol, 1))), image)
    assert wrong.kernel_refusal == f"mii: disagrees about version of symbol {symbol}"
    # ENA imports symbols no shipped module does: the gate cannot tell, and says so instead of passing.
    unknown = check_module(SHIPPED_ENA, image)
    assert unknown.kernel_loads is None and not unknown.passed
    assert any(f.status == "unknown" and "CRC unknown for" in f.message for f in unknown.kernel)


def test_headers_that_do_not_match_the_image_are_refused(headers: KernelTarget) -> None:
    other = KernelTarget.from_modules_dir(MODULES_DIR)
    other.release, other.vermagic = "6.1.0-99-amd64", KERNEL_MAGIC.replace(KREL, OTHER_KREL)
    with pytest.raises(EulerbakeError, match=f"headers are for kernel .*{re.escape(KREL)}.* image's kernel is .*-99-"):
        headers.with_image(other)


def test_module_symvers_fields(headers: KernelTarget) -> None:
    assert headers.exports is not None
    namespaced = headers.exports["insert_resource_expand_to_fit"]
    assert (namespaced.namespace, namespaced.gpl_only, namespaced.owner) == ("CXL", True, "vmlinux")
    assert headers.exports["module_layout"].crc == int(next(
        line.split("\t")[0] for line in (HEADERS_DIR / "Module.symvers").read_text().splitlines()
        if line.split("\t")[1] == "module_layout"), 16)


def test_not_a_module_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "ena.ko"
    text.write_text("not an ELF file\n")
    with pytest.raises(EulerbakeError, match=r"ena\.ko is not a kernel module: it is not an ELF file"):
        read_module(text)
    with pytest.raises(EulerbakeError, match="ELF type is ET_(DYN|EXEC)"):
        read_module(Path("/bin/true"))
    source = tmp_path / "plain.c"
    source.write_text("int plain(void) { return 1; }\n")
    run(["gcc", "-c", "-o", tmp_path / "plain.o", source])
    with pytest.raises(EulerbakeError, match="no .modinfo section"):
        read_module(tmp_path / "plain.o")


# What kbuild puts in a module, written by hand so any compiler can produce it for any arch.
FAKE_MODULE_C = r"""
extern int _printk(const char *fmt, ...);
static const char modinfo[] __attribute__((section(".modinfo"), used, aligned(1))) =
	"license=GPL\0name=armtest\0vermagic=@VERMAGIC@";
struct modversion_info { unsigned long crc; char name[64 - sizeof(unsigned long)]; };
static const struct modversion_info versions[] __attribute__((section("__versions"), used, aligned(8))) = {
	{ 0x11223344, "module_layout" },
	{ 0xaabbccdd, "_printk" },
};
int armtest_init(void) { return _printk("armtest\n"); }
"""
ARM64_MAGIC = "6.1.0-56-arm64 SMP preempt mod_unload modversions aarch64"


def compile_fake_module(tmp_path: Path, compiler: str, *flags: str, vermagic: str = ARM64_MAGIC) -> Path:
    source = tmp_path / "armtest.c"
    source.write_text(FAKE_MODULE_C.replace("@VERMAGIC@", vermagic))
    # -r links an ET_REL, as modules are.
    obj = tmp_path / f"armtest{'-'.join(flags)}.ko"
    run([compiler, "-c", *flags, "-O2", "-o", obj, source])
    return obj


def arm64_headers(tmp_path: Path) -> Path:
    """The files the gate reads from arm64 headers, with Debian's own arm64 asm/vermagic.h."""
    tree = tmp_path / "arm64-headers"
    (tree / "include/generated").mkdir(parents=True)
    (tree / "include/generated/utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-56-arm64"\n')
    (tree / ".config").write_text("CONFIG_ARM64=y\nCONFIG_64BIT=y\nCONFIG_SMP=y\nCONFIG_PREEMPT_BUILD=y\n"
                                  "CONFIG_MODULE_UNLOAD=y\nCONFIG_MODVERSIONS=y\n")
    (tree / "arch/arm64/include/asm").mkdir(parents=True)
    common = HEADERS_DIR.parent / f"linux-headers-{KREL.rsplit('-', 1)[0]}-common"
    (tree / "arch/arm64/include/asm/vermagic.h").write_text(
        (common / "arch/arm64/include/asm/vermagic.h").read_text())
    (tree / "Module.symvers").write_text("0x11223344\tmodule_layout\tvmlinux\tEXPORT_SYMBOL\t\n"
                                         "0xaabbccdd\t_printk\tvmlinux\tEXPORT_SYMBOL\t\n")
    return tree


def test_arm64_module_against_x86_and_arm64_kernels(headers: KernelTarget, tmp_path: Path) -> None:
    """No arm64 kernel headers can be prepared here (no arm64 Module.symvers without building a whole
    arm64 kernel), so the arm64 side is an object compiled by aarch64-linux-gnu-gcc with the sections
    kbuild writes, checked against the x86_64 kernel and against the files arm64 headers would give."""
    obj = compile_fake_module(tmp_path, "aarch64-linux-gnu-gcc")
    module = read_module(obj)
    assert (module.arch, module.machine, module.elf_class) == ("aarch64", "EM_AARCH64", 64)
    assert module.versions == {"module_layout": 0x11223344, "_printk": 0xAABBCCDD}
    with pytest.raises(EulerbakeError, match=r"AArch64 ELF64 little-endian module \(aarch64\) but kernel "
                       rf"{KREL} is x86_64"):
        check_module(module, headers)
    arm64 = KernelTarget.from_headers(arm64_headers(tmp_path))
    assert (arm64.arch, arm64.vermagic) == ("aarch64", ARM64_MAGIC)
    verdict = check_module(module, arm64)
    assert verdict.passed, verdict.reasons()
    crc_changed = check_module(edited(tmp_path, obj, ("crc", ("_printk", 5))), arm64)
    assert crc_changed.kernel_refusal == "armtest: disagrees about version of symbol _printk"


def test_crc_tables_of_32_bit_and_big_endian_modules(tmp_path: Path) -> None:
    big = read_module(compile_fake_module(tmp_path, "aarch64-linux-gnu-gcc", "-mbig-endian"))
    assert (big.arch, big.little_endian) == ("aarch64_be", False)
    assert big.versions == {"module_layout": 0x11223344, "_printk": 0xAABBCCDD}
    small = read_module(compile_fake_module(tmp_path, "gcc", "-m32"))
    assert (small.arch, small.elf_class) == ("i686", 32)
    assert small.versions == {"module_layout": 0x11223344, "_printk": 0xAABBCCDD}


# -- eulerbake kmod check -----------------------------------------------------------------------------


def test_cli_table_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kmod_main(["check", str(SHIPPED_ENA), "--kernel", str(HEADERS_DIR)]) == 0
    table = capsys.readouterr().out
    assert "kernel: would load ena" in table and "gate: PASS" in table and "module_layout" in table

    release_only = edited(tmp_path, SHIPPED_ENA, ("vermagic", KERNEL_MAGIC.replace(KREL, OTHER_KREL)))
    assert kmod_main(["check", str(release_only), "--kernel", str(HEADERS_DIR), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["kernel"]["loads"] is True and report["policy"]["ok"] is False and report["passed"] is False
    assert kmod_main(["check", str(release_only), "--kernel", str(HEADERS_DIR), "--no-strict"]) == 0
    assert "policy (strict release match, off): release mismatch reported, not enforced" in capsys.readouterr().out

    flags = edited(tmp_path, SHIPPED_ENA, ("vermagic", f"{KREL} SMP mod_unload modversions "))
    assert kmod_main(["check", str(flags), "--kernel", str(HEADERS_DIR)]) == 1
    assert "would refuse ena: ena: version magic" in capsys.readouterr().out

    junk = tmp_path / "junk.ko"
    junk.write_bytes(b"\0" * 64)
    assert kmod_main(["check", str(junk), "--kernel", str(HEADERS_DIR)]) == 2
    assert "not an ELF file" in capsys.readouterr().err


def make_disk_image(tmp_path: Path, modules: list[str]) -> Path:
    """A GPT disk: an empty first partition, then an ext4 root (usr-merged) carrying lib/modules/<kver>."""
    root = tmp_path / "imageroot"
    moddir = root / "usr/lib/modules" / KREL
    for relative in modules:
        (moddir / relative).parent.mkdir(parents=True, exist_ok=True)
        (moddir / relative).write_bytes((MODULES_DIR / relative).read_bytes())
    (root / "lib").symlink_to("usr/lib")
    (root / "boot").mkdir()
    (root / "boot" / f"config-{KREL}").write_text(Path(f"/boot/config-{KREL}").read_text())
    run(["depmod", "-b", root, KREL])
    image = tmp_path / "disk.raw"
    run(["truncate", "-s", "64M", image])
    run(["sfdisk", "-q", image], input=b"label: gpt\nstart=2048, size=16384, type=L\nstart=18432, type=L\n")
    run(["mkfs.ext4", "-q", "-F", "-E", f"offset={18432 * 512}", "-d", root, image, "40M"])
    return image


def test_cli_reads_modules_out_of_raw_and_qcow2_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = make_disk_image(tmp_path, ["kernel/drivers/net/mdio.ko",
                                       "kernel/drivers/net/ethernet/intel/e1000/e1000.ko"])
    # Image + headers: the image's own vermagic and module list, the headers' CRCs.
    assert kmod_main(["check", str(SHIPPED_ENA), "--kernel", str(image), "--kernel", str(HEADERS_DIR),
                      "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"]["release"] == KREL and report["target"]["modules"] >= 2
    assert report["target"]["origin"]["exports"].endswith("Module.symvers")
    qcow2 = tmp_path / "disk.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", image, qcow2])
    # The image alone: CRCs from its modules' __versions, which cover everything mii.ko imports.
    mii = MODULES_DIR / "kernel/drivers/net/mii.ko"
    assert kmod_main(["check", str(mii), "--kernel", str(qcow2), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"]["exports"] is None and "__versions" in report["target"]["origin"]["exports"]
    assert report["target"]["origin"]["config"].endswith(f"/root/boot/config-{KREL}")
    empty = tmp_path / "empty.raw"
    run(["truncate", "-s", "8M", empty])
    assert kmod_main(["check", str(mii), "--kernel", str(empty)]) == 2
    assert "no ext2/3/4 partition with /lib/modules" in capsys.readouterr().err
