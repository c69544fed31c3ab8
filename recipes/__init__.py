"""openEuler cloud-image recipes: the offline sample and the release matrix, as derivation graphs.

Stage graph per cell (`<release>:<arch>`), one module per stage in `recipes/stages/`:

    fetch (qcow2.xz) → unpack → image-modules ─┐
    fetch (kernel-devel) → kernel-headers ──────┼→ kmod-build → kmod-check ─┐   (when the cell gets the
    fetch (amzn-drivers) ───────────────────────┘                           ├→ raw   ENA module: `ena`)
    overlays/ena, image hygiene (stages/hygiene.py) ────────────────────────┘

The sample (`sample:x86_64`, `sample:aarch64`, `recipes/sample.py`) is openEuler-shaped but made here,
offline; its x86_64 cell carries the host's Debian kernel so the ENA module and its gate run for real.
What a user tunes per cell (sizes, `ena`, hygiene items) comes from `[tool.eulerbake]` in pyproject.toml
(`recipes/config.py`, `eulerbake config show [TASK]`). `eulerbake lock` pins into `LOCK_PATH` the sources
that `lock_targets` (or the tasks it is given) reach, with the requests `pin_requests` describes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from eulerbake.core.derivation import Derivation, LocalTree

from recipes import commands, config, releases
from recipes.releases import LOCK_PATH, pin_requests
from recipes.sample import sample_targets
from recipes.stages.image_modules import image_modules
from recipes.stages.kernel_headers import kernel_headers
from recipes.stages.kmod_build import kmod_build, patch_series
from recipes.stages.kmod_check import kmod_check
from recipes.stages.raw import raw

__all__ = ["COMMANDS", "LOCK_PATH", "cell_targets", "default_targets", "lock_targets", "pin_requests",
           "release_targets", "sample_targets", "targets"]

OVERLAYS = Path(__file__).resolve().parent.parent / "overlays"
# ena = "auto": the cells whose kernel lacks the ENA driver (the seed: openEuler's aarch64 kernels).
ENA_MODULE_ARCHES = ("aarch64",)

# `eulerbake COMMAND …` for the commands these recipes add.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "config": config.config_main,
    "user-data": commands.user_data_main,
}


def release_targets(rel: releases.Release) -> list[Derivation]:
    """The raw image of one matrix cell (with the ENA module where the cell's `ena` setting says so)."""
    settings = config.cell_settings(rel.version, rel.arch)
    qcow2 = releases.qcow2_image(rel)
    overlays: list[Derivation | LocalTree] = []
    if settings.ena_module(ENA_MODULE_ARCHES):
        headers = kernel_headers(rel.label, releases.kernel_devel_source(rel))
        ko = kmod_build(rel.label, source=releases.ena_source(), headers=headers,
                        patches=patch_series("ena"), module="ena", arch=rel.arch)
        modules = image_modules(rel.label, qcow2)
        overlays += [LocalTree(OVERLAYS / "ena"), kmod_check(rel.label, ko, headers, modules)]
    return [raw(rel.label, qcow2, overlays, arch=rel.arch, **settings.raw_params())]


def cell_targets(release: str, arch: str) -> list[Derivation]:
    """The targets of one cell, the sample's included (`eulerbake config show TASK` looks into them)."""
    if release == config.SAMPLE:
        return [target for target in sample_targets() if target.label == f"{release}:{arch}"]
    return release_targets(releases.matrix([release], [arch])[0])


def lock_targets(versions: Sequence[str] | None, arches: Sequence[str] | None) -> list[Derivation]:
    """What `eulerbake lock [RELEASE…] [--arch A]` pins the closure of: those cells' targets (default: all)."""
    result: list[Derivation] = []
    for rel in releases.matrix(versions, arches):
        result += release_targets(rel)
    return result


def default_targets() -> list[Derivation]:
    """What a bare `doit` builds: the offline sample."""
    return sample_targets()


def targets() -> list[Derivation]:
    """Everything the project knows: the sample and every release × arch cell."""
    return sample_targets() + lock_targets(None, None)
