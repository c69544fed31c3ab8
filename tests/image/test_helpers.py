"""The disk, ext4 and hygiene helpers on their own, and the raw stage on a hand-made disk with boot code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import disk, ext4
from eulerbake.store.local import Store
from eulerbake.tools.run import run, run_text
from recipes.stages.hygiene import edit_grub_defaults, edit_kernel_command_lines, harden_sshd_config, lock_password
from recipes.stages.raw import raw, read_attrs_manifest

from .conftest import debugfs_cat, debugfs_ls, e2fsck_clean, make_disk, source_for, to_qcow2

EPOCH = 1_700_000_000


@pytest.mark.parametrize(
    ("text", "size"),
    [("8G", 8 * 1024**3), ("6GiB", 6 * 1024**3), ("512M", 512 * 1024**2), ("6442450944", 6442450944), (4096, 4096)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert disk.parse_size(text) == size


@pytest.mark.parametrize("text", ["eight", "8X", "-1G", "0", ""])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(EulerbakeError):
        disk.parse_size(text, "disk_size")


def test_lock_password_only_touches_root() -> None:
    shadow = "root:$6$salt$hash:19083:0:99999:7:::\nbin:*:19083:0:99999:7:::\nrootless:$6$x$y:1::::::\n"
    locked = lock_password(shadow).splitlines()
    assert locked[0] == "root:!!:19083:0:99999:7:::"
    assert locked[1:] == shadow.splitlines()[1:]


def test_sshd_settings_win_over_includes_and_existing_lines() -> None:
    config = (
        "Include /etc/ssh/sshd_config.d/*.conf\n"
        "PermitRootLogin yes\n"
        "#PasswordAuthentication yes\n"
        "Match User backup\n"
        "    PasswordAuthentication yes\n"
    )
    hardened = harden_sshd_config(config)
    lines = hardened.splitlines()
    # sshd keeps the first value: ours come before the Include.
    assert lines.index("PermitRootLogin no") < lines.index("Include /etc/ssh/sshd_config.d/*.conf")
    assert lines.index("PasswordAuthentication no") < lines.index("Include /etc/ssh/sshd_config.d/*.conf")
    assert "PermitRootLogin yes" not in lines
    assert "    PasswordAuthentication yes" in lines  # a Match block is the admin's explicit choice
    assert harden_sshd_config(hardened) == hardened


def test_kernel_command_line_edit() -> None:
    cfg = (
        "menuentry 'x' {\n"
        "\tlinux\t/vmlinuz-5.10 root=UUID=abc ro console=tty0 console=ttyS0,9600 rhgb quiet crashkernel=512M\n"
        "\tinitrd\t/initramfs-5.10.img\n"
        "}\n"
        "\tlinuxefi /vmlinuz-rescue root=UUID=abc quiet\n"
    )
    add = ["console=ttyS0,115200n8", "rd.multipath=0"]
    edited, count = edit_kernel_command_lines(cfg, ["quiet", "rhgb"], add)
    assert count == 2
    first = edited.splitlines()[1]
    assert (
        first
        == "\tlinux\t/vmlinuz-5.10 root=UUID=abc ro console=tty0 crashkernel=512M console=ttyS0,115200n8 rd.multipath=0"
    )
    assert edited.splitlines()[2] == "\tinitrd\t/initramfs-5.10.img"
    assert edit_kernel_command_lines(edited, ["quiet", "rhgb"], add) == (edited, 2)  # idempotent
    defaults = edit_grub_defaults('GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="rhgb quiet crashkernel=512M"\n', ["quiet"], add)
    assert (
        defaults.splitlines()[1] == 'GRUB_CMDLINE_LINUX="rhgb crashkernel=512M console=ttyS0,115200n8 rd.multipath=0"'
    )


@pytest.fixture
def small_fs(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    (source / "etc").mkdir(parents=True)
    (source / "usr" / "lib" / "modules").mkdir(parents=True)
    (source / "etc" / "sudoers").write_text("root ALL=(ALL) ALL\n")
    os.chmod(source / "etc" / "sudoers", 0o440)
    os.symlink("usr/lib", source / "lib")
    image = tmp_path / "fs.img"
    ext4.make_filesystem(
        image,
        64 * 1024**2,
        uuid="0f0e0d0c-0b0a-4908-8706-050403020100",
        hash_seed="00010203-0405-4607-8809-0a0b0c0d0e0f",
        epoch=EPOCH,
        source=source,
    )
    return image


def test_inject_tree_modes_owners_symlinks(small_fs: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    (overlay / "etc" / "sudoers.d").mkdir(parents=True)
    (overlay / "etc" / "sudoers.d" / "cloud").write_text("cloud ALL=(ALL) NOPASSWD: ALL\n")
    (overlay / "etc" / "sudoers").write_text("root ALL=(ALL) ALL\n%wheel ALL=(ALL) ALL\n")
    (overlay / "lib" / "modules" / "6.1" / "extra").mkdir(parents=True)
    (overlay / "lib" / "modules" / "6.1" / "extra" / "x.ko").write_bytes(b"\x7fELF")
    (overlay / "usr" / "bin").mkdir(parents=True)
    (overlay / "usr" / "bin" / "hello").write_text("#!/bin/sh\necho hello\n")
    os.chmod(overlay / "usr" / "bin" / "hello", 0o755)
    os.symlink("hello", overlay / "usr" / "bin" / "hi")
    (overlay / ".eulerbake-attrs").write_text("# sudo insists\n0440 0 0 etc/sudoers.d/cloud\n")

    fs = ext4.Ext4Image(small_fs, EPOCH, tmp_path / "scratch")
    written = ext4.inject_tree(fs, overlay, attrs=read_attrs_manifest(overlay), skip={".eulerbake-attrs"})
    assert "/usr/lib/modules/6.1/extra/x.ko" in written  # through the /lib -> usr/lib symlink
    e2fsck_clean(small_fs)
    assert debugfs_ls(small_fs, "/etc/sudoers.d")["cloud"] == (0o100440, 0, 0)
    assert debugfs_ls(small_fs, "/etc")["sudoers"][0] & 0o7777 == 0o440  # replaced file keeps its mode
    assert debugfs_cat(small_fs, "/etc/sudoers").endswith(b"%wheel ALL=(ALL) ALL\n")
    assert debugfs_ls(small_fs, "/usr/bin")["hello"][0] & 0o7777 == 0o755
    assert debugfs_ls(small_fs, "/usr/lib/modules/6.1/extra")["x.ko"][0] & 0o7777 == 0o644
    assert debugfs_ls(small_fs, "/usr/bin")["hi"][0] & 0o170000 == 0o120000
    assert ".eulerbake-attrs" not in debugfs_ls(small_fs, "/")
    assert fs.read_file("/usr/bin/hi") == (overlay / "usr" / "bin" / "hello").read_bytes()


def test_attrs_manifest_errors(tmp_path: Path) -> None:
    (tmp_path / ".eulerbake-attrs").write_text("0440 root etc/x\n")
    with pytest.raises(EulerbakeError, match="cannot parse"):
        read_attrs_manifest(tmp_path)
    (tmp_path / ".eulerbake-attrs").write_text("0440 0 0 etc/missing\n")
    with pytest.raises(EulerbakeError, match="etc/missing is not in the overlay"):
        read_attrs_manifest(tmp_path)


def test_filesystem_changes_refuse_offset_views(small_fs: Path, tmp_path: Path) -> None:
    """resize2fs on 'disk?offset=' truncates the whole disk: such paths never reach a writing tool."""
    before = small_fs.stat().st_size
    with pytest.raises(EulerbakeError, match="standalone copy"):
        ext4.resize(Path(f"{small_fs}?offset=0"), 32 * 1024**2, EPOCH)
    with pytest.raises(EulerbakeError, match="standalone copy"):
        ext4.Ext4Image(f"{small_fs}?offset=0", EPOCH, tmp_path).write_file("/etc/x", b"x")
    assert small_fs.stat().st_size == before


@pytest.mark.parametrize("fs_type", ["ext4", "ext2", "ext4-fast-commit"])
def test_shrink_remakes_the_journal_sparse(fs_type: str, tmp_path: Path) -> None:
    """Shrinking drops and remakes an internal journal (same size) instead of copying it; the new
    journal's zero blocks stay unallocated. A filesystem without a journal is simply resized, and
    one with a fast-commit area keeps its journal the way resize2fs moves it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "blob").write_bytes(os.urandom(4 * 1024**2))
    image = tmp_path / "fs.img"
    run(["truncate", "-s", "2G", image])
    options = {"ext4": ["-J", "size=64"], "ext2": [], "ext4-fast-commit": ["-J", "size=64", "-O", "fast_commit"]}
    mkfs = "mkfs.ext2" if fs_type == "ext2" else "mkfs.ext4"
    run([mkfs, "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1", *options[fs_type], "-d", data, image])
    before = ext4.info(image)
    ext4.check(image, EPOCH, repair=True)
    ext4.resize(image, 256 * 1024**2, EPOCH)
    assert image.stat().st_size == 256 * 1024**2
    e2fsck_clean(image)
    after = ext4.info(image)
    assert after.block_count * after.block_size == 256 * 1024**2
    assert ("has_journal" in after.features) == (fs_type != "ext2")
    assert after.journal_blocks == before.journal_blocks
    if fs_type == "ext4":
        assert disk.allocated_bytes(image) < 16 * 1024**2  # 4 MiB of data + metadata, no zero-filled journal
    assert debugfs_cat(image, "/blob") == (data / "blob").read_bytes()


def test_shrink_moves_files_that_lie_beyond_the_new_end(tmp_path: Path) -> None:
    """A file placed 1.2 GiB into a 2 GiB filesystem survives a shrink to 512 MiB byte for byte."""
    image = tmp_path / "fs.img"
    run(["truncate", "-s", "2G", image])
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1", image])
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(3_000_000))
    fs = ext4.Ext4Image(image, EPOCH, tmp_path / "scratch")
    fs.write_file("/filler", b"x")
    fs.execute(["fallocate /filler 0 300000"])  # 1.1 GiB of blocks, metadata only: pushes the next file far out
    fs.write_file("/payload", payload)
    fs.remove("/filler")

    def payload_blocks() -> list[tuple[int, int]]:
        entry = ext4.Ext4Image(image, EPOCH, tmp_path / "scratch").lstat("/payload")
        assert entry is not None
        return ext4.block_ranges(image, entry.inode)

    assert payload_blocks()[0][0] * 4096 > 1024**3
    ext4.check(image, EPOCH, repair=True)
    ext4.resize(image, 512 * 1024**2, EPOCH)
    e2fsck_clean(image)
    assert image.stat().st_size == 512 * 1024**2
    assert all(start + count <= 512 * 1024**2 // 4096 for start, count in payload_blocks())
    assert debugfs_cat(image, "/payload") == payload.read_bytes()


def test_raw_keeps_boot_code_of_a_hand_made_disk(tmp_path: Path) -> None:
    """MBR boot code and the gap before the first partition (GRUB's core.img) survive; /boot may be absent
    from the root filesystem's view and so may sshd_config, machine-id and cloud-init state."""
    disk_raw = tmp_path / "handmade.raw"
    script = "label: dos\nunit: sectors\n\nstart=2048, size=260096, type=83, bootable\nstart=262144, type=83\n"
    make_disk(disk_raw, "2G", script)
    boot_code = bytes(range(256)) + bytes(range(184))  # 440 bytes: the MBR's code area
    core_img = os.urandom(2047 * 512 - 4096) + b"\0" * 4096
    with disk_raw.open("r+b") as handle:
        handle.write(boot_code)
        handle.seek(512)
        handle.write(core_img)
    boot_tree = tmp_path / "boot" / "grub2"
    boot_tree.mkdir(parents=True)
    (boot_tree / "grub.cfg").write_text("menuentry 'x' {\n\tlinux /vmlinuz root=/dev/sda2 ro quiet\n}\n")
    root_tree = tmp_path / "root" / "etc"
    root_tree.mkdir(parents=True)
    (root_tree / "os-release").write_text('NAME="openEuler"\nVERSION_ID="22.03"\n')
    (root_tree / "shadow").write_text("root:$6$a$b:1:0:99999:7:::\n")
    run(["mkfs.ext4", "-q", "-E", f"offset={2048 * 512}", "-d", tmp_path / "boot", disk_raw, "130048k"])
    run(
        [
            "mkfs.ext4",
            "-q",
            "-E",
            f"offset={262144 * 512}",
            "-d",
            tmp_path / "root",
            disk_raw,
            f"{(2 * 1024**3 - 262144 * 512) // 1024}k",
        ]
    )
    qcow2 = to_qcow2(disk_raw, tmp_path / "handmade.qcow2")

    store = Store(tmp_path / "store")
    drv = raw(
        "handmade:x86_64", source_for(qcow2, "handmade"), [], disk_size="1G", root_size="512M", arch="x86_64"
    )
    out = store.realise(drv, log=lambda _: None).path / "disk.raw"
    with out.open("rb") as handle:
        head = handle.read(2048 * 512)
    assert head[:440] == boot_code
    assert head[512:] == core_img
    assert "No errors detected" in run_text(["sfdisk", "--verify", out])
    root_spec = f"{out}?offset={262144 * 512}"
    e2fsck_clean(root_spec)
    assert debugfs_cat(root_spec, "/etc/shadow").startswith(b"root:!!:")
    assert debugfs_cat(root_spec, "/etc/machine-id") == b""
    assert debugfs_ls(root_spec, "/etc")["machine-id"][0] & 0o7777 == 0o444
    assert b"console=ttyS0,115200n8" in debugfs_cat(f"{out}?offset={2048 * 512}", "/grub2/grub.cfg")
    assert ".autorelabel" not in debugfs_ls(root_spec, "/")  # no SELinux config in this image
    assert disk.read_partition_table(out).partition(2).size == 512 * 2048


def test_partition_table_round_trip(tmp_path: Path) -> None:
    """sfdisk's JSON -> script -> JSON gives the same table, ids included, for both labels."""
    gpt = disk.PartitionTable(
        label="gpt",
        id="",
        first_lba=2048,
        partitions=(
            disk.Partition(1, 2048, 4096, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", uuid="", name="EFI System Partition"),
            disk.Partition(
                2, 8192, 8192, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", uuid="", name="root", attrs="LegacyBIOSBootable"
            ),
        ),
    )
    dos = disk.PartitionTable(label="dos", id="", partitions=(disk.Partition(1, 2048, 4096, "83", bootable=True),))
    for table in (gpt, dos):
        seeded = disk.with_seeded_ids(table, bytes(range(32)))
        image = tmp_path / f"{table.label}.raw"
        disk.create_sparse(image, 16 * 1024**2)
        disk.write_partition_table(image, seeded)
        assert disk.read_partition_table(image) == seeded
        assert disk.with_seeded_ids(table, bytes(range(32))) == seeded  # deterministic
        assert disk.with_seeded_ids(table, bytes(range(1, 33))).id != seeded.id


def test_assembly_by_inserting_a_range_matches_plain_copies(small_fs: Path, tmp_path: Path) -> None:
    """Turning the last partition's file into the disk (fallocate --insert-range) gives the same bytes
    as writing every piece into a fresh sparse file."""
    boot = tmp_path / "boot.img"
    disk.create_sparse(boot, 8 * 1024**2)
    with boot.open("r+b") as handle:
        handle.write(os.urandom(300_000))
    table = disk.PartitionTable(
        label="gpt",
        id="",
        first_lba=2048,
        partitions=(
            disk.Partition(1, 2048, 16384, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", uuid=""),
            disk.Partition(2, 18432, 64 * 2048, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", uuid=""),
        ),
    )
    table = disk.with_seeded_ids(table, bytes(32))
    copied = tmp_path / "copied.raw"
    disk.assemble_disk(copied, 96 * 1024**2, table, {1: boot, 2: small_fs})
    consumed_piece = tmp_path / "root-piece.img"
    disk.copy_sparse(small_fs, consumed_piece)
    inserted = tmp_path / "inserted.raw"
    disk.assemble_disk(inserted, 96 * 1024**2, table, {1: boot, 2: consumed_piece}, consume_last_piece=True)
    assert not consumed_piece.exists()  # it became the disk
    assert run_text(["b3sum", "--no-names", inserted]) == run_text(["b3sum", "--no-names", copied])
    e2fsck_clean(f"{inserted}?offset={18432 * 512}")
    assert disk.allocated_bytes(inserted) < 16 * 1024**2
