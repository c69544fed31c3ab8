"""Versions of external tools, for keys and build logs: probed once per binary, remembered across runs.

`tool_version("qemu-img")` is the first line the tool prints for its version option (`qemu-img version
7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`), or `blake3:<digest>` of the executable for tools that have no
such option. Probing costs a process start (~5-20 ms), so answers are kept in a small JSON file keyed by
the resolved binary's path, inode, size and times: a no-op `doit` starts no process at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from eulerbake.core import hashing
from eulerbake.tools.packages import TOOLS
from eulerbake.tools.run import probe, require_tool

_memory: dict[str, str] = {}
_cache_file: Path | None = None
_cache: dict[str, list[object]] | None = None


def use_cache_file(path: Path | None) -> None:
    """Remember probed versions in `path` (a JSON file; None: this process only)."""
    global _cache_file, _cache
    if path != _cache_file:
        _cache_file, _cache = path, None


def _load() -> dict[str, list[object]]:
    global _cache
    if _cache is None:
        _cache = {}
        if _cache_file is not None and _cache_file.is_file():
            try:
                _cache = json.loads(_cache_file.read_text())
            except (OSError, ValueError):
                _cache = {}
    return _cache


def _save() -> None:
    if _cache_file is None or _cache is None:
        return
    temporary = _cache_file.with_name(f"{_cache_file.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(_cache, sort_keys=True, indent=0))
        os.replace(temporary, _cache_file)
    except OSError:
        temporary.unlink(missing_ok=True)


def _probe(tool: str, binary: Path) -> str:
    spec = TOOLS.get(tool)
    args = ("--version",) if spec is None else spec.version_args
    if args is not None:
        for stream in probe(binary, args):
            first = stream.strip().splitlines()[:1]
            if first and any(ch.isdigit() for ch in first[0]) and "usage" not in first[0].lower():
                return first[0].strip()
    return "blake3:" + hashing.hash_file(binary)[:32]


def tool_version(tool: str) -> str:
    """The version line of `tool` (see the module docstring); raises when the tool is missing."""
    if tool in _memory:
        return _memory[tool]
    binary = Path(require_tool(tool)).resolve()
    st = binary.stat()
    signature: list[object] = [str(binary), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    cache = _load()
    hit = cache.get(tool)
    if hit is not None and hit[:-1] == signature:
        version = str(hit[-1])
    else:
        version = _probe(tool, binary)
        cache[tool] = [*signature, version]
        _save()
    _memory[tool] = version
    return version
