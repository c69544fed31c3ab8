"""The store under stress: kill -9 mid-build, concurrent builders, corruption, bad sources."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3

from eulerbake.store.local import Store
from tests.engine.conftest import ToyProject


def _assert_store_consistent(store_root: Path) -> None:
    """Every committed entry verifies; no output directory exists without its metadata."""
    if not store_root.exists():
        return
    store = Store(store_root)
    assert store.verify() == []
    for path in store_root.iterdir():
        if path.name.startswith("."):
            continue
        if path.suffix in (".json", ".log"):
            assert path.with_suffix("").is_dir(), f"{path.suffix} without output: {path}"
            assert path.with_suffix(".json").is_file(), f"{path.suffix} without metadata: {path}"
        else:
            assert Path(f"{path}.json").is_file(), f"partial entry visible in the store: {path}"


def test_kill_9_at_random_points_never_leaves_a_partial_entry(toy: ToyProject) -> None:
    rng = random.Random(20261123)
    killed_mid_build = 0
    for iteration in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-m", "doit", "-n", "2"], cwd=toy.root, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
            env=toy.env(TOY_SLOW="0.004", TOY_GREETING=f"hello {iteration}"),
        )
        time.sleep(rng.uniform(0.0, 0.9))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        tmp = toy.store / ".tmp"
        killed_mid_build += bool(tmp.is_dir() and any(tmp.iterdir()))
        _assert_store_consistent(toy.store)
    assert killed_mid_build >= 3, "the kills should interrupt some builds half-way"
    toy.ran()
    final = toy.doit(TOY_GREETING="hello 19")
    assert "failed" not in final.stdout
    _assert_store_consistent(toy.store)
    assert toy.doit(TOY_GREETING="hello 19").stdout.count("cached") >= 6


def test_two_concurrent_builders_build_each_output_once(toy: ToyProject) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-m", "doit"], cwd=toy.root, env=toy.env(TOY_SLOW="0.01"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    ran = toy.ran()
    assert sorted(ran) == sorted(["template", "tree", "tarball", "checksum", "combine", "independent"])
    _assert_store_consistent(toy.store)


def test_bit_flip_is_reported_by_verify(toy: ToyProject) -> None:
    toy.doit()
    assert "0 corrupted" in toy.eulerbake("store", "verify").stdout
    (entry,) = toy.store.glob("*-tarball-toy")
    target = entry / "bundle.tar"
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    data[700] ^= 0x01
    target.write_bytes(bytes(data))
    proc = toy.eulerbake("store", "verify", check=False)
    assert proc.returncode == 1
    assert "CORRUPT" in proc.stdout and entry.name in proc.stdout
    assert "1 corrupted" in proc.stdout


def _pin(toy: ToyProject, sha256: str, b3: str, size: int) -> None:
    (toy.root / "seed.pins").write_text(f"{sha256} {b3} {size}\n")


def test_wrong_hash_source_is_refused_and_store_untouched(toy: ToyProject) -> None:
    seed = toy.root / "seed.bin"
    seed.write_bytes(b"the real bytes\n" * 100)
    _pin(toy, hashlib.sha256(b"other").hexdigest(), blake3.blake3(b"other").hexdigest(), seed.stat().st_size)
    toy.doit("combine:toy", "independent:toy")
    toy.ran()
    before = toy.entries()
    proc = toy.doit("seeded:toy", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "does not match its pins" in output
    assert f"expected {hashlib.sha256(b'other').hexdigest()}, got {hashlib.sha256(seed.read_bytes()).hexdigest()}" \
        in output
    assert toy.entries() == before
    assert list((toy.store / ".tmp").iterdir()) == []

    # Correct pins: the source is fetched once, then served from the store.
    _pin(toy, hashlib.sha256(seed.read_bytes()).hexdigest(), blake3.blake3(seed.read_bytes()).hexdigest(),
         seed.stat().st_size)
    toy.doit("seeded:toy")
    assert toy.ran() == ["seeded"]
    seed.unlink()
    seed.write_bytes(b"")  # the original location is gone/changed: the store copy is used, no refetch
    _pin(toy, *(toy.root / "seed.pins").read_text().split())  # unchanged pins
    assert "0 built" in toy.doit("seeded:toy").stdout


def test_store_commands(toy: ToyProject) -> None:
    toy.doit()
    info = toy.eulerbake("store", "info", "combine:toy").stdout
    assert "manifest" in info and "fix.patch" not in info  # inputs are named by role, not path
    meta = json.loads(toy.eulerbake("store", "info", "combine:toy", "--json").stdout)
    assert meta["manifest"]["inputs"]["patch"]["kind"] == "file"
    why = toy.eulerbake("store", "why-depends", "combine:toy", "template:toy").stdout
    assert why.index("combine:toy") < why.index("tarball:toy") < why.index("template:toy")
    assert toy.eulerbake("store", "why-depends", "independent:toy", "template:toy", check=False).returncode == 1

    toy.doit(TOY_GREETING="changed")
    rebuilt = toy.eulerbake("store", "why-rebuilt", "template:toy", TOY_GREETING="changed").stdout
    assert "params.vars.greeting: hello → changed" in rebuilt
    # gc keeps what the current recipes reach: the old template/tarball/checksum/combine entries go.
    gc = toy.eulerbake("store", "gc", TOY_GREETING="changed").stdout
    assert "deleted 4 entries" in gc
    assert "0 built, 6 cached" in toy.doit(TOY_GREETING="changed").stdout
    _assert_store_consistent(toy.store)


def test_store_location_from_environment(toy: ToyProject, tmp_path: Path) -> None:
    elsewhere = tmp_path / "shared-store"
    toy.doit(EULERBAKE_STORE=str(elsewhere))
    assert not toy.store.exists() or toy.entries() == set()
    assert len(list(elsewhere.glob("*.json"))) == 6


def test_gc_drops_leftovers_and_unwanted_partial_downloads(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.open_stat_cache()
    downloads = tmp_path / "store/.cache/downloads"
    downloads.mkdir(parents=True)
    (downloads / "aaaa-wanted.iso.part").write_bytes(b"half")
    (downloads / "bbbb-unwanted.iso.part").write_bytes(b"half")
    (tmp_path / "store/.tmp/cccc-killed").mkdir()
    assert store.gc({"aaaa"}) == []
    assert [p.name for p in downloads.iterdir()] == ["aaaa-wanted.iso.part"]
    assert list((tmp_path / "store/.tmp").iterdir()) == []
