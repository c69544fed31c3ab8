"""Fixtures for the image-stage tests: the offline sample qcow2s, their raw outputs, and
small purpose-made disks (built with sfdisk, mkfs and qemu-img) for the failure cases.

The sample images and the stages built from them are shared by the whole session through one
store; tests that need a clean store make their own under tmp_path.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalFile, LocalTree
from eulerbake.store.local import Store
from eulerbake.tools.run import run, run_text
from recipes.sample import sample_kernel_release, sample_qcow2
from recipes.stages.image_modules import image_modules
from recipes.stages.raw import raw

REPO = Path(__file__).resolve().parents[2]
ENA_OVERLAY = LocalTree(REPO / "overlays" / "ena")
ARCHES = ("x86_64", "aarch64")
ROOT_NUMBER = {"x86_64": 2, "aarch64": 3}
STOCK_ROOT_HASH = "$6$Zk3qT0oE2203smpl$"  # salt of the sample's stock root password hash


def build_module_overlay(ctx: BuildContext) -> None:
    """An overlay tree holding a real kernel module under lib/modules/<release>/extra/, as the ENA stage makes."""
    dest = ctx.out / "lib" / "modules" / ctx.params["kernel_release"] / "extra"
    dest.mkdir(parents=True)
    shutil.copyfile(ctx.inputs["ko"], dest / ctx.params["name"])


def module_overlay(kernel_release: str, built_for: str | None = None) -> Derivation:
    """Debian's own ena.ko for the host kernel, laid out like the ENA build stage's output
    (under `kernel_release`, which a test may set to a kernel the image does not have)."""
    ko = Path(f"/lib/modules/{built_for or kernel_release}/kernel/drivers/net/ethernet/amazon/ena/ena.ko")
    return Derivation(
        stage="test-ko",
        label=kernel_release,
        builder=build_module_overlay,
        inputs={"ko": LocalFile(ko)},
        params={"kernel_release": kernel_release, "name": "ena.ko"},
    )


def overlays_for(arch: str) -> list[Derivation | LocalTree]:
    if arch == "x86_64":
        return [ENA_OVERLAY, module_overlay(sample_kernel_release())]
    return [ENA_OVERLAY]  # no arm64 module exists on this machine


def source_for(path: Path, label: str) -> FixedOutput:
    """A pinned FixedOutput for a local file (what the fetch stage would hand the image stages)."""
    b3, sha = hashing.hash_file_pair(path, use_cache=False)
    return FixedOutput(filename=path.name, urls=(str(path),), sha256=sha, blake3=b3, size=path.stat().st_size,
                       label=label)


def store_listing(store: Store) -> list[str]:
    """Committed entries and build leftovers: what a failed build must not change."""
    names = sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))
    leftovers = sorted(p.name for p in (store.root / ".tmp").iterdir()) if (store.root / ".tmp").is_dir() else []
    return names + [f".tmp/{name}" for name in leftovers]


# -- disks made with real tools -------------------------------------------------------------------


def make_disk(path: Path, size: str, script: str | None) -> None:
    """A sparse raw disk with an optional sfdisk script applied."""
    run(["truncate", "-s", size, path])
    if script is not None:
        run(["sfdisk", "--no-reread", "--no-tell-kernel", path], input=script.encode())


def to_qcow2(raw: Path, dest: Path) -> Path:
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, dest])
    return dest


def qcow2_to_raw(qcow2: Path, dest: Path) -> Path:
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, dest])
    return dest


def e2fsck_clean(spec: str | Path) -> str:
    """`e2fsck -fn` must exit 0 (nothing to fix); returns its summary line."""
    proc = run(["e2fsck", "-fn", spec], check=False)
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, output
    return output.strip().splitlines()[-1]


def debugfs_cat(spec: str | Path, path: str) -> bytes:
    return run(["debugfs", "-R", f'cat "{path}"', spec]).stdout


def debugfs_ls(spec: str | Path, path: str) -> dict[str, tuple[int, int, int]]:
    """name -> (mode, uid, gid) of a directory's entries."""
    listing = {}
    for line in run_text(["debugfs", "-R", f'ls -p "{path}"', spec]).splitlines():
        fields = line.strip().strip("/").split("/")
        if len(fields) >= 5 and fields[4] not in (".", ".."):
            listing[fields[4]] = (int(fields[1], 8), int(fields[2]), int(fields[3]))
    return listing


@dataclass(frozen=True)
class TreeEntry:
    kind: str
    mode: int
    uid: int
    gid: int
    content: str  # blake3 of a file, target of a symlink, "" for a directory


def snapshot(spec: str | Path, dest: Path) -> dict[str, TreeEntry]:
    """Every entry of a filesystem, extracted with debugfs rdump (owners kept: the tests run as root)."""
    dest.mkdir(parents=True)
    run(["debugfs", "-R", f'rdump / "{dest}"', spec])
    entries = {}
    for current, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            full = Path(current) / name
            st = full.lstat()
            rel = full.relative_to(dest).as_posix()
            if stat.S_ISLNK(st.st_mode):
                kind, content = "l", os.readlink(full)
            elif stat.S_ISDIR(st.st_mode):
                kind, content = "d", ""
            else:
                kind, content = "f", hashing.hash_file(full, use_cache=False)
            entries[rel] = TreeEntry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content)
    return entries


# -- session-wide builds --------------------------------------------------------------------------


@dataclass
class Built:
    arch: str
    qcow2: Path
    raw_drv: Derivation
    raw_dir: Path

    @property
    def disk(self) -> Path:
        return self.raw_dir / "disk.raw"


@pytest.fixture(scope="session")
def session_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("image-store") / "store")


@pytest.fixture(scope="session")
def built(session_store: Store) -> Iterator[dict[str, Built]]:
    results = {}
    for arch in ARCHES:
        qcow2_drv = sample_qcow2(arch)
        qcow2_dir = session_store.realise(qcow2_drv, log=lambda _: None).path
        drv = raw(f"sample:{arch}", qcow2_drv, overlays_for(arch), arch=arch)
        raw_dir = session_store.realise(drv, log=lambda _: None).path
        results[arch] = Built(arch, next(qcow2_dir.glob("*.qcow2")), drv, raw_dir)
    yield results


@pytest.fixture(scope="session")
def sample_raw(built: dict[str, Built], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each sample qcow2 converted whole to a raw disk (sparse), to compare against."""
    out = tmp_path_factory.mktemp("sample-raw")
    return {arch: qcow2_to_raw(b.qcow2, out / f"{arch}.raw") for arch, b in built.items()}


@pytest.fixture(scope="session")
def image_modules_x86(built: dict[str, Built], session_store: Store) -> Path:
    return session_store.realise(image_modules("sample:x86_64", sample_qcow2("x86_64")), log=lambda _: None).path
