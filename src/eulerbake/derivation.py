"""Derivations: what to build, from what, and the key that names the result.

A derivation's key is the blake3 of a canonical manifest (like mkosi's cache manifest): its name, the
builder's identity (module, function and the hash of the builder's own source), its parameters and,
for every input, that input's key or content hash. Change one byte anywhere in that manifest and the
key changes, and with it the store path, so only what is downstream of the change is rebuilt.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Union

from eulerbake import hashing
from eulerbake.errors import EulerbakeError

# Bumped when the store layout or the manifest format changes: every key changes with it.
ENGINE_ABI = 1
KEY_LENGTH = 32  # hex digits of the blake3 key used in store paths (128 bits)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class BuildContext:
    """What a builder gets: resolved input paths, parameters and an empty output directory."""

    inputs: dict[str, Path]
    params: dict[str, Any]
    out: Path
    key: str
    work: Path  # scratch directory on the store's filesystem, removed after the build
    log: Callable[[str], None] = print
    source_date_epoch: int = 0

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


@dataclass(frozen=True)
class LocalTree:
    """A directory in the project (overlay tree, root skeleton), hashed canonically."""

    path: Path

    def fingerprint(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise EulerbakeError(f"input directory {self.path} does not exist", hint="restore it or fix the recipe")
        return {"kind": "tree", "blake3": hashing.hash_tree(self.path)}


@dataclass(frozen=True)
class Source:
    """A fixed-output input: bytes fetched from `urls` (or a local path) that must match the pins."""

    filename: str
    urls: tuple[str, ...]
    sha256: str
    blake3: str
    size: int
    label: str = ""  # doit task `fetch:<label>`; defaults to the filename

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.filename):
            raise EulerbakeError(f"invalid source filename {self.filename!r}")

    @property
    def task_name(self) -> str:
        return f"fetch:{self.label or self.filename}"

    @property
    def pinned(self) -> bool:
        return bool(self.sha256 and self.blake3 and self.size >= 0)

    @property
    def key(self) -> str:
        # Fixed-output: the key depends on the pinned content only, never on where it came from.
        # An unpinned source (not yet in the lock file) gets a key from its name and URLs; it cannot be fetched.
        identity = self.blake3 if self.pinned else {"unpinned": sorted(self.urls)}
        return hashing.hash_json({"abi": ENGINE_ABI, "source": identity, "name": self.filename})[:KEY_LENGTH]

    @property
    def store_name(self) -> str:
        return self.filename

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "source", "blake3": self.blake3, "sha256": self.sha256, "size": self.size}


Input = Union["Derivation", LocalFile, LocalTree, Source]


def builder_identity(builder: Builder) -> dict[str, str]:
    """Module, qualified name and the blake3 of the builder's module source."""
    # sys.modules, not inspect: inspect costs ~15 ms of import on every doit run.
    module = sys.modules.get(getattr(builder, "__module__", "") or "")
    if module is None or "<locals>" in builder.__qualname__ or builder.__name__ == "<lambda>":
        raise EulerbakeError(
            f"builder {builder!r} must be a module-level function",
            hint="define builders at module level so doit can pickle the task and the key can hash its code",
        )
    source_file = getattr(module, "__file__", None)
    code_hash = hashing.hash_file(Path(source_file)) if source_file else hashing.hash_bytes(b"")
    return {"ref": f"{module.__name__}:{builder.__qualname__}", "code": code_hash}


@dataclass(eq=False)
class Derivation:
    """One build step: `stage` + `label` name its doit task (`stage:label`), `name` its store path."""

    stage: str
    label: str
    builder: Builder
    inputs: Mapping[str, Input] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    doc: str = ""
    extra_code: tuple[Path, ...] = ()  # more source files the builder depends on (helpers, templates)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "-".join([self.stage, *self.label.split(":")]) if self.label else self.stage
        if not NAME_RE.match(self.name):
            raise EulerbakeError(
                f"invalid derivation name {self.name!r}", hint="use letters, digits, '.', '_', '+', '-'"
            )

    @property
    def task_name(self) -> str:
        return f"{self.stage}:{self.label}" if self.label else self.stage

    @property
    def store_name(self) -> str:
        return self.name

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The sorted manifest whose blake3 is the key (shown by `eulerbake store info`)."""
        inputs: dict[str, Any] = {}
        for input_name, value in sorted(self.inputs.items()):
            if isinstance(value, Derivation):
                inputs[input_name] = {"kind": "derivation", "key": value.key, "name": value.name}
            elif isinstance(value, Source):
                inputs[input_name] = {**value.fingerprint(), "key": value.key, "name": value.filename}
            else:
                inputs[input_name] = value.fingerprint()
        extra = {str(path.name): hashing.hash_file(path) for path in sorted(self.extra_code)}
        return {
            "abi": ENGINE_ABI,
            "name": self.name,
            "builder": {**builder_identity(self.builder), "extra": extra},
            "params": dict(self.params),
            "inputs": inputs,
        }

    @cached_property
    def key(self) -> str:
        return hashing.hash_json(self.manifest)[:KEY_LENGTH]

    def dependencies(self) -> list[Derivation | Source]:
        return [value for value in self.inputs.values() if isinstance(value, (Derivation, Source))]

    def local_files(self) -> list[Path]:
        """Files whose content feeds the key (doit `file_dep`)."""
        files: list[Path] = []
        for value in self.inputs.values():
            if isinstance(value, LocalFile):
                files.append(value.path)
            elif isinstance(value, LocalTree):
                files.extend(hashing.tree_files(value.path))
        return files


def walk(roots: list[Derivation]) -> Iterator[Derivation | Source]:
    """Every derivation and source reachable from `roots`, dependencies first, each once."""
    seen: set[int] = set()

    def visit(node: Derivation | Source) -> Iterator[Derivation | Source]:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, Derivation):
            for dep in node.dependencies():
                yield from visit(dep)
        yield node

    for root in roots:
        yield from visit(root)
