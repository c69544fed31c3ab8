"""Two runners push the same key at the same moment (two processes, a real race on the conditional
create): the cache ends up with one entry, whole and valid, and a reader takes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from eulerbake.store.signing import SecretKey
from tests.cache.conftest import REPO, Runner
from tests.cache.graph import make_graph


def test_two_processes_push_one_key(make_runner: Any, cache_url: str, upstream: Path, tmp_path: Path) -> None:
    keys = [SecretKey.generate("ci-1"), SecretKey.generate("ci-2")]
    runners = []
    for index, key in enumerate(keys):
        runner: Runner = make_runner(f"a{index}", [cache_url])
        runner.realise([make_graph(upstream).kmod])
        key_file = tmp_path / f"key{index}"
        key_file.write_text(str(key))
        key_file.chmod(0o600)
        runners.append((runner, key_file))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.cache.pusher", str(r.root / "store"), cache_url,
                               str(key_file), str(barrier), f"p{index}"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
             for index, (r, key_file) in enumerate(runners)]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outcomes.append(json.loads(out))
    assert sorted(outcomes) == [["present"], ["pushed"]]  # exactly one won the conditional create

    node = make_graph(upstream).kmod
    cache = runners[0][0].caches[0]
    entries = [item for item in cache.backend.listing("entries")]
    assert [item.name for item in entries] == [f"entries/{node.key}.json"]
    assert len(list(cache.backend.listing("archives"))) == 1  # same bytes from both: one archive
    winner = cache.read_entry(node.key)
    assert winner is not None and len(winner["signatures"]) == 1

    b: Runner = make_runner("b", [cache_url], trusted=[str(k.public()) for k in keys])
    results = b.realise([make_graph(upstream).kmod])
    assert b.ran() == [] and results[node.key].substituted
    assert b.caches[0].verify([winner]) == []
