"""`eulerbake kmod check KO --kernel K`: run the kernel-module gate by itself, as a table or JSON.

K is a kernel headers tree, an installed `lib/modules/<kver>` directory, or a disk image (raw or
qcow2) whose ext2/3/4 partitions are read with debugfs (no mount, no root, no NBD). Give `--kernel`
twice to check against an image's own modules *and* the headers that carry its Module.symvers.
Exit status: 0 the gate passes, 1 it fails, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.gate import Verdict, check_module
from eulerbake.linux.target import load_target
from eulerbake.tools.run import CommandError, run, run_text

QCOW2_MAGIC = b"QFI\xfb"
EXT_MAGIC_OFFSET = 1080  # superblock at 1024 + s_magic at 56
EXT_MAGIC = b"\x53\xef"
MODULES_DIRS = ("/usr/lib/modules", "/lib/modules")  # usrmerged systems (openEuler) first
STATUS_STYLE = {"ok": "[green]ok[/]", "fail": "[bold red]FAIL[/]", "warn": "[yellow]warn[/]",
                "unknown": "[magenta]unknown[/]"}


def _ext_partitions(image: Path) -> list[int]:
    """Byte offsets of the ext2/3/4 file systems in a raw disk image (or [0] for a bare file system)."""
    offsets: list[int] = []
    try:
        table = json.loads(run_text(["sfdisk", "--json", image]))["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        offsets = [int(part["start"]) * sector for part in table.get("partitions", [])]
    except (CommandError, KeyError, ValueError):
        offsets = []
    offsets = offsets or [0]
    found = []
    with image.open("rb") as disk:
        for offset in offsets:
            disk.seek(offset + EXT_MAGIC_OFFSET)
            if disk.read(2) == EXT_MAGIC:
                found.append(offset)
    return found


def _debugfs(image: Path, offset: int, request: str) -> str:
    proc = run(["debugfs", "-R", request, f"{image}?offset={offset}"], check=False)
    return proc.stdout.decode(errors="replace") if proc.returncode == 0 else ""


def _ls(image: Path, offset: int, directory: str) -> list[str]:
    """Entry names of `directory` (debugfs `ls -p` prints /inode/mode/uid/gid/name/size/)."""
    names = []
    for line in _debugfs(image, offset, f"ls -p {directory}").splitlines():
        fields = line.strip().split("/")
        if len(fields) >= 7 and fields[5] not in (".", ".."):
            names.append(fields[5])
    return names


def extract_modules_from_image(image: Path, workdir: Path) -> Path:
    """Copy lib/modules (and /boot's symvers-<kver>.gz and config-<kver>) out of a disk image into `workdir/root`."""
    with image.open("rb") as handle:
        magic = handle.read(4)
    if magic == QCOW2_MAGIC:
        raw = workdir / "disk.raw"
        run(["qemu-img", "convert", "-O", "raw", image, raw])
        image = raw
    root = workdir / "root"
    (root / "lib" / "modules").mkdir(parents=True)
    (root / "boot").mkdir()
    partitions = _ext_partitions(image)
    found_modules = False
    for offset in partitions:
        for modules_dir in MODULES_DIRS:
            releases = [name for name in _ls(image, offset, modules_dir) if re.match(r"^\d", name)]
            if releases and not found_modules:
                for release in releases:
                    run(["debugfs", "-R", f"rdump {modules_dir}/{release} {root / 'lib' / 'modules'}",
                         f"{image}?offset={offset}"])
                found_modules = True
                break
        # /boot as its own partition (its root holds the files) or a directory of the root partition.
        for boot_dir in ("/", "/boot"):
            for name in _ls(image, offset, boot_dir):
                if name.startswith(("symvers-", "config-")):
                    run(["debugfs", "-R", f"dump {boot_dir.rstrip('/')}/{name} {root / 'boot' / name}",
                         f"{image}?offset={offset}"])
    if not found_modules:
        raise EulerbakeError(
            f"{image} has no ext2/3/4 partition with /lib/modules/<kver> "
            f"({len(partitions)} ext file system(s) found)",
            hint="give the image's root disk, its lib/modules/<kver> directory, or the kernel headers",
        )
    return root


def _kernel_path(argument: Path, workdir: Path, index: int) -> Path:
    if argument.is_file():
        scratch = workdir / f"image{index}"
        scratch.mkdir()
        return extract_modules_from_image(argument, scratch)
    return argument


def _print_table(console: Console, verdict: Verdict) -> None:
    module, target = verdict.module, verdict.target
    console.print(f"[bold]{escape(module.name)}[/] ({escape(str(module.path))}) against kernel "
                  f"[bold]{escape(target.release)}[/] ({target.arch})")
    table = Table(show_edge=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for finding in verdict.kernel:
        table.add_row(finding.check, STATUS_STYLE.get(finding.status, finding.status), escape(finding.message))
    for finding in verdict.policy:
        label = "policy: " + finding.check + (" (strict)" if verdict.strict else "")
        table.add_row(label, STATUS_STYLE.get(finding.status, finding.status), escape(finding.message))
    console.print(table)
    if verdict.kernel_loads is True:
        console.print(f"kernel: [green]would load[/] {module.name}")
    elif verdict.kernel_loads is False:
        refusal = verdict.kernel_refusal or next(f.message for f in verdict.kernel if f.status == "fail")
        console.print(f"kernel: [bold red]would refuse[/] {escape(module.name)}: {escape(refusal)}")
    else:
        console.print("kernel: [magenta]cannot tell[/] (see 'unknown' above)")
    if not verdict.policy_ok:
        policy = "[bold red]FAIL[/]"
    elif any(f.status == "warn" for f in verdict.policy):
        policy = "[yellow]release mismatch reported, not enforced (--no-strict)[/]"
    else:
        policy = "pass"
    console.print(f"policy (strict release match{'' if verdict.strict else ', off'}): {policy}")
    console.print(f"gate: {'[bold green]PASS[/]' if verdict.passed else '[bold red]FAIL[/]'}")
    for fact, origin in sorted(target.origin.items()):
        console.print(f"  [dim]{fact}: {escape(origin)}[/]")


def kmod_main(argv: list[str]) -> int:
    """`eulerbake kmod check KO --kernel K [--kernel K2] [--json] [--no-strict]`."""
    parser = argparse.ArgumentParser(prog="eulerbake kmod", description="kernel module tools")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="would this kernel load this module? (exit 0 pass, 1 fail, 2 bad input)")
    check.add_argument("ko", type=Path, help="the .ko file (optionally .xz/.gz/.zst compressed)")
    check.add_argument("--kernel", action="append", type=Path, required=True,
                       help="kernel headers dir, lib/modules/<kver> dir, or disk image (raw/qcow2); may repeat")
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")
    check.add_argument("--no-strict", action="store_true",
                       help="report, but do not fail on, a release mismatch the kernel itself accepts")
    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    try:
        with tempfile.TemporaryDirectory(prefix="eulerbake-kmod-") as tmp:
            kernels = [_kernel_path(k, Path(tmp), i) for i, k in enumerate(args.kernel)]
            target = load_target(kernels)
            verdict = check_module(args.ko, target, strict=not args.no_strict)
            report: dict[str, Any] = verdict.to_json()
            if args.json:
                print(json.dumps(report, indent=2, sort_keys=True))
            else:
                _print_table(console, verdict)
    except EulerbakeError as err:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(str(err))}")
        return 2
    return 0 if verdict.passed else 1
