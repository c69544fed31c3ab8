"""A publishing process for a test to SIGKILL mid-upload: `python -m tests.publish.killrun STORE DISK.json`.

It realises the same AMI publication a test makes (same disk, same target, hence the same key), so
what the killed run leaves behind in the account is exactly what the test's next run has to deal with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from eulerbake.store.local import Store
from tests.publish.disks import RawDisk, ami_node, raw_node


def main() -> None:
    store, spec = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    disk = RawDisk(Path(spec["path"]), spec["arch"], spec["table"], spec["root"])
    node = ami_node(raw_node(disk), spec["endpoint"], disk.arch, **spec.get("overrides", {}))
    Store(store).realise(node, log=lambda message: print(message, flush=True))


if __name__ == "__main__":
    main()
