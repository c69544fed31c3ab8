"""Partition tables as data: JSON round trip, seeded ids, the sfdisk script (found by scripts/mutation)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import disk
from recipes.stages.hygiene import (
    edit_grub_defaults,
    edit_kernel_command_lines,
    harden_sshd_config,
    lock_password,
    selinux_enabled,
)

GPT = disk.PartitionTable(
    label="gpt", id="0D8C1E36-1A39-4D3B-9B5B-5F1C0E2A7C11", sector_size=4096, first_lba=6,
    partitions=(disk.Partition(2, 2048, 1000, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "U2", "root", "GUID:59"),
                disk.Partition(1, 256, 256, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "U1", "EFI", None, True)),
)


def test_a_table_survives_json_whole() -> None:
    assert disk.PartitionTable.from_json(GPT.to_json()) == GPT
    without_lba = {k: v for k, v in GPT.to_json().items() if k != "first_lba"}
    assert disk.PartitionTable.from_json(without_lba).first_lba is None


def test_seeded_guids_are_version_4_uppercase_and_from_the_first_16_bytes() -> None:
    seed = bytes(range(32))
    guid = disk.seeded_guid(seed)
    assert guid == guid.upper() and uuid.UUID(guid).version == 4 and uuid.UUID(guid).variant == uuid.RFC_4122
    assert guid == str(uuid.UUID(bytes=seed[:16], version=4)).upper()
    assert disk.seeded_guid(seed[:16] + bytes(16)) == guid


def test_seeded_dos_ids_are_never_zero() -> None:
    assert disk.seeded_dos_id(bytes.fromhex("0000000a") + bytes(28)) == "0x0000000a"
    assert disk.seeded_dos_id(bytes(32)) == "0x00000001"


def test_seeded_ids_differ_per_partition_and_keep_everything_else() -> None:
    seeded = disk.with_seeded_ids(GPT, bytes(32))
    assert seeded.id == disk.seeded_guid(bytes(32))
    uuids = [part.uuid for part in seeded.partitions]
    assert len(set(uuids)) == 2 and GPT.id not in uuids and seeded.id not in uuids
    assert [disk.Partition(**{**part.__dict__, "uuid": None}) for part in seeded.partitions] == \
        [disk.Partition(**{**part.__dict__, "uuid": None}) for part in GPT.partitions]
    dos = disk.PartitionTable("dos", "0x12345678", (disk.Partition(1, 2048, 10, "83", bootable=True),))
    assert disk.with_seeded_ids(dos, bytes(32)).partitions == dos.partitions


def test_the_sfdisk_script_recreates_the_table_exactly() -> None:
    assert disk.sfdisk_script(GPT) == (
        "label: gpt\nlabel-id: 0D8C1E36-1A39-4D3B-9B5B-5F1C0E2A7C11\nunit: sectors\nsector-size: 4096\n"
        "first-lba: 6\n\n"
        'start=256, size=256, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=U1, name="EFI"\n'
        'start=2048, size=1000, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=U2, name="root", attrs="GUID:59"\n'
    )
    dos = disk.PartitionTable("dos", "0x12345678", (disk.Partition(1, 2048, 10, "83", "U", "n", None, True),
                                                    disk.Partition(2, 4096, 10, "83")), first_lba=34)
    assert disk.sfdisk_script(dos) == ("label: dos\nlabel-id: 0x12345678\nunit: sectors\nsector-size: 512\n\n"
                                       "start=2048, size=10, type=83, bootable\nstart=4096, size=10, type=83\n")


@pytest.mark.parametrize("name", ['a"b', "a\nb", '"', "\n"])
def test_a_partition_name_with_a_quote_or_newline_is_refused(name: str) -> None:
    table = disk.PartitionTable("gpt", "G", (disk.Partition(1, 2048, 10, "T", name=name),))
    with pytest.raises(EulerbakeError, match="contains a quote or newline"):
        disk.sfdisk_script(table)


def test_grub_defaults_keep_other_lines_and_quote_the_edited_one() -> None:
    text = "GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX='rhgb quiet'  \nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n"
    assert edit_grub_defaults(text, ["quiet", "rhgb"], ["console=ttyS0,115200n8"]) == (
        'GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="console=ttyS0,115200n8"\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n')


def test_sshd_match_blocks_are_left_alone() -> None:
    text = "PermitRootLogin yes\nMatch User backup\n    PasswordAuthentication yes\n"
    hardened = harden_sshd_config(text)
    assert hardened.endswith("\nPermitRootLogin no\nMatch User backup\n    PasswordAuthentication yes\n")
    assert harden_sshd_config("match all\nPermitRootLogin yes\n").endswith("\nmatch all\nPermitRootLogin yes\n")


class Root:
    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def exists(self, path: str) -> bool:
        return path in self.files

    def read_file(self, path: str) -> bytes:
        return self.files[path].encode()


@pytest.mark.parametrize(("config", "enabled"), [
    ("SELINUX=enforcing\n", True), ("# c\n  SELINUX = permissive \n", True), ("SELINUX=disabled\n", False),
    ("#SELINUX=enforcing\n", False), ("SELINUXTYPE=targeted\n", False), (None, False),
])
def test_selinux_is_on_when_enforcing_or_permissive(config: str | None, enabled: bool) -> None:
    root = Root({} if config is None else {"/etc/selinux/config": config})
    assert selinux_enabled(root) is enabled  # type: ignore[arg-type]


@pytest.mark.parametrize(("shadow", "locked"), [
    ("root:$6$salt$hash:19000:0:99999:7:::\nbin:*:1::\n", "root:!!:19000:0:99999:7:::\nbin:*:1::\n"),
    ("root:pw:1:2:3:4:5:6:X\n", "root:!!:1:2:3:4:5:6:X\n"),
    ("root:pw:1 \r\n", "root:!!:1 \r\n"),
    ("root\nroot:pw\n", "root\nroot:!!\n"),
    ("root:pw", "root:!!"),
])
def test_lock_password_edits_only_roots_password_field(shadow: str, locked: str) -> None:
    assert lock_password(shadow) == locked


def test_kernel_lines_keep_their_last_argument_and_a_missing_final_newline() -> None:
    text = "menuentry x {\n\tlinux /vmlinuz root=/dev/sdaX quiet\n\tlinux16 /vmlinuz resume=/dev/swapX"
    edited, count = edit_kernel_command_lines(text, ["quiet"], ["rd.multipath=0"])
    assert (edited, count) == ("menuentry x {\n\tlinux /vmlinuz root=/dev/sdaX rd.multipath=0\n"
                               "\tlinux16 /vmlinuz resume=/dev/swapX rd.multipath=0", 2)
    assert edit_grub_defaults("GRUB_CMDLINE_LINUX=resume=/dev/swapX", [], []) == \
        'GRUB_CMDLINE_LINUX="resume=/dev/swapX"\n'


def test_selinux_config_with_bytes_that_are_not_utf8() -> None:
    root = Root({})
    root.read_file = lambda _path: b"\xff\xfe\nSELINUX=enforcing\n"  # type: ignore[method-assign]
    root.files["/etc/selinux/config"] = ""
    assert selinux_enabled(root) is True  # type: ignore[arg-type]


def test_reading_a_disk_without_a_table_says_so(tmp_path: Path) -> None:
    blank = tmp_path / "blank.raw"
    blank.write_bytes(bytes(1024 * 1024))
    with pytest.raises(EulerbakeError) as err:
        disk.read_partition_table(blank)
    assert err.value.message.startswith("blank.raw has no partition table (sfdisk: ")
    assert err.value.message.endswith("blank.raw: does not contain a recognized partition table)")  # its last line


def test_an_empty_gpt_label_reads_as_no_partitions(tmp_path: Path) -> None:
    image = tmp_path / "empty.raw"
    image.write_bytes(bytes(4 * 1024 * 1024))
    empty = disk.PartitionTable("gpt", "0D8C1E36-1A39-4D3B-9B5B-5F1C0E2A7C11", ())
    disk.write_partition_table(image, empty)
    table = disk.read_partition_table(image)
    assert (table.label, table.id, table.partitions, table.sector_size) == ("gpt", empty.id, (), 512)


def test_the_smallest_disk_holds_every_partition_and_the_gpt_backup() -> None:
    assert GPT.min_disk_bytes() == (2048 + 1000 + 33) * 4096
    dos = disk.PartitionTable("dos", "0x1", (disk.Partition(1, 2048, 10, "83"), disk.Partition(2, 100, 5, "83")))
    assert dos.min_disk_bytes() == (2048 + 10) * 512
    assert disk.PartitionTable("dos", "0x1", ()).min_disk_bytes() == 0
