"""Building real modules as derivations: Debian's ENA from linux-source, hello, headers from dpkg and RPM."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from eulerbake.core import hashing
from eulerbake.core.derivation import Derivation, FixedOutput, LocalFile, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.module import read_module
from eulerbake.store.local import Store
from eulerbake.tools.run import run
from recipes.sample import debian_ena_chain
from recipes.stages.kernel_headers import kernel_headers
from recipes.stages.kmod_build import apply_patch, kmod_build, patch_series
from recipes.stages.kmod_check import kmod_check
from tests.kmod import modedit
from tests.kmod.conftest import (
    HELLO_C,
    KREL,
    LABEL,
    OTHER_KREL,
    KmodBuilds,
    debian_kernel,
    file_derivation,
    image_modules_derivation,
    store_snapshot,
    write_hello_source,
)

pytestmark = [debian_kernel, pytest.mark.slow]


def test_ena_is_built_patched_and_cached(kmod_builds: KmodBuilds) -> None:
    ena = read_module(kmod_builds.ena_ko)
    # 0001 of overlays/patches/ena-linux-6.1 adds MODULE_VERSION: the series really went in.
    assert ena.modinfo["version"] == ["2.1.0K"]
    assert ena.vermagic == f"{KREL} SMP preempt mod_unload modversions " and ena.arch == "x86_64"
    info = json.loads((kmod_builds.path("ko") / "build-info.json").read_text())
    assert info["patches"] == [p.path.name for p in patch_series("ena-linux-6.1")]
    # The compiler and linker are the stage's tools: their versions are in the key, and the build records them.
    tools = kmod_builds.chain["ko"].manifest["tools"]
    # The version line of the binary gcc resolves to: "x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14) 12.2.0".
    assert "gcc" in tools["gcc"].split()[0] and tools["ld"].startswith("GNU ld ")
    assert info["toolchain"] == {"cc": tools["gcc"], "ld": tools["ld"]}
    # Debug info is stripped and no build path survives in the module.
    data = kmod_builds.ena_ko.read_bytes()
    assert b".debug_info" not in data and str(kmod_builds.store.root).encode() not in data
    # A second realisation builds nothing, and kbuild did not write into the headers it built against.
    again = [kmod_builds.store.realise(node, log=lambda _m: None) for node in kmod_builds.chain.values()]
    assert [r.built for r in again] == [False] * len(again)
    headers_meta = kmod_builds.store.read_meta(kmod_builds.store.meta_path(kmod_builds.chain["headers"]))
    assert kmod_builds.store.verify([headers_meta]) == []


def test_headers_tree_is_self_contained(kmod_builds: KmodBuilds) -> None:
    tree = kmod_builds.path("headers") / "build"
    assert (kmod_builds.path("headers") / "kernel-release").read_text().strip() == KREL
    # Debian's wrapper Makefile includes the -common tree: the merged tree carries the real one.
    assert "include /usr/src" not in (tree / "Makefile").read_text()
    assert (tree / "scripts/mod/modpost").is_file() and not (tree / "scripts").is_symlink()
    for link in (p for p in tree.rglob("*") if p.is_symlink()):
        assert link.resolve().is_relative_to(tree.resolve()), link
    # The key comes from dpkg's md5sums, not from hashing 16,000 files.
    headers = kmod_builds.chain["headers"].manifest["inputs"]["headers"]
    assert headers["kind"] == "dpkg-headers" and "blake3" not in headers
    assert set(headers["packages"][f"linux-headers-{KREL}"]) == {"root", "md5sums", "list"}


def test_builds_are_reproducible_in_another_store(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    """Another store root (another path length): every output hashes the same."""
    other = Store(tmp_path / "a-different" / "store-location")
    chain = debian_ena_chain(LABEL, KREL)
    hello_source = write_hello_source(tmp_path / "elsewhere" / "hello")
    hello = kmod_build(LABEL, source=LocalTree(hello_source), headers=chain["headers"], patches=[],
                       module="hello")
    for role, node in [*chain.items(), ("hello", hello)]:
        built = other.realise(node, log=lambda _m: None)
        assert built.built
        first = kmod_builds.realised[role].path
        assert hashing.hash_tree(built.path, use_cache=False) == hashing.hash_tree(first, use_cache=False), role


def kernel_devel_rpm(headers_tree: Path, workdir: Path) -> Path:
    """A kernel-devel RPM laid out like openEuler's (/usr/src/kernels/<kver>/), built with rpmbuild."""
    spec = workdir / "kernel-devel.spec"
    spec.write_text(f"""\
Name: kernel-devel
Version: 6.1.0
Release: 56
Summary: kernel headers for building modules against {KREL}
License: GPL-2.0-only
AutoReqProv: no
%define __os_install_post %{{nil}}
%define _build_id_links none
%define _binary_payload w1.gzdio
%description
Test package.
%install
mkdir -p %{{buildroot}}/usr/src/kernels
cp -a {headers_tree} %{{buildroot}}/usr/src/kernels/{KREL}
chmod -R u+w %{{buildroot}}
%files
/usr/src/kernels/{KREL}
""")
    run(["rpmbuild", "-bb", "--define", f"_topdir {workdir / 'top'}", "--define", "_build_name_fmt %%{NAME}.rpm",
         spec])
    return workdir / "top" / "RPMS" / "kernel-devel.rpm"


def test_headers_from_a_kernel_devel_rpm(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    rpm = kernel_devel_rpm(kmod_builds.path("headers") / "build", tmp_path)
    headers = kernel_headers("rpm:x86_64", LocalFile(rpm))
    realised = kmod_builds.store.realise(headers, log=lambda _m: None)
    info = json.loads((realised.path / "headers.json").read_text())
    assert (info["release"], info["origin"]) == (KREL, "kernel-devel.rpm")
    hello = kmod_build("rpm:x86_64", source=LocalTree(kmod_builds.hello_source), headers=headers,
                       patches=[], module="hello")
    built = kmod_builds.store.realise(hello, log=lambda _m: None).path / "hello.ko"
    # Same headers, other packaging: the module is byte for byte the one built against the dpkg tree.
    assert built.read_bytes() == kmod_builds.hello_ko.read_bytes()


def test_overlay_with_the_image_modules_goes_through_depmod(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    image = image_modules_derivation()
    overlay = kmod_check(LABEL, kmod_builds.chain["ko"], kmod_builds.chain["headers"], image)
    out = kmod_builds.store.realise(overlay, log=lambda _m: None).path
    ko = out / "lib/modules" / KREL / "extra/ena.ko"
    assert ko.read_bytes() == kmod_builds.ena_ko.read_bytes()
    report = json.loads((out / "gate-report.json").read_text())
    assert report["passed"] and report["kernel"]["loads"] and report["module"]["path"] == "<ko>/ena.ko"
    assert str(kmod_builds.store.root) not in (out / "gate-report.json").read_text()
    # Laid over the image's modules, depmod (kmod) files it under extra/.
    root = tmp_path / "root"
    shutil.copytree(kmod_builds.store.realise(image, log=lambda _m: None).path / "lib", root / "lib")
    shutil.copytree(out / "lib", root / "lib", dirs_exist_ok=True)
    run(["depmod", "-b", root, KREL])
    assert "extra/ena.ko:" in (root / "lib/modules" / KREL / "modules.dep").read_text()


def test_gate_failure_stops_the_build_and_strict_is_policy(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    magic = f"{KREL} SMP preempt mod_unload modversions "
    release_only = tmp_path / "hello.ko"
    release_only.write_bytes(modedit.set_modinfo(kmod_builds.hello_ko.read_bytes(), "vermagic",
                                                 magic.replace(KREL, OTHER_KREL)))
    ko = file_derivation("release-only", release_only, "hello.ko", "hello")
    strict = kmod_check("release-only", ko, kmod_builds.chain["headers"], None)
    kmod_builds.store.realise(ko, log=lambda _m: None)
    before = store_snapshot(kmod_builds.store)
    with pytest.raises(EulerbakeError, match=r"(?s)policy \(strict\): built for release 6\.1\.0-99-amd64.*"
                       r"the kernel itself would load it"):
        kmod_builds.store.realise(strict, log=lambda _m: None)
    assert store_snapshot(kmod_builds.store) == before
    relaxed = kmod_check("release-only", ko, kmod_builds.chain["headers"], None, strict=False)
    assert kmod_builds.store.realise(relaxed, log=lambda _m: None).built


# -- bad inputs: one clear error each, nothing in the store -------------------------------------------


def failing_build(store: Store, node: Derivation, pattern: str) -> None:
    before = store_snapshot(store)
    with pytest.raises(EulerbakeError, match=pattern):
        store.realise(node, log=lambda _m: None)
    assert store_snapshot(store) == before
    assert not store.has(node)


def test_patch_that_does_not_apply_names_file_and_hunk(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    patch = tmp_path / "0001-wrong-context.patch"
    patch.write_text("--- a/hello.c\n+++ b/hello.c\n@@ -5,3 +5,3 @@ static int __init hello_init(void)\n"
                     " {\n-\tpr_info(\"hello: not what the file says\\n\");\n+\tpr_info(\"hi\\n\");\n \treturn 0;\n")
    node = kmod_build("badpatch", source=LocalTree(kmod_builds.hello_source),
                      headers=kmod_builds.chain["headers"], patches=[LocalFile(patch)], module="hello")
    failing_build(kmod_builds.store, node, r"(?s)patch 0001-wrong-context\.patch does not apply:.*hello\.c: hunk #1 "
                  r"\(at line 5\) failed: @@ -5,3 \+5,3 @@ static int __init hello_init")


def test_compiler_error_shows_the_end_of_the_log(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    source = write_hello_source(tmp_path / "broken", HELLO_C.replace("return 0;", "return undeclared_thing;"))
    node = kmod_build("broken", source=LocalTree(source), headers=kmod_builds.chain["headers"],
                      patches=[], module="hello")
    failing_build(kmod_builds.store, node, rf"(?s)building hello\.ko against kernel headers {re.escape(KREL)} failed.*"
                  r"hello\.c:\d+:\d+: error: .undeclared_thing. undeclared")


def test_headers_without_module_symvers_are_refused(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    tree = tmp_path / "headers"
    (tree / "include/generated").mkdir(parents=True)
    (tree / "include/generated/utsrelease.h").write_text(f'#define UTS_RELEASE "{KREL}"\n')
    (tree / ".config").write_text((kmod_builds.path("headers") / "build/.config").read_text())
    (tree / "Makefile").write_text("# headers without Module.symvers\n")
    node = kernel_headers("nosymvers", LocalTree(tree))
    failing_build(kmod_builds.store, node, r"kernel headers .*/headers have no Module\.symvers: the kernel's symbol "
                  r"CRCs \(modversions\) cannot be known")


def test_a_ko_that_is_not_elf_or_not_for_this_arch_is_refused(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    junk = tmp_path / "junk.ko"
    junk.write_text("#!/bin/sh\necho not a module\n")
    ko = file_derivation("junk", junk, "ena.ko", "ena")
    kmod_builds.store.realise(ko, log=lambda _m: None)
    failing_build(kmod_builds.store, kmod_check("junk", ko, kmod_builds.chain["headers"], None),
                  r"ena\.ko is not a kernel module: it is not an ELF file")
    arm = tmp_path / "arm.c"
    arm.write_text('static const char m[] __attribute__((section(".modinfo"), used)) = "name=ena";\n'
                   "int f(void) { return 0; }\n")
    run(["aarch64-linux-gnu-gcc", "-c", "-o", tmp_path / "arm.ko", arm])
    ko = file_derivation("arm", tmp_path / "arm.ko", "ena.ko", "ena")
    kmod_builds.store.realise(ko, log=lambda _m: None)
    failing_build(kmod_builds.store, kmod_check("arm", ko, kmod_builds.chain["headers"], None),
                  rf"AArch64 ELF64 little-endian module \(aarch64\) but kernel {KREL} is x86_64")


def test_definition_errors(tmp_path: Path) -> None:
    with pytest.raises(EulerbakeError, match="no patch series"):
        patch_series("no-such-series")
    with pytest.raises(EulerbakeError, match="unknown architecture 'sparc'"):
        kmod_build("x", source=LocalTree(tmp_path), patches=[], arch="sparc",
                   headers=file_derivation("x", Path(__file__), "x", "x"))
    with pytest.raises(EulerbakeError, match="does not exist"):
        kernel_headers("x", LocalTree(tmp_path / "missing"))
    with pytest.raises(EulerbakeError, match=r"(?s)headers of kernel 9\.9\.9-none.*apt-get install linux-headers-9"):
        debian_ena_chain("x", "9.9.9-none")


def test_module_from_a_pinned_tarball_in_amzn_drivers_layout(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    """A FixedOutput tarball (like amzn-drivers' tag archive): the module dir is found by its kbuild rule."""
    tree = tmp_path / "tarball" / "hello-drivers-1.0"
    module_dir = tree / "kernel" / "linux" / "hello"
    module_dir.mkdir(parents=True)
    (module_dir / "hello.c").write_text(HELLO_C)
    (module_dir / "Makefile").write_text("ifneq ($(KERNELRELEASE),)\nobj-m += hello.o\nelse\nall:\n"
                                         "\t$(MAKE) -C /lib/modules/$(shell uname -r)/build M=$(CURDIR) modules\n"
                                         "endif\n")
    (tree / "README").write_text("drivers\n")
    tarball = tmp_path / "hello-drivers-1.0.tar.gz"
    run(["tar", "-czf", tarball, "-C", tree.parent, tree.name])
    b3, sha = hashing.hash_file_pair(tarball, use_cache=False)
    source = FixedOutput(filename=tarball.name, urls=(tarball.as_uri(),), sha256=sha, blake3=b3,
                    size=tarball.stat().st_size, label="hello-drivers")
    node = kmod_build("tarball", source=source, headers=kmod_builds.chain["headers"], patches=[],
                      module="hello")
    built = kmod_builds.store.realise(node, log=lambda _m: None).path / "hello.ko"
    # Same source text, other packaging and place: the same module.
    assert built.read_bytes() == kmod_builds.hello_ko.read_bytes()


def test_amzn_drivers_series_is_a_well_formed_patch_for_the_ena_ops(kmod_builds: KmodBuilds, tmp_path: Path) -> None:
    """amzn-drivers cannot be downloaded here: overlays/patches/ena (written from the AMI notes against
    amzn-drivers 2.8.0) is only shown to be a valid -p1 patch that finds the same ethtool_ops lines in
    the in-tree ENA driver (at an offset) and casts the four function pointers."""
    source = tmp_path / "ena"
    shutil.copytree(kmod_builds.path("source"), source)
    for path in source.iterdir():
        path.chmod(0o644)
    for patch in patch_series("ena"):
        apply_patch(patch.path, source)
    text = (source / "ena_ethtool.c").read_text()
    for op in ("get_coalesce", "set_coalesce", "get_ringparam", "set_ringparam"):
        assert f"= (void *)ena_{op}," in text
