"""The node kinds of the build graph and the keys that name their outputs.

- `Derivation`: a stage run by a builder over inputs and typed parameters.
- `FixedOutput`: a file whose bytes are declared up front (a pinned upstream download); fetching is its
  builder, and its key depends on the pins alone, never on where the bytes came from.
- `Publication` (`core.publication`): a side effect on a remote service whose output is a receipt.

A node's key is the blake3 of a canonical manifest (like mkosi's cache manifest), shown by `eulerbake store
info` and diffed by `why-rebuilt`. For a derivation it holds the builder's code (its module and every
project module that module imports, found automatically), the parameters, each input's key or content
hash, and the versions of the external tools the stage runs. Nothing here runs when the graph is built:
keys, tool versions and content hashes are computed the first time something asks for them.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from eulerbake.core import hashing
from eulerbake.core.code import code_identity
from eulerbake.core.errors import EulerbakeError

# Bumped when the store layout, the manifest format or anything in this module a builder's output can
# depend on (BuildContext.seed, say) changes: every key changes with it. This module is not in the keys'
# code closures (see core/code.py), so editing it otherwise rebuilds nothing.
ENGINE_ABI = 2
KEY_LENGTH = 32  # hex digits of the blake3 key used in store paths (128 bits)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
FETCHER = "eulerbake.fetch.http:fetch_fixed_output"  # resolved when a fetch runs: most runs fetch nothing


def _discard(_message: str) -> None:
    pass


@dataclass
class BuildContext:
    """What a builder gets: resolved input paths, parameters and an empty output directory."""

    inputs: dict[str, Path]
    params: Any  # the stage's frozen params dataclass, or a dict for stages that have none
    out: Path
    key: str
    work: Path  # scratch directory on the store's filesystem, removed after the build
    log: Callable[[str], None] = print
    source_date_epoch: int = 0
    cache: Path | None = None  # the store's cache directory (resumable downloads live there)
    secrets: Mapping[str, str] = field(default_factory=dict)  # publications only; never recorded anywhere
    input_keys: dict[str, str] = field(default_factory=dict)  # store key of each node input, by input name

    def seed(self, purpose: str) -> bytes:
        """Deterministic 32 bytes for `purpose` (UUIDs, GUIDs, hash seeds), derived from the key."""
        return bytes.fromhex(hashing.hash_bytes(f"{self.key}:{purpose}".encode()))


Builder = Callable[[BuildContext], None]


@dataclass(frozen=True)
class LocalFile:
    """A file in the project (patch, template, overlay file), hashed by its content."""

    path: Path

    def fingerprint(self) -> dict[str, Any]:
        if not self.path.is_file():
            raise EulerbakeError(f"input file {self.path} does not exist", hint="restore it or fix the recipe")
        return {"kind": "file", "blake3": hashing.hash_file(self.path)}

    def files(self) -> list[Path]:
        return [self.path]


@dataclass(frozen=True)
class LocalTree:
    """A directory in the project (overlay tree, root skeleton), hashed canonically."""

    path: Path

    def fingerprint(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise EulerbakeError(f"input directory {self.path} does not exist", hint="restore it or fix the recipe")
        return {"kind": "tree", "blake3": hashing.hash_tree(self.path)}

    def files(self) -> list[Path]:
        return list(hashing.tree_files(self.path)) if self.path.is_dir() else []


class Node:
    """What every node kind offers the store and the doit glue."""

    stage: str
    label: str
    doc: str
    kind: str = "node"
    tools: tuple[str, ...] = ()  # external commands the builder runs: their versions are part of the key

    @property
    def task_name(self) -> str:
        return f"{self.stage}:{self.label}" if self.label else self.stage

    @property
    def store_name(self) -> str:
        raise NotImplementedError

    @property
    def manifest(self) -> dict[str, Any]:
        raise NotImplementedError

    @cached_property
    def key(self) -> str:
        return hashing.hash_json(self.manifest)[:KEY_LENGTH]

    def dependencies(self) -> list[Node]:
        return []

    def local_files(self) -> list[Path]:
        """Files whose content feeds the key (doit `file_dep`)."""
        return []

    def build(self, ctx: BuildContext) -> None:
        raise NotImplementedError

    def known_output_hash(self) -> str | None:
        """The output's tree hash when it is known without reading the output (fixed outputs)."""
        return None

    def secrets(self) -> Mapping[str, str]:
        """Credentials the build needs (publications, from the standard credential chains); never stored."""
        return {}

    def check_output(self, out: Path, secrets: Mapping[str, str]) -> None:
        """A last look at the output before it is sealed (publications refuse a receipt holding a secret)."""

    def confirm(self, path: Path) -> bool:
        """Whether the entry at `path` is still current (a publication asks its target; others always are)."""
        return True



@dataclass(eq=False)
class FixedOutput(Node):
    """A fixed-output input: one file, fetched from `urls` (or a local path), that must match the pins."""

    filename: str
    urls: tuple[str, ...]
    sha256: str
    blake3: str
    size: int
    label: str = ""  # doit task `fetch:<label>`; defaults to the filename
    stage: str = "fetch"
    doc: str = ""
    kind = "fixed-output"

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.filename):
            raise EulerbakeError(f"invalid source filename {self.filename!r}", hint="use letters, digits, '._+-'")
        if not self.label:
            self.label = self.filename
        if not self.doc:
            state = "pinned" if self.pinned else "NOT pinned: run eulerbake lock"
            self.doc = f"fetch {self.filename} ({state})"

    @property
    def pinned(self) -> bool:
        return bool(self.sha256 and self.blake3 and self.size >= 0)

    @property
    def store_name(self) -> str:
        return self.filename

    @cached_property
    def manifest(self) -> dict[str, Any]:
        # The pinned content alone; an unpinned source (not yet locked) is named by its URLs and cannot be fetched.
        identity: Any = self.blake3 if self.pinned else {"unpinned": sorted(self.urls)}
        return {"abi": ENGINE_ABI, "kind": self.kind, "source": identity, "name": self.filename}

    def fingerprint(self) -> dict[str, Any]:
        """How a consumer's manifest names this input."""
        return {"kind": "source", "blake3": self.blake3, "sha256": self.sha256, "size": self.size,
                "key": self.key, "name": self.filename}

    def build(self, ctx: BuildContext) -> None:
        module, _, function = FETCHER.partition(":")
        getattr(importlib.import_module(module), function)(self, ctx.out / self.filename, ctx)

    def known_output_hash(self) -> str | None:
        # The fetcher verified size, sha256 and blake3 as the bytes arrived: the tree hash follows from the pin.
        return hashing.single_file_tree_hash(self.filename, self.blake3, executable=False)


class LocalInput(Protocol):
    """An input from the build machine: content-hashed for the key, its files watched by doit (`file_dep`).

    `LocalFile` and `LocalTree` are the common ones; a recipe may bring its own (say, a tree vouched for by
    a package database), whose `fingerprint()` is computed only when a key is needed.
    """

    @property
    def path(self) -> Path: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def files(self) -> list[Path]: ...


Input = Node | LocalInput


def local_input_files(inputs: Mapping[str, Input]) -> list[Path]:
    """The files of every local input (doit `file_dep`)."""
    files: list[Path] = []
    for value in inputs.values():
        if not isinstance(value, Node):
            files.extend(value.files())
    return files


def builder_ref(builder: Builder) -> tuple[str, str]:
    """(module, qualified name) of a module-level builder function."""
    module = getattr(builder, "__module__", "") or ""
    if module not in sys.modules or "<locals>" in builder.__qualname__ or builder.__name__ == "<lambda>":
        raise EulerbakeError(
            f"builder {builder!r} must be a module-level function",
            hint="define builders at module level so doit can pickle the task and the key can hash its code",
        )
    return module, builder.__qualname__


def params_json(params: Any) -> dict[str, Any]:
    """The manifest form of a stage's parameters: a frozen dataclass's fields, or a plain mapping."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return dataclasses.asdict(params)
    return dict(params)


@dataclass(eq=False)
class Derivation(Node):
    """One build step: `stage` + `label` name its doit task (`stage:label`), `name` its store path.

    `tools` are the external commands the builder runs (their versions are part of the key, and the
    store refuses to commit a build that ran a tool it did not declare).
    """

    stage: str
    label: str
    builder: Builder
    inputs: Mapping[str, Input] = field(default_factory=dict)
    params: Any = field(default_factory=dict)
    name: str = ""
    doc: str = ""
    tools: tuple[str, ...] = ()
    kind = "derivation"

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "-".join([self.stage, *self.label.split(":")]) if self.label else self.stage
        if not NAME_RE.match(self.name):
            raise EulerbakeError(
                f"invalid derivation name {self.name!r}", hint="use letters, digits, '.', '_', '+', '-'"
            )

    @property
    def store_name(self) -> str:
        return self.name

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The sorted manifest whose blake3 is the key (shown by `eulerbake store info`)."""
        from eulerbake.tools.versions import tool_version  # tools are probed only when a key is needed

        module, qualname = builder_ref(self.builder)
        return {
            "abi": ENGINE_ABI,
            "kind": self.kind,
            "name": self.name,
            "builder": f"{module}:{qualname}",
            "code": code_identity(module),
            "params": params_json(self.params),
            "inputs": input_manifest(self.inputs),
            "tools": {tool: tool_version(tool) for tool in sorted(set(self.tools))},
        }

    def dependencies(self) -> list[Node]:
        return [value for value in self.inputs.values() if isinstance(value, Node)]

    def local_files(self) -> list[Path]:
        return local_input_files(self.inputs)

    def build(self, ctx: BuildContext) -> None:
        self.builder(ctx)


def input_manifest(inputs: Mapping[str, Input]) -> dict[str, Any]:
    """How a manifest names its inputs: a node by its key, a local file or tree by its content hash."""
    named: dict[str, Any] = {}
    for input_name, value in sorted(inputs.items()):
        if isinstance(value, FixedOutput):
            named[input_name] = value.fingerprint()
        elif isinstance(value, Node):
            named[input_name] = {"kind": value.kind, "key": value.key, "name": value.store_name}
        else:
            named[input_name] = value.fingerprint()
    return named


def walk(roots: list[Node]) -> Iterator[Node]:
    """Every node reachable from `roots`, dependencies first, each once."""
    seen: set[int] = set()

    def visit(node: Node) -> Iterator[Node]:
        if id(node) in seen:
            return
        seen.add(id(node))
        for dep in node.dependencies():
            yield from visit(dep)
        yield node

    for root in roots:
        yield from visit(root)
