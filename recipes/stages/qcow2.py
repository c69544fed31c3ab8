"""Stage `qcow2`: the offline sample release, an openEuler-shaped qcow2 this project builds itself.

Same shape as the openEuler 22.03 LTS cloud image (40 GiB virtual disk; x86_64: dos label with a
2 GiB /boot and a 38 GiB ext4 root; aarch64: GPT with an EFI system partition, /boot and root),
with very little data in it: the root skeleton in `sample-root/`, the host's real kernel modules
(a few) and vmlinuz, and openEuler's known root password. Demos and tests run on it offline.
Made with `mkfs.ext4 -d` from a staging tree (owners, modes and SELinux labels then set with debugfs),
mkfs.vfat + mcopy for the ESP, sfdisk for the table and `qemu-img convert` to qcow2: a few MiB of data.

`mkfs.ext4 -d` copies the staging tree's modes, so every staged entry gets an explicit mode (directories
0755, files 0644, or 0755 when the skeleton's file is executable) whatever the caller's umask: under
umask 077 the tree would otherwise carry 0700 directories and 0600 files (71 inodes of the x86_64 sample),
other bytes under the same key.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from eulerbake.core.derivation import BuildContext, Derivation, LocalFile, LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import disk, ext4, vfat
from eulerbake.tools.run import run

SKELETON = Path(__file__).resolve().parents[1] / "sample-root"
RELEASE = "22.03-LTS"
ARCHES = ("x86_64", "aarch64")
TOOLS = ("mkfs.ext4", "debugfs", "mkfs.vfat", "mcopy", "sfdisk", "qemu-img", "depmod")
VIRTUAL_SIZE = 40 * 1024**3
GIB = 1024**3
MIB = 1024**2
# A few small real modules of the host kernel, one with a dependency, so modules.dep means something.
SAMPLE_MODULES = (
    "kernel/drivers/net/dummy.ko",
    "kernel/lib/crc8.ko",
    "kernel/net/netfilter/x_tables.ko",
    "kernel/net/netfilter/xt_mac.ko",
)
MODULE_LISTS = ("modules.order", "modules.builtin", "modules.builtin.modinfo")
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"

# Partition layouts in 512-byte sectors: (mount point, start, size); the last runs to the disk end.
LAYOUTS: dict[str, tuple[str, list[tuple[str, int, int]]]] = {
    "x86_64": ("dos", [("/boot", 2048, 2 * GIB // 512 - 2048), ("/", 2 * GIB // 512, 0)]),
    "aarch64": (
        "gpt",
        [
            ("/boot/efi", 2048, 512 * MIB // 512 - 2048),
            ("/boot", 512 * MIB // 512, GIB // 512),
            ("/", 1536 * MIB // 512, 0),
        ],
    ),
}

# Modes git cannot record, and owners a rootless build cannot set on the host (set in the image).
MODES = {
    "etc/shadow": 0o000,
    "etc/shadow-": 0o000,
    "etc/gshadow": 0o000,
    "etc/ssh/sshd_config": 0o600,
    "etc/machine-id": 0o444,
    "root": 0o550,
    "tmp": 0o1777,
    "var/tmp": 0o1777,
}
EMPTY_DIRS = (
    "boot", "dev", "home", "media", "mnt", "opt", "proc", "root", "run", "srv", "sys", "tmp",
    "usr/bin", "usr/sbin", "usr/lib64", "var/log", "var/tmp",
)  # fmt: skip
SYMLINKS = {
    "bin": "usr/bin",
    "sbin": "usr/sbin",
    "lib": "usr/lib",
    "lib64": "usr/lib64",
    "var/lib/cloud/instance": "/var/lib/cloud/instances/iid-datasource-none",
}
DIR_MODE, FILE_MODE, EXECUTABLE_MODE = 0o755, 0o644, 0o755  # staging modes, whatever the umask
SELINUX_LABELS = {
    "/": "system_u:object_r:root_t:s0",
    "/etc/shadow": "system_u:object_r:shadow_t:s0",
    "/etc/ssh/sshd_config": "system_u:object_r:etc_t:s0",
    "/etc/machine-id": "system_u:object_r:machineid_t:s0",
}



def qcow2_name(arch: str) -> str:
    return f"openEuler-{RELEASE}-sample-{arch}.qcow2"


def _uuid(ctx: BuildContext, purpose: str) -> str:
    return disk.seeded_guid(ctx.seed(purpose)).lower()


def _stage_root(ctx: BuildContext, dest: Path, kernel_release: str, variables: dict[str, str]) -> None:
    """The root tree: skeleton (templates rendered), empty dirs, symlinks and kernel modules."""
    _copy_rendered(SKELETON / "root", dest, variables)
    for directory in EMPTY_DIRS:
        (dest / directory).mkdir(parents=True, exist_ok=True)
    for link, target in SYMLINKS.items():
        (dest / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, dest / link)
    modules = dest / "usr/lib/modules" / kernel_release
    modules.mkdir(parents=True)
    for name in MODULE_LISTS:
        source = ctx.inputs.get(f"modules/{name}")
        if name == "modules.order" and source is not None:
            # Only the modules shipped here, in the kernel's order.
            wanted = set(SAMPLE_MODULES)
            lines = [line for line in source.read_text().splitlines() if line in wanted]
            (modules / name).write_text("".join(line + "\n" for line in lines))
        elif source is not None:
            shutil.copyfile(source, modules / name)
        else:
            (modules / name).write_bytes(b"")
    for module in SAMPLE_MODULES:
        source = ctx.inputs.get(f"modules/{module}")
        if source is not None:
            (modules / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, modules / module)
    run(["depmod", "-b", dest, kernel_release])


def _copy_rendered(source: Path, dest: Path, variables: dict[str, str]) -> None:
    """Copy a skeleton tree; `*.j2` files are rendered with jinja2 and lose the suffix."""
    import jinja2  # only when building: every doit run imports the recipes

    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    for path in sorted(source.rglob("*")):
        target = dest / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".j2":
            target.with_suffix("").write_text(environment.from_string(path.read_text()).render(variables))
            target.with_suffix("").chmod(FILE_MODE)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            target.chmod(EXECUTABLE_MODE if path.stat().st_mode & stat.S_IXUSR else FILE_MODE)


def _set_modes(tree: Path) -> None:
    """Every entry of a staging tree to an explicit mode: directories 0755, files 0644 (0755 if executable).

    Files get an executable bit only from an explicit chmod (a skeleton script, the kernel), never from the
    umask; what the umask took away (group and other bits, or more) is put back the same way every time.
    """
    for current, _dirnames, filenames in os.walk(tree):
        os.chmod(current, DIR_MODE)
        for name in filenames:
            path = os.path.join(current, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):  # a symlink's own mode means nothing; os.walk does not follow them
                os.chmod(path, EXECUTABLE_MODE if st.st_mode & stat.S_IXUSR else FILE_MODE)


def _tree_paths(root: Path) -> list[str]:
    """Image paths of every entry of a staging tree, parents first, plus the filesystem root."""
    paths = ["/"]
    for current, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(current).relative_to(root).as_posix()
        prefix = "/" if rel == "." else f"/{rel}/"
        paths.extend(prefix + name for name in sorted(dirnames + filenames))
    return paths


def _make_ext4(ctx: BuildContext, image: Path, size: int, staging: Path, purpose: str, modes: dict[str, int]) -> None:
    """mkfs.ext4 -d from `staging`, then owners, modes and times fixed inside the image."""
    ext4.make_filesystem(
        image,
        size,
        uuid=_uuid(ctx, f"{purpose}-fs-uuid"),
        hash_seed=_uuid(ctx, f"{purpose}-hash-seed"),
        epoch=ctx.source_date_epoch,
        source=staging,
    )
    fs = ext4.Ext4Image(image, ctx.source_date_epoch, ctx.work / f"debugfs-{purpose}")
    paths = _tree_paths(staging)
    commands = []
    for path in [*paths, "/lost+found"]:
        local = staging / path.lstrip("/") if path != "/lost+found" else None
        commands += [f"sif {ext4.quote(path)} uid 0", f"sif {ext4.quote(path)} gid 0"]
        if local is not None and not local.is_symlink():
            rel = path.lstrip("/")
            if rel in modes:
                kind = stat.S_IFMT(local.lstat().st_mode)
                commands.append(f"sif {ext4.quote(path)} mode 0{kind | modes[rel]:o}")
    fs.execute(commands)
    fs.pin_times([*paths, "/lost+found"])
    # Like a real cloud image: mounted (booted) after its last check, so a resize must run e2fsck -f first.
    epoch = ctx.source_date_epoch
    fs.execute([f"ssv lastcheck {epoch}", f"ssv mtime {epoch + 3600}", f"ssv wtime {epoch + 3600}", "ssv mnt_count 7"])

def build(ctx: BuildContext) -> None:
    """Assemble the sample disk from partition images and convert it to qcow2."""
    params: Params = ctx.params
    arch = params.arch
    kernel_release = params.kernel_release
    epoch = ctx.source_date_epoch
    label, layout = LAYOUTS[arch]
    table = _partition_table(label, layout)
    table = disk.with_seeded_ids(table, ctx.seed("partition-table"))
    variables = {
        "kernel_release": kernel_release,
        "arch": arch,
        "root_uuid": _uuid(ctx, "root-fs-uuid"),
        "boot_uuid": _uuid(ctx, "boot-fs-uuid"),
        "esp_uuid": "",
    }
    esp_volume_id = ctx.seed("esp-volume-id")[:4].hex().upper()
    if any(mount == "/boot/efi" for mount, _, _ in layout):
        variables["esp_uuid"] = f"{esp_volume_id[:4]}-{esp_volume_id[4:]}"

    pieces: dict[int, Path] = {}
    for part, (mount, _, _) in zip(table.partitions, layout, strict=True):
        piece = ctx.work / f"p{part.number}.img"
        staging = ctx.work / f"staging-{part.number}"
        staging.mkdir()
        if mount == "/":
            _stage_root(ctx, staging, kernel_release, variables)
            _set_modes(staging)
            _set_times(staging, epoch)
            _make_ext4(ctx, piece, part.length(), staging, "root", MODES)
            fs = ext4.Ext4Image(piece, epoch, ctx.work / "debugfs-labels")
            fs.execute([f"ea_set {ext4.quote(path)} security.selinux {ctx_}" for path, ctx_ in SELINUX_LABELS.items()])
        elif mount == "/boot":
            if (SKELETON / "boot" / arch).is_dir():
                _copy_rendered(SKELETON / "boot" / arch, staging, variables)
            kernel = ctx.inputs.get("kernel-image")
            if kernel is not None:
                shutil.copyfile(kernel, staging / f"vmlinuz-{kernel_release}")
                (staging / f"vmlinuz-{kernel_release}").chmod(EXECUTABLE_MODE)
            _set_modes(staging)
            _set_times(staging, epoch)
            _make_ext4(ctx, piece, part.length(), staging, "boot", {})
        else:  # the EFI system partition
            _copy_rendered(SKELETON / "efi" / arch, staging, variables)
            _set_modes(staging)
            vfat.make_filesystem(piece, part.length(), volume_id=esp_volume_id, epoch=epoch)
            vfat.copy_tree(piece, staging, epoch)
        pieces[part.number] = piece

    raw = ctx.work / "disk.raw"
    disk.assemble_disk(raw, VIRTUAL_SIZE, table, pieces)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, ctx.out / qcow2_name(arch)])
    ctx.log(f"sample {arch}: {qcow2_name(arch)} ({disk.format_size((ctx.out / qcow2_name(arch)).stat().st_size)})")


def _set_times(tree: Path, epoch: int) -> None:
    for current, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            os.utime(os.path.join(current, name), (epoch, epoch), follow_symlinks=False)
    os.utime(tree, (epoch, epoch))


def _partition_table(label: str, layout: list[tuple[str, int, int]]) -> disk.PartitionTable:
    parts = []
    end_of_disk = VIRTUAL_SIZE // 512 - (disk.GPT_BACKUP_SECTORS if label == "gpt" else 0)
    for number, (mount, start, size) in enumerate(layout, start=1):
        if size == 0:  # the last partition takes the rest, 1 MiB aligned
            size = (end_of_disk - start) // 2048 * 2048
        if label == "dos":
            parts.append(disk.Partition(number, start, size, "83", bootable=mount == "/boot"))
        else:
            kind = EFI_SYSTEM if mount == "/boot/efi" else LINUX_FS
            name = {"/boot/efi": "EFI System Partition", "/boot": "boot", "/": "root"}[mount]
            parts.append(disk.Partition(number, start, size, kind, uuid="", name=name))
    return disk.PartitionTable(label=label, id="", partitions=tuple(parts), first_lba=2048 if label == "gpt" else None)

@dataclass(frozen=True)
class Params:
    arch: str
    kernel_release: str  # the /lib/modules/<release>/ (and, on x86_64, the vmlinuz) the image carries
    virtual_size: int


def qcow2(arch: str, *, kernel_release: str) -> Derivation:
    """Stage `qcow2:sample:<arch>`: the sample openEuler-shaped qcow2, carrying `kernel_release`.

    On x86_64 the release is the host's (its vmlinuz and a few modules go in); the aarch64 image has
    only the module lists of a release string (there is no arm64 kernel on the build host).
    """
    if arch not in ARCHES:
        raise EulerbakeError(f"unknown architecture {arch!r} for the sample release", hint=f"use one of {ARCHES}")
    inputs: dict[str, LocalFile | LocalTree] = {"skeleton": LocalTree(SKELETON)}
    if arch == "x86_64":
        module_dir = Path("/lib/modules") / kernel_release
        inputs["kernel-image"] = LocalFile(Path("/boot") / f"vmlinuz-{kernel_release}")
        for name in (*MODULE_LISTS, *SAMPLE_MODULES):
            inputs[f"modules/{name}"] = LocalFile(module_dir / name)
    return Derivation(
        stage="qcow2",
        label=f"sample:{arch}",
        builder=build,
        inputs=inputs,
        params=Params(arch=arch, kernel_release=kernel_release, virtual_size=VIRTUAL_SIZE),
        tools=TOOLS,
        doc=f"offline openEuler-shaped {arch} qcow2 (40 GiB virtual, a few MiB of data)",
    )
