"""Decompression as a cached derivation, built through the store from a pinned .xz / .gz source."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from pathlib import Path

import blake3
import pytest

from eulerbake.core.derivation import FixedOutput
from eulerbake.core.errors import EulerbakeError
from eulerbake.fetch.lock import LockEntry, LockFile
from eulerbake.store.local import Store
from recipes import releases
from recipes.stages.unpack import unpack


def local_source(path: Path, label: str) -> FixedOutput:
    data = path.read_bytes()
    return FixedOutput(filename=path.name, urls=(str(path),), sha256=hashlib.sha256(data).hexdigest(),
                  blake3=blake3.blake3(data).hexdigest(), size=len(data), label=label)


def test_xz_qcow2_unpacks_reproducibly(tmp_path: Path, small_qcow2: Path) -> None:
    compressed = tmp_path / "openEuler-test-x86_64.qcow2.xz"
    with compressed.open("wb") as out:
        subprocess.run(["xz", "-T1", "-c", str(small_qcow2)], stdout=out, check=True)
    image = unpack("test:x86_64", local_source(compressed, "test:x86_64:qcow2"))
    assert image.task_name == "unpack:test:x86_64" and image.params.output == "openEuler-test-x86_64.qcow2"

    first = Store(tmp_path / "a").realise(image, log=lambda _m: None)
    second = Store(tmp_path / "b").realise(image, log=lambda _m: None)

    output = first.path / "openEuler-test-x86_64.qcow2"
    assert output.read_bytes() == small_qcow2.read_bytes()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(output)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 8 * 1024 * 1024
    meta = [json.loads(Path(str(r.path) + ".json").read_text())["output"]["hash"] for r in (first, second)]
    assert meta[0] == meta[1]  # built twice, identical
    assert Store(tmp_path / "a").realise(image, log=lambda _m: None).built is False  # cached


def test_gz_unpacks(tmp_path: Path) -> None:
    payload = b"root:x:0:0::/root:/bin/bash\n" * 1000
    compressed = tmp_path / "rootfs.tar.gz"
    compressed.write_bytes(gzip.compress(payload, mtime=0))
    derivation = unpack("test:gz", local_source(compressed, "test:gz"))
    result = Store(tmp_path / "store").realise(derivation, log=lambda _m: None)
    assert (result.path / "rootfs.tar").read_bytes() == payload


@pytest.mark.parametrize("suffix", [".xz", ".gz"])
def test_corrupt_archive_fails_and_stores_nothing(tmp_path: Path, suffix: str) -> None:
    compressed = tmp_path / f"broken.img{suffix}"
    compressed.write_bytes(b"\xfd7zXZ\x00" + b"not really compressed" if suffix == ".xz" else b"\x1f\x8b\x08garbage")
    store = Store(tmp_path / "store")
    derivation = unpack("test:broken", local_source(compressed, "test:broken"))

    with pytest.raises(EulerbakeError, match="xz|gzip|decompress"):
        store.realise(derivation, log=lambda _m: None)

    assert not store.has(derivation)
    assert list((store.root / ".tmp").iterdir()) == []


def test_truncated_xz_says_the_download_is_damaged(tmp_path: Path, small_qcow2: Path) -> None:
    whole = subprocess.run(["xz", "-T1", "-c", str(small_qcow2)], capture_output=True, check=True).stdout
    compressed = tmp_path / "openEuler-cut-x86_64.qcow2.xz"
    compressed.write_bytes(whole[: len(whole) // 2])  # a download cut short, pinned as it was
    store = Store(tmp_path / "store")
    derivation = unpack("test:cut", local_source(compressed, "test:cut"))

    with pytest.raises(EulerbakeError) as caught:
        store.realise(derivation, log=lambda _m: None)

    assert caught.value.message == "cannot decompress openEuler-cut-x86_64.qcow2.xz: xz says 'Unexpected end of input'"
    assert caught.value.hint == "the download is damaged: `eulerbake lock --update` or check the mirror"
    assert not store.has(derivation)


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "disk.raw"
    plain.write_bytes(b"x")
    with pytest.raises(EulerbakeError, match="do not know how to decompress 'disk.raw'"):
        unpack("test:raw", local_source(plain, "test:raw"))


def test_release_image_is_its_own_stage(tmp_path: Path, small_qcow2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qcow2_image(rel) through a file:// mirror laid out like upstream, end to end."""
    rel = releases.matrix(["22.03-LTS-SP4"], ["aarch64"])[0]
    mirror = tmp_path / "mirror"
    target = mirror / releases.qcow2_xz_paths(rel)[0]
    target.parent.mkdir(parents=True)
    with target.open("wb") as out:
        subprocess.run(["xz", "-T1", "-c", str(small_qcow2)], stdout=out, check=True)
    monkeypatch.setenv("EULERBAKE_MIRRORS", f"file://{mirror}")
    data = target.read_bytes()
    entry = LockEntry(f"file://{target}", rel.qcow2_xz_filename, len(data), hashlib.sha256(data).hexdigest(),
                      blake3.blake3(data).hexdigest())
    lock = LockFile(tmp_path / "sources.lock", {f"{rel.label}:qcow2": entry})

    result = Store(tmp_path / "store").realise(releases.qcow2_image(rel, lock), log=lambda _m: None)

    assert (result.path / f"openEuler-{rel.version}-{rel.arch}.qcow2").read_bytes() == small_qcow2.read_bytes()
