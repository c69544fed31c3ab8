"""Fixtures for the kernel-module tests: Debian's real kernel (headers, source, image) and built modules.

No openEuler download is possible here, so the tests use Debian 12's linux-headers/linux-image/
linux-source packages: real headers with a real Module.symvers, a real kernel to boot under QEMU,
and the real in-tree ENA source. Built artefacts are shared by the whole session through one store.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from eulerbake.core.derivation import BuildContext, Derivation, LocalFile, LocalTree
from eulerbake.store.local import Realised, Store
from eulerbake.tools.run import run
from recipes.sample import debian_ena_chain, sample_kernel_release
from recipes.stages.kmod_build import kmod_build

# The host's Debian kernel (linux-headers-amd64 / linux-image-amd64 follow Debian's current ABI).
KREL = sample_kernel_release()
OTHER_KREL = re.sub(r"-\d+-", "-99-", KREL, count=1)  # same version, another ABI: "6.1.0-99-amd64"
HEADERS_DIR = Path(f"/usr/src/linux-headers-{KREL}")
LINUX_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
MODULES_DIR = Path(f"/lib/modules/{KREL}")
VMLINUZ = Path(f"/boot/vmlinuz-{KREL}")
SHIPPED_ENA = MODULES_DIR / "kernel/drivers/net/ethernet/amazon/ena/ena.ko"
LABEL = "test:x86_64"

HELLO_C = """\
// SPDX-License-Identifier: GPL-2.0
#include <linux/init.h>
#include <linux/module.h>

static int __init hello_init(void)
{
	pr_info("hello: loaded\\n");
	return 0;
}

static void __exit hello_exit(void)
{
	pr_info("hello: unloaded\\n");
}

module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("eulerbake test module");
"""

debian_kernel = pytest.mark.skipif(
    not (HEADERS_DIR.is_dir() and MODULES_DIR.is_dir() and LINUX_SOURCE.is_file() and VMLINUZ.is_file()),
    reason=f"needs Debian's linux-headers-{KREL}, linux-image-{KREL} and linux-source-6.1",
)


def store_snapshot(store: Store) -> set[str]:
    """Committed entries plus anything left in the build area: must not change when a build fails."""
    if not store.root.is_dir():
        return set()
    names = {p.name for p in store.root.iterdir() if not p.name.startswith(".")}
    tmp = store.root / ".tmp"
    return names | ({f".tmp/{p.name}" for p in tmp.iterdir()} if tmp.is_dir() else set())


def write_hello_source(directory: Path, c_source: str = HELLO_C) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hello.c").write_text(c_source)
    (directory / "Kbuild").write_text("obj-m += hello.o\n")
    return directory


def build_copied_file(ctx: BuildContext) -> None:
    """Test builder: the output holds one given file under a given name (a stand-in ko derivation)."""
    shutil.copyfile(ctx.inputs["file"], ctx.out / ctx.params["filename"])


def file_derivation(label: str, path: Path, filename: str, module: str) -> Derivation:
    return Derivation(stage="test-file", label=label, builder=build_copied_file, inputs={"file": LocalFile(path)},
                      params={"filename": filename, "module": module})


def build_image_modules(ctx: BuildContext) -> None:
    """Test builder: what the image stage hands over, lib/modules/<kver>/ (a few real modules) + kernel-release."""
    release = ctx.params["release"]
    moddir = ctx.out / "lib" / "modules" / release
    for relative in ctx.params["modules"]:
        (moddir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ctx.inputs[relative.rsplit("/", 1)[-1]], moddir / relative)
    shutil.copyfile(MODULES_DIR / "modules.builtin", moddir / "modules.builtin")
    run(["depmod", "-b", ctx.out, release])
    (ctx.out / "kernel-release").write_text(release + "\n")


IMAGE_MODULES = ["kernel/drivers/net/mdio.ko", "kernel/drivers/net/dummy.ko",
                 "kernel/drivers/net/ethernet/intel/e1000/e1000.ko"]


def image_modules_derivation(label: str = LABEL) -> Derivation:
    return Derivation(
        stage="test-image-modules", label=label, builder=build_image_modules,
        inputs={rel.rsplit("/", 1)[-1]: LocalFile(MODULES_DIR / rel) for rel in IMAGE_MODULES},
        params={"release": KREL, "modules": IMAGE_MODULES}, tools=("depmod",),
    )


@dataclass
class KmodBuilds:
    """The session's store and the realised ENA chain + hello module."""

    store: Store
    chain: dict[str, Derivation]
    hello: Derivation
    hello_source: Path
    realised: dict[str, Realised]

    def path(self, role: str) -> Path:
        return self.realised[role].path

    @property
    def ena_ko(self) -> Path:
        return self.path("ko") / "ena.ko"

    @property
    def hello_ko(self) -> Path:
        return self.path("hello") / "hello.ko"


@pytest.fixture(scope="session")
def kmod_builds(tmp_path_factory: pytest.TempPathFactory) -> KmodBuilds:
    """Build once per session: Debian headers, ENA from linux-source (patched), hello."""
    base = tmp_path_factory.mktemp("kmod")
    store = Store(base / "store")
    chain = debian_ena_chain(LABEL, KREL)
    hello_source = write_hello_source(base / "hello-src")
    hello = kmod_build(LABEL, source=LocalTree(hello_source), headers=chain["headers"], patches=[],
                       module="hello")
    realised = {role: store.realise(node, log=lambda _m: None) for role, node in [*chain.items(), ("hello", hello)]}
    return KmodBuilds(store, chain, hello, hello_source, realised)


@pytest.fixture(scope="session")
def hello_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """hello and its siblings (GPL-only, namespaced, weak, built-in imports), built with one kbuild run."""
    from tests.kmod.variants import build_hello_family

    return build_hello_family(tmp_path_factory.mktemp("hello-family"), HEADERS_DIR)


@pytest.fixture(scope="session")
def foreign_key() -> tuple[object, object, bytes]:
    """(key, certificate, DER) of a signing key no kernel here trusts."""
    from tests.kmod.modedit import make_signing_key

    return make_signing_key()
