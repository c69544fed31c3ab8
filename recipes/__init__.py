"""openEuler cloud-image recipes: the offline sample and the release matrix, as derivation graphs.

Stage graph per cell (`<release>:<arch>`), one module per stage in `recipes/stages/`:

    fetch (qcow2.xz) → unpack → image-modules ─┐
    fetch (kernel-devel) → kernel-headers ──────┼→ kmod-build → kmod-check ─┐
    fetch (amzn-drivers) ───────────────────────┘                           ├→ raw
    overlays/ena, image hygiene (stages/hygiene.py) ────────────────────────┘

The sample (`sample:x86_64`, `sample:aarch64`, `recipes/sample.py`) is openEuler-shaped but made here,
offline; its x86_64 cell carries the host's Debian kernel so the ENA module and its gate run for real.
`eulerbake lock` pins what `pin_requests` names into `LOCK_PATH` (`recipes/releases.py`).
"""

from __future__ import annotations

from pathlib import Path

from eulerbake.core.derivation import Derivation, LocalTree

from recipes import releases
from recipes.releases import LOCK_PATH, pin_requests
from recipes.sample import sample_targets
from recipes.stages.image_modules import image_modules
from recipes.stages.kernel_headers import kernel_headers
from recipes.stages.kmod_build import kmod_build, patch_series
from recipes.stages.kmod_check import kmod_check
from recipes.stages.raw import raw

__all__ = ["LOCK_PATH", "default_targets", "pin_requests", "release_targets", "sample_targets", "targets"]

OVERLAYS = Path(__file__).resolve().parent.parent / "overlays"
# Releases whose kernel lacks the ENA driver (the seed: openEuler's aarch64 kernels).
ENA_MODULE_ARCHES = ("aarch64",)


def release_targets(rel: releases.Release) -> list[Derivation]:
    """The raw image of one matrix cell (with the ENA module where its kernel lacks one)."""
    qcow2 = releases.qcow2_image(rel)
    overlays: list[Derivation | LocalTree] = []
    if rel.arch in ENA_MODULE_ARCHES:
        headers = kernel_headers(rel.label, releases.kernel_devel_source(rel))
        ko = kmod_build(rel.label, source=releases.ena_source(), headers=headers,
                        patches=patch_series("ena"), module="ena", arch=rel.arch)
        modules = image_modules(rel.label, qcow2)
        overlays += [LocalTree(OVERLAYS / "ena"), kmod_check(rel.label, ko, headers, modules)]
    return [raw(rel.label, qcow2, overlays, arch=rel.arch)]


def default_targets() -> list[Derivation]:
    """What a bare `doit` builds: the offline sample."""
    return sample_targets()


def targets() -> list[Derivation]:
    """Everything the project knows: the sample and every release × arch cell."""
    result = sample_targets()
    for rel in releases.matrix():
        result += release_targets(rel)
    return result
