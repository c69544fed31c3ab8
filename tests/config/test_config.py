"""The user's config, `[tool.eulerbake]` in pyproject.toml: defaults, overrides and where each value came from,
one clear error per bad key or value, and values flowing into the stages' parameters (so into keys)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import recipes
from eulerbake.core.derivation import walk
from eulerbake.core.errors import EulerbakeError
from recipes import config, releases
from recipes.stages.hygiene import ITEMS

from .conftest import REPO, WriteConfig, copy_project


def cell(release: str = "22.03-LTS", arch: str = "x86_64") -> config.CellSettings:
    return config.cell_settings(release, arch)


def values(settings: config.CellSettings) -> dict[str, tuple[str, str]]:
    return {s.name: (s.value, s.origin) for s in settings.settings}


def raw_of(release: str, arch: str) -> tuple[object, list[str]]:
    """(the params of the cell's raw stage, the task names of its graph)."""
    targets = recipes.cell_targets(release, arch)
    return targets[0].params, [node.task_name for node in walk(list(targets))]


def test_defaults_without_a_file(write_config: WriteConfig) -> None:
    assert not config.PYPROJECT.exists()
    settings = cell()
    assert values(settings) == {"root_size": ("6G", "default"), "disk_size": ("auto", "default"),
                                "ena": ("auto", "default"), **{f"hygiene.{item}": ("on", "default") for item in ITEMS}}
    assert settings.raw_params() == {"root_size": "6G", "disk_size": "auto", "hygiene": ITEMS}
    write_config('[project]\nname = "x"\n')  # a pyproject.toml without the table: the same defaults
    assert cell() == settings


def test_the_repositorys_own_file_is_valid() -> None:
    loaded = config.load(REPO / "pyproject.toml")
    for rel in releases.matrix():
        loaded.cell(rel.version, rel.arch)


def test_overrides_most_specific_wins_and_each_value_names_its_table(write_config: WriteConfig) -> None:
    write_config('''
[tool.eulerbake]
root_size = "5G"
hygiene.sshd = "off"
substituters = []

[tool.eulerbake.arch.aarch64]
root_size = "7G"
ena = "off"

[tool.eulerbake.release."22.03-LTS"]
disk_size = "12G"
root_size = "8G"
hygiene = false

[tool.eulerbake.release."22.03-LTS".aarch64]
root_size = "9G"
hygiene.machine_id = true

[tool.eulerbake.aws]
region = "eu-west-1"
''')
    top, rel = "tool.eulerbake", 'tool.eulerbake.release."22.03-LTS"'
    other = values(cell("24.03-LTS", "x86_64"))
    assert other["root_size"] == ("5G", top) and other["disk_size"] == ("auto", "default")
    assert other["hygiene.sshd"] == ("off", top) and other["hygiene.machine_id"] == ("on", "default")
    assert values(cell("24.03-LTS", "aarch64"))["root_size"] == ("7G", "tool.eulerbake.arch.aarch64")
    x86 = values(cell("22.03-LTS", "x86_64"))
    assert x86["root_size"] == ("8G", rel) and x86["disk_size"] == ("12G", rel)
    assert {x86[f"hygiene.{item}"] for item in ITEMS} == {("off", rel)}
    arm = cell("22.03-LTS", "aarch64")
    assert values(arm)["root_size"] == ("9G", f"{rel}.aarch64")  # release.arch beats release beats arch
    assert values(arm)["ena"] == ("off", "tool.eulerbake.arch.aarch64")
    assert arm.hygiene == ("machine_id",)
    assert config.load().table("aws") == {"region": "eu-west-1"} and config.load().table("maas") == {}
    assert config.load().engine == ("substituters",)


def test_values_flow_into_the_stages_parameters_and_keys(write_config: WriteConfig) -> None:
    params, tasks = raw_of("22.03-LTS", "x86_64")
    assert (params.disk_size, params.root_size, params.hygiene) == ("auto", 6 * 1024**3, ITEMS)  # type: ignore[attr-defined]
    assert "kmod-build:22.03-LTS:x86_64" not in tasks
    assert "kmod-build:22.03-LTS:aarch64" in raw_of("22.03-LTS", "aarch64")[1]  # ena auto: the seed's rule

    write_config('''
[tool.eulerbake]
disk_size = "10G"
hygiene.serial_console = "off"
[tool.eulerbake.release."22.03-LTS".x86_64]
ena = "on"
[tool.eulerbake.arch.aarch64]
ena = "off"
''')
    params, tasks = raw_of("22.03-LTS", "x86_64")
    assert params.disk_size == 10 * 1024**3  # type: ignore[attr-defined]
    assert params.hygiene == ("root_password", "machine_id", "cloud_init_state", "sshd")  # type: ignore[attr-defined]
    assert {"kmod-build:22.03-LTS:x86_64", "fetch:22.03-LTS:x86_64:kernel-devel"} <= set(tasks)
    assert not any(task.startswith("kmod-") for task in raw_of("22.03-LTS", "aarch64")[1])
    sample_x86, sample_tasks = raw_of("sample", "x86_64")
    assert sample_x86.disk_size == 10 * 1024**3  # type: ignore[attr-defined]  # the sample follows the file too
    assert "kmod-build:sample:x86_64" in sample_tasks


def test_ena_off_drops_the_sample_module_and_on_is_refused_where_it_cannot_be_built(
        write_config: WriteConfig) -> None:
    write_config('[tool.eulerbake.release.sample]\nena = "off"\n')
    for arch in ("x86_64", "aarch64"):
        params, tasks = raw_of("sample", arch)
        assert params.overlays == () and not any(t.startswith("kmod-") for t in tasks)  # type: ignore[attr-defined]
    path = write_config('[tool.eulerbake]\nena = "on"\n')
    with pytest.raises(EulerbakeError) as caught:
        recipes.sample_targets()
    assert "ena = on for sample:aarch64 (from tool.eulerbake)" in str(caught.value)
    assert caught.value.hint and "tool.eulerbake.release.sample.aarch64" in caught.value.hint
    assert path.exists()


@pytest.mark.parametrize(("text", "key", "allowed"), [
    ('[tool.eulerbake]\nroot_sise = "6G"\n', "tool.eulerbake.root_sise is not a setting or table eulerbake knows",
     "root_size, disk_size, ena, hygiene"),
    ('[tool.eulerbake.release."22.03-LTS"]\ndisk_sise = "9G"\n',
     'tool.eulerbake.release."22.03-LTS".disk_sise is not a setting', "root_size, disk_size, ena, hygiene, x86_64"),
    ('[tool.eulerbake.release."21.09"]\nena = "on"\n', 'tool.eulerbake.release."21.09" is not a release',
     "22.03-LTS-SP4"),
    ("[tool.eulerbake.arch.riscv64]\nena = \"on\"\n", "tool.eulerbake.arch.riscv64 is not an architecture",
     "x86_64, aarch64"),
    ('[tool.eulerbake.release.sample.x86_64]\nhygiene.ssh = "off"\n',
     "tool.eulerbake.release.sample.x86_64.hygiene.ssh is not a hygiene item", ", ".join(ITEMS)),
    ('[tool.eulerbake]\nrelease = "22.03-LTS"\n', 'tool.eulerbake.release = "22.03-LTS" is not a table', "a table"),
])
def test_a_bad_key_is_one_error_naming_file_key_and_what_is_allowed(
        write_config: WriteConfig, text: str, key: str, allowed: str) -> None:
    path = write_config(text)
    with pytest.raises(EulerbakeError) as caught:
        cell()
    assert caught.value.message == f"{path}: {key}" or caught.value.message.startswith(f"{path}: {key}")
    assert caught.value.hint and allowed in caught.value.hint


@pytest.mark.parametrize(("setting", "problem", "allowed"), [
    ('root_size = "six gigs"', 'tool.eulerbake.root_size = "six gigs" is not a size', "whole MiB"),
    ('root_size = "auto"', 'tool.eulerbake.root_size = "auto" is not a size', 'e.g. "6G"'),
    ('disk_size = "8.0001G"',
     'tool.eulerbake.disk_size = "8.0001G" is not a whole number of MiB (partitions are 1 MiB aligned)', '"auto"'),
    ('disk_size = "big"', 'tool.eulerbake.disk_size = "big" is not a size or "auto"', '"auto"'),
    ("disk_size = true", "tool.eulerbake.disk_size = true is not a size", '"auto"'),
    ('ena = "maybe"', 'tool.eulerbake.ena = "maybe" is not one of on, off, auto', '"on", "off" or "auto"'),
    ('hygiene.sshd = "yes"', 'tool.eulerbake.hygiene.sshd = "yes" is not one of on, off', '"on" or "off"'),
    ("hygiene = 1", "tool.eulerbake.hygiene = 1 is not one of on, off", "root_password"),
    ('aws = "eu-west-1"', 'tool.eulerbake.aws = "eu-west-1" is not a table', "a table"),
])
def test_a_bad_value_is_one_error_naming_file_key_and_what_is_allowed(
        write_config: WriteConfig, setting: str, problem: str, allowed: str) -> None:
    path = write_config(f"[tool.eulerbake]\n{setting}\n")
    with pytest.raises(EulerbakeError) as caught:
        cell()
    assert caught.value.message == f"{path}: {problem}"
    assert caught.value.hint and caught.value.hint.startswith("allowed: ") and allowed in caught.value.hint


def test_a_disk_smaller_than_the_root_names_both_tables(write_config: WriteConfig) -> None:
    path = write_config('[tool.eulerbake]\ndisk_size = "5G"\nroot_size = "4G"\n'
                        '[tool.eulerbake.arch.x86_64]\nroot_size = "7G"\n')
    assert cell("22.03-LTS", "aarch64").raw_params()["disk_size"] == "5G"
    with pytest.raises(EulerbakeError) as caught:
        cell("22.03-LTS", "x86_64")
    assert str(caught.value).startswith(f"{path}: for 22.03-LTS:x86_64, disk_size 5G (from tool.eulerbake) is smaller "
                                        "than root_size 7G (from tool.eulerbake.arch.x86_64)")


def test_broken_toml_is_one_error(write_config: WriteConfig) -> None:
    path = write_config("[tool.eulerbake\nroot_size = 6G\n")
    with pytest.raises(EulerbakeError, match=f"cannot read {path}: ") as caught:
        cell()
    assert caught.value.hint == "fix the TOML syntax"


def test_config_show(write_config: WriteConfig, capsys: pytest.CaptureFixture[str]) -> None:
    write_config('[tool.eulerbake]\nroot_size = "5G"\n[tool.eulerbake.release."22.03-LTS".aarch64]\nena = "off"\n'
                 '[tool.eulerbake.maas]\nname = "openeuler"\n')
    assert recipes.COMMANDS["config"](["show"]) == 0
    shown = capsys.readouterr().out
    assert "  root_size                 5G    [tool.eulerbake]\n" in shown
    assert "  disk_size                 auto  default\n" in shown
    assert '[tool.eulerbake.release."22.03-LTS".aarch64] ena = "off"' in shown
    assert "passed to the publish stages: [tool.eulerbake.maas] name" in shown

    assert recipes.COMMANDS["config"](["show", "kmod-check:24.03-LTS:aarch64"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("settings of 24.03-LTS:aarch64")
    assert "  ena auto -> the module is built (kmod-build:24.03-LTS:aarch64)" in shown
    assert config.load().cell("22.03-LTS", "aarch64").ena == "off"
    assert recipes.COMMANDS["config"](["show", "raw:22.03-LTS:aarch64"]) == 0
    shown = capsys.readouterr().out
    assert '  ena                       off   [tool.eulerbake.release."22.03-LTS".aarch64]\n' in shown
    assert "  ena off -> no module is built" in shown


@pytest.mark.parametrize(("task", "problem"), [
    ("kmod-build:22.03-LTS:x86_64", "no task named kmod-build:22.03-LTS:x86_64 in cell 22.03-LTS:x86_64"),
    ("fetch:amzn-drivers:ena_linux_2.14.1", "is not a task of a release cell"),
])
def test_config_show_of_a_task_that_is_not_there(write_config: WriteConfig, task: str, problem: str) -> None:
    with pytest.raises(EulerbakeError, match=problem):
        recipes.COMMANDS["config"](["show", task])


def test_a_bad_config_stops_doit_at_graph_load_with_one_message(tmp_path: Path) -> None:
    """Through doit (dodo.py) and through `eulerbake`: exit 2, the one message, no traceback, nothing built."""
    project = copy_project(tmp_path / "project", '\n[tool.eulerbake.release."22.03-LTS"]\ndisk_size = "huge"\n')
    env = {**os.environ, "EULERBAKE_STORE": str(tmp_path / "store")}
    env.pop("EULERBAKE_PROJECT", None)
    expected = f'{project / "pyproject.toml"}: tool.eulerbake.release."22.03-LTS".disk_size = "huge" is not a size'
    for command in (["-m", "doit", "list"], ["-m", "eulerbake.cli.main", "list"], ["-m", "eulerbake.cli.main", "config",
                                                                                    "show"]):
        proc = subprocess.run([sys.executable, *command], cwd=project, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "fix: allowed: " in proc.stderr
    assert not (tmp_path / "store").exists() or not [p for p in (tmp_path / "store").iterdir()
                                                      if not p.name.startswith(".")]


def test_config_show_through_the_cli(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", '\n[tool.eulerbake.arch.x86_64]\nhygiene.sshd = "off"\n')
    env = {**os.environ, "EULERBAKE_STORE": str(tmp_path / "store")}
    env.pop("EULERBAKE_PROJECT", None)
    proc = subprocess.run([sys.executable, "-m", "eulerbake.cli.main", "config", "show", "raw:24.03-LTS-SP2:x86_64"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "  hygiene.sshd              off   [tool.eulerbake.arch.x86_64]\n" in proc.stdout
    assert f"(from {project / 'pyproject.toml'};" in proc.stdout
