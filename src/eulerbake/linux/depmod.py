"""Kernel module indexes inside an image: which kernels have modules there, and depmod run on their tree.

depmod never runs against the image in place (it has no notion of a filesystem image): the module tree
is dumped with debugfs, depmod writes its indexes into the copy with the image's own depmod.d
configuration, and only the index files that changed are written back.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import ext4
from eulerbake.tools.run import run

MODULE_DIR_RE = re.compile(r"^/(?:usr/)?lib/modules/([^/]+)/")
# The suffixes linux.module reads too; named here so the stages that run depmod do not key on the ELF reader.
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
DEPMOD_INPUTS = ("modules.order", "modules.builtin", "modules.builtin.modinfo")


def module_releases(root: ext4.Ext4Image) -> list[str]:
    """Kernel releases with a module tree in the image (`/lib/modules/<release>/`)."""
    modules_dir = root.realpath("/lib/modules") or root.realpath("/usr/lib/modules")
    listing = (root.list_dir(modules_dir) if modules_dir else None) or {}
    return sorted(name for name, entry in listing.items() if entry.is_dir)


def kernel_releases_touched(paths: Iterable[str]) -> list[str]:
    """The kernel releases whose module tree (`/lib/modules/<release>/…`) one of `paths` lies in."""
    return sorted({match.group(1) for path in paths if (match := MODULE_DIR_RE.match(path))})


def refresh_module_indexes(root: ext4.Ext4Image, kernel_release: str, work: Path) -> list[str]:
    """Run depmod on a copy of the image's module tree and write the new indexes back.

    depmod reads the image's own depmod.d configuration (never the build host's). Modules missing
    from modules.order are appended to it, sorted, in the copy only, so depmod's output does not
    depend on directory order.
    """
    modules_dir = root.realpath(f"/lib/modules/{kernel_release}")
    if modules_dir is None:
        raise EulerbakeError(f"/lib/modules/{kernel_release} does not exist in the image")
    base = work / f"depmod-{kernel_release}"
    copy = root.dump_tree(modules_dir, base / "lib" / "modules")
    if copy.name != kernel_release:
        copy = copy.rename(copy.parent / kernel_release)
    config = base / "depmod.d"
    config.mkdir()
    for index, candidate in enumerate(("/usr/lib/depmod.d", "/lib/depmod.d", "/etc/depmod.d")):
        real = root.realpath(candidate)
        if real is not None:  # copied in this order, so /etc's file of the same name wins
            for conf in sorted(root.dump_tree(real, base / f"config-{index}").glob("*.conf")):
                shutil.copyfile(conf, config / conf.name)
    order_file = copy / "modules.order"
    listed = order_file.read_text().splitlines() if order_file.is_file() else []
    present = sorted(
        path.relative_to(copy).as_posix() for path in copy.rglob("*") if path.name.endswith(MODULE_SUFFIXES)
    )
    extra = [module for module in present if module not in set(listed)]
    order_file.write_text("".join(line + "\n" for line in [*listed, *extra]))
    run(["depmod", "-b", base, "-C", config, kernel_release])
    written = []
    for generated in sorted(copy.glob("modules.*")):
        if generated.name in DEPMOD_INPUTS:
            continue
        target = f"{modules_dir}/{generated.name}"
        existing = root.lstat(target)
        if existing is not None and existing.is_file and root.read_file(target) == generated.read_bytes():
            continue
        written.append(root.write_file(target, generated))
    return written
