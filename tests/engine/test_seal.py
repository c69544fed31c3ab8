"""The seal of a store entry, directly: what `seal` sets, what `record` writes, what `check` and the stamp
shortcut find for each way a sealed tree can change (each case a distinct message)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from eulerbake.core import hashing
from eulerbake.store import seal

EPOCH = 1_700_000_000


def _tree(root: Path) -> Path:
    """A small entry: a file, an executable, a nested file, a symlink, an empty directory; sealed."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "sub" / "deeper" / "b.bin").write_bytes(b"\x00\x01" * 100)
    os.symlink("a.txt", root / "link")
    os.symlink("sub", root / "dirlink")  # a link to a directory: listed as a link, never walked into
    seal.seal(root, EPOCH)
    return root


@pytest.fixture
def sealed(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    root = _tree(tmp_path / "entry")
    return root, seal.record(root)


def _writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)


def test_seal_sets_modes_and_times_and_leaves_links_alone(tmp_path: Path) -> None:
    root = _tree(tmp_path / "entry")
    modes = {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in root.rglob("*") if not p.is_symlink()}
    assert modes == {"a.txt": 0o444, "run.sh": 0o555, "sub": 0o555, "sub/deeper": 0o555,
                     "sub/deeper/b.bin": 0o444, "empty": 0o555}
    assert stat.S_IMODE(root.stat().st_mode) == 0o555
    times = {p.lstat().st_mtime for p in [root, *root.rglob("*")]}
    assert times == {EPOCH}  # the link itself too (not its target only)
    assert os.readlink(root / "link") == "a.txt"


def test_record_lists_every_entry_with_stats_and_hash(sealed: tuple[Path, dict[str, object]]) -> None:
    root, record = sealed
    entries = record["entries"]
    assert isinstance(entries, dict) and record["format"] == 1 and record["stamp"] == seal.stamp(root)
    assert sorted(entries) == ["a.txt", "dirlink", "empty", "link", "run.sh", "sub", "sub/deeper", "sub/deeper/b.bin"]
    assert entries["link"] == ["l", "a.txt"] and entries["dirlink"] == ["l", "sub"]
    assert entries["sub"] == ["d"] and entries["empty"] == ["d"]
    st = (root / "a.txt").lstat()
    assert entries["a.txt"] == ["f", st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns,
                                hashing.hash_file(root / "a.txt", use_cache=False)]
    given = seal.record(root, {"a.txt": "given-digest"})["entries"]
    assert given["a.txt"][-1] == "given-digest"  # type: ignore[index]
    assert given["run.sh"][-1] == entries["run.sh"][-1]  # type: ignore[index]


def test_dumps_puts_the_stamp_first_and_round_trips(sealed: tuple[Path, dict[str, object]]) -> None:
    root, record = sealed
    text = seal.dumps(record)
    assert text.startswith(f'{{"stamp": "{record["stamp"]}", ') and json.loads(text) == record
    assert seal.recorded_stamp(text.encode()[:128]) == record["stamp"] == seal.stamp(root)
    assert seal.recorded_stamp(b'{"entries": {}}') is None  # a record from before stamps: no shortcut
    assert seal.recorded_stamp(text.replace(str(record["stamp"]), "0" * 64).encode()[:128]) != seal.stamp(root)
    with pytest.raises(OSError):  # an unreadable tree has no stamp (Store.seal_problems then checks in full)
        seal.stamp(root / "gone")


def test_an_intact_tree_has_no_problems(sealed: tuple[Path, dict[str, object]]) -> None:
    root, record = sealed
    assert seal.check(root, record) == []
    assert seal.stamp(root) == record["stamp"]


def _change(root: Path, how: str) -> None:
    _writable(root)
    if how == "extra file":
        (root / "sub" / "new.txt").write_text("new")
    elif how == "removed file":
        (root / "sub" / "deeper" / "b.bin").unlink()
    elif how == "removed directory":
        os.rmdir(root / "empty")
    elif how == "file became a directory":
        (root / "a.txt").unlink()
        (root / "a.txt").mkdir()
    elif how == "directory became a file":
        os.rmdir(root / "empty")
        (root / "empty").write_text("")
    elif how == "link retargeted":
        (root / "link").unlink()
        os.symlink("run.sh", root / "link")
    elif how == "link became a file":
        (root / "link").unlink()
        (root / "link").write_text("a.txt")
    elif how == "same size, other bytes":
        (root / "a.txt").write_text("ALPHA\n")
    elif how == "other size":
        (root / "a.txt").write_text("alpha, longer\n")
    elif how == "file became a link":
        (root / "a.txt").unlink()
        os.symlink("run.sh", root / "a.txt")
    elif how == "directory became a link":
        os.rmdir(root / "empty")
        os.symlink("sub", root / "empty")
    elif how == "link re-created":  # the same target, a new inode
        (root / "link").unlink()
        os.symlink("a.txt", root / "link")
    elif how == "written back with its old mtime":
        before = (root / "a.txt").stat()
        (root / "a.txt").write_text("ALPHA\n")
        os.utime(root / "a.txt", ns=(before.st_atime_ns, before.st_mtime_ns))
    elif how == "extra and missing":
        (root / "new.txt").write_text("new")
        (root / "run.sh").unlink()
    elif how == "replaced by a copy":  # same bytes, a new inode: the stamp moves, the content does not
        data = (root / "a.txt").read_bytes()
        (root / "a.txt").unlink()
        (root / "a.txt").write_bytes(data)


CHANGES = {
    "extra file": ["sub/new.txt: not in the sealed entry"],
    "removed file": ["sub/deeper/b.bin: missing"],
    "removed directory": ["empty: missing"],
    "file became a directory": ["a.txt: no longer a regular file"],
    "directory became a file": ["empty: no longer a directory"],
    "link retargeted": ["link: symlink changed"],
    "link became a file": ["link: symlink changed"],
    "same size, other bytes": ["a.txt: content changed since it was sealed"],
    "other size": ["a.txt: content changed since it was sealed"],
    "file became a link": ["a.txt: no longer a regular file"],
    "directory became a link": ["empty: no longer a directory"],
    "link re-created": [],
    "written back with its old mtime": ["a.txt: content changed since it was sealed"],
    "extra and missing": ["new.txt: not in the sealed entry", "run.sh: missing"],
    "replaced by a copy": [],
}


@pytest.mark.parametrize("how", list(CHANGES))
def test_each_change_is_named_and_moves_the_stamp(sealed: tuple[Path, dict[str, object]], how: str) -> None:
    root, record = sealed
    _change(root, how)
    assert sorted(seal.check(root, record)) == CHANGES[how]
    assert seal.stamp(root) != record["stamp"]  # never the shortcut after a change, even a harmless one
    assert seal.recorded_stamp(seal.dumps(record).encode()[:128]) != seal.stamp(root)


def test_a_link_made_again_moves_the_stamp(sealed: tuple[Path, dict[str, object]]) -> None:
    """Only the link's own inode changes (its target's stats do not): the stamp reads the link, not the target."""
    root, record = sealed
    os.chmod(root, 0o755)  # the entry's top directory is not in the stamp (only what is below it)
    (root / "link").unlink()
    os.symlink("a.txt", root / "link")
    assert seal.check(root, record) == []
    assert seal.stamp(root) != record["stamp"]


def test_a_size_change_is_found_without_hashing(sealed: tuple[Path, dict[str, object]],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root, record = sealed
    os.chmod(root / "a.txt", 0o644)  # only this file's stats move
    (root / "a.txt").write_text("alpha, longer\n")
    monkeypatch.setattr(hashing, "hash_file", lambda *_a, **_k: pytest.fail("hashed a file whose size moved"))
    assert seal.check(root, record) == ["a.txt: content changed since it was sealed"]


def test_an_untouched_tree_is_checked_without_hashing(sealed: tuple[Path, dict[str, object]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root, record = sealed
    monkeypatch.setattr(hashing, "hash_file", lambda *_a, **_k: pytest.fail("hashed a file whose stats held"))
    assert seal.check(root, record) == []


def test_a_record_without_entries_finds_every_entry_new(sealed: tuple[Path, dict[str, object]]) -> None:
    root, _record = sealed
    problems = seal.check(root, {"format": 1})
    assert sorted(problems) == sorted(f"{name}: not in the sealed entry"
                                      for name in ("a.txt", "dirlink", "empty", "link", "run.sh", "sub"))


def test_every_missing_entry_is_named_when_half_are_gone(tmp_path: Path) -> None:
    root = tmp_path / "entry"
    root.mkdir()
    for name in ("w", "x", "y", "z"):
        (root / name).write_text(name)
    record = seal.record(root)
    (root / "x").unlink()
    (root / "z").unlink()
    assert sorted(seal.check(root, record)) == ["x: missing", "z: missing"]


def test_an_unknown_entry_does_not_stop_the_check_of_its_directory(sealed: tuple[Path, dict[str, object]]) -> None:
    root, record = sealed
    _writable(root)
    for index in range(30):  # readdir order is the directory's hash order: some come before a.txt
        (root / f"new-{index:02d}").write_text("new")
    (root / "a.txt").write_text("ALPHA\n")
    assert "a.txt: content changed since it was sealed" in seal.check(root, record)


def test_a_tree_that_cannot_be_read_is_one_problem(sealed: tuple[Path, dict[str, object]]) -> None:
    root, record = sealed
    problems = seal.check(root / "nonexistent", record)
    assert len(problems) == 1 and problems[0].startswith("unreadable: ")


def test_the_stamp_follows_paths_not_listing_order(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for root, names in ((one, ["x", "y", "z"]), (two, ["z", "y", "x"])):
        root.mkdir()
        for name in names:
            (root / name).write_text(name)
    assert seal.stamp(one) != seal.stamp(two)  # other inodes and times: other stamps
    assert seal.stamp(one) == seal.stamp(one)
    os.utime(one / "y", ns=(1, 1))
    assert seal.stamp(one) != seal.stamp(one.parent / "two")


@pytest.fixture
def poisoned_cache(tmp_path: Path) -> Iterator[hashing.StatCache]:
    """A stat cache to put wrong answers in: the seal is made and checked from the bytes, never from it."""
    hashing.use_stat_cache(tmp_path / "stat.sqlite3")
    assert hashing._stat_cache is not None
    yield hashing._stat_cache
    hashing.use_stat_cache(None)


def test_the_seal_record_is_hashed_from_the_bytes(tmp_path: Path, poisoned_cache: hashing.StatCache) -> None:
    root = _tree(tmp_path / "entry")
    truth = hashing.hash_file(root / "a.txt", use_cache=False)
    poisoned_cache.remember(root / "a.txt", (root / "a.txt").stat(), "0" * 64, None)
    assert hashing.hash_file(root / "a.txt") == "0" * 64  # the poison is in place
    assert seal.record(root)["entries"]["a.txt"][-1] == truth


def test_a_changed_file_is_found_whatever_the_stat_cache_says(sealed: tuple[Path, dict[str, object]],
                                                              poisoned_cache: hashing.StatCache) -> None:
    root, record = sealed
    os.chmod(root / "a.txt", 0o644)
    (root / "a.txt").write_text("ALPHA\n")  # the same size: the content decides
    os.utime(root / "a.txt", (EPOCH + 5, EPOCH + 5))  # long past: a time the cache keeps
    entries = record["entries"]
    assert isinstance(entries, dict)
    poisoned_cache.remember(root / "a.txt", (root / "a.txt").stat(), entries["a.txt"][-1], None)  # "unchanged"
    assert hashing.hash_file(root / "a.txt") == entries["a.txt"][-1]  # the poison is in place
    assert seal.check(root, record) == ["a.txt: content changed since it was sealed"]


def test_an_intact_tree_is_walked_once(sealed: tuple[Path, dict[str, object]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The check counts what it found: only missing entries cost a second walk to name them."""
    root, record = sealed
    monkeypatch.setattr(seal, "_walk", lambda _path: pytest.fail("walked the tree a second time"))
    assert seal.check(root, record) == []
