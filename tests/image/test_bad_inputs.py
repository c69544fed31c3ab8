"""Every bad input fails with one clear EulerbakeError and leaves the store as it was."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from eulerbake.core.derivation import Derivation, FixedOutput
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store
from eulerbake.tools.run import run
from recipes.sample import sample_kernel_release, sample_qcow2
from recipes.stages.image_modules import image_modules
from recipes.stages.raw import raw

from .conftest import ENA_OVERLAY, Built, make_disk, module_overlay, source_for, store_listing, to_qcow2

DOS_TWO_PARTS = "label: dos\nunit: sectors\n\nstart=2048, size=129024, type=c\nstart=131072, type=83\n"


def _raw(label: str, qcow2: Derivation | FixedOutput, root_size: str = "6G") -> Derivation:
    return raw(label, qcow2, [], root_size=root_size, arch="x86_64")


def _fails_cleanly(store: Store, drv: Derivation, *patterns: str) -> EulerbakeError:
    """Realise `drv` (inputs first), expect an EulerbakeError matching `patterns`, store unchanged."""
    for dep in drv.dependencies():
        if isinstance(dep, FixedOutput):
            store.realise(dep, log=lambda _: None)
    before = store_listing(store)
    with pytest.raises(EulerbakeError) as caught:
        store.realise(drv, log=lambda _: None)
    message = str(caught.value)
    for pattern in patterns:
        assert pattern in message, message
    assert store_listing(store) == before
    assert not store.has(drv)
    return caught.value


def test_not_a_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "openEuler.raw"
    make_disk(raw, "256M", DOS_TWO_PARTS)
    store = Store(tmp_path / "store")
    err = _fails_cleanly(store, _raw("bad:x86_64", source_for(raw, "bad")), "is not a qcow2 image", "'raw'")
    assert err.hint and "qemu-img convert -O qcow2" in err.hint


def test_a_text_file_named_qcow2_is_not_a_disk_image(tmp_path: Path) -> None:
    """What a mirror's error page saved as the image looks like: the fix points at the mirror, not at qemu-img."""
    page = tmp_path / "not-an-image.qcow2"
    page.write_bytes(b"Not Found\r\n\r\n")  # 13 bytes of text
    store = Store(tmp_path / "store")
    err = _fails_cleanly(store, _raw("page:x86_64", source_for(page, "page")),
                         "not-an-image.qcow2 is not a disk image: 13 bytes", "it starts with 'Not Found'")
    assert err.hint and err.hint.startswith("this is not a disk image: check the mirror / the lock entry")
    assert "qemu-img convert" not in str(err)


def test_truncated_qcow2(tmp_path: Path, built: dict[str, Built]) -> None:
    cut = tmp_path / "openEuler-cut.qcow2"
    shutil.copyfile(built["x86_64"].qcow2, cut)
    with cut.open("r+b") as handle:
        handle.truncate(cut.stat().st_size // 2)
    store = Store(tmp_path / "store")
    _fails_cleanly(store, _raw("cut:x86_64", source_for(cut, "cut")), "is truncated", "fetch the image again")


def test_no_partition_table(tmp_path: Path) -> None:
    bare = tmp_path / "rootfs.raw"
    run(["truncate", "-s", "64M", bare])
    run(["mkfs.ext4", "-q", bare])
    store = Store(tmp_path / "store")
    source = source_for(to_qcow2(bare, tmp_path / "rootfs.qcow2"), "bare")
    err = _fails_cleanly(store, _raw("bare:x86_64", source), "rootfs.qcow2 has no partition table")
    assert "bare filesystem" in (err.hint or "")


def test_no_ext4_root(tmp_path: Path) -> None:
    raw = tmp_path / "noroot.raw"
    make_disk(raw, "256M", DOS_TWO_PARTS)
    run(["mkfs.vfat", "--offset", "2048", raw, str(129024 // 2)])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "readme").write_text("no os-release here\n")
    run(["mkfs.ext4", "-q", "-E", f"offset={131072 * 512}", "-d", tmp_path / "data", raw, "120M"])
    store = Store(tmp_path / "store")
    source = source_for(to_qcow2(raw, tmp_path / "noroot.qcow2"), "noroot")
    _fails_cleanly(
        store,
        _raw("noroot:x86_64", source),
        "has no root filesystem partition",
        "partition 1: FAT",
        "partition 2: ext filesystem without /etc/os-release",
    )


def test_root_size_smaller_than_used_space(session_store: Store, built: dict[str, Built]) -> None:
    err = _fails_cleanly(
        session_store,
        _raw("sample:x86_64", sample_qcow2("x86_64"), root_size="64M"),
        "root filesystem of openEuler-22.03-LTS-sample-x86_64.qcow2 does not fit the requested root size 64 MiB",
        "it needs at least",
        "are in use",
    )
    assert err.hint and "root_size" in err.hint


def test_disk_smaller_than_partitions(session_store: Store, built: dict[str, Built]) -> None:
    # /boot ends at 2 GiB and root is 6 GiB: a 7 GiB disk cannot hold them.
    drv = raw("sample:x86_64", sample_qcow2("x86_64"), [ENA_OVERLAY], disk_size="7G", arch="x86_64")
    err = _fails_cleanly(session_store, drv, "disk_size 7G is too small for openEuler-22.03-LTS-sample-x86_64.qcow2: "
                         "its root partition starts at 2G, so with a 6G root the disk needs at least 8192 MiB")
    assert err.hint == 'set disk_size to "auto" (here 8G) or to at least 8G, or lower root_size (see `eulerbake ' \
        'config show`)'


def test_module_for_another_kernel(session_store: Store, built: dict[str, Built]) -> None:
    wrong = module_overlay("5.10.0-60.18.0.50.oe2203.x86_64", built_for=sample_kernel_release())
    drv = raw("sample:x86_64", sample_qcow2("x86_64"), [ENA_OVERLAY, wrong], arch="x86_64")
    session_store.realise(wrong, log=lambda _: None)
    err = _fails_cleanly(
        session_store,
        drv,
        "installs kernel modules for 5.10.0-60.18.0.50.oe2203.x86_64",
        f"the image's kernel modules are for {sample_kernel_release()}",
    )
    assert err.hint and "image-modules" in err.hint


def test_missing_tool_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, session_store: Store, built: dict[str, Built]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for tool in Path(directory).iterdir() if Path(directory).is_dir() else []:
            if tool.name != "sfdisk" and not (bin_dir / tool.name).exists():
                os.symlink(tool, bin_dir / tool.name)
    monkeypatch.setenv("PATH", str(bin_dir))
    drv = _raw("sample:x86_64", sample_qcow2("x86_64"), root_size="5G")
    err = _fails_cleanly(session_store, drv, "required tool 'sfdisk' was not found")
    assert err.hint == "install it with: apt-get install fdisk"


def test_image_modules_needs_a_root_filesystem(tmp_path: Path) -> None:
    raw = tmp_path / "empty.raw"
    make_disk(raw, "256M", DOS_TWO_PARTS)
    store = Store(tmp_path / "store")
    source = source_for(to_qcow2(raw, tmp_path / "empty.qcow2"), "empty")
    _fails_cleanly(store, image_modules("empty:x86_64", source), "has no root filesystem partition")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"root_size": "six gigs"}, "root_size 'six gigs' is not a size"),
        ({"root_size": "0"}, "must be larger than zero"),
        ({"disk_size": "8.0001G"}, "is not a whole number of MiB"),
        ({"disk_size": "4G"}, "disk_size 4G is smaller than root_size 6G"),
        ({"hygiene": ["sshd", "selinux"]}, "unknown hygiene item.s. selinux"),
        ({"arch": "riscv64"}, "unknown architecture 'riscv64'"),
    ],
)
def test_bad_parameters_fail_before_building(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"arch": "x86_64", **kwargs}
    with pytest.raises(EulerbakeError, match=message):
        raw("sample:x86_64", sample_qcow2("x86_64"), [], **arguments)
