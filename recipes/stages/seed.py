"""The NoCloud seed, a helper of the `boot` stage (not a stage): a small FAT volume labelled `cidata`.

cloud-init's NoCloud datasource reads `user-data` and `meta-data` from any filesystem labelled `cidata`
(ds-identify accepts `CIDATA` too, which is how FAT stores a label). The templates live in `overlays/boot/`
(`*.j2`, rendered with jinja2); the volume is made rootless with mkfs.vfat + mcopy, 1 MiB of FAT12, with
its volume id from the derivation key and its times pinned, so a seed is the same bytes on every machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import vfat
from eulerbake.tools.run import run

TOOLS = ("mkfs.vfat", "mcopy")
LABEL = "CIDATA"
SIZE = 1024 * 1024
SEED_FILES = ("meta-data", "user-data")


def make_seed(image: Path, templates: Path, variables: Mapping[str, str], *, volume_id: str, epoch: int,
              staging: Path) -> None:
    """Render `<templates>/{user-data,meta-data}.j2` into `staging` and put them on a new FAT12 volume
    labelled CIDATA at `image` (mkfs.vfat + mcopy, no mount)."""
    import jinja2  # only when building: every doit run imports the recipes

    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    staging.mkdir(parents=True)
    for name in SEED_FILES:
        template = templates / f"{name}.j2"
        if not template.is_file():
            raise EulerbakeError(f"the NoCloud seed template {template} is missing",
                                 hint="restore overlays/boot/ (user-data.j2 and meta-data.j2)")
        (staging / name).write_text(environment.from_string(template.read_text()).render(variables))
    with image.open("wb") as handle:
        handle.truncate(SIZE)
    run(["mkfs.vfat", "-n", LABEL, "-i", volume_id, "--invariant", image],
        env={"SOURCE_DATE_EPOCH": str(epoch), "MTOOLSRC": os.devnull})
    vfat.copy_tree(image, staging, epoch)
