"""The kickstart stage: rendered for every release × arch of recipes/releases.py and validated with
pykickstart's RHEL8 handler inside the stage; a broken template fails the stage with pykickstart's message
and the line. `ksvalidator` (pykickstart's own CLI) agrees on what the stage writes."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eulerbake.core.derivation import LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store
from recipes.releases import matrix
from recipes.stages.kickstart import TEMPLATES, kickstart, validate_kickstart

CELLS = [(rel.version, rel.arch, firmware) for rel in matrix()
         for firmware in (("bios", "uefi") if rel.arch == "x86_64" else ("uefi",))]
KSVALIDATOR = Path(sys.executable).with_name("ksvalidator")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("store"))


@pytest.mark.parametrize(("version", "arch", "firmware"), CELLS, ids=[":".join(cell) for cell in CELLS])
def test_every_release_and_arch_validates(store: Store, version: str, arch: str, firmware: str) -> None:
    node = kickstart(f"{version}:{arch}:{firmware}", release=version, arch=arch, firmware=firmware)
    text = (store.realise(node, log=lambda _m: None).path / "openeuler.ks").read_text()
    validate_kickstart(text)  # what the stage did; and the sections the issue names are there:
    efi = "x64" if arch == "x86_64" else "aa64"
    for needed in ("cdrom", "poweroff", "firewall --enabled --service=ssh", "lang en_US.UTF-8", "keyboard us",
                   "network ", "selinux --enforcing", "timezone UTC", "rootpw --lock", "part / ", "%post",
                   "\ncloud-init\n", "efibootmgr", "shim", f"grub2-efi-{efi}-modules"):
        assert needed in text, needed
    assert "\nrepo " not in text  # the openEuler overlay drops rhel8.ks's AppStream repository
    assert ("bootloader --disabled" in text) == (firmware == "uefi")
    console = "ttyS0" if arch == "x86_64" else "ttyAMA0"
    assert firmware == "uefi" or f"console={console}" in text


def test_ksvalidator_agrees(store: Store, tmp_path: Path) -> None:
    for version, arch, firmware in CELLS[:3]:
        node = kickstart(f"{version}:{arch}:{firmware}", release=version, arch=arch, firmware=firmware)
        path = store.realise(node, log=lambda _m: None).path / "openeuler.ks"
        proc = subprocess.run([KSVALIDATOR, "-v", "RHEL8", path], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_an_invalid_kickstart_fails_the_stage_with_pykickstarts_message_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "kickstart"
    shutil.copytree(TEMPLATES, broken)
    template = broken / "openeuler.ks.j2"
    template.write_text(template.read_text().replace("eula --agreed", "eula --agreed\ntimezone --bogus-option"))
    node = kickstart("broken", release="22.03-LTS-SP4", arch="x86_64")
    node = dataclasses.replace(node, inputs={"templates": LocalTree(broken)})
    with pytest.raises(EulerbakeError) as failure:
        Store(tmp_path / "store").realise(node, log=lambda _m: None)
    message = str(failure.value)
    assert "pykickstart (RHEL8 handler) rejects openeuler.ks" in message
    assert "The following problem occurred on line 6 of the kickstart file" in message
    assert "line 6: timezone --bogus-option" in message
    assert not list((tmp_path / "store").glob("*-kickstart-broken"))


def test_warnings_are_errors_as_with_ksvalidator() -> None:
    with pytest.raises(EulerbakeError, match="A partition with the mountpoint / has already been defined"):
        validate_kickstart("cdrom\npart / --size=1\npart / --size=2\n")
    with pytest.raises(EulerbakeError, match="The install command has been deprecated"):
        validate_kickstart("cdrom\ninstall\n")


def test_firmware_and_arch_are_checked() -> None:
    with pytest.raises(EulerbakeError, match="cannot install aarch64"):
        kickstart("x", release="22.03-LTS-SP4", arch="aarch64", firmware="bios")
