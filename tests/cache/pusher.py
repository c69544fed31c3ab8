"""Push every entry of a store to a cache, meeting another pusher right before the metadata is written.

`python -m tests.cache.pusher STORE URL KEYFILE BARRIER_DIR NAME`: prints the push statuses as JSON. Both
processes reach the conditional create of the same key at the same moment, so the race is real.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from eulerbake.store.local import Store
from eulerbake.store.signing import SecretKey
from eulerbake.store.substituters import CacheSettings


def main() -> None:
    store_root, url, key_file, barrier, name = sys.argv[1:]
    cache = CacheSettings((url,), (), False).open(url)
    real_create = cache.backend.create

    def create(entry: str, data: bytes) -> bool:
        Path(barrier, name).touch()
        deadline = time.monotonic() + 30
        while len(list(Path(barrier).iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        return real_create(entry, data)

    cache.backend.create = create  # type: ignore[method-assign]
    store = Store(Path(store_root))
    key = SecretKey.parse(Path(key_file).read_text())
    print(json.dumps([result.status for result in cache.push_all(store, store.entries(), key, log=lambda _m: None)]))


if __name__ == "__main__":
    main()
