"""The offline sample release: the stage graph of `sample:x86_64` and `sample:aarch64`, with no download.

The sample is openEuler-shaped (stage `qcow2` makes its image) but carries the build host's Debian
kernel on x86_64, so the ENA module is built from Debian's `linux-source` against the installed
headers (keyed by dpkg, `DpkgHeaders`) and checked by the gate against a real kernel. There is no
arm64 kernel on an x86 builder: the aarch64 sample carries an openEuler 22.03 LTS release string.

Only wiring lives here: which stages, with which inputs. Nothing is run or read from a package
database while the graph is built; the host kernel's release comes from the installed headers' files.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from eulerbake.core.derivation import Derivation, LocalFile, LocalTree
from eulerbake.core.errors import EulerbakeError

from recipes import config
from recipes.stages.ena_source import ena_source
from recipes.stages.image_modules import image_modules
from recipes.stages.kernel_headers import DpkgHeaders, kernel_headers
from recipes.stages.kmod_build import host_arch, kmod_build, patch_series
from recipes.stages.kmod_check import kmod_check
from recipes.stages.qcow2 import qcow2
from recipes.stages.raw import raw

ENA_OVERLAY = Path(__file__).resolve().parent.parent / "overlays" / "ena"
ARCHES = ("x86_64", "aarch64")
# ena = "auto": the ENA module is built where the host has the kernel for it (x86_64: Debian's headers and
# linux-source); the aarch64 sample gets the driver settings only.
ENA_MODULE_ARCHES = ("x86_64",)
AARCH64_KERNEL_RELEASE = "5.10.0-60.18.0.50.oe2203.aarch64"
LINUX_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")


def sample_kernel_release() -> str:
    """The host kernel release the x86_64 sample carries, from the installed kernel headers.

    `include/generated/utsrelease.h` is the authority (`include/config/kernel.release` holds the
    upstream version on Debian); the matching /lib/modules directory must exist too.
    """
    found = []
    for header in sorted(Path("/usr/src").glob("linux-headers-*/include/generated/utsrelease.h")):
        match = re.search(r'UTS_RELEASE\s+"([^"]+)"', header.read_text())
        if match and Path("/lib/modules", match.group(1), "modules.order").is_file():
            found.append(match.group(1))
    if not found:
        raise EulerbakeError(
            "no kernel headers with matching modules found (looked for /usr/src/linux-headers-*/include/generated/"
            "utsrelease.h and /lib/modules/<release>/)",
            hint="apt-get install linux-headers-amd64 linux-image-amd64",
        )
    return found[-1]


def sample_qcow2(arch: str, *, kernel_release: str | None = None) -> Derivation:
    """The sample openEuler-shaped qcow2 for `arch` (task `qcow2:sample:<arch>`): the host kernel on x86_64."""
    release = kernel_release or (sample_kernel_release() if arch == "x86_64" else AARCH64_KERNEL_RELEASE)
    return qcow2(arch, kernel_release=release)


def debian_ena_chain(label: str, kernel_release: str, image_modules: Derivation | None = None, *,
                     linux_source: Path = LINUX_SOURCE) -> dict[str, Derivation]:
    """The sample's ENA chain on the host's Debian kernel (headers + linux-source): no download needed.

    Returns the derivations by role: headers, source, ko, overlay.
    """
    headers_dir = Path(f"/usr/src/linux-headers-{kernel_release}")
    if not headers_dir.is_dir():
        raise EulerbakeError(f"the sample needs the headers of kernel {kernel_release} ({headers_dir})",
                             hint=f"apt-get install linux-headers-{kernel_release} linux-source")
    if not linux_source.is_file():
        raise EulerbakeError(f"the sample builds ENA from {linux_source}", hint="apt-get install linux-source")
    headers = kernel_headers(label, DpkgHeaders(headers_dir))
    source = ena_source(label, LocalFile(linux_source))
    ko = kmod_build(label, source=source, headers=headers, patches=patch_series("ena-linux-6.1"),
                    module="ena", arch=host_arch(), make_vars={"CONFIG_ENA_ETHERNET": "m"})
    overlay = kmod_check(label, ko, headers, image_modules)
    return {"headers": headers, "source": source, "ko": ko, "overlay": overlay}


def sample_targets() -> list[Derivation]:
    """raw:sample:x86_64 (with a real ENA ko built against the host kernel) and raw:sample:aarch64.

    Their settings (sizes, ena, hygiene) come from the project's config, release `sample`.
    """
    return list(_sample_targets(*(config.cell_settings(config.SAMPLE, arch) for arch in ARCHES)))


# targets() and default_targets() both ask for the sample: handing out the same objects means the task
# graph never has to compare two keys to see they are one node (and computing a key runs tools).
@functools.cache
def _sample_targets(*settings: config.CellSettings) -> tuple[Derivation, ...]:
    targets = []
    for arch, cell in zip(ARCHES, settings, strict=True):
        label = f"sample:{arch}"
        image = sample_qcow2(arch)
        overlays: list[Derivation | LocalTree] = []
        if cell.ena == "on" and arch not in ENA_MODULE_ARCHES:
            origin = cell.get("ena").origin
            raise EulerbakeError(
                f"ena = on for {label} (from {origin}): the {arch} sample cannot carry an ENA module (the build "
                "host has no kernel of that architecture to build it for)",
                hint=f'set ena = "auto" or "off" for it: {config.key_path(*config.TABLE, "release", "sample", arch)} '
                "in pyproject.toml",
            )
        if cell.ena != "off":
            overlays.append(LocalTree(ENA_OVERLAY))  # modprobe/modules-load/depmod settings for the driver
        if cell.ena_module(ENA_MODULE_ARCHES):
            modules = image_modules(label, image)
            chain = debian_ena_chain(label, sample_kernel_release(), image_modules=modules)
            overlays.append(chain["overlay"])
        targets.append(raw(label, image, overlays, arch=arch, **cell.raw_params()))
    return tuple(targets)
