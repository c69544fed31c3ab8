"""Fetching fixed-output sources: try each location in turn, verify size, sha256 and blake3.

Locations are local paths, `file://` URLs and `http(s)://` URLs. Nothing reaches the store unless
every pin matches.
"""

from __future__ import annotations

import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from eulerbake import hashing
from eulerbake.derivation import Source
from eulerbake.errors import EulerbakeError


def _copy_location(location: str, dest: Path) -> None:
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme in ("", "file"):
        local = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else location)
        if not local.is_file():
            raise FileNotFoundError(f"{local} does not exist")
        shutil.copyfile(local, dest)
        return
    with urllib.request.urlopen(location, timeout=60) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out, 1024 * 1024)


def verify_pins(source: Source, path: Path, origin: str) -> None:
    """Fail with expected and actual hashes when `path` does not match the source's pins."""
    size = path.stat().st_size
    b3, sha = hashing.hash_file_pair(path, use_cache=False)
    wrong = []
    if size != source.size:
        wrong.append(f"size: expected {source.size}, got {size}")
    if sha != source.sha256:
        wrong.append(f"sha256: expected {source.sha256}, got {sha}")
    if b3 != source.blake3:
        wrong.append(f"blake3: expected {source.blake3}, got {b3}")
    if wrong:
        raise EulerbakeError(
            f"source {source.filename} from {origin} does not match its pins:\n  " + "\n  ".join(wrong),
            hint="if upstream really changed, re-pin it with `eulerbake lock`; otherwise the mirror is bad",
        )


def fetch_source(source: Source, dest: Path, log: Callable[[str], None] = print) -> None:
    """Fetch `source` into `dest` from the first location that works and matches the pins."""
    if not source.pinned:
        raise EulerbakeError(
            f"source {source.filename} ({source.label or 'no label'}) is not pinned",
            hint="pin it with `eulerbake lock` and review the change to recipes/sources.lock",
        )
    errors: list[str] = []
    for location in source.urls:
        try:
            _copy_location(location, dest)
        except OSError as exc:
            errors.append(f"{location}: {exc}")
            continue
        verify_pins(source, dest, location)
        return
    raise EulerbakeError(
        f"could not fetch {source.filename}:\n  " + "\n  ".join(errors or ["no locations given"]),
        hint="check the URL or mirror list, or pre-copy the file and point a file:// mirror at it",
    )
