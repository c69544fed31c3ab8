"""disk_size `auto` (the default): the partitions before the root, the shrunk root and a GPT backup, rounded up
to a GiB; resolved by the raw builder from the image's table, so the parameter and the key say "auto"."""

from __future__ import annotations

from pathlib import Path

import pytest

from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import disk
from eulerbake.store.local import Store
from eulerbake.tools.run import run, run_text
from recipes.sample import sample_qcow2
from recipes.stages.raw import _shrunk_table, auto_disk_size, raw

from .conftest import Built, e2fsck_clean, make_disk, source_for, to_qcow2

GIB, MIB = 1024**3, 1024**2
SECTORS_PER_MIB = MIB // 512


def table(label: str, starts_mib: list[int], root_mib: int) -> disk.PartitionTable:
    """Partitions starting at `starts_mib`, each up to the next; the last (the root) `root_mib` long."""
    ends = [*starts_mib[1:], starts_mib[-1] + root_mib]
    parts = tuple(disk.Partition(number, start * SECTORS_PER_MIB, (end - start) * SECTORS_PER_MIB, "83")
                  for number, (start, end) in enumerate(zip(starts_mib, ends, strict=True), start=1))
    return disk.PartitionTable(label=label, id="", partitions=parts)


@pytest.mark.parametrize(("label", "starts", "expected"), [
    ("dos", [1, 2048], 8 * GIB),  # the stock x86_64 layout: /boot up to 2 GiB, then a 6 GiB root
    ("gpt", [1, 512, 1536], 8 * GIB),  # stock aarch64: ESP, /boot, root from 1.5 GiB (+ the GPT backup)
    ("dos", [1, 2049], 9 * GIB),  # the image: a 2 GiB /boot from sector 2048, root from 2 GiB + 1 MiB
    ("gpt", [1, 2047], 8 * GIB),  # the root ends 1 MiB before 8 GiB: room for the GPT backup table
])
def test_auto_is_the_partitions_rounded_up_to_a_gib(label: str, starts: list[int], expected: int) -> None:
    shrunk, size = _shrunk_table(table(label, starts, 40 * 1024), "image.qcow2", 6 * GIB, "auto")
    assert size == auto_disk_size(shrunk) == expected
    assert shrunk.by_position()[-1].length() == 6 * GIB and size >= shrunk.min_disk_bytes()


def test_gpt_backup_pushes_a_full_gib_over() -> None:
    exact = table("gpt", [1, 2048], 6 * 1024)  # root ends exactly at 8 GiB: the GPT backup needs 33 more sectors
    assert _shrunk_table(exact, "x", 6 * GIB, "auto")[1] == 9 * GIB
    assert _shrunk_table(table("dos", [1, 2048], 6 * 1024), "x", 6 * GIB, "auto")[1] == 8 * GIB


def test_too_small_a_disk_says_what_it_needs_without_contradiction() -> None:
    with pytest.raises(EulerbakeError) as caught:
        _shrunk_table(table("dos", [1, 2049], 40 * 1024), "openEuler-22.03-LTS-x86_64.qcow2", 6 * GIB, 8 * GIB)
    assert caught.value.message == (
        "disk_size 8G is too small for openEuler-22.03-LTS-x86_64.qcow2: its root partition starts at 2049M, so "
        "with a 6G root the disk needs at least 8193 MiB")
    assert caught.value.hint == ('set disk_size to "auto" (here 9G) or to at least 8193M, or lower root_size '
                                 "(see `eulerbake config show`)")


def test_auto_stays_auto_in_the_parameters() -> None:
    default = raw("sample:x86_64", sample_qcow2("x86_64"), [], arch="x86_64")
    assert default.params.disk_size == "auto" and default.manifest["params"]["disk_size"] == "auto"
    assert raw("sample:x86_64", sample_qcow2("x86_64"), [], disk_size="8G", arch="x86_64").key != default.key


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_auto_on_the_stock_layouts_is_8_gib(arch: str, built: dict[str, Built]) -> None:
    assert built[arch].raw_drv.params.disk_size == "auto"
    assert built[arch].disk.stat().st_size == 8 * GIB
    assert '"disk_size": 8589934592' in (built[arch].raw_dir / "disk.json").read_text()


def _image_with_root_at_2g_plus_1m(tmp_path: Path) -> Path:
    """A dos disk like the issue's: /boot 2 GiB from sector 2048, the root (a small ext4) from 2 GiB + 1 MiB."""
    image = tmp_path / "openEuler-big-boot.raw"
    boot_sectors = 2 * GIB // 512
    root_start = 2048 + boot_sectors
    make_disk(image, "3G", f"label: dos\nunit: sectors\n\nstart=2048, size={boot_sectors}, type=83, bootable\n"
                           f"start={root_start}, type=83\n")
    tree = tmp_path / "root" / "etc"
    tree.mkdir(parents=True)
    (tree / "os-release").write_text('NAME="openEuler"\nVERSION_ID="22.03"\n')
    run(["mkfs.ext4", "-q", "-E", f"offset={root_start * 512}", "-d", tmp_path / "root", image, "256M"])
    return to_qcow2(image, tmp_path / "openEuler-big-boot.qcow2")


def test_auto_on_a_root_starting_at_2g_plus_1m_builds_a_9_gib_disk(tmp_path: Path) -> None:
    source = source_for(_image_with_root_at_2g_plus_1m(tmp_path), "big-boot")
    store = Store(tmp_path / "store")
    store.realise(source, log=lambda _: None)

    too_small = raw("big-boot:x86_64", source, [], disk_size="8G", hygiene=False, arch="x86_64")
    with pytest.raises(EulerbakeError, match="disk_size 8G is too small .* starts at 2049M, .* at least 8193 MiB"):
        store.realise(too_small, log=lambda _: None)

    drv = raw("big-boot:x86_64", source, [], hygiene=False, arch="x86_64")
    out = store.realise(drv, log=lambda _: None).path / "disk.raw"
    assert out.stat().st_size == 9 * GIB
    assert "No errors detected" in run_text(["sfdisk", "--verify", out])
    root = disk.read_partition_table(out).partition(2)
    assert (root.offset(), root.length()) == (2 * GIB + MIB, 6 * GIB)
    e2fsck_clean(f"{out}?offset={root.offset()}")
