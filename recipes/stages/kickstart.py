"""Stage `kickstart`: the anaconda kickstart installing openEuler for MAAS, checked by pykickstart before a VM boots.

    kickstart:<release>:<arch>  overlays/kickstart (rhel8.ks.j2 + openeuler.ks.j2) → openeuler.ks

The seed's kickstart is packer-maas's rhel8.ks "minus what fails on openEuler". Here rhel8.ks is the jinja2
base (`rhel8.ks.j2`, one block per section: install source, poweroff, firewall, lang/keyboard, network,
selinux, timezone, root locked, partitioning, boot loader, %post, %packages with cloud-init, grub2 with its
EFI modules, shim and efibootmgr) and `openeuler.ks.j2` overrides the sections that differ (no AppStream
repository, openEuler's package names, the boot loader for a UEFI install without an ESP).

The rendered text is validated inside the stage as `ksvalidator` does (pykickstart's RHEL8 handler, parse
warnings are errors): an invalid kickstart fails the stage with pykickstart's own message and line, in a
fraction of a second, instead of an installer that stops 20 minutes into a Packer build.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from eulerbake.core.derivation import BuildContext, Derivation, LocalTree
from eulerbake.core.errors import EulerbakeError

TEMPLATES = Path(__file__).resolve().parents[2] / "overlays" / "kickstart"
OUTPUT = "openeuler.ks"
SERIAL_CONSOLES = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}
# Both boot loaders on x86_64, so one installed image serves BIOS and UEFI machines (maas-tgz firmware=both).
BOOT_PACKAGES = {
    "x86_64": ("grub2-pc", "grub2-pc-modules", "grub2-efi-x64", "grub2-efi-x64-modules", "shim"),
    "aarch64": ("grub2-efi-aa64", "grub2-efi-aa64-modules", "shim"),
}
TOOLS: tuple[str, ...] = ()  # rendering and validating run in Python


@dataclass(frozen=True)
class Params:
    release: str  # e.g. 22.03-LTS-SP4
    arch: str
    firmware: str  # bios or uefi: how the installing VM boots (the boot loader section depends on it)
    template: str  # the overlay template to render
    disk: str  # the installing VM's disk (vda with virtio)
    lang: str
    keyboard: str
    timezone: str
    selinux: str  # enforcing, permissive or disabled
    serial_console: str
    boot_packages: tuple[str, ...]
    extra_packages: tuple[str, ...]
    ignore_missing: bool  # %packages --ignoremissing: openEuler's package names differ between releases


def validate_kickstart(text: str, name: str = OUTPUT) -> None:
    """Parse `text` with pykickstart's RHEL8 handler as ksvalidator does; raise its message, line included."""
    # Imported when validating: every doit run imports the recipes, and pykickstart (with requests) is slow to load.
    from pykickstart.errors import KickstartError, KickstartParseWarning
    from pykickstart.parser import KickstartParser
    from pykickstart.version import RHEL8, makeVersion

    parser = KickstartParser(makeVersion(RHEL8), followIncludes=False, errorsAreFatal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KickstartParseWarning)
        try:
            parser.readKickstartFromString(text)
        except (KickstartError, KickstartParseWarning) as err:
            lines = text.splitlines()
            lineno = getattr(err, "lineno", None)
            where = f"\n  line {lineno}: {lines[lineno - 1]}" if isinstance(lineno, int) and 0 < lineno <= len(lines) \
                else ""
            message = " ".join(str(err).split())
            raise EulerbakeError(
                f"pykickstart (RHEL8 handler) rejects {name}: {message}{where}",
                hint="fix the template in overlays/kickstart (check it with: ksvalidator -v RHEL8 <file>)",
            ) from None


def render(params: Params, templates: str, label: str) -> str:
    import jinja2  # only when building: every doit run imports the recipes

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    try:
        return env.get_template(params.template).render(
            title=f"openEuler {params.release} {params.arch} for MAAS", label=label, template=params.template,
            firmware=params.firmware, disk=params.disk, lang=params.lang, keyboard=params.keyboard,
            timezone=params.timezone, selinux=params.selinux, serial_console=params.serial_console,
            boot_packages=params.boot_packages, extra_packages=params.extra_packages,
            packages_options=" --ignoremissing" if params.ignore_missing else "",
        )
    except jinja2.TemplateError as err:
        where = f" (line {err.lineno})" if isinstance(err, jinja2.TemplateSyntaxError) else ""
        raise EulerbakeError(f"cannot render overlays/kickstart/{params.template}{where}: {err}",
                             hint="fix the jinja2 template") from None


def build(ctx: BuildContext) -> None:
    """Render the overlay template and validate it with pykickstart (RHEL8): `openeuler.ks`."""
    params: Params = ctx.params
    text = render(params, str(ctx.inputs["templates"]), f"{params.release}:{params.arch}")
    validate_kickstart(text)
    (ctx.out / OUTPUT).write_text(text)
    ctx.log(f"kickstart: {OUTPUT} ({len(text.splitlines())} lines) passes pykickstart's RHEL8 handler")


def kickstart(
    label: str,
    *,
    release: str,
    arch: str,
    firmware: str = "",
    template: str = "openeuler.ks.j2",
    disk: str = "vda",
    lang: str = "en_US.UTF-8",
    keyboard: str = "us",
    timezone: str = "UTC",
    selinux: str = "enforcing",
    extra_packages: tuple[str, ...] = (),
    ignore_missing: bool = True,
) -> Derivation:
    """Stage `kickstart:<label>`: the validated openEuler kickstart; `firmware` defaults to the arch's
    (x86_64: bios, aarch64: uefi, the only one it has)."""
    if arch not in SERIAL_CONSOLES:
        raise EulerbakeError(f"unknown architecture {arch!r}", hint=f"use one of {', '.join(SERIAL_CONSOLES)}")
    firmware = firmware or ("bios" if arch == "x86_64" else "uefi")
    if firmware not in ("bios", "uefi") or (arch == "aarch64" and firmware == "bios"):
        raise EulerbakeError(f"firmware {firmware!r} cannot install {arch}", hint="use bios or uefi (aarch64: uefi)")
    if selinux not in ("enforcing", "permissive", "disabled"):
        raise EulerbakeError(f"unknown SELinux mode {selinux!r}", hint="use enforcing, permissive or disabled")
    return Derivation(
        stage="kickstart",
        label=label,
        builder=build,
        inputs={"templates": LocalTree(TEMPLATES)},
        params=Params(release=release, arch=arch, firmware=firmware, template=template, disk=disk, lang=lang,
                      keyboard=keyboard, timezone=timezone, selinux=selinux, serial_console=SERIAL_CONSOLES[arch],
                      boot_packages=BOOT_PACKAGES[arch], extra_packages=tuple(extra_packages),
                      ignore_missing=bool(ignore_missing)),
        tools=TOOLS,
        doc=f"openEuler {release} {arch} kickstart ({firmware}), validated with pykickstart RHEL8",
    )
