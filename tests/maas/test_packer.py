"""The packer-maas stage: both templates (HCL2, JSON) rendered with the pinned ISO checksum, the firmware and a
loopback VNC, and `packer validate` (Debian's packer 1.6.6, offline) run on them inside the stage."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store
from recipes.releases import matrix
from recipes.stages.kickstart import kickstart
from recipes.stages.packer_maas import UEFI_FIRMWARE, packer_maas

PIN = "3f1d2b9c8a7e6d5c4b3a29180f1e2d3c4b5a69788796a5b4c3d2e1f0a9b8c7d6"  # a sha256 as sources.lock holds it
CELLS = [(rel.version, rel.arch, firmware) for rel in matrix()
         for firmware in (("bios", "uefi") if rel.arch == "x86_64" else ("uefi",))]
SAMPLE = [cell for cell in CELLS if cell[0] == "22.03-LTS-SP4"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("store"))


def _templates(store: Store, version: str, arch: str, firmware: str, **options: object) -> Path:
    label = f"{version}:{arch}:{firmware}"
    ks = kickstart(label, release=version, arch=arch, firmware=firmware)
    node = packer_maas(label, ks, release=version, arch=arch, iso_filename=f"openEuler-{version}-{arch}-dvd.iso",
                       iso_sha256=PIN, **options)  # type: ignore[arg-type]
    return store.realise(node, log=lambda _m: None).path


def _check(out: Path, version: str, arch: str, firmware: str) -> None:
    hcl = (out / "openeuler.pkr.hcl").read_text()
    template = json.loads((out / "openeuler.json").read_text())
    (builder,) = template["builders"]
    assert builder["iso_checksum"] == f"sha256:{PIN}" and f'iso_checksum     = "sha256:{PIN}"' in hcl
    assert builder["vnc_bind_address"] == "127.0.0.1" and 'vnc_bind_address = "127.0.0.1"' in hcl
    assert builder["headless"] is True and builder["communicator"] == "none"
    assert ["-serial", "stdio"] in builder["qemuargs"]
    assert any("inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/openeuler.ks" in key for key in builder["boot_command"])
    assert (out / "http" / "openeuler.ks").is_file()
    drives = " ".join(arg[1] for arg in builder["qemuargs"] if arg[0] == "-drive")
    if firmware == "uefi":
        code, variables = UEFI_FIRMWARE[arch]
        assert f"file={code}" in drives and Path(code).is_file() and Path(variables).is_file()
        assert "if=pflash,format=raw,unit=1,file={{user `efi_vars`}}" in drives
        assert "file={{user `iso_url`}}" in drives and "{{ .OutputDir }}/{{ .Name }}" in drives
        assert "${var.efi_vars}" in hcl and "${var.iso_url}" in hcl
    else:
        assert drives == ""  # BIOS: packer's own disk and cdrom drives
    assert builder["qemu_binary"] == f"qemu-system-{arch}"


@pytest.mark.parametrize(("version", "arch", "firmware"), SAMPLE, ids=[":".join(cell) for cell in SAMPLE])
def test_templates_pass_packer_validate(store: Store, version: str, arch: str, firmware: str) -> None:
    _check(_templates(store, version, arch, firmware), version, arch, firmware)


@pytest.mark.slow
@pytest.mark.parametrize(("version", "arch", "firmware"), CELLS, ids=[":".join(cell) for cell in CELLS])
def test_every_rendered_template_passes_packer_validate(store: Store, version: str, arch: str, firmware: str) -> None:
    _check(_templates(store, version, arch, firmware), version, arch, firmware)


def test_vnc_bind_address_and_sizes_are_parameters(store: Store) -> None:
    out = _templates(store, "24.03-LTS-SP1", "x86_64", "bios", vnc_bind_address="0.0.0.0", disk_size="8G",
                     memory=4096, cpus=4, accelerator="tcg")
    (builder,) = json.loads((out / "openeuler.json").read_text())["builders"]
    assert (builder["vnc_bind_address"], builder["disk_size"], builder["memory"], builder["cpus"],
            builder["accelerator"]) == ("0.0.0.0", "8G", 4096, 4, "tcg")


def test_packer_validate_really_runs_in_the_stage(tmp_path: Path) -> None:
    ks = kickstart("bad", release="22.03-LTS-SP4", arch="x86_64")
    node = packer_maas("bad", ks, release="22.03-LTS-SP4", arch="x86_64", iso_filename="x.iso", iso_sha256=PIN)
    node = dataclasses.replace(node, params=dataclasses.replace(node.params, iso_sha256="zz" * 32))
    with pytest.raises(EulerbakeError) as failure:
        Store(tmp_path / "store").realise(node, log=lambda _m: None)
    assert re.search(r"packer validate failed.*invalid checksum", " ".join(str(failure.value).split()))


def test_an_unpinned_checksum_is_refused(tmp_path: Path) -> None:
    ks = kickstart("x", release="22.03-LTS-SP4", arch="x86_64")
    with pytest.raises(EulerbakeError, match="not a pinned sha256"):
        packer_maas("x", ks, release="22.03-LTS-SP4", arch="x86_64", iso_filename="x.iso", iso_sha256="none")
    unpinned = packer_maas("x", ks, release="22.03-LTS-SP4", arch="x86_64", iso_filename="x.iso", iso_sha256="")
    assert unpinned.task_name == "packer-maas:x"  # an unlocked checkout still lists the task; building it fails:
    with pytest.raises(EulerbakeError, match="ISO is not pinned"):
        Store(tmp_path / "store").realise(unpinned, log=lambda _m: None)
    with pytest.raises(EulerbakeError, match="installs for bios"):
        packer_maas("x", ks, release="22.03-LTS-SP4", arch="x86_64", iso_filename="x.iso", iso_sha256=PIN,
                    firmware="uefi")
    with pytest.raises(EulerbakeError, match="needs the ISO"):
        packer_maas("x", ks, release="22.03-LTS-SP4", arch="x86_64", iso_filename="x.iso", iso_sha256=PIN,
                    build_image=True)
