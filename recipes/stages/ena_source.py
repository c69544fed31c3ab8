"""Stage `ena-source`: one directory (the in-tree ENA driver) out of a kernel source tarball.

The offline sample builds ENA from Debian's `linux-source` (a 132 MB .tar.xz): the in-tree driver is
the one source of ENA on the machine, and `kmod-build` takes it like any module source. Only the one
directory is extracted (tar with a wildcard: ~10 s), and the output is its plain tree.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalFile
from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.run import run

ENA_SUBDIR = "drivers/net/ethernet/amazon/ena"
TOOLS = ("tar",)


@dataclass(frozen=True)
class Params:
    subdir: str  # the directory of the kernel tree to take, e.g. drivers/net/ethernet/amazon/ena


def build(ctx: BuildContext) -> None:
    """Extract one directory of a kernel tarball (tar with a wildcard: ~10 s for Debian's 132 MB .tar.xz)."""
    params: Params = ctx.params
    tarball = ctx.inputs["tarball"]
    subdir = params.subdir.strip("/")
    ctx.log(f"extracting {subdir} from {tarball.name}")
    proc = run(["tar", "-xf", tarball, "-C", ctx.work, "--wildcards", f"*/{subdir}/*"], check=False)
    found = sorted(ctx.work.glob(f"*/{subdir}"))
    if proc.returncode != 0 or len(found) != 1:
        raise EulerbakeError(
            f"{tarball.name} has no {subdir}/ (tar: {proc.stderr.decode(errors='replace').strip()[-300:]})",
            hint="use a kernel source tarball such as Debian's /usr/src/linux-source-<ver>.tar.xz",
        )
    shutil.copytree(found[0], ctx.out, dirs_exist_ok=True, symlinks=True)
    ctx.log(f"{len(list(ctx.out.iterdir()))} files from {found[0].relative_to(ctx.work)}")


def ena_source(label: str, tarball: LocalFile | FixedOutput, *, subdir: str = ENA_SUBDIR) -> Derivation:
    """Stage `ena-source:<label>`: `subdir` (the ENA driver) out of a kernel source tarball (Debian linux-source)."""
    return Derivation(
        stage="ena-source",
        label=label,
        builder=build,
        inputs={"tarball": tarball},
        params=Params(subdir=subdir),
        tools=TOOLS,
        doc=f"extract {subdir} from the kernel source tarball",
    )
