"""openEuler cloud-image recipes: the offline sample and the release matrix, as derivation graphs.

Stage graph per cell (`<release>:<arch>`), one module per stage in `recipes/stages/`:

    fetch (qcow2.xz) → unpack → image-modules ─┐
    fetch (kernel-devel) → kernel-headers ──────┼→ kmod-build → kmod-check ─┐   (when the cell gets the
    fetch (amzn-drivers) ───────────────────────┘                           ├→ raw   ENA module: `ena`)
    overlays/ena, image hygiene (stages/hygiene.py) ────────────────────────┘
    raw → boot (QEMU proof) ┄┄→ ami (Publication, EBS direct or S3 import) ─→ packer-template → packer-ami
    kickstart → packer-maas (DVD ISO, qemu) → boot (`…:maas`) + maas-tgz → maas-upload (Publication)

Publications are never default targets; their targets (region, profile, MAAS profile) come from
`[tool.eulerbake.aws]` / `[tool.eulerbake.maas]`. `packer-ami` is in the graph once a builder key exists
(`EULERBAKE_PACKER_KEY_FILE`, or the state key made by the packer stages), since making one runs a tool.

The sample (`sample:x86_64`, `sample:aarch64`, `recipes/sample.py`) is openEuler-shaped but made here,
offline; its x86_64 cell carries the host's Debian kernel so the ENA module and its gate run for real.
What a user tunes per cell (sizes, `ena`, hygiene items) comes from `[tool.eulerbake]` in pyproject.toml
(`recipes/config.py`, `eulerbake config show [TASK]`). `eulerbake lock` pins into `LOCK_PATH` the sources
that `lock_targets` (or the tasks it is given) reach, with the requests `pin_requests` describes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eulerbake.core.derivation import Derivation, LocalTree, Node
from eulerbake.core.errors import EulerbakeError

from recipes import commands, config, releases
from recipes.publish.aws import ami
from recipes.publish.maas import maas_upload, release_name, release_title
from recipes.releases import LOCK_PATH, pin_requests
from recipes.sample import sample_targets
from recipes.stages.authorized_key_overlay import authorized_key_overlay
from recipes.stages.boot import boot
from recipes.stages.builder_key import builder_key_path, normalise_public_key
from recipes.stages.image_modules import image_modules
from recipes.stages.kernel_headers import kernel_headers
from recipes.stages.kickstart import kickstart
from recipes.stages.kmod_build import kmod_build, patch_series
from recipes.stages.kmod_check import kmod_check
from recipes.stages.maas_tgz import maas_tgz
from recipes.stages.packer_ami import packer_ami
from recipes.stages.packer_maas import packer_maas
from recipes.stages.packer_template import packer_template
from recipes.stages.raw import raw

__all__ = ["COMMANDS", "LOCK_PATH", "cell_targets", "default_targets", "lock_targets", "pin_requests",
           "publish_targets", "release_targets", "sample_targets", "targets"]

OVERLAYS = Path(__file__).resolve().parent.parent / "overlays"
# ena = "auto": the cells whose kernel lacks the ENA driver (the seed: openEuler's aarch64 kernels).
ENA_MODULE_ARCHES = ("aarch64",)

# `eulerbake COMMAND …` for the commands these recipes add.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "config": config.config_main,
    "user-data": commands.user_data_main,
    "packer-key": commands.packer_key_main,
}


def release_targets(rel: releases.Release) -> list[Derivation]:
    """The raw image of one matrix cell (with the ENA module where the cell's `ena` setting says so)."""
    return [_raw_of(rel.version, rel.arch)]


# One object per cell and settings: the graph never compares two raws by key (that would hash inputs).
_raws: dict[tuple[str, str, str], tuple[object, Derivation]] = {}


def _raw_of(version: str, arch: str, packer_key: str = "") -> Derivation:
    settings_now = config.load()
    cached = _raws.get((version, arch, packer_key))
    if cached is not None and cached[0] is settings_now:
        return cached[1]
    node = _make_raw(version, arch, packer_key)
    _raws[(version, arch, packer_key)] = (settings_now, node)
    return node


def _make_raw(version: str, arch: str, packer_key: str) -> Derivation:
    rel = releases.matrix([version], [arch])[0]
    settings = config.cell_settings(rel.version, rel.arch)
    qcow2 = releases.qcow2_image(rel)
    overlays: list[Derivation | LocalTree] = []
    if settings.ena_module(ENA_MODULE_ARCHES):
        headers = kernel_headers(rel.label, releases.kernel_devel_source(rel))
        ko = kmod_build(rel.label, source=releases.ena_source(), headers=headers,
                        patches=patch_series("ena"), module="ena", arch=rel.arch)
        modules = image_modules(rel.label, qcow2)
        overlays += [LocalTree(OVERLAYS / "ena"), kmod_check(rel.label, ko, headers, modules)]
    if packer_key:  # the base image Packer logs in to: root may log in with the builder key only
        return raw(f"{rel.label}:packer", qcow2, [*overlays, authorized_key_overlay(rel.label, packer_key)],
                   arch=rel.arch, **settings.raw_params())
    return raw(rel.label, qcow2, overlays, arch=rel.arch, **settings.raw_params())


def _packer_public_key() -> str:
    """The builder key's public half if one exists already ("" otherwise): reading it runs nothing."""
    try:
        public = builder_key_path(create=False)
    except EulerbakeError:
        return ""
    public = public.with_name(public.name + ".pub")
    return normalise_public_key(public.read_text(), str(public)) if public.is_file() else ""


def _aws_settings() -> dict[str, Any]:
    aws = dict(config.load().table("aws"))
    return {"region": str(aws.get("region", "us-east-1")), "profile": aws.get("profile"),
            "endpoint_url": aws.get("endpoint_url"), "via": str(aws.get("via", "ebs")), "bucket": aws.get("bucket"),
            "boot_check": config.switch(aws, (*config.TABLE, "aws"), "boot_check", True)}


def publish_targets(rel: releases.Release) -> list[Node]:
    """The publications of one cell: boot proof → AMI (→ Packer AMI), and the MAAS chain."""
    aws = _aws_settings()
    image = _raw_of(rel.version, rel.arch)
    proof = boot(rel.label, image, arch=rel.arch, expect_module="ena" if _has_ena(image) else None)
    name = f"openEuler-{rel.version}-{rel.arch}"
    common = {key: aws[key] for key in ("region", "profile", "endpoint_url", "via", "bucket")}
    nodes: list[Node] = [proof, ami(rel.label, image, name=name, arch=rel.arch, release=rel.version,
                                    boot_check=proof if aws["boot_check"] else None, **common)]
    key = _packer_public_key()
    if key:
        base = ami(f"{rel.label}:packer-base", _raw_of(rel.version, rel.arch, key), name=f"{name}-packer-base",
                   arch=rel.arch, release=rel.version, **common)
        template = packer_template(rel.label, base, arch=rel.arch, region=aws["region"], ami_name=name,
                                   public_key=key)
        nodes.append(packer_ami(rel.label, template, profile=aws["profile"]))
    maas = dict(config.load().table("maas"))
    firmware = "bios" if rel.arch == "x86_64" else "uefi"
    answers = kickstart(rel.label, release=rel.version, arch=rel.arch, firmware=firmware)
    iso = releases.iso_source(rel)
    installed = packer_maas(rel.label, answers, release=rel.version, arch=rel.arch, iso_filename=rel.iso_filename,
                            iso_sha256=iso.sha256, iso=iso, build_image=True)
    tarball = maas_tgz(rel.label, installed, arch=rel.arch, firmware="both" if rel.arch == "x86_64" else "uefi",
                       compat=str(maas.get("compat", "id-like")))
    resource = str(maas.get("name", release_name(rel.version)))
    # The installed disk the tarball is packed from, booted the same way (no hygiene: maas-tgz does it).
    maas_proof = boot(f"{rel.label}:maas", installed, arch=rel.arch, expect_module=None)
    checked = config.switch(maas, (*config.TABLE, "maas"), "boot_check", True)
    nodes.append(maas_proof)
    nodes.append(maas_upload(rel.label, tarball, name=resource, title=release_title(rel.version), arch=rel.arch,
                             profile=str(maas.get("profile", "default")), boot_check=maas_proof if checked else None))
    return nodes


def _has_ena(image: Derivation) -> bool:
    return any(getattr(value, "stage", "") == "kmod-check" for value in image.inputs.values())


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


def targets() -> list[Node]:
    """Everything the project knows: the sample, every release × arch cell and their publications."""
    cells = releases.matrix()
    return [*sample_targets(), *lock_targets(None, None), *(node for rel in cells for node in publish_targets(rel))]
