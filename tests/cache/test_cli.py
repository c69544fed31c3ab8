"""`eulerbake cache keygen | push | ls | info | verify | gc`, run as a user runs them (processes)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from eulerbake.store.signing import SecretKey
from tests.cache.graph import upstream_file
from tests.cache.test_doit import _checkout


def test_cache_commands(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    checkout = _checkout(tmp_path, "p", f"file://{cache}", "placeholder:AAAA", upstream_file(tmp_path / "up"))
    keys = tmp_path / "keys"
    keys.mkdir()
    made = checkout.run("eulerbake.cli.cache", "keygen", "ci-1", "--dir", str(keys))
    public = (keys / "ci-1.public").read_text().strip()
    assert public in made.stdout and (keys / "ci-1.secret").stat().st_mode & 0o777 == 0o600
    pyproject = checkout.root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("placeholder:AAAA", public))

    checkout.run("doit")
    refused = checkout.run("eulerbake.cli.cache", "push", check=False)
    assert refused.returncode == 2 and "no signing key" in refused.stderr
    checkout.env["EULERBAKE_SIGNING_KEY_FILE"] = str(keys / "ci-1.secret")
    pushed = checkout.run("eulerbake.cli.cache", "push")  # the default targets' closure
    assert "5 pushed" in pushed.stdout
    assert "0 pushed, 5 already" in checkout.run("eulerbake.cli.cache", "push").stdout

    listed = json.loads(checkout.run("eulerbake.cli.cache", "ls", "--json").stdout)
    assert sorted(meta["task"] for meta in listed) == ["fetch:upstream", "image:sample", "kmod:sample",
                                                       "raw:sample", "unpack:sample"]
    info = checkout.run("eulerbake.cli.cache", "info", "raw:sample").stdout
    assert "signed by trusted key ci-1" in info and "needs" in info
    assert "5 entries checked" in checkout.run("eulerbake.cli.cache", "verify").stdout

    raw = next(meta for meta in listed if meta["task"] == "raw:sample")
    archive = cache / "archives" / f"{raw['archive']['hash']}.tar.zst"
    data = bytearray(archive.read_bytes())
    data[-20] ^= 1
    archive.write_bytes(bytes(data))
    bad = checkout.run("eulerbake.cli.cache", "verify", check=False)
    assert bad.returncode == 1 and f"BAD {raw['key']}-raw-sample: its archive hashes to" in bad.stdout
    checkout.run("eulerbake.cli.cache", "verify", "--delete")
    dry = checkout.run("eulerbake.cli.cache", "gc", "--grace", "0", "--dry-run").stdout
    assert "would delete 0 entries and 1 archives" in dry and archive.exists()
    checkout.run("eulerbake.cli.cache", "gc", "--grace", "0")
    assert not archive.exists()
    after = json.loads(checkout.run("eulerbake.cli.cache", "ls", "--json").stdout)
    assert len(after) == 4
    # image still names raw, which is gone: verify says so (a push of raw again repairs it)
    assert "references missing from the cache" in checkout.run("eulerbake.cli.cache", "verify", "--quick",
                                                              check=False).stdout
    assert "1 pushed" in checkout.run("eulerbake.cli.cache", "push", "raw:sample").stdout
    assert "0 problem(s)" in checkout.run("eulerbake.cli.cache", "verify", "--quick").stdout


def test_gc_by_age_keeps_what_newer_entries_need(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    public = str(SecretKey.generate("ci-1").public())
    checkout = _checkout(tmp_path, "p", f"file://{cache}", public, upstream_file(tmp_path / "up"))
    checkout.run("doit")
    checkout.run("eulerbake.cli.cache", "push", "--unsigned")
    old = time.time() - 30 * 86400
    for path in (cache / "entries").iterdir():
        if json.loads(path.read_text())["task"] != "image:sample":
            os.utime(path, (old, old))
    kept = checkout.run("eulerbake.cli.cache", "gc", "--older-than", "7", "--grace", "0").stdout
    assert "deleted 0 entries" in kept  # every old entry is in the closure of the new image entry
    (cache / "entries").joinpath(next(p.name for p in (cache / "entries").iterdir()
                                      if json.loads(p.read_text())["task"] == "image:sample")).unlink()
    gone = checkout.run("eulerbake.cli.cache", "gc", "--older-than", "7", "--grace", "0").stdout
    assert "deleted 4 entries and 5 archives" in gone
