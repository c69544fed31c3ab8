"""Benchmark: the boot proof's seconds from QEMU start to the power-off marker, beside the time of `raw`
for the same image.

    .venv/bin/python benchmarks/bench_boot.py [--workdir DIR] [--accel tcg[,kvm]] [--disk auto|nvme|virtio]

The image is the Debian-made, openEuler-shaped x86_64 disk of tests/boot (`tests/boot/image.py`, built
once into `EULERBAKE_BOOT_IMAGE_STORE` and reused). In a fresh store the ENA chain and image-modules are
built first (not timed), then `raw` (timed: Store.realise, shrink + overlays + hygiene + disk) and `boot`
for each accelerator. Printed per accelerator: QEMU start → the report's last marker (the user-data powers
off right after it), QEMU start → exit, and the whole boot stage (seed, overlay, inspection, sealing).
By default TCG, plus KVM when the stage's own probe says /dev/kvm is hardware KVM (here it is kvm_pvm,
under which a normal kernel stalls: forcing `--accel kvm` there shows that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eulerbake.core import hashing  # noqa: E402
from eulerbake.core.derivation import FixedOutput, LocalTree  # noqa: E402
from eulerbake.store.local import Store  # noqa: E402
from recipes.sample import ENA_OVERLAY, debian_ena_chain, sample_kernel_release  # noqa: E402
from recipes.stages import boot as boot_stage  # noqa: E402
from recipes.stages.image_modules import image_modules  # noqa: E402
from recipes.stages.raw import raw  # noqa: E402
from tests.boot.image import debian_image  # noqa: E402

LABEL = "bench:x86_64"


def _quiet(_message: str) -> None:
    pass


def image_source(kernel_release: str) -> FixedOutput:
    store = Store(Path(os.environ.get("EULERBAKE_BOOT_IMAGE_STORE")
                       or Path(tempfile.gettempdir()) / "eulerbake-boot-image-store"))
    started = time.monotonic()
    entry = store.realise(debian_image(kernel_release), log=_quiet)
    qcow2 = next(entry.path.glob("*.qcow2"))
    state = "built" if entry.built else "cached"
    print(f"image: {qcow2.name} ({state}, {time.monotonic() - started:.1f} s)")
    b3, sha = hashing.hash_file_pair(qcow2)
    return FixedOutput(filename=qcow2.name, urls=(str(qcow2),), sha256=sha, blake3=b3, size=qcow2.stat().st_size,
                       label="bench-image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the fresh store goes (default: a temp dir)")
    parser.add_argument("--accel", default="", help="comma-separated accelerators (default: tcg, + kvm if hardware)")
    parser.add_argument("--disk", default="auto", choices=boot_stage.DISKS)
    args = parser.parse_args()
    accels = [a for a in args.accel.split(",") if a] or ["tcg"] + (
        ["kvm"] if boot_stage.pick_accel("x86_64")[0] == "kvm" and not os.environ.get(boot_stage.ACCEL_ENV) else [])

    kernel_release = sample_kernel_release()
    source = image_source(kernel_release)
    workdir = Path(tempfile.mkdtemp(prefix="bench-boot-", dir=args.workdir))
    store = Store(workdir / "store")
    chain = debian_ena_chain(LABEL, kernel_release, image_modules=image_modules(LABEL, source))
    store.realise(chain["overlay"], log=_quiet)
    raw_drv = raw(LABEL, source, [LocalTree(ENA_OVERLAY), chain["overlay"]], arch="x86_64")
    started = time.monotonic()
    store.realise(raw_drv, log=_quiet)
    raw_seconds = time.monotonic() - started

    print(f"{'raw (shrink to 6 GiB, overlays, hygiene, disk)':<52} {raw_seconds:7.1f} s")
    for accel in accels:
        os.environ[boot_stage.ACCEL_ENV] = accel
        drv = boot_stage.boot(LABEL, raw_drv, arch="x86_64", disk=args.disk)
        if store.has(drv):  # the accelerator is not in the key: the same report would be reused
            store.delete(store.read_meta(store.meta_path(drv)))
        started = time.monotonic()
        try:
            entry = store.realise(drv, log=_quiet)
        except Exception as err:  # e.g. KVM forced on kvm_pvm: the timeout, shown instead of a figure
            print(f"boot {accel}: failed after {time.monotonic() - started:.0f} s: {str(err).splitlines()[0]}")
            continue
        stage_seconds = time.monotonic() - started
        qemu = json.loads((entry.path / "report.json").read_text())["qemu"]
        print(f"{f'boot {accel}: QEMU start -> power-off marker':<52} {qemu['seconds_to_report']:7.1f} s"
              f"   (QEMU exit {qemu['seconds']:.1f} s, whole stage {stage_seconds:.1f} s, {qemu['disk']} disk)")
    print(f"store: {store.root} (remove it when done)")


if __name__ == "__main__":
    main()
