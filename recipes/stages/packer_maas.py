"""Stage `packer-maas`: the Packer qemu template that installs openEuler from its DVD with the kickstart.

    packer-maas:<release>:<arch>  kickstart + overlays/packer-maas → openeuler.pkr.hcl, openeuler.json, http/
                                  (build_image=True, with the ISO: + openEuler-<release>-<arch>.qcow2)

The seed's template: qemu builder, `inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/openeuler.ks`, headless,
`-serial stdio`, a 4G disk, 2048 MB, and `iso_checksum none` with VNC on 0.0.0.0. Here the checksum is the
ISO's pinned sha256 from sources.lock (a parameter: the template changes when the pin does), VNC listens on
127.0.0.1 unless told otherwise, and the firmware is explicit: BIOS (SeaBIOS, isolinux boot menu) or UEFI
with Debian's split firmware images in pflash, OVMF (package ovmf) for x86_64 and AAVMF
(qemu-efi-aarch64) for aarch64, whose variable store is copied per build. Both forms are written: HCL2 and
JSON (Debian's packer 1.6.6 reads both), and both pass `packer validate` inside the stage (0.15 s each);
packer's post-processors (qemu-nbd + mount + tar, as root) are gone: `maas-tgz` packs the installed disk.

With `build_image=True` and the ISO as an input the stage runs `packer build` (an hour or more; needs a
working KVM: here /dev/kvm is a software virtualiser, so use accelerator="tcg" and a lot of patience) and
its output also holds the installed disk as a qcow2, ready for `maas-tgz`.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, Input, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.run import CommandError, run

TEMPLATES = Path(__file__).resolve().parents[2] / "overlays" / "packer-maas"
HCL_TEMPLATE, JSON_TEMPLATE = "openeuler.pkr.hcl.j2", "openeuler.json.j2"
KICKSTART = "openeuler.ks"
SERIAL_CONSOLES = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}
QEMU_BINARIES = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}
# (code, variables template): Debian's ovmf and qemu-efi-aarch64 packages.
UEFI_FIRMWARE = {
    "x86_64": ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    "aarch64": ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
}
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
VAR_RE = re.compile(r"@(\w+)@")
PACKER_ENV = {"CHECKPOINT_DISABLE": "1", "PACKER_NO_COLOR": "1"}  # no call home, plain output
TOOLS = ("packer",)


@dataclass(frozen=True)
class Params:
    release: str
    arch: str
    firmware: str  # bios or uefi
    iso_filename: str
    iso_sha256: str  # the pin from sources.lock
    vnc_bind_address: str
    disk_size: str
    memory: int  # MiB
    cpus: int
    accelerator: str  # kvm or tcg
    headless: bool
    boot_wait: str
    shutdown_timeout: str
    qemu_binary: str
    machine_type: str
    efi_code: str  # "" for BIOS
    efi_vars_template: str
    boot_command: tuple[str, ...]
    qemuargs: tuple[tuple[str, ...], ...]  # `@name@` stands for a template variable (iso_url, efi_vars, …)
    build_image: bool
    build_timeout: int  # seconds


def boot_command(arch: str, firmware: str) -> tuple[str, ...]:
    """Keys typed at the DVD's boot menu: pick "Install", append the kickstart, serial and VNC consoles.

    BIOS: isolinux, <tab> edits the entry's line (packer-maas's rhel8). UEFI: grub, `e` edits the entry;
    from the initrd line, <left> lands at the end of the linux line; F10 boots (packer-maas's openeuler).
    """
    kickstart_url = "inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/" + KICKSTART
    consoles = f"console={SERIAL_CONSOLES[arch]} console=tty0"
    if firmware == "bios":
        return ("<up><tab> ", f"{kickstart_url} ", f"{consoles} inst.cmdline", "<enter>")
    return ("<up><wait>", "e", "<down><down><down><left>", f" {consoles} inst.cmdline {kickstart_url}<f10>")


def qemu_arguments(arch: str, firmware: str, accelerator: str) -> tuple[tuple[str, ...], ...]:
    """Extra qemu arguments: the serial console on stdio (the seed) and, for UEFI, the firmware in pflash.

    Packer adds its own disk, cdrom and network only when qemuargs name no -drive/-device of their own, so
    with pflash drives the disk (Packer's `{{ .OutputDir }}/{{ .Name }}`), the DVD and the NIC are listed here.
    """
    args: list[tuple[str, ...]] = [("-serial", "stdio")]
    if firmware == "bios":
        return tuple(args)
    code, _ = UEFI_FIRMWARE[arch]
    args += [
        ("-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}"),
        ("-drive", "if=pflash,format=raw,unit=1,file=@efi_vars@"),
        ("-drive", "file={{ .OutputDir }}/{{ .Name }},if=virtio,cache=writeback,discard=ignore,format=qcow2"),
    ]
    if arch == "x86_64":
        args.append(("-drive", "file=@iso_url@,media=cdrom,readonly=on"))
    else:  # the virt machine has no IDE: the DVD on virtio-scsi; USB keyboard and a GPU for boot_command over VNC
        args += [
            ("-boot", "strict=off"),
            ("-cpu", "host" if accelerator == "kvm" else "max"),
            ("-drive", "file=@iso_url@,if=none,id=cdrom0,media=cdrom,readonly=on"),
            ("-device", "virtio-scsi-pci,id=scsi0"),
            ("-device", "scsi-cd,drive=cdrom0,bootindex=0"),
            ("-device", "virtio-net-pci,netdev=user.0"),
            ("-device", "qemu-xhci"),
            ("-device", "usb-kbd"),
            ("-device", "virtio-gpu-pci"),
        ]
    return tuple(args)


def _hcl(value: Any) -> str:
    """An HCL2 literal (JSON syntax is HCL's), literal `${`/`%{` escaped, `@name@` → `${var.name}`."""
    text = json.dumps(value).replace("${", "$${").replace("%{", "%%{")
    return VAR_RE.sub(r"${var.\1}", text)


def _json_template(value: Any) -> str:
    """A JSON literal for Packer's JSON template, `@name@` → its user variable."""
    return VAR_RE.sub(lambda m: "{{user `" + m.group(1) + "`}}", json.dumps(value))


def render(params: Params, templates: Path, label: str) -> dict[str, str]:
    """{output name: text} of both templates."""
    import jinja2  # only when building: every doit run imports the recipes

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["hcl"] = _hcl
    env.filters["tojson_tpl"] = _json_template
    values = {
        "title": f"openEuler {params.release} {params.arch} ({params.firmware}) for MAAS", "label": label,
        "firmware": params.firmware, "iso_default": params.iso_filename, "iso_checksum": f"sha256:{params.iso_sha256}",
        "boot_command": list(params.boot_command), "boot_wait": params.boot_wait,
        "shutdown_timeout": params.shutdown_timeout, "headless": params.headless,
        "vnc_bind_address": params.vnc_bind_address, "qemu_binary": params.qemu_binary,
        "machine_type": params.machine_type, "accelerator": params.accelerator, "cpus": params.cpus,
        "memory": params.memory, "disk_size": params.disk_size, "vm_name": disk_name(params),
        "qemuargs": [list(arg) for arg in params.qemuargs], "efi_vars_template": params.efi_vars_template,
    }
    rendered = {}
    for template, output in ((HCL_TEMPLATE, "openeuler.pkr.hcl"), (JSON_TEMPLATE, "openeuler.json")):
        try:
            rendered[output] = env.get_template(template).render(template=template, **values)
        except jinja2.TemplateError as err:
            raise EulerbakeError(f"cannot render overlays/packer-maas/{template}: {err}",
                                 hint="fix the jinja2 template") from None
    json.loads(rendered["openeuler.json"])  # a template bug shows here, not as a packer parse error
    return rendered


def disk_name(params: Params) -> str:
    return f"openEuler-{params.release}-{params.arch}.qcow2"


def _packer(args: Sequence[str | Path], cwd: Path, work: Path, **kwargs: Any) -> None:
    # Packer talks to its builder plugins over unix sockets in TMPDIR, whose paths may not exceed 107 bytes:
    # the build's own scratch directory under the store is often deeper than that.
    sockets = Path(tempfile.mkdtemp(prefix="eulerbake-packer-"))
    env = {**PACKER_ENV, "HOME": str(work), "PACKER_CACHE_DIR": str(work / "packer_cache"), "TMPDIR": str(sockets)}
    try:
        run(["packer", *args], cwd=cwd, env=env, **kwargs)
    except CommandError as err:
        raise EulerbakeError(f"packer {args[0]} failed in {cwd.name}/:\n{err.output_tail.rstrip()}",
                             hint="fix overlays/packer-maas or the stage's parameters") from None
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def build(ctx: BuildContext) -> None:
    """Render both templates, copy the kickstart into http/, `packer validate` both; `packer build` if asked."""
    params: Params = ctx.params
    label = f"{params.release}:{params.arch}"
    if not params.iso_sha256:
        raise EulerbakeError(f"the openEuler {label} ISO is not pinned: the template would have no checksum",
                             hint=f"eulerbake lock {params.release} (sources.lock then holds its sha256)")
    (ctx.out / "http").mkdir()
    shutil.copyfile(ctx.inputs["kickstart"] / KICKSTART, ctx.out / "http" / KICKSTART)
    for name, text in render(params, ctx.inputs["templates"], label).items():
        (ctx.out / name).write_text(text)
    variables = ["-var", f"iso_url={params.iso_filename}"]
    for name in ("openeuler.pkr.hcl", "openeuler.json"):
        _packer(["validate", *variables, name], ctx.out, ctx.work)
    ctx.log(f"packer-maas: openeuler.pkr.hcl and openeuler.json pass packer validate ({params.firmware})")
    if params.build_image:
        _build_image(ctx, params)


def _build_image(ctx: BuildContext, params: Params) -> None:
    iso = ctx.inputs["iso"]
    build_dir = ctx.work / "packer"
    shutil.copytree(ctx.out, build_dir)
    output = ctx.work / "output"
    variables = ["-var", f"iso_url={iso}", "-var", f"output_directory={output}"]
    if params.firmware == "uefi":
        package = "ovmf" if params.arch == "x86_64" else "qemu-efi-aarch64"
        for firmware in (params.efi_code, params.efi_vars_template):
            if not Path(firmware).is_file():
                raise EulerbakeError(f"UEFI firmware {firmware} is missing", hint=f"apt-get install {package}")
        shutil.copyfile(params.efi_vars_template, ctx.work / "efivars.fd")
        variables += ["-var", f"efi_vars={ctx.work / 'efivars.fd'}"]
    log_file = ctx.work / "packer-build.log"
    ctx.log(f"packer-maas: packer build (installing openEuler {params.release} {params.arch}; log in {log_file})")
    with log_file.open("w") as log:
        def progress(line: str) -> None:  # packer's lines as they come: the install takes an hour or more
            log.write(line + "\n")
            log.flush()
            if line.strip():
                ctx.log(f"packer-maas: {line.strip()}")

        _packer(["build", *variables, "openeuler.pkr.hcl"], build_dir, ctx.work, on_line=progress,
                timeout=params.build_timeout)
    disk = output / disk_name(params)
    if not disk.is_file():
        raise EulerbakeError(f"packer build left no {disk.name} in {output}", hint=f"read {log_file}")
    shutil.move(disk, ctx.out / disk.name)


def packer_maas(
    label: str,
    kickstart: Derivation,
    *,
    release: str,
    arch: str,
    iso_filename: str,
    iso_sha256: str,
    firmware: str = "",
    vnc_bind_address: str = "127.0.0.1",
    disk_size: str = "4G",
    memory: int = 2048,
    cpus: int = 2,
    accelerator: str = "",
    headless: bool = True,
    boot_wait: str = "5s",
    shutdown_timeout: str = "1h",
    iso: FixedOutput | None = None,
    build_image: bool = False,
    build_timeout: int = 3 * 3600,
) -> Derivation:
    """Stage `packer-maas:<label>`: the validated Packer templates for `kickstart`'s install (and, with
    `build_image=True` and the `iso`, the installed disk). `iso_sha256` is the ISO's pin in sources.lock;
    `firmware` defaults to the kickstart's."""
    if arch not in QEMU_BINARIES:
        raise EulerbakeError(f"unknown architecture {arch!r}", hint=f"use one of {', '.join(QEMU_BINARIES)}")
    ks_firmware = getattr(kickstart.params, "firmware", "")
    firmware = firmware or ks_firmware or ("bios" if arch == "x86_64" else "uefi")
    if firmware not in ("bios", "uefi") or (arch == "aarch64" and firmware == "bios"):
        raise EulerbakeError(f"firmware {firmware!r} cannot boot {arch}", hint="use bios or uefi (aarch64: uefi)")
    if ks_firmware and ks_firmware != firmware:
        raise EulerbakeError(f"{kickstart.task_name} installs for {ks_firmware}, packer-maas:{label} boots {firmware}",
                             hint="give both stages the same firmware")
    if iso_sha256 and not SHA256_RE.match(iso_sha256):  # "" (not pinned yet) fails when the stage runs
        raise EulerbakeError(f"packer-maas:{label}: the ISO checksum {iso_sha256!r} is not a pinned sha256",
                             hint="pin the ISO with `eulerbake lock` and pass its sha256 from sources.lock")
    # KVM where the host runs the guest's architecture; TCG (emulation) otherwise.
    accelerator = accelerator or ("kvm" if platform.machine() == arch else "tcg")
    if accelerator not in ("kvm", "tcg"):
        raise EulerbakeError(f"unknown accelerator {accelerator!r}", hint="use kvm or tcg")
    inputs: dict[str, Input] = {"kickstart": kickstart, "templates": LocalTree(TEMPLATES)}
    tools = list(TOOLS)
    if build_image:
        if iso is None:
            raise EulerbakeError(f"packer-maas:{label}: build_image=True needs the ISO", hint="pass iso=<FixedOutput>")
        if iso.sha256 and iso.sha256 != iso_sha256:
            raise EulerbakeError(f"{iso.task_name} is pinned to {iso.sha256}, not {iso_sha256}",
                                 hint="pass the ISO's sha256 from sources.lock")
        inputs["iso"] = iso
        tools.append(QEMU_BINARIES[arch])  # packer starts it: its version is part of the key
    code, variables = UEFI_FIRMWARE[arch] if firmware == "uefi" else ("", "")
    machine = "virt" if arch == "aarch64" else ("q35" if firmware == "uefi" else "pc")
    return Derivation(
        stage="packer-maas",
        label=label,
        builder=build,
        inputs=inputs,
        params=Params(
            release=release, arch=arch, firmware=firmware, iso_filename=iso_filename, iso_sha256=iso_sha256,
            vnc_bind_address=vnc_bind_address, disk_size=disk_size, memory=memory, cpus=cpus,
            accelerator=accelerator, headless=bool(headless), boot_wait=boot_wait, shutdown_timeout=shutdown_timeout,
            qemu_binary=QEMU_BINARIES[arch], machine_type=machine, efi_code=code, efi_vars_template=variables,
            boot_command=boot_command(arch, firmware), qemuargs=qemu_arguments(arch, firmware, accelerator),
            build_image=bool(build_image), build_timeout=build_timeout,
        ),
        tools=tuple(tools),
        doc=f"Packer qemu templates for openEuler {release} {arch} ({firmware})"
        + (", and the installed disk" if build_image else ""),
    )
