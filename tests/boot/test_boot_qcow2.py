"""The boot proof of a disk that is not a raw stage's output: one qcow2, as packer-maas leaves the disk it
installed (the disk `maas-upload` publishes, packed by maas-tgz). Here the qcow2 is the Debian cell's
raw disk converted to qcow2 (packer-maas itself needs an openEuler DVD and hours), booted as it is."""

from __future__ import annotations

import json

import pytest

from eulerbake.core.derivation import BuildContext, Derivation
from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.run import run
from recipes.stages.boot import boot
from tests.boot.conftest import LABEL, Pipeline

pytestmark = pytest.mark.slow
GIB = 1024**3


def build_installed_qcow2(ctx: BuildContext) -> None:
    """Test builder: a packer-maas-like output, templates beside one qcow2 (no disk.raw, no disk.json)."""
    (ctx.out / "openeuler.pkr.hcl").write_text("# the templates packer-maas writes beside the disk\n")
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", ctx.inputs["raw"] / "disk.raw",
         ctx.out / "openEuler-test-x86_64.qcow2"])


def installed_qcow2(pipeline: Pipeline) -> Derivation:
    return Derivation(stage="test-installed", label=LABEL, builder=build_installed_qcow2,
                      inputs={"raw": pipeline.raw}, tools=("qemu-img",))


def test_a_qcow2_disk_boots_as_it_is_and_is_inspected_through_a_copy(pipeline: Pipeline) -> None:
    disk = installed_qcow2(pipeline)
    proof = boot(f"{LABEL}:maas", disk, arch="x86_64", expect_module=None)
    assert proof.params.hygiene is False  # not a raw stage: its hygiene checks are not assumed
    entry = pipeline.store.realise(proof, log=lambda _message: None).path
    report = json.loads((entry / "report.json").read_text())
    assert report["verdict"] == "pass", json.dumps(report["checks"], indent=1)
    names = {check["name"] for check in report["checks"]}
    assert {"kernel release", "root device", "root filesystem size", "cloud-init result"} <= names
    assert not any(name.startswith(("machine-id", "root password", "sshd", "ena")) for name in names)
    assert report["image"]["root_number"] == 2 and report["image"]["root_bytes"] == 6 * GIB
    assert int(report["markers"]["root-device-bytes"][-1]) == 6 * GIB
    assert not list(entry.rglob("*.raw"))  # the inspection copy stayed in the work directory


def test_an_output_with_no_disk_is_one_message(pipeline: Pipeline) -> None:
    proof = boot(f"{LABEL}:nodisk", pipeline.chain["overlay"], arch="x86_64", expect_module=None)
    with pytest.raises(EulerbakeError, match="holds neither disk.raw \\+ disk.json nor exactly one \\*.qcow2"):
        pipeline.store.realise(proof, log=lambda _message: None)
