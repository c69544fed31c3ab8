"""What a user tunes, in one file: `[tool.eulerbake]` of the project's pyproject.toml, validated and resolved
per cell (release × arch) into the stages' typed parameters, so a changed value changes keys like any parameter.

```toml
[tool.eulerbake]                          # every key optional; `eulerbake config show [TASK]` prints the result
root_size = "6G"                          # the root filesystem after the shrink, whole MiB (6G, 6144M)
disk_size = "auto"                        # "auto" or a size (see recipes/stages/raw.py)
ena = "auto"                              # "on", "off" or "auto" (the cells whose kernel lacks the driver)
hygiene.sshd = "off"                      # each item on or off (or `hygiene = "off"` for all of them)

[tool.eulerbake.arch.aarch64]             # overrides for every release on one arch …
[tool.eulerbake.release."22.03-LTS"]      # … for one release (or `sample`) on both arches …
[tool.eulerbake.release."22.03-LTS".x86_64]   # … and for one cell; the most specific wins
[tool.eulerbake.aws]                      # publish targets: passed through to the publish stages as tables
[tool.eulerbake.maas]
```

The same table holds the engine's store-cache keys (`substituters`, `trusted-public-keys`, …, read by
`eulerbake.store.substituters`): pyproject.toml is the project's one config file. Values are checked when
the graph loads: a typo'd key or a bad value is one EulerbakeError naming the file, the key and what is
allowed (doit then stops with that message and exit 2, before anything is built).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from eulerbake.core.derivation import walk
from eulerbake.core.errors import EulerbakeError
from eulerbake.fs import disk

from recipes import releases
from recipes.stages.hygiene import ITEMS as HYGIENE_ITEMS

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
TABLE = ("tool", "eulerbake")
SAMPLE = "sample"  # the offline sample's release name (recipes/sample.py)
AUTO = "auto"
SWITCH = ("on", "off")
ENA_VALUES = ("on", "off", "auto")
# Read by the engine (eulerbake.store.substituters), which validates them; listed so a typo is still caught here.
ENGINE_KEYS = ("substituters", "trusted-public-keys", "require-signatures", "push-to")
PASS_THROUGH = ("aws", "maas")  # publish targets: tables handed to the publish stages as they are
OVERRIDE_TABLES = ("arch", "release")

DEFAULTS: dict[str, str] = {
    "root_size": "6G",
    "disk_size": AUTO,
    "ena": AUTO,
    **{f"hygiene.{item}": "on" for item in HYGIENE_ITEMS},
}
SETTINGS = ("root_size", "disk_size", "ena", "hygiene")
ALLOWED = {
    "root_size": 'a size in whole MiB, e.g. "6G" or "6144M"',
    "disk_size": '"auto" (the partitions and the shrunk root, rounded up to a GiB) or a size in whole MiB, e.g. "8G"',
    "ena": '"on", "off" or "auto" (auto: the module is built where the kernel lacks the driver)',
    "hygiene": f'"on" or "off" (true/false), for every item or per item: a table of {", ".join(HYGIENE_ITEMS)}',
}
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def key_path(*parts: str) -> str:
    """A dotted TOML key, quoted where needed: tool.eulerbake.release."22.03-LTS".x86_64."""
    return ".".join(part if _BARE_KEY.match(part) else f'"{part}"' for part in parts)


@dataclass(frozen=True)
class Setting:
    """One effective value and where it came from: "default" or the table that set it."""

    name: str  # "root_size", "disk_size", "ena" or "hygiene.<item>"
    value: str
    origin: str


@dataclass(frozen=True)
class CellSettings:
    """The effective settings of one cell (`<release>:<arch>`), hashable: they key the sample's cached graph."""

    release: str
    arch: str
    settings: tuple[Setting, ...]

    def get(self, name: str) -> Setting:
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise KeyError(name)

    @property
    def root_size(self) -> str:
        return self.get("root_size").value

    @property
    def disk_size(self) -> str:
        return self.get("disk_size").value

    @property
    def ena(self) -> str:
        return self.get("ena").value

    @property
    def hygiene(self) -> tuple[str, ...]:
        """The hygiene items turned on, in stages/hygiene.py's order."""
        return tuple(item for item in HYGIENE_ITEMS if self.get(f"hygiene.{item}").value == "on")

    def ena_module(self, auto_arches: Sequence[str]) -> bool:
        """Whether the cell gets the ENA module: "on", or "auto" on one of `auto_arches`."""
        return self.ena == "on" or (self.ena == AUTO and self.arch in auto_arches)

    def raw_params(self) -> dict[str, Any]:
        """The keyword arguments of stage `raw` that come from here."""
        return {"root_size": self.root_size, "disk_size": self.disk_size, "hygiene": self.hygiene}


@dataclass(frozen=True)
class Layer:
    """One table of the file that sets values: where it is and what it says (flattened keys)."""

    origin: str  # e.g. tool.eulerbake.release."22.03-LTS".x86_64
    release: str | None
    arch: str | None
    values: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Config:
    """The validated `[tool.eulerbake]` table of one file (empty when the file or the table is missing)."""

    path: Path
    layers: tuple[Layer, ...]  # least specific first: top level, arch.*, release.*, release.*.<arch>
    tables: tuple[tuple[str, Any], ...]  # pass-through tables (aws, maas), as read
    engine: tuple[str, ...]  # engine keys present

    def top(self) -> tuple[Setting, ...]:
        """What every cell gets unless a more specific table says otherwise."""
        return self._resolve(self.layers[:1])

    def cell(self, release: str, arch: str) -> CellSettings:
        """The effective settings of `<release>:<arch>`: built-in defaults, then each matching layer."""
        matching = [layer for layer in self.layers if layer.release in (None, release) and layer.arch in (None, arch)]
        settings = self._resolve(matching)
        by_name = {setting.name: setting for setting in settings}
        disk_size, root_size = by_name["disk_size"], by_name["root_size"]
        if disk_size.value != AUTO and _size(disk_size.value) < _size(root_size.value):
            raise EulerbakeError(
                f"{self.path}: for {release}:{arch}, disk_size {disk_size.value} (from {disk_size.origin}) is smaller "
                f"than root_size {root_size.value} (from {root_size.origin})",
                hint='the disk holds the root and the partitions before it: raise disk_size, set it to "auto", '
                "or lower root_size",
            )
        return CellSettings(release, arch, settings)

    @staticmethod
    def _resolve(layers: Sequence[Layer]) -> tuple[Setting, ...]:
        values = {name: Setting(name, value, "default") for name, value in DEFAULTS.items()}
        for layer in layers:
            for name, value in layer.values:
                values[name] = Setting(name, value, layer.origin)
        return tuple(values[name] for name in DEFAULTS)

    def table(self, name: str) -> Mapping[str, Any]:
        """A pass-through table (`aws`, `maas`), {} when the file has none."""
        if name not in PASS_THROUGH:
            raise KeyError(name)
        return dict(self.tables).get(name, {})


def _size(value: str) -> int:
    return disk.parse_size(value)


def _fail(path: Path, key: str, problem: str, allowed: str) -> EulerbakeError:
    return EulerbakeError(f"{path}: {key} {problem}", hint=f"allowed: {allowed}")


def _switch(path: Path, key: str, value: Any, choices: Sequence[str], allowed: str) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    raise _fail(path, key, f"= {_show(value)} is not one of {', '.join(choices)}", allowed)


def switch(table: dict[str, Any], where: tuple[str, ...], key: str, default: bool) -> bool:
    """An on/off setting of a table the engine passes through (aws, maas): true/false or "on"/"off"."""
    value = _switch(PYPROJECT, key_path(*where, key), table.get(key, default), SWITCH,
                    f'{key} = true or false ("on" or "off")')
    return value == "on"


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value).lower() if isinstance(value, bool) else repr(value)


def _checked_size(path: Path, key: str, value: Any, allowed: str, *, auto: bool) -> str:
    if auto and isinstance(value, str) and value.lower() == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _fail(path, key, f"= {_show(value)} is not a size", allowed)
    try:
        size = disk.parse_size(value, key)
    except EulerbakeError:
        raise _fail(path, key, f"= {_show(value)} is not a size" + (' or "auto"' if auto else ""), allowed) from None
    if size % disk.MIB:
        raise _fail(path, key, f"= {_show(value)} is not a whole number of MiB (partitions are 1 MiB aligned)",
                    allowed)
    return str(value).strip()


def _settings(path: Path, where: tuple[str, ...], table: Mapping[str, Any],
              extra: Sequence[str]) -> list[tuple[str, str]]:
    """The flattened, checked settings of one table; `extra` are sub-table names the caller handles."""
    found: list[tuple[str, str]] = []
    for name, value in table.items():
        key = key_path(*where, name)
        if name in extra:
            continue
        if name == "root_size":
            found.append((name, _checked_size(path, key, value, ALLOWED[name], auto=False)))
        elif name == "disk_size":
            found.append((name, _checked_size(path, key, value, ALLOWED[name], auto=True)))
        elif name == "ena":
            found.append((name, _switch(path, key, value, ENA_VALUES, ALLOWED[name])))
        elif name == "hygiene":
            found += _hygiene(path, where, value)
        else:
            names = ", ".join([*SETTINGS, *extra])
            raise _fail(path, key, "is not a setting", f"{names} (hygiene items: {', '.join(HYGIENE_ITEMS)})")
    return found


def _hygiene(path: Path, where: tuple[str, ...], value: Any) -> list[tuple[str, str]]:
    key = key_path(*where, "hygiene")
    if not isinstance(value, dict):
        switch = _switch(path, key, value, SWITCH, ALLOWED["hygiene"])
        return [(f"hygiene.{item}", switch) for item in HYGIENE_ITEMS]
    found = []
    for item, setting in value.items():
        item_key = key_path(*where, "hygiene", item)
        if item not in HYGIENE_ITEMS:
            raise _fail(path, item_key, "is not a hygiene item", ", ".join(HYGIENE_ITEMS))
        found.append((f"hygiene.{item}", _switch(path, item_key, setting, SWITCH, '"on" or "off" (true/false)')))
    return found


def _table(path: Path, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, key, f"= {_show(value)} is not a table", f"a table, e.g. [{key}]")
    return value


def parse(path: Path, document: Mapping[str, Any]) -> Config:
    """The validated Config of a parsed pyproject.toml (`document`) read from `path`."""
    table = document.get(TABLE[0], {}).get(TABLE[1], {})
    top = _table(path, key_path(*TABLE), table)
    known_tables = (*OVERRIDE_TABLES, *PASS_THROUGH)
    for name in top:
        if name not in (*SETTINGS, *known_tables, *ENGINE_KEYS):
            raise _fail(path, key_path(*TABLE, name), "is not a setting or table eulerbake knows",
                        f"the settings {', '.join(SETTINGS)}, the tables {', '.join(known_tables)}, "
                        f"and the store cache keys {', '.join(ENGINE_KEYS)}")
    layers = [Layer(key_path(*TABLE), None, None, tuple(_settings(path, TABLE, top, [*known_tables, *ENGINE_KEYS])))]
    arches = _table(path, key_path(*TABLE, "arch"), top.get("arch", {}))
    for arch, values in arches.items():
        where = (*TABLE, "arch", arch)
        if arch not in releases.ARCHES:
            raise _fail(path, key_path(*where), "is not an architecture", ", ".join(releases.ARCHES))
        layers.append(Layer(key_path(*where), None, arch,
                            tuple(_settings(path, where, _table(path, key_path(*where), values), []))))
    cells = []
    known_releases = (*releases.RELEASES, SAMPLE)
    for release, values in _table(path, key_path(*TABLE, "release"), top.get("release", {})).items():
        where = (*TABLE, "release", release)
        if release not in known_releases:
            raise _fail(path, key_path(*where), "is not a release", ", ".join(known_releases))
        values = _table(path, key_path(*where), values)
        layers.append(Layer(key_path(*where), release, None, tuple(_settings(path, where, values, releases.ARCHES))))
        for arch in releases.ARCHES:
            if arch in values:
                cell = (*where, arch)
                cells.append(Layer(key_path(*cell), release, arch,
                                   tuple(_settings(path, cell, _table(path, key_path(*cell), values[arch]), []))))
    tables = tuple((name, _table(path, key_path(*TABLE, name), top[name])) for name in PASS_THROUGH if name in top)
    return Config(path, tuple(layers + cells), tables, tuple(name for name in ENGINE_KEYS if name in top))


@cache
def _load(path: Path, mtime_ns: int, size: int) -> Config:
    if size < 0:
        return parse(path, {})
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EulerbakeError(f"cannot read {path}: {exc}", hint="fix the TOML syntax") from exc
    return parse(path, document)


def load(path: Path | None = None) -> Config:
    """The config in `path` (default: the project's pyproject.toml), read and checked once per change."""
    path = path or PYPROJECT
    st = path.stat() if path.is_file() else None
    return _load(path, st.st_mtime_ns if st else 0, st.st_size if st else -1)


def cell_settings(release: str, arch: str) -> CellSettings:
    """The effective settings of one cell, from the project's config."""
    return load().cell(release, arch)


# -- `eulerbake config show [TASK]` -----------------------------------------------------------------


def _cell_of(task: str) -> tuple[str, str]:
    """(release, arch) of a cell's task (`raw:22.03-LTS:x86_64`, `fetch:…:qcow2`) or of a cell label."""
    parts = task.split(":")
    known = (*releases.RELEASES, SAMPLE)
    for index in range(len(parts) - 1):
        if parts[index] in known and parts[index + 1] in releases.ARCHES:
            return parts[index], parts[index + 1]
    raise EulerbakeError(f"{task} is not a task of a release cell",
                         hint="give a cell's task (e.g. raw:22.03-LTS-SP4:x86_64) or a cell (sample:aarch64); "
                         "`eulerbake list --all` shows the tasks")


def _show_cell(config: Config, task: str) -> list[str]:
    import recipes  # the graph, to name what the settings do to this cell (recipes imports this module)

    release, arch = _cell_of(task)
    settings = config.cell(release, arch)
    nodes = {node.task_name: node for node in walk(list(recipes.cell_targets(release, arch)))}
    if ":" in task and task not in nodes and task != f"{release}:{arch}":
        raise EulerbakeError(f"no task named {task} in cell {release}:{arch}",
                             hint=f"its tasks: {', '.join(sorted(nodes))}")
    lines = [f"settings of {release}:{arch} (from {config.path}; the most specific table wins)"]
    lines += _rows(settings.settings)
    modules = sorted(name for name in nodes if name.startswith("kmod-build:"))
    lines.append(f"  ena {settings.ena} -> " + (f"the module is built ({', '.join(modules)})" if modules
                                                else "no module is built"))
    return lines


def _rows(settings: Sequence[Setting]) -> list[str]:
    width = max(len(setting.name) for setting in settings)
    values = max(len(setting.value) for setting in settings)
    return [f"  {s.name:<{width}}  {s.value:<{values}}  {'default' if s.origin == 'default' else '[' + s.origin + ']'}"
            for s in settings]


def _show_file(config: Config) -> list[str]:
    lines = [f"settings of every cell unless overridden (from {config.path})"]
    lines += _rows(config.top())
    overrides = [layer for layer in config.layers[1:] if layer.values]
    if overrides:
        lines.append("overrides (arch, then release, then release.arch):")
        for layer in overrides:
            lines.append(f"  [{layer.origin}] " + ", ".join(f"{name} = {_show(value)}" for name, value in layer.values))
    for name, table in config.tables:
        keys = ", ".join(sorted(table)) or "(empty)"
        lines.append(f"passed to the publish stages: [{key_path(*TABLE, name)}] {keys}")
    if config.engine:
        lines.append(f"read by the engine (store caches): {', '.join(config.engine)}")
    lines.append("`eulerbake config show TASK` gives one cell's values")
    return lines


def config_main(argv: list[str]) -> int:
    """`eulerbake config show [TASK]`: the effective settings (of one cell's task) and where each came from."""
    parser = argparse.ArgumentParser(
        prog="eulerbake config",
        description="Settings from [tool.eulerbake] in pyproject.toml: root_size, disk_size, ena, hygiene.<item>, "
        "overridden per arch (arch.<A>), release (release.<R>) and cell (release.<R>.<A>).")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the effective values and where each came from")
    show.add_argument("task", nargs="?", help="a cell's task, e.g. raw:22.03-LTS-SP4:x86_64 (default: the file's)")
    args = parser.parse_args(argv)
    config = load()
    lines = _show_cell(config, args.task) if args.task else _show_file(config)
    print("\n".join(lines))
    return 0
