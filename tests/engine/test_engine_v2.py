"""Engine v2 through real doit/eulerbake runs: build logs, declared tools and their versions in the key,
keys over the builder's import closure, graph-load errors, and golden manifests that pin the key format."""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from eulerbake.core.code import imported_modules
from tests.engine.conftest import ToyProject

GOLDEN = Path(__file__).resolve().parent / "golden_manifests.json"
GOLDEN_TASKS = ("fetch:toy:pinned", "golden:toy:a", "golden:toy:b")
UPDATE_GOLDEN_ENV = "EULERBAKE_UPDATE_GOLDEN"


def _meta(toy: ToyProject, task: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads(toy.eulerbake("store", "info", task, "--json", environ=environ).stdout)
    return meta


def _changed_fields(why_rebuilt: str) -> list[str]:
    """The manifest fields `eulerbake store why-rebuilt` lists as changed."""
    return re.findall(r"^  (\S+): ", why_rebuilt, flags=re.M)


def _flat(text: str) -> str:
    return " ".join(text.split())


# -- build logs ---------------------------------------------------------------------------------------------


def test_store_log_shows_the_build_log(toy: ToyProject) -> None:
    toy.doit("combine:toy")
    key = _meta(toy, "combine:toy")["key"]
    log = toy.eulerbake("store", "log", "combine:toy").stdout
    lines = log.splitlines()
    assert lines[:3] == ["task combine:toy", f"key {key}", "kind derivation"]
    assert re.fullmatch(r"result: built in \d+\.\d\ds", lines[-1])
    assert log == (toy.store / f"{key}-combine-toy.log").read_text()
    by_key = toy.eulerbake("store", "log", key[:12]).stdout  # an entry by key prefix too
    assert by_key == log


@dataclass
class FakeTool:
    """An executable `faketool` first on PATH; `probes` counts how often its version was asked."""

    bin: Path
    probes: Path

    @property
    def script(self) -> Path:
        return self.bin / "faketool"

    def install(self, version: str, padding: str = "") -> None:
        self.script.write_text(
            "#!/bin/sh\n"
            f"# {padding}\n"
            'if [ "$1" = --version ]; then\n'
            f"  echo probed >> '{self.probes}'\n"
            f"  echo 'faketool {version}'\n"
            "  exit 0\n"
            "fi\n"
            "echo 'faketool: warming up' >&2\n"
            'shift; echo "emitted $*"\n'
        )
        self.script.chmod(self.script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def probe_count(self) -> int:
        return len(self.probes.read_text().splitlines()) if self.probes.exists() else 0

    def env(self) -> dict[str, str]:
        return {"TOY_FAKETOOL": "1", "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def faketool(tmp_path: Path) -> FakeTool:
    (tmp_path / "bin").mkdir()
    tool = FakeTool(tmp_path / "bin", tmp_path / "probes")
    tool.install("1.0")
    return tool


def test_build_log_shows_commands_and_tool_versions(toy: ToyProject, faketool: FakeTool) -> None:
    toy.doit("faketool:toy", environ=faketool.env())
    log = toy.eulerbake("store", "log", "faketool:toy", environ=faketool.env()).stdout
    assert "tools\n  faketool: faketool 1.0\n" in log
    message = log.index("# asking faketool to emit the word")
    command = log.index("+ faketool emit hello  [exit 0, ")
    assert message < command  # messages and commands in the order they happened
    assert "  | faketool: warming up" in log  # the tail of the command's stderr
    (entry,) = toy.store.glob("*-faketool-toy")
    assert (entry / "emitted.txt").read_text() == "emitted hello\n"


def test_failed_build_keeps_its_log(toy: ToyProject) -> None:
    proc = toy.doit("broken:toy", check=False, TOY_FAIL="1")
    assert proc.returncode != 0
    assert not list(toy.store.glob("*-broken-toy*"))  # no entry, and no log beside the entries
    (failed,) = (toy.store / ".failed").glob("*-broken-toy.log")
    shown = toy.eulerbake("store", "log", "broken:toy", TOY_FAIL="1").stdout
    assert shown == failed.read_text()
    assert shown.startswith("task broken:toy\n")
    assert re.search(r"^result: FAILED after \d+\.\d\ds\n  RuntimeError: this builder always fails$", shown, re.M)


def test_no_log_for_a_task_never_built(toy: ToyProject) -> None:
    toy.doit("template:toy")
    proc = toy.eulerbake("store", "log", "independent:toy", check=False)
    assert proc.returncode == 2
    assert "independent:toy has no build log" in _flat(proc.stderr) and "Traceback" not in proc.stderr


# -- declared tools -----------------------------------------------------------------------------------------


def test_an_undeclared_tool_fails_the_build_and_commits_nothing(toy: ToyProject) -> None:
    proc = toy.doit("undeclared:toy", check=False, TOY_UNDECLARED="1")
    output = _flat(proc.stdout + proc.stderr)
    assert proc.returncode != 0
    assert "undeclared:toy ran sh, which its stage does not list in `tools`; the output was discarded" in output
    assert "fix: add 'sh' to the tools of the `undeclared` stage" in output
    assert toy.ran() == ["undeclared"]  # the builder did run: the store refused its output
    assert not list(toy.store.glob("*-undeclared-toy*"))
    assert list((toy.store / ".tmp").iterdir()) == []
    log = toy.eulerbake("store", "log", "undeclared:toy", TOY_UNDECLARED="1").stdout
    assert "  sh: (not declared)" in log and "+ sh -c 'echo undeclared'  [exit 0, " in log
    assert "undeclared:toy ran sh, which its stage does not list in `tools`" in log  # the log says why


def test_tool_versions_are_in_the_key(toy: ToyProject, faketool: FakeTool) -> None:
    env = faketool.env()
    toy.doit("faketool:toy", environ=env)
    assert toy.ran() == ["faketool"]
    first = _meta(toy, "faketool:toy", environ=env)
    assert first["manifest"]["tools"] == {"faketool": "faketool 1.0"}
    assert first["tools"] == {"faketool": "faketool 1.0"}  # what really ran, for provenance
    cache = json.loads((toy.store / ".cache" / "tool-versions.json").read_text())
    assert cache["faketool"][0] == str(faketool.script) and cache["faketool"][-1] == "faketool 1.0"

    probes = faketool.probe_count()
    assert probes >= 1
    assert "0 built, 1 cached" in toy.doit("faketool:toy", environ=env).stdout
    assert faketool.probe_count() == probes  # a no-op run asks the cache, not the tool

    before = faketool.script.stat()
    faketool.install("2.0", padding="a new release, a few bytes longer")
    after = faketool.script.stat()
    assert after.st_size != before.st_size  # the cache is keyed by the binary's stat: this must miss
    toy.doit("faketool:toy", environ=env)
    assert toy.ran() == ["faketool"]
    assert faketool.probe_count() > probes
    second = _meta(toy, "faketool:toy", environ=env)
    assert second["key"] != first["key"]
    assert second["manifest"]["tools"] == {"faketool": "faketool 2.0"}

    why = toy.eulerbake("store", "why-rebuilt", "faketool:toy", environ=env).stdout
    assert "tools.faketool: faketool 1.0 → faketool 2.0" in why
    assert _changed_fields(why) == ["tools.faketool"]


def test_a_missing_declared_tool_is_one_message(toy: ToyProject, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc = toy.doit("faketool:toy", check=False, TOY_FAKETOOL="1", PATH=f"{empty}{os.pathsep}/usr/bin:/bin")
    output = _flat(proc.stdout + proc.stderr)
    assert proc.returncode != 0 and "Traceback" not in output
    assert "required tool 'faketool' was not found on PATH" in output
    assert not list(toy.store.glob("*-faketool-toy*"))


# -- code keys ----------------------------------------------------------------------------------------------


def test_editing_a_helper_rebuilds_exactly_the_stages_whose_module_imports_it(toy: ToyProject) -> None:
    env = {"TOY_STAMP": "1"}
    every = ("stamp:toy", "combine:toy", "independent:toy")
    toy.doit(*every, environ=env)
    assert sorted(toy.ran()) == ["checksum", "combine", "independent", "stamp", "tarball", "template", "tree"]
    stamp = _meta(toy, "stamp:toy", environ=env)
    assert {"recipes.stamps", "recipes.helper"} <= set(stamp["manifest"]["code"])  # found, not listed
    for task in ("template:toy", "combine:toy", "independent:toy"):
        code = _meta(toy, task, environ=env)["manifest"]["code"]
        assert "recipes" in code and "recipes.helper" not in code and "recipes.stamps" not in code

    helper = toy.root / "recipes" / "helper.py"
    helper.write_text(helper.read_text() + "\n# an edit to the helper\n")
    out = toy.doit(*every, environ=env)
    assert toy.ran() == ["stamp"]
    assert "1 built, 6 cached" in out.stdout
    why = toy.eulerbake("store", "why-rebuilt", "stamp:toy", environ=env).stdout
    assert _changed_fields(why) == ["code.recipes.helper"]
    assert (next(toy.store.glob("*-stamp-toy")) / "stamp.txt").read_text().startswith("== stamped ==\n")


def test_imported_modules_reads_every_import_form() -> None:
    source = "\n".join([
        '"""A module of eulerbake.core, as the key sees it."""',
        "from eulerbake.core import (hashing, errors)",
        "import eulerbake.tools.run",
        "import os, json",
        "import eulerbake.store.buildlog as buildlog, eulerbake.tools.units",
        "from . import code",
        "from .publication import Publication  # a relative module, then a name in it",
        "from ..tasks import glue",
        "from rich.console import Console",
        "",
        "def later() -> None:",
        "    import eulerbake.tools.versions",
        "    from eulerbake.store import local",
        "",
        "class Lazy:",
        "    def method(self) -> None:",
        "        from eulerbake.tools.packages import TOOLS",
    ])
    found = imported_modules(source, frozenset({"eulerbake"}), "eulerbake.core")
    assert found == {
        "eulerbake.core.hashing", "eulerbake.core.errors", "eulerbake.tools.run", "eulerbake.store.buildlog",
        "eulerbake.tools.units", "eulerbake.core.code", "eulerbake.core.publication", "eulerbake.tasks.glue",
        "eulerbake.tools.versions", "eulerbake.store.local", "eulerbake.tools.packages",
    }
    # `from pkg import name` where name is not a module is the package itself; other roots are ignored.
    assert imported_modules("from eulerbake.core.derivation import Node\nimport rich\n",
                            frozenset({"eulerbake"}), "x") == {"eulerbake.core.derivation"}
    assert imported_modules("from .. import tools\n", frozenset({"eulerbake"}), "eulerbake.core") == {
        "eulerbake.tools"}  # a package imported as a name: its __init__
    assert imported_modules("from ...a import b\n", frozenset({"p"}), "p.q.r") == {"p.a"}


def test_imported_modules_reads_a_multiline_parenthesised_import() -> None:
    source = "from eulerbake.tools import (\n    packages,\n    units,\n)\n"
    assert imported_modules(source, frozenset({"eulerbake"}), "x") == {"eulerbake.tools.packages",
                                                                         "eulerbake.tools.units"}


# -- graph-load errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("doit", "list"), ("eulerbake", "list"), ("doit",), ("eulerbake", "store", "gc")],
                         ids=" ".join)
def test_a_recipe_error_while_the_graph_loads_is_one_message(toy: ToyProject, command: tuple[str, ...]) -> None:
    toy.doit("independent:toy")
    before = toy.entries()
    run = toy.doit if command[0] == "doit" else toy.eulerbake
    proc = run(*command[1:], check=False, TOY_BAD_PARAM="yes")
    assert proc.returncode == 2
    assert "error: TOY_BAD_PARAM='yes' is not a valid toy parameter" in proc.stderr
    assert "fix: unset TOY_BAD_PARAM" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert toy.entries() == before  # nothing was built, nothing collected


# -- golden manifests ---------------------------------------------------------------------------------------


def _field_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for name in sorted(set(old) | set(new)):
            lines += _field_diff(old.get(name), new.get(name), f"{prefix}.{name}" if prefix else name)
        return lines
    return [] if old == new else [f"  {prefix}: {json.dumps(old)} → {json.dumps(new)}"]


def test_golden_manifests(toy: ToyProject) -> None:
    assert "3 built, 0 cached" in toy.doit("golden:toy:b", TOY_GOLDEN="1").stdout
    actual = {}
    for task in GOLDEN_TASKS:
        meta = _meta(toy, task, {"TOY_GOLDEN": "1"})
        actual[task] = {"key": meta["key"], "manifest": meta["manifest"]}
    assert all(entry["manifest"].get("tools", {}) == {} for entry in actual.values())  # machine-independent

    if os.environ.get(UPDATE_GOLDEN_ENV, "") not in ("", "0"):
        GOLDEN.write_text(json.dumps(actual, indent=2, sort_keys=True) + "\n")
        return
    expected = json.loads(GOLDEN.read_text())
    diff = _field_diff(expected, actual)
    assert actual == expected, (
        "the manifests of the golden toy derivations changed, so their keys moved (every store entry built "
        "with the old engine becomes a cache miss):\n" + "\n".join(diff) + "\n"
        f"If that is on purpose (a manifest format change, a new ENGINE_ABI, an edit to an engine module the "
        f"builders' code reaches), regenerate {GOLDEN.name} and commit it with the change:\n"
        f"  {UPDATE_GOLDEN_ENV}=1 .venv/bin/pytest tests/engine/test_engine_v2.py -k golden"
    )
