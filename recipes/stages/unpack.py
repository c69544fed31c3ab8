"""Stage `unpack`: decompression as its own cached stage, an `.xz` or `.gz` file in, the plain file out.

Kept apart from fetching so the compressed download stays the pinned, verified input and the
decompressed file is an ordinary derivation (built once, reused by every stage that needs it).
xz goes through the `xz` tool: it decompresses multi-block files on every core (400 MB of mixed
binaries: `xz -d -T0` 2.7 s, single-threaded `xz` 4.7 s, Python's lzma 5.5 s, on 2 cores here).
"""

from __future__ import annotations

import gzip
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput
from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.run import CommandError, run

# suffix -> (format, suffix of the decompressed file)
FORMATS = {".xz": ("xz", ""), ".gz": ("gz", ""), ".tgz": ("gz", ".tar"), ".txz": ("xz", ".tar")}
COPY_CHUNK = 4 * 1024 * 1024
# gzip is decompressed in Python: only xz archives run a tool.
TOOLS = ("xz",)
DAMAGED_HINT = "the download is damaged: `eulerbake lock --update` or check the mirror"


@dataclass(frozen=True)
class Params:
    format: str  # "xz" or "gz"
    archive_name: str  # the compressed file (inside the input's output when the input is a derivation)
    output: str  # the decompressed file's name


def _format_of(filename: str) -> tuple[str, str]:
    """(format, decompressed name) for a compressed file name, or an error naming the known suffixes."""
    for suffix, (fmt, new_suffix) in FORMATS.items():
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return fmt, filename[: -len(suffix)] + new_suffix
    raise EulerbakeError(
        f"do not know how to decompress {filename!r}",
        hint=f"unpack handles names ending in {', '.join(FORMATS)}",
    )


def build(ctx: BuildContext) -> None:
    """Decompress the input file into `ctx.out/<output>`."""
    params: Params = ctx.params
    archive = Path(ctx.inputs["archive"])
    if archive.is_dir():  # the input is a derivation: its output directory holds the file
        archive = archive / params.archive_name
    output = ctx.out / params.output
    ctx.log(f"decompressing {archive.name} ({params.format})")
    with output.open("wb") as out:
        if params.format == "xz":
            try:
                run(["xz", "--decompress", "--stdout", "--threads=0", archive], stdout=out.fileno())
            except CommandError as exc:
                said = exc.output_tail.strip().splitlines() or [f"exit {exc.returncode}"]
                # `/usr/bin/xz: <path>: Unexpected end of input`: the words after the path are xz's reason.
                reason = said[-1].split(f"{archive}: ", 1)[-1]
                raise EulerbakeError(f"cannot decompress {archive.name}: xz says {reason!r}",
                                     hint=DAMAGED_HINT) from exc
        else:
            try:
                with gzip.open(archive, "rb") as compressed:
                    shutil.copyfileobj(compressed, out, COPY_CHUNK)
            except (OSError, EOFError, zlib.error) as exc:
                raise EulerbakeError(f"cannot decompress {archive.name}: {exc}", hint=DAMAGED_HINT) from exc
    ctx.log(f"{output.name}: {output.stat().st_size} bytes")


def unpack(
    label: str, archive: FixedOutput | Derivation, archive_name: str = "", output: str = "", doc: str = ""
) -> Derivation:
    """A derivation decompressing `archive` (a FixedOutput, or a derivation whose output holds `archive_name`).

    Its task is `unpack:<label>`; the output file is `output`, by default the name without its suffix.
    """
    name = archive.filename if isinstance(archive, FixedOutput) else archive_name
    if not name:
        raise EulerbakeError(f"unpack:{label}: name the file inside {archive.task_name}",
                             hint="pass archive_name= when the archive is a derivation")
    fmt, plain_name = _format_of(name)
    return Derivation(
        stage="unpack",
        label=label,
        builder=build,
        inputs={"archive": archive},
        params=Params(format=fmt, archive_name=name, output=output or plain_name),
        tools=TOOLS if fmt == "xz" else (),
        doc=doc or f"decompress {name}",
    )
