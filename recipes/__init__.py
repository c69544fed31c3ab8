"""openEuler cloud-image recipes: the offline sample and the release matrix, as derivation graphs.

Stage graph per cell (`<release>:<arch>`):

    fetch (qcow2.xz) → unpack → image-modules ─┐
    fetch (kernel-devel) → kernel-headers ──────┼→ kmod-ena → kmod-check ─┐
    fetch (amzn-drivers) ───────────────────────┘                         ├→ raw
    overlays/ena, overlays/hygiene (built in) ────────────────────────────┘

The sample (`sample:x86_64`, `sample:aarch64`) is openEuler-shaped but made here, offline; its
x86_64 cell carries the host's Debian kernel so the ENA module and its gate run for real.
"""

from __future__ import annotations

import functools
from pathlib import Path

from eulerbake.core.derivation import Derivation, LocalTree
from recipes import image, kmod, releases, sample

OVERLAYS = Path(__file__).resolve().parent.parent / "overlays"
# Releases whose kernel lacks the ENA driver (the seed: openEuler's aarch64 kernels).
ENA_MODULE_ARCHES = ("aarch64",)


def sample_targets() -> list[Derivation]:
    """raw:sample:x86_64 (with a real ENA ko built against the host kernel) and raw:sample:aarch64."""
    return list(_sample_targets())


@functools.cache  # asked for by both targets() and default_targets(); looking up dpkg's lists costs ~30 ms
def _sample_targets() -> tuple[Derivation, ...]:
    targets = []
    for arch in ("x86_64", "aarch64"):
        label = f"sample:{arch}"
        qcow2 = sample.sample_qcow2(arch)
        overlays: list[Derivation | LocalTree] = [LocalTree(OVERLAYS / "ena")]
        if arch == "x86_64":
            modules = image.image_modules(label, qcow2)
            chain = kmod.debian_ena_chain(label, sample.sample_kernel_release(), image_modules=modules)
            overlays.append(chain["overlay"])
        targets.append(image.raw_image(label, qcow2, overlays, arch=arch))
    return tuple(targets)


def release_targets(rel: releases.Release) -> list[Derivation]:
    """The raw image of one matrix cell (with the ENA module where its kernel lacks one)."""
    qcow2 = releases.qcow2_image(rel)
    overlays: list[Derivation | LocalTree] = []
    if rel.arch in ENA_MODULE_ARCHES:
        headers = kmod.kernel_headers(rel.label, releases.kernel_devel_source(rel))
        ko = kmod.kmod_build(rel.label, source=releases.ena_source(), headers=headers,
                             patches=kmod.patch_series("ena"), module="ena", arch=rel.arch)
        modules = image.image_modules(rel.label, qcow2)
        overlays += [LocalTree(OVERLAYS / "ena"), kmod.kmod_overlay(rel.label, ko, headers, modules)]
    return [image.raw_image(rel.label, qcow2, overlays, arch=rel.arch)]


def default_targets() -> list[Derivation]:
    """What a bare `doit` builds: the offline sample."""
    return sample_targets()


def targets() -> list[Derivation]:
    """Everything the project knows: the sample and every release × arch cell."""
    result = sample_targets()
    for rel in releases.matrix():
        result += release_targets(rel)
    return result
