"""Publishing waits for the boot proof: `ami:<cell>` depends on `boot:<cell>` of the same disk (and `maas-upload`
on `boot:<cell>:maas`, the installed disk maas-tgz packs) unless
`boot_check = false` in `[tool.eulerbake.aws]` (`.maas`); the receipt's target says which it was."""

from __future__ import annotations

import pytest

import recipes
from eulerbake.core.errors import EulerbakeError
from recipes import releases
from tests.config.conftest import WriteConfig

CELL = ("24.03-LTS-SP1", "x86_64")


def _nodes() -> dict[str, object]:
    (rel,) = releases.matrix([CELL[0]], [CELL[1]])
    return {node.task_name: node for node in recipes.publish_targets(rel)}


def test_the_ami_depends_on_the_boot_proof_of_the_disk_it_publishes(write_config: WriteConfig) -> None:
    write_config("[tool.eulerbake]\n")
    nodes = _nodes()
    label = ":".join(CELL)
    ami, proof = nodes[f"ami:{label}"], nodes[f"boot:{label}"]
    assert ami.inputs["boot_check"] is proof  # type: ignore[attr-defined]
    assert proof.inputs["raw"] is ami.inputs["raw"]  # type: ignore[attr-defined]
    assert ami.target["boot_check"] == "on"  # type: ignore[attr-defined]


@pytest.mark.parametrize("off", ["false", '"off"', '"OFF"'])  # read as every other switch of [tool.eulerbake]
def test_boot_check_turned_off_is_recorded_and_changes_the_key(write_config: WriteConfig, off: str) -> None:
    write_config("[tool.eulerbake]\n")
    label = ":".join(CELL)
    checked = _nodes()[f"ami:{label}"]
    write_config(f"[tool.eulerbake.aws]\nboot_check = {off}\n")
    unchecked = _nodes()[f"ami:{label}"]
    assert "boot_check" not in unchecked.inputs  # type: ignore[attr-defined]
    assert unchecked.target["boot_check"] == "off"  # type: ignore[attr-defined]
    assert unchecked.key != checked.key  # type: ignore[attr-defined]


@pytest.mark.parametrize("table", ["aws", "maas"])
def test_a_boot_check_that_is_not_a_switch_is_one_message(write_config: WriteConfig, table: str) -> None:
    write_config(f'[tool.eulerbake.{table}]\nboot_check = "maybe"\n')
    with pytest.raises(EulerbakeError, match=rf'\.{table}\.boot_check = "maybe" is not one of on, off') as caught:
        _nodes()
    assert caught.value.hint == 'allowed: boot_check = true or false ("on" or "off")'


def test_the_maas_upload_depends_on_the_boot_proof_of_the_installed_disk(write_config: WriteConfig) -> None:
    write_config("[tool.eulerbake]\n")
    label = ":".join(CELL)
    nodes = _nodes()
    upload, proof = nodes[f"maas-upload:{label}"], nodes[f"boot:{label}:maas"]
    tarball = upload.inputs["tgz"]  # type: ignore[attr-defined]
    assert upload.inputs["boot_check"] is proof and upload.target["boot_check"] == "on"  # type: ignore[attr-defined]
    assert proof.inputs["raw"] is tarball.inputs["image"]  # type: ignore[attr-defined]  # the disk it packs
    assert proof.params.hygiene is False and proof.params.expect_module == ""  # type: ignore[attr-defined]
    write_config("[tool.eulerbake.maas]\nboot_check = false\n")
    unchecked = _nodes()[f"maas-upload:{label}"]
    assert "boot_check" not in unchecked.inputs and unchecked.target["boot_check"] == "off"  # type: ignore[attr-defined]
    assert unchecked.key != upload.key  # type: ignore[attr-defined]
