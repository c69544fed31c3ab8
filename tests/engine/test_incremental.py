"""Incremental builds through real doit runs: exactly what is downstream of a change is rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

from tests.engine.conftest import ToyProject

ALL = ["template", "tree", "tarball", "checksum", "combine", "independent"]


def _tasks_in_store(toy: ToyProject) -> dict[str, str]:
    """task name -> key of every committed entry."""
    result = {}
    for meta in toy.store.glob("*.json"):
        data = json.loads(meta.read_text())
        result.setdefault(data["task"], set()).add(data["key"])  # type: ignore[attr-defined]
    return result  # type: ignore[return-value]


def test_first_build_then_noop(toy: ToyProject) -> None:
    first = toy.doit()
    assert sorted(toy.ran()) == sorted(ALL)
    assert "6 built, 0 cached" in first.stdout
    second = toy.doit()
    assert toy.ran() == []
    assert "0 built, 6 cached" in second.stdout


def test_rebuilds_exactly_what_changed(toy: ToyProject) -> None:
    toy.doit()
    toy.ran()
    before = _tasks_in_store(toy)

    (toy.root / "templates/motd.j2").write_text("{{ greeting }}, world\n")
    toy.doit()
    assert toy.ran() == ["template", "tarball", "checksum", "combine"]

    (toy.root / "overlay/etc/passwd").write_text("root:x:0:0::/root:/bin/bash\n")
    toy.doit()
    assert toy.ran() == ["tree", "tarball", "checksum", "combine"]

    with (toy.root / "fix.patch").open("a") as f:
        f.write("+one more byte\n")
    toy.doit()
    assert toy.ran() == ["combine"]

    (toy.root / "other.txt").write_text("second\n")
    toy.doit()
    assert toy.ran() == ["independent"]

    toy.doit(TOY_GREETING="bonjour")  # a parameter change
    assert toy.ran() == ["template", "tarball", "checksum", "combine"]

    after = _tasks_in_store(toy)
    new_entries = {task: len(after[task] - before[task]) for task in after}
    assert new_entries == {"template:toy": 2, "tree:toy": 1, "tarball:toy": 3, "checksum:toy": 3,
                           "combine:toy": 4, "independent:toy": 1}


def test_touch_without_change_rebuilds_nothing(toy: ToyProject) -> None:
    toy.doit()
    toy.ran()
    template = toy.root / "templates/motd.j2"
    template.write_text(template.read_text())  # new mtime, same bytes
    out = toy.doit()
    assert toy.ran() == []
    assert "0 built" in out.stdout


def test_reverting_a_change_reuses_the_old_entry(toy: ToyProject) -> None:
    toy.doit()
    original = (toy.root / "other.txt").read_text()
    (toy.root / "other.txt").write_text("changed\n")
    toy.doit()
    toy.ran()
    (toy.root / "other.txt").write_text(original)
    toy.doit()
    assert toy.ran() == []  # the entry for the original content is still in the store


def test_builder_code_change_rebuilds_its_stage(toy: ToyProject) -> None:
    toy.doit()
    toy.ran()
    recipes = toy.root / "recipes/__init__.py"
    recipes.write_text(recipes.read_text() + "\n# a comment changes the builders' code hash\n")
    toy.doit()
    assert sorted(toy.ran()) == sorted(ALL)  # all toy builders live in that one module


def test_parallel_run_builds_everything(toy: ToyProject) -> None:
    out = toy.doit("-n", "2")
    assert sorted(toy.ran()) == sorted(ALL)
    assert "6 built" in out.stdout
    assert "0 built, 6 cached" in toy.doit("-n", "2").stdout


def test_doit_commands_behave_as_usual(toy: ToyProject) -> None:
    listing = toy.doit("list", "--all").stdout
    for task in ["template:toy", "tree:toy", "tarball:toy", "checksum:toy", "combine:toy", "independent:toy"]:
        assert task in listing
    info = toy.doit("info", "combine:toy", check=False).stdout  # exit 1: not up to date
    assert "checksum:toy" in info and "fix.patch" in info
    toy.doit("combine:toy")
    assert sorted(toy.ran()) == ["checksum", "combine", "tarball", "template", "tree"]
    path = toy.eulerbake("store", "path", "template:toy").stdout.strip()
    assert Path(path).is_dir()
    toy.doit("clean", "template:toy")
    assert not Path(path).exists()
    toy.doit("forget")
    toy.doit()
    assert toy.ran() == ["template", "independent"]


def test_failing_builder_leaves_nothing(toy: ToyProject) -> None:
    toy.doit()
    before = toy.entries()
    proc = toy.doit("broken:toy", check=False, TOY_FAIL="1")
    assert proc.returncode != 0
    assert "this builder always fails" in proc.stdout + proc.stderr
    assert toy.entries() == before
    assert list((toy.store / ".tmp").iterdir()) == []


def test_input_edited_during_build_is_not_committed(toy: ToyProject) -> None:
    proc = toy.doit("tree:toy", check=False, TOY_EDIT_DURING_BUILD="1")
    assert proc.returncode != 0
    assert "changed while tree:toy was building" in proc.stdout + proc.stderr
    assert not list(toy.store.glob("*-tree-toy*"))
    toy.doit("tree:toy")  # the next run builds from the edited content
    (entry,) = toy.store.glob("*-tree-toy")
    assert "edited mid-build" in (entry / "etc/passwd").read_text()
