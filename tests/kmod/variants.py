"""The module variants the gate is held to, each with what Debian's 6.1 kernel does with it.

Each variant is made here, from modules built by the tests themselves (a family of small hello modules,
see HELLO_FAMILY) and Debian's shipped ena.ko; `test_boot.py` boots Debian's kernel under QEMU and
`insmod`s every one (that is the oracle: it asserts `loads`, `errno` and `line` against what the
kernel did), and asserts the gate's `--no-strict` verdict equals it. `test_gate.py` checks the gate
against the same expectations for the variants that need no build, quickly and without a boot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eulerbake.tools.run import run
from tests.kmod import modedit
from tests.kmod.conftest import HELLO_C, KREL, OTHER_KREL

KERNEL_MAGIC = f"{KREL} SMP preempt mod_unload modversions "
OTHER_MAGIC = KERNEL_MAGIC.replace(KREL, OTHER_KREL)
FLAGS_MAGIC = f"{KREL} SMP mod_unload modversions "  # "preempt" missing

# Small modules, each importing the kind of symbol a case needs; built together with one kbuild run.
HELLO_FAMILY = {
    "hello": HELLO_C,
    # ktime_get is EXPORT_SYMBOL_GPL.
    "hellogpl": """\
// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
#include <linux/timekeeping.h>
static int __init hellogpl_init(void) { pr_info("hellogpl: %lld\\n", ktime_get()); return 0; }
static void __exit hellogpl_exit(void) { }
module_init(hellogpl_init);
module_exit(hellogpl_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("eulerbake test module using a GPL-only symbol");
""",
    # dma_buf_put is in namespace DMA_BUF (never called: hellons_nothing stays NULL; not static, so it is kept).
    "hellons": """\
// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
#include <linux/dma-buf.h>
struct dma_buf *hellons_nothing;
static int __init hellons_init(void) { if (hellons_nothing) dma_buf_put(hellons_nothing); return 0; }
static void __exit hellons_exit(void) { }
module_init(hellons_init);
module_exit(hellons_exit);
MODULE_LICENSE("GPL");
MODULE_IMPORT_NS(DMA_BUF);
MODULE_DESCRIPTION("eulerbake test module using a namespaced symbol");
""",
    # A weak reference to a symbol no kernel exports: left NULL by the loader.
    "helloweak": """\
// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
extern int eulerbake_no_such_symbol(void) __attribute__((weak));
static int __init helloweak_init(void) { return eulerbake_no_such_symbol ? eulerbake_no_such_symbol() : 0; }
static void __exit helloweak_exit(void) { }
module_init(helloweak_init);
module_exit(helloweak_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("eulerbake test module with a weak undefined symbol");
""",
    # crc_ccitt comes from lib/crc-ccitt, built into Debian's kernel (modules.builtin).
    "hellobuiltin": """\
// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
#include <linux/crc-ccitt.h>
static int __init hellobuiltin_init(void) { static const u8 b = 1; pr_info("%u\\n", crc_ccitt(0, &b, 1)); return 0; }
static void __exit hellobuiltin_exit(void) { }
module_init(hellobuiltin_init);
module_exit(hellobuiltin_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("eulerbake test module using a symbol of a built-in module");
""",
}

# What kbuild puts in a module, written by hand so any compiler can produce it for any arch: .modinfo,
# __versions, and a .gnu.linkonce.this_module whose struct module has its name after state and list.
FAKE_MODULE_C = r"""
extern int _printk(const char *fmt, ...);
struct module_head { int state; void *next, *prev; char name[56]; };
struct module_head __this_module __attribute__((section(".gnu.linkonce.this_module"), used)) = { .name = "armtest" };
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


def build_hello_family(directory: Path, headers: Path) -> dict[str, Path]:
    """Build every HELLO_FAMILY module with one kbuild run; also returns hello's unlinked object ('hello.o')."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in HELLO_FAMILY.items():
        (directory / f"{name}.c").write_text(source)
    (directory / "Kbuild").write_text("".join(f"obj-m += {name}.o\n" for name in HELLO_FAMILY))
    run(["make", "-C", headers, f"M={directory}", "modules"], timeout=600)
    built = {name: directory / f"{name}.ko" for name in HELLO_FAMILY}
    built["hello.o"] = directory / "hello.o"
    return built


def compile_fake_module(directory: Path, compiler: str, *flags: str, vermagic: str = ARM64_MAGIC) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "armtest.c"
    source.write_text(FAKE_MODULE_C.replace("@VERMAGIC@", vermagic))
    obj = directory / f"armtest{'-'.join(flags)}.ko"
    run([compiler, "-c", *flags, "-O2", "-o", obj, source])
    return obj


@dataclass(frozen=True)
class Variant:
    """One module file, and what the kernel does with it: `line` is a line its log then holds."""

    case: str
    name: str  # the module's name (to unload it after a load)
    data: bytes
    loads: bool
    errno: str = ""  # what insmod gets back when refused
    line: str = ""


def section_bounds_damage(data: bytes) -> tuple[bytes, str]:
    """One byte of a RELA section's sh_size raised so the section ends 16 MiB past the file (as fuzzing found)."""
    index, _name, _offset, _size = modedit.sections_of_type(data, "SHT_RELA")[-1]
    at = modedit.section_header_field(data, index, "sh_size") + 3
    return modedit.flip(data, at, 0x01), f"Invalid ELF section in module (section {index} type 4)"


def debian_ena_variants(shipped: bytes) -> list[Variant]:
    """Edits of Debian's signed ena.ko, and of the same module with its signature taken off."""
    blob_at, blob_len = modedit.signature_blob(shipped)
    plain = modedit.unsigned(shipped)
    first_symbol = _first_import(plain)
    bounds, bounds_line = section_bounds_damage(plain)
    return [
        Variant("debian-ena", "ena", shipped, True),
        # Signed by Debian's build key, which the kernel trusts: any edit breaks the signature.
        Variant("debian-ena-vermagic", "ena", modedit.set_modinfo(shipped, "vermagic", FLAGS_MAGIC), False,
                "EKEYREJECTED"),
        Variant("debian-ena-crc", "ena", modedit.set_version_crc(shipped, first_symbol, 0x12345678), False,
                "EKEYREJECTED"),
        Variant("debian-ena-sigflip", "ena", modedit.flip(shipped, blob_at + blob_len - 7, 0x01), False,
                "EKEYREJECTED"),
        Variant("debian-ena-sig-garbled", "ena", modedit.flip(shipped, blob_at, 0x01), False, "EBADMSG"),
        # The same module unsigned: what the kernel makes of the content itself.
        Variant("ena-unsigned", "ena", plain, True),
        Variant("ena-unsigned-flags", "ena", modedit.set_modinfo(plain, "vermagic", FLAGS_MAGIC), False, "ENOEXEC",
                f"ena: version magic '{FLAGS_MAGIC}' should be '{KERNEL_MAGIC}'"),
        Variant("ena-unsigned-crc-layout", "ena", modedit.set_version_crc(plain, "module_layout", 0x12345678), False,
                "ENOEXEC", "ena: disagrees about version of symbol module_layout"),
        Variant("ena-unsigned-crc-symbol", "ena", modedit.set_version_crc(plain, first_symbol, 0x12345678), False,
                "EINVAL", f"ena: disagrees about version of symbol {first_symbol}"),
        Variant("ena-unsigned-release-noversions", "ena", modedit.drop_versions_alloc(
            modedit.set_modinfo(plain, "vermagic", OTHER_MAGIC)), False, "ENOEXEC",
            f"ena: version magic '{OTHER_MAGIC}' should be '{KERNEL_MAGIC}'"),
        Variant("ena-unsigned-release", "ena", modedit.set_modinfo(plain, "vermagic", OTHER_MAGIC), True),
        Variant("ena-unsigned-license", "ena", modedit.set_modinfo(plain, "license", "GP"), False, "ENOENT",
                f"ena: Unknown symbol {_first_gpl_only_import(plain)} (err -2)"),
        Variant("ena-section-bounds", "ena", bounds, False, "ENOEXEC", bounds_line),
        Variant("ena-truncated", "ena", plain[:5000], False, "ENOEXEC", "Invalid ELF section header overflow"),
        # Cut inside the signature: no marker, so an unsigned module whose ELF is whole (the rest is ignored).
        Variant("debian-ena-cut-signature", "ena", shipped[:-100], True),
    ]


def _first_import(data: bytes) -> str:
    from eulerbake.linux.elfcheck import ElfView

    view = ElfView(data, 64, True)
    return next(s.name for s in view.symbols() if s.shndx == 0 and s.name)


def _first_gpl_only_import(data: bytes) -> str:
    from eulerbake.linux.elfcheck import ElfView
    from eulerbake.linux.target import parse_module_symvers
    from tests.kmod.conftest import HEADERS_DIR

    exports = parse_module_symvers((HEADERS_DIR / "Module.symvers").read_text())
    view = ElfView(data, 64, True)
    return next(s.name for s in view.symbols() if s.shndx == 0 and s.name in exports and exports[s.name].gpl_only)


def hello_variants(family: dict[str, Path], foreign_key: tuple[object, object, bytes]) -> list[Variant]:
    """The hello family as built, and each case's edit of it."""
    hello = family["hello"].read_bytes()
    stripped = family["hello"].parent / "hello-stripped.ko"
    run(["objcopy", "--strip-all", family["hello"], stripped])
    key, cert, _der = foreign_key
    signed = modedit.sign(hello, key, cert)
    return [
        Variant("hello", "hello", hello, True),
        Variant("hello-stripped", "hello", stripped.read_bytes(), False, "ENOEXEC",
                "hello: module has no symbols (stripped?)"),
        Variant("hello-object", "hello", family["hello.o"].read_bytes(), False, "ENOEXEC",
                "(missing .modinfo section or name field): No module found in object"),
        Variant("hello-flags", "hello", modedit.set_modinfo(hello, "vermagic", FLAGS_MAGIC), False, "ENOEXEC",
                f"hello: version magic '{FLAGS_MAGIC}' should be '{KERNEL_MAGIC}'"),
        Variant("hello-crc-layout", "hello", modedit.set_version_crc(hello, "module_layout", 0x12345678), False,
                "ENOEXEC", "hello: disagrees about version of symbol module_layout"),
        Variant("hello-crc-printk", "hello", modedit.set_version_crc(hello, "_printk", 0x12345678), False, "EINVAL",
                "hello: disagrees about version of symbol _printk"),
        Variant("hello-release", "hello", modedit.set_modinfo(hello, "vermagic", OTHER_MAGIC), True),
        Variant("hello-release-noversions", "hello", modedit.drop_versions_alloc(
            modedit.set_modinfo(hello, "vermagic", OTHER_MAGIC)), False, "ENOEXEC",
            f"hello: version magic '{OTHER_MAGIC}' should be '{KERNEL_MAGIC}'"),
        # insmod ignores depends=; modprobe follows modules.dep, which depmod builds from symbols.
        Variant("hello-depends-missing", "hello", modedit.rewrite_modinfo(hello, {"depends": "eulerbake_nosuch"}),
                True),
        Variant("hellobuiltin-depends", "hellobuiltin",
                modedit.rewrite_modinfo(family["hellobuiltin"].read_bytes(), {"depends": "crc-ccitt"}), True),
        Variant("hellogpl", "hellogpl", family["hellogpl"].read_bytes(), True),
        Variant("hellogpl-bsd", "hellogpl", modedit.set_modinfo(family["hellogpl"].read_bytes(), "license", "BSD"),
                False, "ENOENT", "hellogpl: Unknown symbol ktime_get (err -2)"),
        Variant("hellons", "hellons", family["hellons"].read_bytes(), True),
        Variant("hellons-noimport", "hellons", modedit.rewrite_modinfo(family["hellons"].read_bytes(),
                                                                       {"import_ns": None}), False, "EINVAL",
                "hellons: module uses symbol (dma_buf_put) from namespace DMA_BUF, but does not import it."),
        Variant("helloweak", "helloweak", family["helloweak"].read_bytes(), True),
        # Signed by a key the kernel does not know: ENOKEY is not fatal, the module loads (tainting) —
        # and so does an edited copy, whose signature the kernel cannot check.
        Variant("hello-foreign-signed", "hello", signed, True),
        Variant("hello-foreign-signed-edited", "hello", modedit.set_modinfo(signed, "vermagic", OTHER_MAGIC), True),
    ]


def arch_variants(directory: Path) -> list[Variant]:
    """Objects of other machines, classes and byte orders, as the x86_64 loader reads their headers."""
    arm64 = compile_fake_module(directory, "aarch64-linux-gnu-gcc")
    arm64_be = compile_fake_module(directory, "aarch64-linux-gnu-gcc", "-mbig-endian")
    i386 = compile_fake_module(directory, "gcc", "-m32")
    return [
        Variant("arm64-module", "armtest", arm64.read_bytes(), False, "ENOEXEC",
                "Invalid architecture in ELF header: 183"),
        Variant("arm64be-module", "armtest", arm64_be.read_bytes(), False, "ENOEXEC",
                "Invalid ELF header type: 256 != 1"),
        Variant("i386-module", "armtest", i386.read_bytes(), False, "ENOEXEC",
                "Invalid architecture in ELF header: 3"),
    ]


def built_ena_variants(ena: bytes) -> list[Variant]:
    """Our ENA, built from linux-source with overlays/patches/ena-linux-6.1 (its init prints the version)."""
    return [
        Variant("ena", "ena", ena, True, "", "ena: Elastic Network Adapter (ENA) v2.1.0K"),
        Variant("ena-license", "ena", modedit.set_modinfo(ena, "license", "GP"), False, "ENOENT",
                f"ena: Unknown symbol {_first_gpl_only_import(ena)} (err -2)"),
    ]


def enforcing_variants(family: dict[str, Path], shipped: bytes,
                       foreign_key: tuple[object, object, bytes]) -> list[Variant]:
    """Booted with module.sig_enforce=1: only modules signed by a trusted key load."""
    hello = family["hello"].read_bytes()
    key, cert, _der = foreign_key
    return [
        Variant("enforce-debian-ena", "ena", shipped, True),
        Variant("enforce-hello", "hello", hello, False, "EKEYREJECTED", "Loading of unsigned module is rejected"),
        Variant("enforce-hello-foreign-signed", "hello", modedit.sign(hello, key, cert), False, "EKEYREJECTED",
                "Loading of module with unavailable key is rejected"),
    ]

