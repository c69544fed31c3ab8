"""A store on a full filesystem: the build fails with one message naming the store and the space it needs,
and the store is left as it was (a small tmpfs mounted for the test; root only, like the loop-device tests)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from eulerbake.core.derivation import BuildContext, Derivation
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store

MIB = 1024 * 1024


def fill(ctx: BuildContext) -> None:
    """Write `mib` MiB of non-zero data (a tmpfs keeps no holes anyway)."""
    with (ctx.out / "big.bin").open("wb") as f:
        for _ in range(int(ctx.params["mib"])):
            f.write(b"\xa5" * MIB)


def small(ctx: BuildContext) -> None:
    (ctx.out / "small.txt").write_text("fits\n")


@pytest.fixture
def tiny_store(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount / "store"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _listing(root: Path) -> list[str]:
    """Entries, metadata, logs and seals: everything but the per-key lock files and the temp area."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")
                  if path.relative_to(root).parts[0] not in (".locks", ".tmp", ".cache"))


def test_a_full_disk_is_one_message_and_the_store_is_left_as_it_was(tiny_store: Path) -> None:
    store = Store(tiny_store)
    kept = store.realise(Derivation("small", "t", small))
    before = _listing(tiny_store)
    with pytest.raises(EulerbakeError) as caught:
        store.realise(Derivation("fill", "t", fill, params={"mib": 64}))
    message, hint = caught.value.message, caught.value.hint or ""
    assert message.startswith(f"no space left on {tiny_store} while building fill:t")
    assert "nothing was committed" in message and "need at least ~" in hint and "EULERBAKE_STORE" in hint
    after = _listing(tiny_store)
    assert after == before, (before, after)  # no entry, no metadata, no partial output
    assert not any((tiny_store / ".tmp").iterdir()) if (tiny_store / ".tmp").exists() else True
    assert store.realise(Derivation("small", "t", small)).built is False and kept.path.is_dir()
    # With space again, the same build succeeds: the failure left nothing in its way.
    assert store.realise(Derivation("fill", "t", fill, params={"mib": 4})).built
