"""Provenance: a signed SLSA v1 statement for every store entry, its audit, and bit-for-bit rebuild checks.

- `statement`: the in-toto Statement v1 + SLSA Provenance v1 predicate of an entry, built from its
  metadata and its node (what ran, on what, with which tools, from which recipe commit);
- `dsse`: the DSSE envelope around it, signed with the cache's ed25519 keys (`store.signing`);
- `audit`: walks an entry (found from a task, a store path, a file's hash or an AMI's tags) down to its
  pinned sources, verifying every envelope and re-hashing every local input it can find;
- `check`: `build --check` — rebuild one output in a fresh temporary store and compare bit for bit.

An entry's envelope lives beside its metadata: `store/<key>-<name>.provenance.json`. This package sits on
the floor of `fetch` and `linux`: it imports core, tools and store, never tasks or cli.
"""

from __future__ import annotations

from pathlib import Path

from eulerbake.store.local import PROVENANCE_SUFFIX

__all__ = ["PROVENANCE_SUFFIX", "SIGNING_KEY_ENV", "provenance_path"]

SIGNING_KEY_ENV = "EULERBAKE_SIGNING_KEY_FILE"  # the same key (and variable) that signs cache entries


def provenance_path(entry: Path) -> Path:
    """Where the envelope of the entry at `entry` (`store/<key>-<name>`) lives."""
    return Path(f"{entry}{PROVENANCE_SUFFIX}")
