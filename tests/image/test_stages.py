"""The sample qcow2 and the raw stage (root shrink, overlays, hygiene) on both layouts (x86_64 dos,
aarch64 GPT), checked with real tools: qemu-img, sfdisk --verify, e2fsck -fn, fsck.fat, debugfs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eulerbake.core import hashing
from eulerbake.core.derivation import LocalTree
from eulerbake.fs import disk
from eulerbake.fs.partitions import find_root_partition
from eulerbake.store.local import Store
from eulerbake.tools.run import run, run_text
from recipes.sample import AARCH64_KERNEL_RELEASE, sample_kernel_release, sample_qcow2
from recipes.stages.raw import raw

from .conftest import (
    ARCHES,
    ENA_OVERLAY,
    ROOT_NUMBER,
    STOCK_ROOT_HASH,
    Built,
    debugfs_cat,
    debugfs_ls,
    e2fsck_clean,
    overlays_for,
    snapshot,
)

GIB = 1024**3


def _offset(raw: Path, number: int) -> int:
    table = disk.read_partition_table(raw)
    return table.partition(number).offset(table.sector_size)


def _spec(raw: Path, number: int) -> str:
    return f"{raw}?offset={_offset(raw, number)}"


@pytest.mark.parametrize("arch", ARCHES)
def test_sample_is_an_openeuler_shaped_qcow2(arch: str, built: dict[str, Built], sample_raw: dict[str, Path]) -> None:
    info = json.loads(run_text(["qemu-img", "info", "--output=json", built[arch].qcow2]))
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 40 * GIB
    assert built[arch].qcow2.stat().st_size < 64 * 1024**2  # a few MiB of data, not 40 GiB

    raw = sample_raw[arch]
    table = disk.read_partition_table(raw)
    assert table.label == ("dos" if arch == "x86_64" else "gpt")
    root = find_root_partition(raw)
    assert root.number == ROOT_NUMBER[arch]
    assert root.size * 512 >= 38 * GIB  # the 38 GiB root of the stock image
    spec = _spec(raw, root.number)
    e2fsck_clean(spec)
    assert b'VERSION_ID="22.03"' in debugfs_cat(spec, "/etc/os-release")
    # The stock root password, a real SHA-512 crypt hash of openEuler12#$.
    shadow_root = debugfs_cat(spec, "/etc/shadow").decode().splitlines()[0].split(":")[1]
    salt = shadow_root.split("$")[2]
    assert run_text(["openssl", "passwd", "-6", "-salt", salt, "openEuler12#$"]).strip() == shadow_root
    release = sample_kernel_release() if arch == "x86_64" else AARCH64_KERNEL_RELEASE
    modules_dep = debugfs_cat(spec, f"/lib/modules/{release}/modules.dep").decode()
    if arch == "x86_64":
        assert "kernel/net/netfilter/xt_mac.ko: kernel/net/netfilter/x_tables.ko" in modules_dep
        boot = _spec(raw, 1)
        assert b" quiet " in debugfs_cat(boot, "/grub2/grub.cfg")
        vmlinuz = debugfs_cat(boot, f"/vmlinuz-{release}")
        assert vmlinuz == Path(f"/boot/vmlinuz-{release}").read_bytes()
    else:
        assert modules_dep == ""
        assert table.partitions[0].type == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


@pytest.mark.parametrize("arch", ARCHES)
def test_shrink_keeps_every_file_and_has_the_requested_size(
    arch: str, session_store: Store, sample_raw: dict[str, Path], tmp_path: Path
) -> None:
    """Without overlays and hygiene the raw stage only shrinks: the root tree must be unchanged."""
    plain = raw(f"sample:{arch}", sample_qcow2(arch), [], hygiene=False, arch=arch)
    disk_raw = session_store.realise(plain, log=lambda _: None).path / "disk.raw"
    number = ROOT_NUMBER[arch]
    table = disk.read_partition_table(disk_raw)
    assert table.partition(number).length(table.sector_size) == 6 * GIB
    spec = _spec(disk_raw, number)
    e2fsck_clean(spec)
    dumpe2fs = run_text(["dumpe2fs", "-h", spec])
    fields = dict(re.findall(r"^(Block count|Block size|Total journal size):\s+(\S+)$", dumpe2fs, flags=re.MULTILINE))
    assert int(fields["Block count"]) * int(fields["Block size"]) == 6 * GIB
    stock = run_text(["dumpe2fs", "-h", _spec(sample_raw[arch], number)])
    assert f"Total journal size:       {fields['Total journal size']}" in stock  # journal made again, same size
    assert disk.allocated_bytes(disk_raw) < GIB  # sparse: the disk costs its data, not its size
    original = snapshot(_spec(sample_raw[arch], number), tmp_path / "original")
    after = snapshot(spec, tmp_path / "shrunk")
    assert len(original) > 50
    assert after == original


@pytest.mark.parametrize("arch", ARCHES)
def test_raw_disk_layout_is_valid_and_sparse(arch: str, built: dict[str, Built], sample_raw: dict[str, Path]) -> None:
    raw = built[arch].disk
    assert raw.stat().st_size == 8 * GIB
    assert disk.allocated_bytes(raw) < raw.stat().st_size // 100  # sparse: well under 1 % allocated
    verify = run_text(["sfdisk", "--verify", raw])
    assert "No errors detected" in verify
    table = disk.read_partition_table(raw)
    sectors = raw.stat().st_size // 512
    for part in table.partitions:
        assert part.end <= sectors - (disk.GPT_BACKUP_SECTORS if table.label == "gpt" else 0)
    root = table.partition(ROOT_NUMBER[arch])
    assert root.size * 512 == 6 * GIB
    assert find_root_partition(raw).number == root.number
    # Partition-table ids come from the derivation key, not from the source image.
    source_table = disk.read_partition_table(sample_raw[arch])
    assert table.id != source_table.id
    if table.label == "gpt":
        assert {p.uuid for p in table.partitions}.isdisjoint({p.uuid for p in source_table.partitions})
    for part in table.partitions:
        spec = f"{raw}?offset={part.offset()}"
        head = raw.open("rb")
        head.seek(part.offset() + 1024 + 0x38)
        if head.read(2) == b"\x53\xef":
            e2fsck_clean(spec)
        head.close()
    described = json.loads((built[arch].raw_dir / "disk.json").read_text())
    assert described["root"] == root.number


def test_esp_passes_fsck(built: dict[str, Built], tmp_path: Path) -> None:
    raw = built["aarch64"].disk
    table = disk.read_partition_table(raw)
    esp = table.partition(1)
    image = tmp_path / "esp.img"
    disk.extract_range(raw, "raw", esp.offset(), esp.length(), image)
    proc = run(["fsck.fat", "-n", image], check=False)
    assert proc.returncode == 0, proc.stdout.decode()


def test_fstab_names_the_esp_by_the_id_it_really_has(built: dict[str, Built], tmp_path: Path) -> None:
    """The ESP's volume id is the seeded one fstab was written with (mkfs.vfat's --invariant once replaced it
    with 1234-ABCD, and a booted image waited for a /boot/efi that never came)."""
    raw = built["aarch64"].disk
    esp = disk.read_partition_table(raw).partition(1)
    image = tmp_path / "esp.img"
    disk.extract_range(raw, "raw", esp.offset(), esp.length(), image)
    real = run_text(["blkid", "-o", "value", "-s", "UUID", image]).strip()
    assert real and real != "1234-ABCD"
    fstab = debugfs_cat(_spec(raw, ROOT_NUMBER["aarch64"]), "/etc/fstab").decode()
    assert f"UUID={real} " in fstab and " /boot/efi " in fstab


@pytest.mark.parametrize("arch", ARCHES)
def test_overlays_are_injected_with_mode_and_owner(arch: str, built: dict[str, Built], tmp_path: Path) -> None:
    spec = _spec(built[arch].disk, ROOT_NUMBER[arch])
    for rel in ("etc/modprobe.d/ena.conf", "etc/modules-load.d/ena.conf", "etc/depmod.d/ena.conf"):
        directory, name = rel.rsplit("/", 1)
        mode, uid, gid = debugfs_ls(spec, "/" + directory)[name]
        assert (mode & 0o7777, uid, gid) == (0o644, 0, 0), rel
        assert debugfs_cat(spec, "/" + rel) == (ENA_OVERLAY.path / rel).read_bytes()
    assert debugfs_cat(spec, "/etc/modules-load.d/ena.conf").decode().splitlines()[-1] == "ena"
    if arch == "x86_64":
        release = sample_kernel_release()
        extra = f"/lib/modules/{release}/extra"
        mode, uid, gid = debugfs_ls(spec, extra)["ena.ko"]
        assert (mode & 0o7777, uid, gid) == (0o644, 0, 0)
        shipped = Path(f"/lib/modules/{release}/kernel/drivers/net/ethernet/amazon/ena/ena.ko")
        assert debugfs_cat(spec, f"{extra}/ena.ko") == shipped.read_bytes()
        # depmod ran on the image's module tree: the new module is indexed, the old ones still are.
        modules_dep = debugfs_cat(spec, f"/lib/modules/{release}/modules.dep").decode()
        assert "extra/ena.ko:" in modules_dep.splitlines()
        assert "kernel/net/netfilter/xt_mac.ko: kernel/net/netfilter/x_tables.ko" in modules_dep
        assert (
            "alias pci:v00001D0Fd0000EC20sv*sd*bc*sc*i* ena"
            in debugfs_cat(spec, f"/lib/modules/{release}/modules.alias").decode()
        )
        # modprobe reads the binary indexes, not the text ones: they were written back too, so modprobe on
        # the image's indexes alone resolves ena and its PCI alias to the injected module.
        dump = tmp_path / "dump" / "lib" / "modules" / release
        dump.mkdir(parents=True)
        for name in debugfs_ls(spec, f"/lib/modules/{release}"):
            if name.startswith("modules."):
                (dump / name).write_bytes(debugfs_cat(spec, f"/lib/modules/{release}/{name}"))
        assert {"modules.dep.bin", "modules.alias.bin", "modules.symbols.bin"} <= {p.name for p in dump.iterdir()}
        for wanted in ("ena", "pci:v00001D0Fd0000EC20sv00000000sd00000000bc02sc00i00"):
            shown = run(["modprobe", "-d", tmp_path / "dump", "-S", release, "--show-depends", wanted])
            assert shown.stdout.decode().split() == ["insmod", f"{tmp_path}/dump{extra}/ena.ko"], wanted
        # modules.order in the image is left as the kernel shipped it.
        assert "ena" not in debugfs_cat(spec, f"/lib/modules/{release}/modules.order").decode()


def _first_global_value(sshd_config: str, keyword: str) -> str:
    for line in sshd_config.splitlines():
        words = line.split()
        if words and words[0].lower() == "match":
            break
        if len(words) >= 2 and words[0].lower() == keyword.lower():
            return words[1]
    raise AssertionError(f"{keyword} not set")


@pytest.mark.parametrize("arch", ARCHES)
def test_hygiene_on_the_output_image(arch: str, built: dict[str, Built], sample_raw: dict[str, Path]) -> None:
    raw = built[arch].disk
    spec = _spec(raw, ROOT_NUMBER[arch])
    stock = debugfs_cat(_spec(sample_raw[arch], ROOT_NUMBER[arch]), "/etc/shadow").decode()
    assert STOCK_ROOT_HASH in stock
    for shadow_file in ("/etc/shadow", "/etc/shadow-"):
        shadow = debugfs_cat(spec, shadow_file).decode()
        root_line = shadow.splitlines()[0].split(":")
        assert root_line[0] == "root"
        assert root_line[1].startswith("!") and STOCK_ROOT_HASH not in shadow
        assert root_line[2:] == stock.splitlines()[0].split(":")[2:]  # ageing fields kept
        assert shadow.splitlines()[1:] == stock.splitlines()[1:]  # other accounts untouched
    etc = debugfs_ls(spec, "/etc")
    assert etc["shadow"][0] & 0o7777 == 0  # mode kept on the rewritten file
    label = run_text(["debugfs", "-R", "ea_list /etc/shadow", spec])
    assert "system_u:object_r:shadow_t:s0" in label  # SELinux label kept too
    assert debugfs_cat(spec, "/etc/machine-id") == b""
    assert etc["machine-id"][0] & 0o7777 == 0o444
    assert "cloud" not in debugfs_ls(spec, "/var/lib")
    sshd = debugfs_cat(spec, "/etc/ssh/sshd_config").decode()
    assert _first_global_value(sshd, "PermitRootLogin") == "no"
    assert _first_global_value(sshd, "PasswordAuthentication") == "no"
    assert debugfs_ls(spec, "/etc/ssh")["sshd_config"][0] & 0o7777 == 0o600
    console = "ttyS0" if arch == "x86_64" else "ttyAMA0"
    if arch == "x86_64":
        grub = debugfs_cat(_spec(raw, 1), "/grub2/grub.cfg").decode()
    else:
        esp = disk.read_partition_table(raw).partition(1)
        mcopy = ["mcopy", "-i", f"{raw}@@{esp.offset()}", "::/EFI/openEuler/grub.cfg", "-"]
        grub = run_text(mcopy, env={"MTOOLS_SKIP_CHECK": "1"})
    kernel_lines = [line.split() for line in grub.splitlines() if line.strip().startswith("linux")]
    assert kernel_lines
    for args in kernel_lines:
        assert "quiet" not in args
        assert any(arg.startswith(f"console={console}") for arg in args)
        assert "rd.multipath=0" in args
        assert any(arg.startswith("root=UUID=") for arg in args)  # the rest of the line is intact
    defaults = debugfs_cat(spec, "/etc/default/grub").decode()
    assert f"console={console}" in defaults and "quiet" not in defaults
    assert ".autorelabel" in debugfs_ls(spec, "/")  # SELinux is enforcing in the sample: relabel new files


@pytest.mark.slow
def test_hygiene_can_be_turned_off(built: dict[str, Built], session_store: Store) -> None:
    drv = raw("sample:x86_64", sample_qcow2("x86_64"), [ENA_OVERLAY], hygiene=False, arch="x86_64")
    assert drv.key != built["x86_64"].raw_drv.key
    disk_raw = session_store.realise(drv, log=lambda _: None).path / "disk.raw"
    spec = _spec(disk_raw, 2)
    assert STOCK_ROOT_HASH in debugfs_cat(spec, "/etc/shadow").decode()
    assert b" quiet " in debugfs_cat(_spec(disk_raw, 1), "/grub2/grub.cfg")
    assert "ena.conf" in debugfs_ls(spec, "/etc/modules-load.d")


def test_keys_follow_inputs(tmp_path: Path) -> None:
    """Rebuilt only when the qcow2, an overlay file or a parameter changes."""
    overlay = tmp_path / "overlay" / "etc"
    overlay.mkdir(parents=True)
    (overlay / "motd").write_text("hello\n")
    qcow2 = sample_qcow2("x86_64")
    first = raw("sample:x86_64", qcow2, [LocalTree(tmp_path / "overlay")], arch="x86_64")
    same = raw("sample:x86_64", sample_qcow2("x86_64"), [LocalTree(tmp_path / "overlay")], arch="x86_64")
    assert first.key == same.key
    (overlay / "motd").write_text("changed\n")
    changed = raw("sample:x86_64", qcow2, [LocalTree(tmp_path / "overlay")], arch="x86_64")
    assert changed.key != first.key
    resized = raw("sample:x86_64", qcow2, [LocalTree(tmp_path / "overlay")], root_size="5G", arch="x86_64")
    assert resized.key not in (first.key, changed.key)
    assert (
        raw("sample:x86_64", qcow2, [], disk_size="9G", arch="x86_64").key
        != raw("sample:x86_64", qcow2, [], arch="x86_64").key
    )
    unhygienic = raw("sample:x86_64", qcow2, [LocalTree(tmp_path / "overlay")], hygiene=False, arch="x86_64")
    assert unhygienic.key not in (first.key, changed.key, resized.key)


def test_second_realise_builds_nothing(built: dict[str, Built], session_store: Store) -> None:
    again = session_store.realise(built["x86_64"].raw_drv, log=lambda _: None)
    assert again.built is False and again.path == built["x86_64"].raw_dir


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_two_clean_builds_are_bit_identical(arch: str, built: dict[str, Built], tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    drv = raw(f"sample:{arch}", sample_qcow2(arch), overlays_for(arch), arch=arch)
    assert drv.key == built[arch].raw_drv.key
    rebuilt = store.realise(drv, log=lambda _: None).path
    again_qcow2 = next(store.path(sample_qcow2(arch)).glob("*.qcow2"))
    assert run_text(["b3sum", "--no-names", again_qcow2]) == run_text(["b3sum", "--no-names", built[arch].qcow2])
    first = run_text(["b3sum", "--no-names", built[arch].disk])
    second = run_text(["b3sum", "--no-names", rebuilt / "disk.raw"])
    assert first == second
    assert hashing.hash_tree(rebuilt, use_cache=False) == hashing.hash_tree(built[arch].raw_dir, use_cache=False)


def test_image_modules(image_modules_x86: Path) -> None:
    release = sample_kernel_release()
    assert (image_modules_x86 / "kernel-release").read_text() == release + "\n"
    modules = image_modules_x86 / "lib" / "modules" / release
    assert (modules / "modules.dep").is_file()
    for module in ("kernel/drivers/net/dummy.ko", "kernel/net/netfilter/xt_mac.ko"):
        assert (modules / module).read_bytes() == (Path("/lib/modules") / release / module).read_bytes()


def test_sample_roots_look_used_so_the_shrink_must_check_them_first(built: dict[str, Built], tmp_path: Path) -> None:
    """A real cloud image was booted after its last check: resize2fs refuses it unless e2fsck -f ran first.

    The sample roots are made to look like that, so dropping the raw stage's `e2fsck -fp` fails the build.
    """
    from eulerbake.fs.partitions import extract_partitions, open_qcow2

    image, table = open_qcow2(built["x86_64"].qcow2, tmp_path)
    pieces = extract_partitions(image, table, tmp_path)
    root = pieces[table.by_position()[-1].number]
    header = run(["dumpe2fs", "-h", root]).stdout.decode()
    mounts = int(re.search(r"^Mount count:\s+(\d+)", header, re.M).group(1))  # type: ignore[union-attr]
    assert mounts > 0
    refused = run(["resize2fs", root, "7G"], check=False)
    assert refused.returncode != 0 and b"e2fsck -f" in refused.stdout + refused.stderr
