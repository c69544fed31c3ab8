"""Stage `boot`: boot the raw image under QEMU through its own bootloader, and prove it came up right.

    boot:<label>  raw:<label> (disk.raw + disk.json) + overlays/boot (NoCloud seed) → console.log + report.json
                  (or a stage whose output is one qcow2: the disk packer-maas installed for MAAS)

The seed's author found the missing ENA driver only after uploading to AWS, on the serial console of an
instance that never came up. This stage finds such things on the build machine: the image boots through
its own firmware path (x86_64: SeaBIOS → the MBR's GRUB; aarch64: UEFI with AAVMF) with no network, its
disk on NVMe (what a Nitro instance shows) when its initramfs carries the nvme driver, else virtio, and a
NoCloud seed (`seed.py`) whose user-data prints markers on the serial console and powers off. The markers
are checked: kernel release, root device and size, the expected module loaded through depmod's index and
modules-load.d (no insmod hook), a fresh machine-id, root's password locked, sshd's effective
PermitRootLogin/PasswordAuthentication, and cloud-init's own result.json.

The store's disk.raw is never written: QEMU gets a qcow2 overlay in the work directory whose backing
file it opens read-only (root ignores the store's read-only modes; the seal check would catch it).
A failed check fails the stage with the console lines that show why (a panic, the initramfs not finding
root, the kernel's own refusal of a module, or the last 40 lines on a timeout); QEMU is stopped as soon
as the console shows the boot cannot succeed. TCG by default: /dev/kvm here is kvm_pvm, under which a
normal kernel stalls (FACTS.md); hardware KVM is used when it is there, `EULERBAKE_QEMU_ACCEL` overrides.
Seen here (TCG, 2 cores): a Debian 6.1 kernel with systemd and cloud-init reports in ~100 s.
"""

from __future__ import annotations

import bz2
import json
import lzma
import os
import re
import shutil
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, Derivation, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import disk, ext4
from eulerbake.fs.partitions import find_root_partition
from eulerbake.linux.depmod import module_releases
from eulerbake.tools.run import run

from recipes.stages import seed

TEMPLATES = Path(__file__).resolve().parents[2] / "overlays" / "boot"
QEMU = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}
TOOLS = ("qemu-img", "debugfs", "sfdisk", *seed.TOOLS)  # + the arch's QEMU; sfdisk reads a qcow2 disk's table
# (firmware code, writable UEFI variable store or None, Debian package)
FIRMWARE = {
    "x86_64": (Path("/usr/share/seabios/bios-256k.bin"), None, "seabios"),
    "aarch64": (Path("/usr/share/AAVMF/AAVMF_CODE.fd"), Path("/usr/share/AAVMF/AAVMF_VARS.fd"), "qemu-efi-aarch64"),
}
DISKS = ("auto", "nvme", "virtio")
ACCEL_ENV = "EULERBAKE_QEMU_ACCEL"  # tcg or kvm: overrides the probe
TIMEOUTS = {"tcg": 900, "kvm": 300}  # seconds, when the stage is given none
MARKER = "@@eulerbake"
EVIDENCE_LINES = 40
FATAL_GRACE = 5.0  # seconds of console kept after a fatal line (the panic's trace), before QEMU is stopped
POWEROFF_GRACE = 120.0  # seconds from the last marker to QEMU's exit
POLL = 0.5
# Console lines after which the boot cannot succeed: QEMU is stopped instead of waiting for the timeout.
FATAL = {
    "firmware": re.compile(r"Boot failed: |No bootable device|Failed to load Boot|No bootable option"),
    "bootloader": re.compile(r"grub rescue>|Entering rescue mode|Press any key to continue"),
    "kernel panic": re.compile(r"Kernel panic - not syncing"),
    "root filesystem": re.compile(r"VFS: Unable to mount root fs|Dropping to a shell|Gave up waiting for root"
                                  r"|Entering emergency mode|You are in emergency mode|Cannot open access to console"),
}
# Lines quoted with a fatal one: what the firmware, GRUB, the kernel or the initramfs said just before.
CAUSES = re.compile(r"error: |Boot failed|No bootable|VFS: |Kernel panic|ALERT!|does not exist|Gave up waiting"
                    r"|Unable to|not found|Failed to|unknown-block|Dropping to a shell|emergency mode")
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][A-Z0-9]|[=>cDEHM78])")
KMSG = re.compile(r"^\[\s*\d+\.\d+\]\s")
KERNEL_NAMES = ("vmlinuz-", "vmlinux-", "Image-")
INITRAMFS_NAMES = ("initramfs-{}.img", "initrd.img-{}", "initrd-{}", "initramfs-{}")
NVME_MODULE = re.compile(r"(^|/)nvme\.ko(\.(xz|gz|zst))?$")
SSHD_EXPECTED = {"permitrootlogin": "no", "passwordauthentication": "no"}


@dataclass(frozen=True)
class Firmware:
    """A firmware image from a Debian package, hashed by content (the key covers the firmware too)."""

    path: Path
    package: str

    def fingerprint(self) -> dict[str, Any]:
        if not self.path.is_file():
            raise EulerbakeError(f"the boot stage needs the firmware {self.path}",
                                 hint=f"apt-get install {self.package}")
        return {"kind": "file", "blake3": hashing.hash_file(self.path)}

    def files(self) -> list[Path]:
        return [self.path]


@dataclass(frozen=True)
class Params:
    arch: str
    disk: str  # "nvme", "virtio", or "auto": NVMe when the image's initramfs has the nvme driver
    expect_module: str  # a module that must be loaded, "" for none
    hygiene: bool  # the image went through hygiene: root locked, sshd hardened, machine-id emptied
    timeout: int  # seconds until the report; 0: sized for the accelerator (TIMEOUTS)
    memory_mib: int
    cpus: int


# -- what the image holds (read through debugfs, never mounted or written) -----------------------


@dataclass
class ImageFacts:
    kernels: dict[str, str]  # release → where its kernel is ("partition 1:/vmlinuz-…")
    module_releases: list[str]
    initramfs: str  # where the booted release's initramfs is, "" if none was found
    nvme_driver: str  # how the nvme driver would be there at boot ("initramfs", "built in"), "" if not
    shipped_machine_id: str
    root_number: int
    root_bytes: int
    disk_bytes: int


def _filesystems(raw: Path, table: disk.PartitionTable, scratch: Path) -> Iterator[tuple[int, ext4.Ext4Image]]:
    for part in table.by_position():
        offset = part.offset(table.sector_size)
        if ext4.is_ext_filesystem(raw, offset):
            yield part.number, ext4.Ext4Image(ext4.inside(raw, offset), 0, scratch)


def inspect_image(raw: Path, layout: dict[str, Any], scratch: Path) -> ImageFacts:
    """Kernels, initramfs, module trees and the shipped machine-id, read from disk.raw (read-only)."""
    table = disk.PartitionTable.from_json(layout["table"])
    root_number = int(layout["root"])
    kernels: dict[str, str] = {}
    initramfs: dict[str, tuple[ext4.Ext4Image, str, str]] = {}
    root_fs = None
    for number, fs in _filesystems(raw, table, scratch):
        if number == root_number:
            root_fs = fs
        boot_dir = "/boot" if number == root_number else "/"
        listing = fs.list_dir(fs.realpath(boot_dir) or "/nonexistent") or {}
        for name, entry in sorted(listing.items()):
            prefix = next((p for p in KERNEL_NAMES if name.startswith(p)), None)
            if prefix and (entry.is_file or entry.is_symlink) and not name.endswith((".hmac", ".sig")):
                release = name[len(prefix):]
                kernels.setdefault(release, f"partition {number}:{boot_dir.rstrip('/')}/{name}")
                for pattern in INITRAMFS_NAMES:
                    candidate = pattern.format(release)
                    if candidate in listing and release not in initramfs:
                        initramfs[release] = (fs, f"{boot_dir.rstrip('/')}/{candidate}", f"partition {number}")
    if root_fs is None:
        raise EulerbakeError(f"partition {root_number} (the root, says disk.json) holds no ext filesystem",
                             hint="rebuild the raw stage: disk.raw and disk.json disagree")
    releases = module_releases(root_fs)
    booted = next((r for r in sorted(kernels, reverse=True) if r in releases), next(iter(sorted(kernels)), ""))
    nvme = ""
    found_initramfs = ""
    if booted:
        builtin = root_fs.realpath(f"/lib/modules/{booted}/modules.builtin")
        if builtin and any(NVME_MODULE.search(line)
                           for line in root_fs.read_file(builtin).decode(errors="replace").splitlines()):
            nvme = "built in"
        if booted in initramfs:
            fs, path, where = initramfs[booted]
            found_initramfs = f"{where}:{path}"
            if not nvme and any(NVME_MODULE.search(name) for name in initramfs_members(fs.read_file(path))):
                nvme = "initramfs"
    machine_id = root_fs.read_file("/etc/machine-id").decode(errors="replace").strip() \
        if root_fs.exists("/etc/machine-id") else ""
    root = table.partition(root_number)
    return ImageFacts(kernels=kernels, module_releases=releases, initramfs=found_initramfs, nvme_driver=nvme,
                      shipped_machine_id=machine_id, root_number=root_number,
                      root_bytes=root.length(table.sector_size), disk_bytes=int(layout["disk_size"]))


# -- initramfs contents: concatenated cpio archives (an uncompressed early one, then a compressed one) --

CPIO_MAGICS = (b"070701", b"070702")
CPIO_HEADER = 110


def _decompress(data: bytes) -> bytes | None:
    """The decompressed stream at the start of `data` (trailing bytes ignored), None if unknown."""
    if data[:2] == b"\x1f\x8b":
        return zlib.decompressobj(wbits=31).decompress(data)
    if data[:6] == b"\xfd7zXZ\x00" or data[:3] == b"\x5d\x00\x00":
        return lzma.LZMADecompressor().decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard  # a project dependency; imported only for zstd-compressed initramfs images

        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    if data[:3] == b"BZh":
        return bz2.BZ2Decompressor().decompress(data)
    return None


def initramfs_members(data: bytes) -> list[str]:
    """Paths in an initramfs image (newc cpio, early uncompressed parts, gzip/xz/lzma/zstd/bzip2)."""
    names: list[str] = []
    pos = 0
    while pos < len(data):
        while pos < len(data) and data[pos] == 0:  # padding between archives
            pos += 1
        if data[pos:pos + 6] in CPIO_MAGICS:
            while data[pos:pos + 6] in CPIO_MAGICS:
                size = int(data[pos + 54:pos + 62], 16)
                name_size = int(data[pos + 94:pos + 102], 16)
                name = data[pos + CPIO_HEADER:pos + CPIO_HEADER + name_size - 1].decode(errors="replace")
                pos = (pos + CPIO_HEADER + name_size + 3) & ~3
                pos = (pos + size + 3) & ~3
                if name == "TRAILER!!!":
                    break
                names.append(name)
        elif pos < len(data):
            inner = _decompress(data[pos:])
            if inner is not None:
                names += initramfs_members(inner)
            break
    return names


# -- QEMU ---------------------------------------------------------------------------------------------


def host_arch() -> str:
    machine = os.uname().machine
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def pick_accel(arch: str) -> tuple[str, str]:
    """("kvm" or "tcg", why): KVM only when it is hardware KVM for this architecture."""
    wanted = os.environ.get(ACCEL_ENV, "").strip().lower()
    if wanted in ("kvm", "tcg"):
        return wanted, f"{ACCEL_ENV}={wanted}"
    if wanted:
        raise EulerbakeError(f"{ACCEL_ENV}={wanted!r} is neither kvm nor tcg", hint=f"unset {ACCEL_ENV} to probe")
    if host_arch() != arch:
        return "tcg", f"a {arch} guest on a {host_arch()} host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    if Path("/sys/module/kvm_pvm").exists():
        return "tcg", "/dev/kvm is kvm_pvm, a software virtualiser under which a normal kernel stalls"
    if arch == "x86_64" and not any(Path(f"/sys/module/{name}").exists() for name in ("kvm_intel", "kvm_amd")):
        return "tcg", "/dev/kvm is neither kvm_intel nor kvm_amd"
    return "kvm", "/dev/kvm is hardware KVM"


def qemu_command(arch: str, accel: str, params: Params, interface: str, files: dict[str, Path]) -> list[str]:
    """The QEMU command line: the image's firmware and disk, the seed, the serial console to a file."""
    cmd = [QEMU[arch], "-accel", accel, "-m", str(params.memory_mib), "-smp", str(params.cpus),
           "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
           "-serial", f"file:{files['console']}", "-pidfile", str(files["pidfile"])]
    if arch == "x86_64":
        cmd += ["-machine", "q35", "-cpu", "host" if accel == "kvm" else "max", "-bios", str(files["firmware"]),
                # SeaBIOS's own messages ("Boot failed: not a bootable disk") on the serial console, and
                # its debug log; QEMU warns that the fw_cfg name lacks "opt/", but SeaBIOS reads this one.
                "-fw_cfg", f"name=etc/sercon-port,file={files['sercon']}",
                "-chardev", f"file,id=firmware,path={files['firmware-log']}",
                "-device", "isa-debugcon,iobase=0x402,chardev=firmware"]
    else:
        cmd += ["-machine", "virt", "-cpu", "host" if accel == "kvm" else "max",
                "-drive", f"if=pflash,format=raw,readonly=on,file={files['firmware']}",
                "-drive", f"if=pflash,format=raw,file={files['firmware-vars']}"]
    for name, path, fmt, readonly in (("root", files["overlay"], "qcow2", False),
                                      ("cidata", files["seed"], "raw", True)):
        cmd += ["-drive", f"file={path},format={fmt},if=none,id={name}" + (",readonly=on" if readonly else "")]
        device = f"nvme,serial={name}" if interface == "nvme" else "virtio-blk-pci"
        cmd += ["-device", f"{device},drive={name}" + (",bootindex=0" if name == "root" else "")]
    return cmd


@dataclass
class VmRun:
    returncode: int | None
    seconds: float  # QEMU start to exit
    seconds_to_report: float | None  # QEMU start to the last marker (the power-off marker)
    stopped: str  # why the stage stopped QEMU: "" (it powered off), "timeout", "no power-off", or a FATAL kind
    stderr: str


def clean_console(text: str) -> list[str]:
    """Console lines without terminal escapes and carriage returns."""
    return [ANSI.sub("", line).replace("\r", "").rstrip() for line in text.replace("\r\n", "\n").split("\n")]


def _fatal(lines: list[str]) -> str:
    for line in lines:
        for kind, pattern in FATAL.items():
            if pattern.search(line) and MARKER not in line:
                return kind
    return ""


def _read(path: Path) -> str:
    return path.read_bytes().decode(errors="replace") if path.exists() else ""


def _stop(pidfile: Path) -> None:
    """End the QEMU this build started (its pid is in the pidfile it wrote): SIGTERM, then SIGKILL."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_vm(cmd: list[str], console: Path, pidfile: Path, *, timeout: float, end_marker: str,
           log: Callable[[str], None]) -> VmRun:
    """Run QEMU (through `run`, in a thread) while watching the console; stop it early when the console
    shows a fatal line, on the timeout, or when it does not power off after the report."""
    outcome: dict[str, Any] = {}

    def qemu() -> None:
        try:
            outcome["proc"] = run(cmd, timeout=timeout + POWEROFF_GRACE + 60, check=False)
        except EulerbakeError as err:  # run's own timeout: a backstop, the loop below stops QEMU first
            outcome["error"] = err

    started = time.monotonic()
    thread = threading.Thread(target=qemu, name="qemu", daemon=True)
    thread.start()
    reported: float | None = None
    stop_at: float | None = None
    stopped = ""
    while thread.is_alive():
        thread.join(POLL)
        now = time.monotonic() - started
        lines = clean_console(_read(console))
        if reported is None and any(end_marker in line for line in lines):
            reported = now
            log(f"boot: report complete after {now:.0f} s")
        if stop_at is None:
            kind = _fatal(lines) if reported is None else ""
            if kind:
                stopped, stop_at = kind, now + FATAL_GRACE
                log(f"boot: {kind} failure on the console; stopping QEMU")
            elif reported is None and now > timeout:
                stopped, stop_at = "timeout", now
            elif reported is not None and now - reported > POWEROFF_GRACE:
                stopped, stop_at = "no power-off", now
        if stop_at is not None and now >= stop_at:
            _stop(pidfile)
            thread.join(30)
            break
    proc = outcome.get("proc")
    stderr = proc.stderr.decode(errors="replace") if proc is not None else str(outcome.get("error", ""))
    return VmRun(returncode=proc.returncode if proc is not None else None, seconds=round(time.monotonic() - started, 1),
                 seconds_to_report=round(reported, 1) if reported is not None else None, stopped=stopped,
                 stderr=stderr)


# -- the report ---------------------------------------------------------------------------------------


def read_markers(lines: list[str], nonce: str) -> dict[str, list[str]]:
    """Marker values by name, from `@@eulerbake <name> <value>` lines of this boot (its nonce)."""
    facts: dict[str, list[str]] = {}
    pattern = re.compile(rf"{re.escape(MARKER)} (\S+) ?(.*)$")
    for line in lines:
        match = pattern.search(line)
        if match:
            facts.setdefault(match.group(1), []).append(match.group(2).strip())
    if nonce not in facts.get("begin", []):
        return {}
    return facts


@dataclass
class Check:
    name: str
    ok: bool
    expected: str
    found: str
    evidence: list[str] = field(default_factory=list)


def _one(facts: dict[str, list[str]], name: str) -> str:
    values = facts.get(name, [])
    return values[-1] if values else ""


def _kernel_lines(lines: list[str], module: str) -> list[str]:
    """What the kernel and systemd-modules-load said about `module` (its refusal, in the kernel's words)."""
    said = re.compile(rf"(^|\] ){re.escape(module)}: |Failed to insert module '{re.escape(module)}'")
    return [line for line in lines if said.search(line) and MARKER not in line]


def module_checks(facts: dict[str, list[str]], lines: list[str], module: str, release: str) -> list[Check]:
    """`module` is loaded, found by modprobe in depmod's index, listed in modules-load.d, no install hook."""
    loaded = module.replace("-", "_") in _one(facts, "lsmod").split()
    refusal = _kernel_lines(lines, module) + [line for line in facts.get("kmsg", []) if line not in lines]
    path = _one(facts, "modprobe-path")
    listed = _one(facts, "modules-load-d")
    hook = _one(facts, "modprobe-install")
    inserted = any(f"Inserted module '{module}'" in line for line in facts.get("modules-load-log", []))
    return [
        Check(f"{module} loaded", loaded, "in lsmod", "loaded" if loaded else "not loaded",
              [] if loaded else refusal + facts.get("modules-load-log", [])),
        Check(f"{module} found by modprobe", path.startswith((f"/lib/modules/{release}/",
                                                              f"/usr/lib/modules/{release}/")),
              f"a file under /lib/modules/{release}/ (depmod's index)", path or "nothing"),
        Check(f"{module} loaded at boot by modules-load.d", bool(listed) and (inserted or not loaded),
              "listed in a modules-load.d file, inserted by systemd-modules-load",
              (listed or "listed nowhere") + ("; inserted by systemd-modules-load" if inserted else "")),
        Check(f"no install hook for {module}", not hook, "no `install` line in modprobe.d", hook or "none"),
    ]


def evaluate(facts: dict[str, list[str]], lines: list[str], image: ImageFacts, params: Params,
             interface: str) -> list[Check]:
    """Every check of the boot proof, from the markers (and the console lines for the evidence)."""
    checks: list[Check] = []
    release = _one(facts, "kernel")
    bootable = sorted(r for r in image.kernels if r in image.module_releases)
    checks.append(Check("kernel release", release in bootable, " or ".join(bootable) or "a kernel with modules",
                        release or "nothing"))
    device = _one(facts, "root-device")
    number = image.root_number
    device_re = rf"/dev/nvme\d+n\d+p{number}" if interface == "nvme" else rf"/dev/vd[a-z]+{number}"
    checks.append(Check("root device", re.fullmatch(device_re, device) is not None,
                        f"partition {image.root_number} of the {interface} disk, ext4",
                        f"{device or 'nothing'} ({_one(facts, 'root-fstype') or '?'})"))
    fs_bytes = int(_one(facts, "root-fs-bytes") or 0) if _one(facts, "root-fs-bytes").isdigit() else 0
    # cloud-init's growpart may grow the root into the rest of the disk: anything from the shrunk size up.
    checks.append(Check("root filesystem size", 0.9 * image.root_bytes <= fs_bytes <= image.disk_bytes,
                        f"{disk.format_size(image.root_bytes)} (the raw stage's root) up to the "
                        f"{disk.format_size(image.disk_bytes)} disk", disk.format_size(fs_bytes) if fs_bytes else "?"))
    if params.expect_module:
        checks += module_checks(facts, lines, params.expect_module, release)
    if params.hygiene:
        machine_id = _one(facts, "machine-id")
        fresh = re.fullmatch(r"[0-9a-f]{32}", machine_id) is not None and machine_id != image.shipped_machine_id
        checks.append(Check("machine-id regenerated", fresh,
                            "32 hex digits generated on this boot" + (
                                f", not the shipped {image.shipped_machine_id}" if image.shipped_machine_id else ""),
                            machine_id or "empty"))
        state = _one(facts, "root-password")
        checks.append(Check("root password locked", state == "locked", "locked (! or * in /etc/shadow)",
                            state or "nothing"))
        for key, expected in SSHD_EXPECTED.items():
            value = _one(facts, f"sshd-{key}")
            checks.append(Check(f"sshd {key}", value == expected, expected, value or "nothing (sshd -T failed)"))
    checks.append(_cloud_init_check(_one(facts, "cloud-init-result")))
    return checks


def _cloud_init_check(text: str) -> Check:
    try:
        result = json.loads(text)["v1"]
        datasource, errors = str(result.get("datasource")), list(result.get("errors") or [])
    except (ValueError, KeyError, TypeError, AttributeError):
        return Check("cloud-init result", False, "/run/cloud-init/result.json with no errors", text or "nothing")
    ok = not errors and "NoCloud" in datasource
    return Check("cloud-init result", ok, "datasource NoCloud, no errors",
                 f"datasource {datasource}, errors {errors or 'none'}")


def failure_evidence(lines: list[str], run_: VmRun, firmware_lines: list[str]) -> list[str]:
    """The console lines that show why a boot did not get to its report."""
    text = [line for line in lines if line.strip()]
    if run_.stopped in FATAL:
        index = next(i for i, line in enumerate(text) if FATAL[run_.stopped].search(line))
        causes = [line for line in text[max(0, index - 400):index] if CAUSES.search(line)][-12:]
        shown = [*causes, *text[index:index + 12]]
        if run_.stopped == "firmware":
            shown = [line for line in firmware_lines if "Boot" in line or "boot" in line][-6:] + shown
        return list(dict.fromkeys(shown))
    return text[-EVIDENCE_LINES:]


def _why(run_: VmRun, lines: list[str], timeout: float) -> str:
    if run_.stopped in FATAL:
        return f"the boot failed ({run_.stopped})"
    if run_.stopped == "timeout":
        came_up = any(re.search(r"\blogin: ?$", line) for line in lines)
        return (f"no report within {timeout:.0f} s" + (
            ": the system came up (login prompt) but the seed's user-data never ran: is cloud-init installed "
            "and enabled, and does it find the NoCloud seed (label cidata)?" if came_up else ""))
    if run_.returncode not in (0, None):
        return f"QEMU exited with code {run_.returncode}: {run_.stderr.strip()[-500:]}"
    return "QEMU exited before the report"


# -- the stage ----------------------------------------------------------------------------------------


def _boot_files(ctx: BuildContext, params: Params) -> dict[str, Path]:
    files = {"console": ctx.out / "console.log", "pidfile": ctx.work / "qemu.pid",
             "overlay": ctx.work / "disk.qcow2", "seed": ctx.work / "seed.img",
             "firmware": ctx.inputs["firmware"]}
    if params.arch == "x86_64":
        files["sercon"] = ctx.work / "sercon-port"
        files["sercon"].write_bytes((0x3F8).to_bytes(2, "little"))  # COM1
        files["firmware-log"] = ctx.out / "firmware.log"
    else:
        files["firmware-vars"] = ctx.work / "efivars.fd"
        shutil.copyfile(ctx.inputs["firmware-vars"], files["firmware-vars"])
        files["firmware-vars"].chmod(0o644)
    return files


def disk_and_layout(given: Path, work: Path) -> tuple[Path, str, Path, dict[str, Any]]:
    """(the disk QEMU boots, its format, a raw file to inspect, its layout {table, root, source}).

    A raw stage's output (disk.raw + disk.json) is used as it is. An output holding one *.qcow2 (the disk
    packer-maas installed, which maas-tgz packs), or a qcow2 file, is booted as it is and inspected through
    a sparse raw copy in the work directory (the cost follows the data), its root found by its contents.
    """
    if (given / "disk.raw").is_file() and (given / "disk.json").is_file():
        return given / "disk.raw", "raw", given / "disk.raw", json.loads((given / "disk.json").read_text())
    found = disk.disk_image_in(given)
    if found is None:
        raise EulerbakeError(f"{given} holds neither disk.raw + disk.json nor exactly one *.qcow2 image",
                             hint="boot the raw stage's output, or a stage whose output is one qcow2 (packer-maas)")
    image = found[0]
    info = disk.validate_qcow2(image)
    inspected = work / "inspect.raw"
    run(["qemu-img", "convert", "-q", "-f", info.format, "-O", "raw", image, inspected])
    table = disk.read_partition_table(inspected)
    root = find_root_partition(inspected, scratch=work)
    return image, info.format, inspected, {"table": table.to_json(), "root": root.number, "source": image.name,
                                           "disk_size": info.virtual_size}


def build(ctx: BuildContext) -> None:
    """Inspect the image, make the seed and the overlay, boot, check the markers, write the report."""
    params: Params = ctx.params
    (ctx.work / "scratch").mkdir(exist_ok=True)
    disk_file, disk_format, inspected, layout = disk_and_layout(ctx.inputs["raw"], ctx.work / "scratch")
    image = inspect_image(inspected, layout, ctx.work / "scratch")
    (ctx.work / "scratch" / "inspect.raw").unlink(missing_ok=True)  # QEMU boots the image itself
    if not image.kernels:
        raise EulerbakeError(
            f"{layout.get('source', disk_file.name)} has no kernel to boot (no vmlinuz-* in /boot on any partition)",
            hint="this image is a skeleton (the offline aarch64 sample carries only a module tree); boot a real one")
    interface = params.disk if params.disk != "auto" else ("nvme" if image.nvme_driver else "virtio")
    accel, accel_why = pick_accel(params.arch)
    timeout = params.timeout or TIMEOUTS[accel]
    nonce = ctx.seed("boot-nonce").hex()[:16]
    files = _boot_files(ctx, params)
    seed.make_seed(files["seed"], ctx.inputs["templates"],
                   {"instance_id": f"iid-eulerbake-{nonce}", "nonce": nonce, "marker": MARKER,
                    "module": params.expect_module},
                   volume_id=ctx.seed("seed-volume-id")[:4].hex().upper(), epoch=ctx.source_date_epoch,
                   staging=ctx.work / "seed")
    # The store's disk.raw is only ever the read-only backing file of an overlay in the work directory.
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", disk_format, "-b", disk_file.resolve(), files["overlay"]])
    ctx.log(f"boot: {accel} ({accel_why}), {interface} disk (nvme driver: {image.nvme_driver or 'none'}), "
            f"timeout {timeout} s")
    vm = run_vm(qemu_command(params.arch, accel, params, interface, files), files["console"], files["pidfile"],
                timeout=timeout, end_marker=f"{MARKER} end {nonce}", log=ctx.log)
    lines = clean_console(_read(files["console"]))
    facts = read_markers(lines, nonce)
    checks = evaluate(facts, lines, image, params, interface) if vm.seconds_to_report is not None else []
    if vm.seconds_to_report is not None and vm.stopped:
        checks.append(Check("power-off", False, "QEMU exits after the report", vm.stopped))
    passed = vm.seconds_to_report is not None and all(check.ok for check in checks)
    firmware_lines = clean_console(_read(files.get("firmware-log", Path("/nonexistent"))))
    report = {
        "verdict": "pass" if passed else "fail",
        "checks": [asdict(check) for check in checks],
        "markers": facts,
        "image": asdict(image),
        "qemu": {"accel": accel, "accel_reason": accel_why, "disk": interface, "arch": params.arch,
                 "timeout": timeout, "seconds": vm.seconds, "seconds_to_report": vm.seconds_to_report,
                 "stopped": vm.stopped, "returncode": vm.returncode},
    }
    if passed:
        (ctx.out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        ctx.log(f"boot: {len(checks)} checks passed, report after {vm.seconds_to_report:.0f} s")
        return
    for line in lines:  # the whole console goes to the failed build's log
        ctx.log(f"console | {line}")
    ctx.log("boot report: " + json.dumps(report, sort_keys=True))
    failed = [check for check in checks if not check.ok]
    if checks:
        summary = f"{len(failed)} of {len(checks)} boot checks failed ({accel}, {interface} disk):\n" + "\n".join(
            f"  FAILED {check.name}: expected {check.expected}; found {check.found}" for check in failed)
        evidence = [line for check in failed for line in check.evidence]
    else:
        summary = _why(vm, lines, timeout) + f" ({accel}, {interface} disk, {vm.seconds:.0f} s)"
        evidence = failure_evidence(lines, vm, firmware_lines)
    if evidence:
        summary += "\nconsole lines that show why:\n" + "\n".join(f"  | {line}" for line in evidence)
    raise EulerbakeError(summary, hint="the whole console and the report are in the failed build's log "
                         "(store/.failed/<key>-<name>.log); fix the image (or its recipe) and build again")


def boot(label: str, raw: Derivation, *, arch: str, expect_module: str | None = "ena", timeout: int | None = None,
         disk: str = "auto", memory_mib: int = 1024, cpus: int = 2, hygiene: bool | None = None) -> Derivation:
    """Stage `boot:<label>`: boot `raw`'s disk.raw under QEMU with a NoCloud seed; output the boot report.

    `disk` is "nvme", "virtio" or "auto" (NVMe if the initramfs has the driver); `hygiene` defaults to
    what the raw stage did (its checks are only made on images that went through hygiene).
    """
    if arch not in QEMU:
        raise EulerbakeError(f"unknown architecture {arch!r} for the boot stage", hint=f"use one of {sorted(QEMU)}")
    if disk not in DISKS:
        raise EulerbakeError(f"unknown boot disk {disk!r}", hint=f"use one of {', '.join(DISKS)}")
    if hygiene is None:  # a raw stage's items; a disk from elsewhere (packer-maas) went through none
        hygiene = raw.stage == "raw" and bool(getattr(raw.params, "hygiene", True))
    code, variables, package = FIRMWARE[arch]
    inputs: dict[str, Derivation | LocalTree | Firmware] = {
        "raw": raw, "templates": LocalTree(TEMPLATES), "firmware": Firmware(code, package)}
    if variables is not None:
        inputs["firmware-vars"] = Firmware(variables, package)
    return Derivation(
        stage="boot",
        label=label,
        builder=build,
        inputs=inputs,
        params=Params(arch=arch, disk=disk, expect_module=expect_module or "", hygiene=hygiene,
                      timeout=int(timeout or 0), memory_mib=memory_mib, cpus=cpus),
        tools=(*TOOLS, QEMU[arch]),
        doc=f"boot {raw.task_name} under QEMU with a NoCloud seed and check what came up",
    )
