"""Derivations whose manifests `tests/engine/golden_manifests.json` pins: fixed inputs, no external tools.

Their inputs live in `golden/` (edited by no other test) and their builders here, so only a change to
the engine (manifest format, hashing, ENGINE_ABI, the engine modules their code reaches) or to this file
moves their keys. Changing them is fine, on purpose: regenerate the golden file with the change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalFile, LocalTree

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


@dataclass(frozen=True)
class Knobs:
    """Typed parameters (a frozen dataclass, as real stages use)."""

    level: int
    names: tuple[str, ...]


def shout(ctx: BuildContext) -> None:
    text = Path(ctx.inputs["text"]).read_text().upper()
    (ctx.out / "shout.txt").write_text(text * ctx.params["times"])


def bundle(ctx: BuildContext) -> None:
    knobs: Knobs = ctx.params
    parts = [(Path(ctx.inputs["shout"]) / "shout.txt").read_text(), Path(ctx.inputs["pinned"]).read_text()]
    parts += [p.read_text() for p in sorted(Path(ctx.inputs["tree"]).rglob("*.txt"))]
    (ctx.out / "bundle.txt").write_text(f"level {knobs.level} {','.join(knobs.names)}\n" + "".join(parts))


def golden_targets() -> list[Derivation]:
    pinned = FixedOutput("pinned.txt", (str(GOLDEN / "pinned.txt"),),
                         sha256="e91d31f1b5d4dd5ad0c52ca959c3550371af63f0bc36c96bba90a9557566d99e",
                         blake3="12c2fdd4d2fc7c4f87f464496a57822d801f92f86c444cb1d457ccc5dbf49146",
                         size=41, label="toy:pinned")
    first = Derivation("golden", "toy:a", shout, {"text": LocalFile(GOLDEN / "input.txt")}, {"times": 2})
    second = Derivation("golden", "toy:b", bundle, {"shout": first, "tree": LocalTree(GOLDEN / "tree"),
                                                    "pinned": pinned}, Knobs(level=3, names=("x", "y")))
    return [second]
