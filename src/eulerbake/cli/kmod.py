"""`eulerbake kmod check KO --kernel K`: run the kernel-module gate by itself, as a table or JSON.

K is a kernel headers tree, an installed `lib/modules/<kver>` directory (read as one: its `build`
symlink only when given itself), a kernel image (`/boot/vmlinuz-<kver>`: release, trusted certificates,
vmlinux's exports), or a disk image (raw or qcow2) whose ext2/3/4 partitions are read with debugfs (no
mount, no root, no NBD): its lib/modules/<kver> and /boot/{vmlinuz,config,symvers}-<kver>. Several
`--kernel`s combine (the JSON's target.origin says which fact came from which). `--json` prints JSON
whatever happens, errors included. Exit status: 0 the gate passes, 1 it fails (or cannot tell), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from eulerbake.core.errors import EulerbakeError
from eulerbake.fs.disk import QCOW2_MAGIC
from eulerbake.linux.gate import Verdict, check_module
from eulerbake.linux.kernels import kind_of, read_kernel, trust_certificates
from eulerbake.linux.target import KernelTarget
from eulerbake.tools.run import CommandError, run, run_text

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
    """Copy lib/modules (and /boot's symvers-, config- and vmlinuz-<kver>) out of a disk image into `workdir/root`."""
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
                if name.startswith(("symvers-", "config-", "vmlinuz-")):
                    run(["debugfs", "-R", f"dump {boot_dir.rstrip('/')}/{name} {root / 'boot' / name}",
                         f"{image}?offset={offset}"])
    if not found_modules:
        raise EulerbakeError(
            f"{image} has no ext2/3/4 partition with /lib/modules/<kver> "
            f"({len(partitions)} ext file system(s) found)",
            hint="give the image's root disk, its lib/modules/<kver> directory, or the kernel headers",
        )
    return root


def _read_kernels(arguments: list[Path], workdir: Path, signing_certs: list[Path]) -> KernelTarget:
    """Each --kernel read as what it is (a disk image unpacked first), combined in the order given."""
    target: KernelTarget | None = None
    for index, argument in enumerate(arguments):
        if kind_of(argument) == "disk-image":
            scratch = workdir / f"image{index}"
            scratch.mkdir()
            root = extract_modules_from_image(argument, scratch)
            found = read_kernel(root)
            _relabel(found, root, argument)
        else:
            found = read_kernel(argument)
        target = found if target is None else target.combine(found)
    assert target is not None  # argparse requires one --kernel
    return trust_certificates(target, signing_certs)


def _relabel(target: KernelTarget, root: Path, image: Path) -> None:
    """Name what was read out of a disk image by the image and the path inside it, not the scratch copy."""
    def inside(text: str) -> str:
        return text.replace(str(root), f"{image}:")

    target.origin = {fact: "disk-image " + inside(where.split(" ", 1)[1]) for fact, where in target.origin.items()}
    target.sources = [{"kind": "disk-image", "path": str(image), "read_as": source["kind"],
                       "inside": inside(source["path"])} for source in target.sources]


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
    refusal = verdict.refusal
    if verdict.kernel_loads is True:
        console.print(f"kernel: [green]would load[/] {escape(module.name)}")
    elif refusal is not None:
        console.print(f"kernel: [bold red]would refuse[/] {escape(module.name)} ({verdict.errno}): "
                      f"{escape(refusal.message)}")
        if refusal.kernel_line:
            console.print(f"  the kernel logs: {escape(refusal.kernel_line)}")
    else:
        console.print(f"kernel: [magenta]cannot tell[/] ({escape(verdict.cannot_tell)})")
    if not verdict.policy_ok:
        policy = "[bold red]FAIL[/]"
    elif any(f.status == "warn" for f in verdict.policy):
        policy = "[yellow]release mismatch reported, not enforced (--no-strict)[/]"
    else:
        policy = "pass"
    console.print(f"policy (strict release match{'' if verdict.strict else ', off'}): {policy}")
    console.print(f"gate: {'[bold green]PASS[/]' if verdict.passed else '[bold red]FAIL[/]'}")
    for fix in verdict.fixes():
        console.print(f"  fix: {escape(fix)}")
    for fact, origin in sorted(target.origin.items()):
        console.print(f"  [dim]{fact}: {escape(origin)}[/]")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so `--json` can report usage errors as JSON too."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _error_json(message: str, hint: str | None) -> str:
    return json.dumps({"error": {"message": message, "fix": hint or ""}, "passed": False}, indent=2, sort_keys=True)


def kmod_main(argv: list[str]) -> int:
    """`eulerbake kmod check KO --kernel K [--kernel K2] [--signing-cert C] [--json] [--no-strict]`."""
    parser = _Parser(prog="eulerbake kmod", description="kernel module tools")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = sub.add_parser("check", help="would this kernel load this module? (exit 0 pass, 1 fail, 2 bad input)")
    check.add_argument("ko", type=Path, help="the .ko file (optionally .xz/.gz/.zst compressed)")
    check.add_argument("--kernel", action="append", type=Path, required=True,
                       help="kernel headers dir, lib/modules/<kver> dir, /boot/vmlinuz-<kver>, or disk image "
                       "(raw/qcow2); may repeat: the sources combine")
    check.add_argument("--signing-cert", action="append", type=Path, default=[],
                       help="an X.509 certificate (DER/PEM) the kernel trusts for module signatures; may repeat")
    check.add_argument("--json", action="store_true", help="print the verdict (or the error) as JSON")
    check.add_argument("--no-strict", action="store_true",
                       help="report, but do not fail on, a release mismatch the kernel itself accepts")
    want_json = "--json" in argv
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        if want_json:
            print(_error_json(str(err), "eulerbake kmod check KO --kernel K [--json] [--no-strict]"))
        else:
            parser.print_usage(sys.stderr)
            print(f"eulerbake kmod: error: {err}", file=sys.stderr)
        return 2
    console = Console(highlight=False, soft_wrap=True)
    try:
        with tempfile.TemporaryDirectory(prefix="eulerbake-kmod-") as tmp:
            target = _read_kernels(args.kernel, Path(tmp), args.signing_cert)
            verdict = check_module(args.ko, target, strict=not args.no_strict)
            report: dict[str, Any] = verdict.to_json()
            if args.json:
                print(json.dumps(report, indent=2, sort_keys=True))
            else:
                _print_table(console, verdict)
    except EulerbakeError as err:
        if args.json:
            print(_error_json(err.message, err.hint))
        else:
            Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(str(err))}")
        return 2
    return 0 if verdict.passed else 1
