"""Where a kernel target comes from: each `--kernel` path recognised, read as what it is, and combined.

A path is one of: a headers tree (`include/generated/utsrelease.h`, or a store output with it under
`build/`), an installed modules directory (`lib/modules/<kver>/` or a root holding one — read as
modules, its `build` symlink never followed: give `<moddir>/build` itself to use the headers), or a
kernel image (`/boot/vmlinuz-<kver>`). A modules directory inside a root also reads that root's
`/boot/vmlinuz-<kver>` (release check, trusted certificates, vmlinux's exports). Disk images are
unpacked by the CLI first (`cli/kmod.py`) and then read as a root.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.kimage import looks_like_kernel_image, read_kernel_image
from eulerbake.linux.target import KernelTarget, find_modules_dir, load_certificates


def kind_of(path: Path) -> str:
    """Which kind of kernel description `path` is (no file is read beyond a few header bytes)."""
    if not path.exists():
        raise EulerbakeError(f"kernel {path} does not exist",
                             hint="give a headers dir, lib/modules/<kver>, /boot/vmlinuz-<kver> or a disk image")
    if path.is_file():
        return "kernel-image" if looks_like_kernel_image(path) else "disk-image"
    if (path / "modules.dep").is_file() or (path / "modules.order").is_file():
        return "modules-dir"
    if (path / "include" / "generated" / "utsrelease.h").is_file():
        return "headers"
    if (path / "build" / "include" / "generated" / "utsrelease.h").is_file() and not (path / "lib").is_dir():
        return "headers"  # a kernel-headers store output: build/ + kernel-release
    find_modules_dir(path)  # a root or store output holding lib/modules/<kver>, or a clear error
    return "modules-dir"


def from_kernel_image(path: Path) -> KernelTarget:
    """A target from a kernel image alone: release, vermagic, trusted certificates, vmlinux's exports."""
    image = read_kernel_image(path)
    if image.arch is None:
        raise EulerbakeError(f"cannot tell the architecture of kernel image {path}",
                             hint="give the kernel headers or the modules directory of that kernel too")
    config = image.config
    words = image.vermagic.split(" ")[1:] if image.vermagic else []
    crcs = image.exports is not None and any(e.crc is not None for e in image.exports.values())
    where = f"kernel-image {path}"
    origin = {"release": where, "certificates": f"{where} (built-in trusted keys)"}
    if image.vermagic:
        origin["flags"] = f"{where} (VERMAGIC_STRING)"
    if image.exports is not None:
        origin["exports"] = f"{where} (vmlinux __ksymtab/__kcrctab)"
    if config is not None:
        origin["config"] = f"{where} (CONFIG_IKCONFIG)"

    def option(name: str) -> bool | None:
        return None if config is None else config.get(name) == "y"

    return KernelTarget(
        release=image.release,
        vermagic=image.vermagic,
        arch=image.arch,
        modversions="modversions" in words if image.vermagic else crcs,
        force_load=option("CONFIG_MODULE_FORCE_LOAD"),
        missing_namespace_allowed=option("CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS"),
        sig_enforce=option("CONFIG_MODULE_SIG_FORCE"),
        vmlinux_exports=image.exports,
        certificates=image.certificates,
        origin=origin,
        sources=[{"kind": "kernel-image", "path": str(path)}],
    )


def read_kernel(path: Path) -> KernelTarget:
    """One `--kernel` path, read as what it is."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "headers":
        return KernelTarget.from_headers(path)
    if kind == "kernel-image":
        return from_kernel_image(path)
    if kind == "disk-image":
        raise EulerbakeError(f"{path} is a disk image (or no kernel file this gate knows)",
                             hint="eulerbake kmod check reads disk images; or give its lib/modules/<kver> directory")
    target = KernelTarget.from_modules_dir(path)
    moddir, root = find_modules_dir(path)
    vmlinuz = root / "boot" / f"vmlinuz-{moddir.name}" if root is not None else None
    if vmlinuz is not None and vmlinuz.is_file() and looks_like_kernel_image(vmlinuz):
        target = target.combine(from_kernel_image(vmlinuz))
    return target


def load_target(kernels: Iterable[Path], signing_certs: Sequence[Path] = ()) -> KernelTarget:
    """A target from headers trees, modules directories and kernel images, combined in the order given."""
    target: KernelTarget | None = None
    for path in kernels:
        found = read_kernel(Path(path))
        target = found if target is None else target.combine(found)
    if target is None:
        raise EulerbakeError("no kernel given to check against", hint="--kernel HEADERS|MODULES-DIR|VMLINUZ|IMAGE")
    return trust_certificates(target, signing_certs)


def trust_certificates(target: KernelTarget, signing_certs: Sequence[Path]) -> KernelTarget:
    """Add `--signing-cert` files to the keys the target trusts (as a MOK or secondary keyring would)."""
    for cert in signing_certs:
        target.certificates = tuple(dict.fromkeys(target.certificates + load_certificates(Path(cert))))
        target.origin["certificates"] = ", ".join(filter(None, [target.origin.get("certificates"),
                                                                f"signing-cert {cert}"]))
    return target
