"""Benchmark: shrink + raw of a 40 GiB-virtual qcow2 holding ~1 GiB of data, against a bare
`qemu-img convert -O raw` of the same qcow2 (the seed's last step, and the least any route to a raw
disk must pay). Goal: shrink + raw within 1.5x of the bare conversion.

    .venv/bin/python benchmarks/bench_shrink.py [--data-mib 1024] [--rounds 3] [--workdir DIR]

The input is made with real tools (sfdisk, mkfs.ext4 -d, qemu-img) like the openEuler x86_64
image: dos label, 2 GiB /boot, 38 GiB ext4 root with the sample skeleton plus incompressible data.
Four figures are printed, each the median of the rounds after a warm-up round:
- baseline: `qemu-img convert -O raw` of the whole qcow2 (the goal's yardstick);
- durable baseline: the same plus an fsync of the result. Every e2fsprogs tool fsyncs the image
  it opens, and the store syncs each output it seals, so this is the floor for any route that
  shrinks the filesystem with e2fsprogs; it is printed to show where the time goes;
- stages: the raw stage's builder itself (shrink, overlays, hygiene, disk; the issue's goal);
- realise: Store.realise of the raw stage from an empty store (adds hashing and sealing outputs).
Each phase starts after a sync and, when run as root, a dropped page cache (see `settle`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eulerbake.core import hashing  # noqa: E402
from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalTree  # noqa: E402
from eulerbake.store.local import DEFAULT_SOURCE_DATE_EPOCH, Store, remove_tree  # noqa: E402
from eulerbake.tools.run import run  # noqa: E402
from recipes.stages import raw as raw_stage  # noqa: E402

GIB = 1024**3
BOOT_START, ROOT_START = 2048, 4194304  # sectors, as in the stock image
GRUB_CFG = "menuentry 'openEuler' {\n\tlinux /vmlinuz root=UUID=x ro rhgb quiet crashkernel=512M\n}\n"


def make_input(work: Path, data_mib: int) -> Path:
    """A 40 GiB-virtual qcow2 with `data_mib` MiB of random files in its root filesystem."""
    root = work / "root"
    shutil.copytree(REPO / "recipes" / "sample-root" / "root", root, symlinks=True)
    (root / "etc" / "fstab.j2").rename(root / "etc" / "fstab")
    data = root / "usr" / "share" / "bench"
    data.mkdir(parents=True)
    chunk = 16 * 1024 * 1024
    for index in range(max(1, data_mib // 16)):
        (data / f"blob-{index:04d}").write_bytes(os.urandom(chunk))
    boot = work / "boot" / "grub2"
    boot.mkdir(parents=True)
    (boot / "grub.cfg").write_text(GRUB_CFG)
    raw = work / "input.raw"
    run(["truncate", "-s", "40G", raw])
    script = "label: dos\nunit: sectors\n\n"
    script += f"start={BOOT_START}, size={ROOT_START - BOOT_START}, bootable\nstart={ROOT_START}\n"
    run(["sfdisk", "--no-reread", "--no-tell-kernel", raw], input=script.encode())
    run(
        [
            "mkfs.ext4",
            "-q",
            "-E",
            f"offset={BOOT_START * 512}",
            "-d",
            work / "boot",
            raw,
            f"{(ROOT_START - BOOT_START) // 2}k",
        ]
    )
    run(["mkfs.ext4", "-q", "-E", f"offset={ROOT_START * 512}", "-d", root, raw, "38G"])
    qcow2 = work / "openEuler-bench-x86_64.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2])
    raw.unlink()
    shutil.rmtree(work / "root")
    shutil.rmtree(work / "boot")
    return qcow2


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def settle() -> None:
    """Start a phase from the same state: nothing dirty, and (as root) an empty page cache.

    On a VM, pages the guest has not touched yet are slow to fault in; whichever phase runs
    after another's page cache was freed gets them cheap. Dropping caches evens that out.
    """
    os.sync()
    if os.access(DROP_CACHES, os.W_OK):
        DROP_CACHES.write_text("3\n")


def _context(drv: Derivation, inputs: dict[str, Path], base: Path) -> BuildContext:
    (base / "out").mkdir(parents=True)
    (base / "work").mkdir()
    return BuildContext(
        inputs=inputs,
        params=drv.params,
        out=base / "out",
        key=drv.key,
        work=base / "work",
        log=lambda _: None,
        source_date_epoch=DEFAULT_SOURCE_DATE_EPOCH,
    )


def _convert(qcow2: Path, target: Path, *, durable: bool) -> float:
    settle()
    started = time.perf_counter()
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, target])
    if durable:
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def one_round(qcow2: Path, source: FixedOutput, drv: Derivation, base: Path) -> tuple[float, float, float, float]:
    """(baseline, durable baseline, stages, realise) seconds for one round in the fresh directory `base`."""
    base.mkdir()
    baseline = _convert(qcow2, base / "baseline.raw", durable=False)
    durable = _convert(qcow2, base / "baseline.raw", durable=True)

    overlay = REPO / "overlays" / "ena"
    raw_ctx = _context(drv, {"qcow2": qcow2, "overlay-00": overlay}, base / "raw")
    settle()
    started = time.perf_counter()
    raw_stage.build(raw_ctx)
    stages = time.perf_counter() - started
    disk_raw = raw_ctx.out / "disk.raw"
    allocated = disk_raw.stat().st_blocks * 512 / 2**20
    size = disk_raw.stat().st_size / GIB
    print(f"  baseline {baseline:.2f}s, durable {durable:.2f}s, stages {stages:.2f}s", end="")
    print(f" (disk.raw {size:.0f} GiB, {allocated:.0f} MiB)", end="")
    shutil.rmtree(base)

    store = Store(base.with_name(base.name + "-store"))
    store.realise(source, log=lambda _: None)  # the fetch is not part of the measurement
    settle()
    started = time.perf_counter()
    store.realise(drv, log=lambda _: None)
    realise = time.perf_counter() - started
    print(f", realise {realise:.2f}s")
    remove_tree(store.root)
    return baseline, durable, stages, realise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-shrink-", dir=args.workdir))
    try:
        qcow2 = make_input(work, args.data_mib)
        b3, sha = hashing.hash_file_pair(qcow2, use_cache=False)
        source = FixedOutput(qcow2.name, (str(qcow2),), sha, b3, qcow2.stat().st_size, label="bench")
        drv = raw_stage.raw("bench:x86_64", source, [LocalTree(REPO / "overlays" / "ena")], arch="x86_64")
        print(f"input: {qcow2.name}, 40 GiB virtual, {qcow2.stat().st_size / 2**20:.0f} MiB qcow2")

        # Round 0 warms up: the machine's first touch of fresh memory costs far more than later ones.
        rounds = [one_round(qcow2, source, drv, work / f"round-{n}") for n in range(args.rounds + 1)][1:]
        baseline, durable, stages, realise = (statistics.median(column) for column in zip(*rounds, strict=True))
        print(f"baseline qemu-img convert -O raw : {baseline:6.2f}s")
        print(f"  the same, fsynced (durable)    : {durable:6.2f}s  ratio {durable / baseline:.2f}x")
        print(f"shrink + raw stage               : {stages:6.2f}s  ratio {stages / baseline:.2f}x (goal <= 1.5x)")
        print(f"  against the durable baseline   :          ratio {stages / durable:.2f}x")
        print(f"Store.realise(raw) incl. hashing : {realise:6.2f}s  ratio {realise / baseline:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
