"""`eulerbake build --check`: every output of the toy graph rebuilds bit for bit; a builder made
non-deterministic on purpose is caught, with the file and the byte offset named."""

from __future__ import annotations

import json
from pathlib import Path

from eulerbake.provenance.check import first_difference
from tests.provenance.conftest import Keys, Project

HEADER_LENGTH = 28  # recipes/noisy.py: the bytes before the stamp are the same in every build


def test_every_output_of_the_toy_graph_rebuilds_bit_for_bit(project: Project) -> None:
    project.doit()
    before = {p.name for p in project.store.iterdir()}
    proc = project.cli("build", "--check", "--json")
    results = json.loads(proc.stdout)
    assert {r["task"] for r in results} == {"template:toy", "tree:toy", "tarball:toy", "checksum:toy", "combine:toy",
                                            "digest:toy", "independent:toy", "fetch:toy:seed", "seeded:toy",
                                            "faketool:toy"}
    assert all(r["ok"] and r["difference"] is None and r["recorded_hash"] == r["rebuilt_hash"] for r in results)
    assert {p.name for p in project.store.iterdir()} == before  # the main store is as it was
    assert list((project.store / ".tmp").iterdir()) == []  # no scratch store left behind
    text = project.cli("build", "--check", "combine:toy").stdout
    assert "combine:toy: rebuilt bit for bit" in text


def test_a_non_deterministic_builder_fails_naming_the_file_and_the_offset(project: Project, keys: Keys,
                                                                          tmp_path: Path) -> None:
    project.doit("noisy:toy", TOY_NOISY="random")
    proc = project.cli("build", "--check", "noisy:toy", "--json", "--keep", str(tmp_path / "kept"), check=False,
                       TOY_NOISY="random")
    assert proc.returncode == 1
    (result,) = json.loads(proc.stdout)
    assert not result["ok"] and result["recorded_hash"] != result["rebuilt_hash"]
    difference = result["difference"]
    assert difference["path"] == "b-stamp.bin"  # a-stable.txt comes first and is identical
    assert HEADER_LENGTH <= difference["offset"] < HEADER_LENGTH + 16
    (kept,) = (tmp_path / "kept").iterdir()
    assert first_difference(project.entry("noisy:toy", TOY_NOISY="random"), kept) is not None

    # A builder writing time.time_ns(): another key, built first (it was not), then caught the same way.
    proc = project.cli("build", "--check", "noisy:toy", check=False, TOY_NOISY="time")
    assert proc.returncode == 1
    assert "noisy:toy is not built yet: building it first" in proc.stderr
    assert "noisy:toy: NOT reproducible: b-stamp.bin at byte offset" in proc.stdout
    assert "1 of 1 output(s) are not reproducible" in proc.stdout

    # `audit --rebuild` says the same, in the chain.
    project.cli("provenance", "noisy:toy", "--closure", "--sign-key", str(keys.secret_file), "--quiet",
                TOY_NOISY="random")
    proc = project.cli("audit", "noisy:toy", "--rebuild", "--trusted-key", keys.public, "--json", check=False,
                       TOY_NOISY="random")
    assert proc.returncode == 1
    document = json.loads(proc.stdout)
    assert any("noisy:toy: rebuild: noisy:toy: NOT reproducible: b-stamp.bin at byte offset" in p
               for p in document["problems"])
    assert sum(1 for r in document["rebuilt"] if r["ok"]) == len(document["rebuilt"]) - 1  # its inputs do rebuild
