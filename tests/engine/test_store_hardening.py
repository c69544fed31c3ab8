"""Trust in the store: corrupted entries are never reused, gc waits for builds, no symlink tricks, and every
broken store state is one message with a fix (each case failed before the store was hardened)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.engine.conftest import ToyProject


def _entry(toy: ToyProject, task_stage: str) -> Path:
    (entry,) = [p for p in toy.store.glob(f"*-{task_stage}-toy") if p.is_dir()]
    return entry


def _flip(path: Path, offset: int = 10) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _recorded_hashes(toy: ToyProject) -> dict[str, str]:
    return {json.loads(p.read_text())["task"]: json.loads(p.read_text())["output"]["hash"]
            for p in toy.store.glob("*.json")}


def test_corrupted_input_is_moved_aside_and_rebuilt_not_reused(toy: ToyProject) -> None:
    toy.doit()
    toy.ran()
    hashes = _recorded_hashes(toy)
    tarball = _entry(toy, "tarball")
    _flip(tarball / "bundle.tar", 700)
    # Downstream entries are forgotten by doit so the corrupted input would be built into them.
    toy.doit("clean", "checksum:toy", "combine:toy")
    proc = toy.doit()
    assert "CORRUPT" in proc.stderr and tarball.name in proc.stderr
    assert sorted(toy.ran()) == ["checksum", "combine", "tarball"]
    assert _recorded_hashes(toy) == hashes  # never a new hash under an old key
    assert (tarball / "bundle.tar").read_bytes() != b""
    corrupt = list((toy.store / ".corrupt").iterdir())
    assert len(corrupt) == 1 and "tarball" in (corrupt[0] / "NOTE").read_text()
    assert "0 corrupted, 0 other problems" in toy.eulerbake("store", "verify").stdout


def test_cached_entry_is_checked_before_it_is_reported_cached(toy: ToyProject) -> None:
    toy.doit()
    toy.ran()
    _flip(_entry(toy, "combine") / "release.txt", 1)
    proc = toy.doit()
    assert toy.ran() == ["combine"]
    assert "1 built, 5 cached" in proc.stdout


def test_corruption_can_fail_the_build_instead(toy: ToyProject) -> None:
    toy.doit()
    _flip(_entry(toy, "combine") / "release.txt", 1)
    proc = toy.doit(check=False, EULERBAKE_NO_REBUILD_CORRUPT="1")
    assert proc.returncode != 0
    assert "corrupted" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_a_write_that_puts_back_size_and_mtime_is_still_caught(toy: ToyProject) -> None:
    """The seal's stamp shortcut covers inode and ctime too: restoring mtime does not hide a write."""
    toy.doit()
    toy.ran()
    entry = _entry(toy, "tarball")
    record = (toy.store / ".seals" / f"{entry.name[:32]}.json").read_bytes()
    assert record.startswith(b'{"stamp": "')  # the shortcut's precondition
    target = entry / "bundle.tar"
    before = os.stat(target)
    _flip(target, 700)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.chmod(target, before.st_mode & 0o7777)
    proc = toy.doit()
    assert "CORRUPT" in proc.stderr and sorted(toy.ran()) == ["tarball"]


def test_a_touched_but_unchanged_file_is_not_corruption(toy: ToyProject) -> None:
    toy.doit()
    toy.ran()
    entry = _entry(toy, "combine")
    os.utime(entry / "release.txt", (1, 1))
    assert "0 built" in toy.doit().stdout and toy.ran() == []
    # The full check found it intact and restamped the record: the next check is the shortcut.
    from eulerbake.store import seal
    record = json.loads((toy.store / ".seals" / f"{entry.name[:32]}.json").read_text())
    assert record["stamp"] == seal.stamp(entry)


def test_a_seal_record_without_a_stamp_is_checked_in_full_and_stamped(toy: ToyProject) -> None:
    toy.doit()
    toy.ran()
    entry = _entry(toy, "tarball")
    path = toy.store / ".seals" / f"{entry.name[:32]}.json"
    record = json.loads(path.read_text())
    del record["stamp"]
    path.write_text(json.dumps(record, sort_keys=True))  # as records were written before stamps
    assert "0 built" in toy.doit().stdout and toy.ran() == []
    assert path.read_bytes().startswith(b'{"stamp": "')
    _flip(entry / "bundle.tar", 700)
    assert "CORRUPT" in toy.doit().stderr and toy.ran() == ["tarball"]


def test_planted_lock_symlink_is_refused_and_its_target_untouched(toy: ToyProject, tmp_path: Path) -> None:
    toy.doit("independent:toy")
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me\n")
    toy.doit("clean", "template:toy")
    # The key of template:toy is in its metadata once built; plant a link under the lock name of every key.
    toy.doit("template:toy")
    key = json.loads(next(toy.store.glob("*-template-toy.json")).read_text())["key"]
    toy.doit("clean", "template:toy")
    lock = toy.store / ".locks" / f"{key}.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(victim)
    proc = toy.doit("template:toy", check=False)
    assert proc.returncode != 0
    assert "symbolic link" in proc.stdout + proc.stderr
    assert victim.read_text() == "do not truncate me\n"


def test_garbled_metadata_is_named_and_repaired(toy: ToyProject) -> None:
    toy.doit()
    meta = next(toy.store.glob("*-combine-toy.json"))
    os.chmod(meta, 0o644)
    meta.write_text("{}")
    (toy.store / "junk.txt").write_text("stray\n")
    for args in (("store", "info"), ("store", "gc", "--dry-run")):
        proc = toy.eulerbake(*args, check=False)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, args
    proc = toy.eulerbake("store", "verify", check=False)
    assert proc.returncode == 1
    assert meta.name in proc.stdout and "junk.txt" in proc.stdout and "stray" in proc.stdout
    repaired = toy.eulerbake("store", "verify", "--repair")
    assert "moved to" in repaired.stdout
    assert toy.eulerbake("store", "verify").returncode == 0
    assert "1 built" in toy.doit().stdout


def test_deleted_entry_directory_is_reported_and_rebuilt(toy: ToyProject) -> None:
    toy.doit()
    toy.ran()
    entry = _entry(toy, "combine")
    subprocess.run(["chmod", "-R", "u+w", str(entry)], check=True)
    subprocess.run(["rm", "-rf", str(entry)], check=True)
    proc = toy.eulerbake("store", "verify", check=False)
    assert proc.returncode == 1 and "orphaned metadata" in proc.stdout
    assert "1 built" in toy.doit().stdout and toy.ran() == ["combine"]


def test_store_setting_that_is_a_file_is_one_message(toy: ToyProject, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    for run in (toy.doit, toy.eulerbake):
        proc = run("list", check=False, EULERBAKE_STORE=str(not_a_dir))
        assert proc.returncode == 2, proc.stderr
        assert "is not a directory" in proc.stderr and "EULERBAKE_STORE" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_verify_of_a_missing_store_fails(toy: ToyProject, tmp_path: Path) -> None:
    proc = toy.eulerbake("store", "verify", check=False, EULERBAKE_STORE=str(tmp_path / "typo"))
    assert proc.returncode == 2 and "there is no store" in proc.stderr


def test_store_path_of_an_unbuilt_task(toy: ToyProject) -> None:
    proc = toy.eulerbake("store", "path", "combine:toy", check=False)
    assert proc.returncode == 1 and "not built yet" in proc.stdout
    expected = toy.eulerbake("store", "path", "combine:toy", "--expected").stdout.strip()
    toy.doit()
    assert toy.eulerbake("store", "path", "combine:toy").stdout.strip() == expected


def test_gc_waits_for_a_build_in_another_checkout(toy: ToyProject, tmp_path: Path) -> None:
    shared = tmp_path / "shared-store"
    other = subprocess.Popen([sys.executable, "-m", "doit"], cwd=toy.root, text=True,
                             env=toy.env(EULERBAKE_STORE=str(shared), TOY_SLOW="0.05", TOY_GREETING="other checkout"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not any((shared / ".tmp").glob("*/out/bundle.tar")) and time.monotonic() < deadline:
        time.sleep(0.02)
    # This checkout's recipes (another greeting) reach none of the other checkout's entries.
    gc = toy.eulerbake("store", "gc", EULERBAKE_STORE=str(shared))
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, out + err
    assert "waiting for builds" in gc.stdout + gc.stderr
    assert "6 built" in out


def test_builder_temp_files_stay_in_the_build(toy: ToyProject, tmp_path: Path) -> None:
    from eulerbake.tools.run import recording, run

    outer = tmp_path / "caller-tmp"
    outer.mkdir()
    scratch = tmp_path / "build-scratch"
    scratch.mkdir()
    os.environ["TMPDIR"] = str(outer)
    try:
        with recording(tmpdir=scratch):
            run(["sh", "-c", 'touch "$TMPDIR/ccXXXX.s"'])
    finally:
        del os.environ["TMPDIR"]
    assert list(outer.iterdir()) == [] and [p.name for p in scratch.iterdir()] == ["ccXXXX.s"]


CRASH_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from eulerbake.store.local import Store
import recipes

real_rename = os.rename
calls = []

def rename_then_die(src, dst, *args, **kwargs):
    real_rename(src, dst, *args, **kwargs)
    if str(dst).startswith({store!r}) and not str(dst).startswith({store!r} + "/."):
        calls.append(dst)
        if len(calls) == {after}:
            os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename_then_die
node = next(n for n in recipes.targets() if n.task_name == "independent:toy")
Store(Path({store!r})).realise(node, log=lambda message: None)
"""


def test_a_crash_between_the_commit_renames_leaves_no_metadata_without_output(toy: ToyProject) -> None:
    from tests.engine.test_store_safety import _assert_store_consistent

    store = str(toy.store)
    script = CRASH_BETWEEN_RENAMES.format(root=str(toy.root), store=store, after=1)
    proc = subprocess.run([sys.executable, "-c", script], cwd=toy.root, env=toy.env(), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # killed right after the output directory was renamed into place
    assert any(p.is_dir() for p in toy.store.glob("*-independent-toy"))
    assert not list(toy.store.glob("*-independent-toy.json"))
    assert "orphaned output" in toy.eulerbake("store", "verify", check=False).stdout
    proc = toy.doit("independent:toy")
    assert "1 built" in proc.stdout and toy.ran()[-1] == "independent"
    _assert_store_consistent(toy.store)


def test_verify_checks_the_manifest_against_the_key(toy: ToyProject) -> None:
    toy.doit()
    meta_file = next(toy.store.glob("*-combine-toy.json"))
    meta = json.loads(meta_file.read_text())
    meta["manifest"]["params"]["title"] = "edited"
    os.chmod(meta_file, 0o644)
    meta_file.write_text(json.dumps(meta))
    proc = toy.eulerbake("store", "verify", check=False)
    assert proc.returncode == 1 and "does not hash to the entry's key" in proc.stdout
