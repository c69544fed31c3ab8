"""`eulerbake lock` against the local mirror: pins, upstream .sha256sum checks, the store import, re-pinning."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import blake3
import pytest

import recipes
from eulerbake.cli import lock as lock_cli
from eulerbake.core.errors import EulerbakeError
from eulerbake.fetch import http as fetch
from eulerbake.fetch.lock import LockFile
from eulerbake.store.local import Store
from eulerbake.tasks.project import Project
from recipes import releases

from .conftest import MirrorServer


@dataclass
class Upstream:
    """One release cell published on the local mirror in repo.openeuler.org's layout."""

    rel: releases.Release
    qcow2: bytes
    iso: bytes
    rpm: bytes

    def publish(self, mirror: MirrorServer, qcow2_checksum: str | None = None) -> None:
        rel = self.rel
        qcow2_path, iso_path = releases.qcow2_xz_paths(rel)[0], releases.iso_paths(rel)[0]
        mirror.add(qcow2_path, self.qcow2)
        digest = qcow2_checksum or hashlib.sha256(self.qcow2).hexdigest()
        mirror.add(qcow2_path + ".sha256sum", f"{digest}  {rel.qcow2_xz_filename}\n".encode())
        mirror.add(iso_path, self.iso)  # BSD-style checksum file for the ISO
        bsd_line = f"SHA256 ({rel.iso_filename}) = {hashlib.sha256(self.iso).hexdigest()}\n"
        mirror.add(iso_path + ".sha256sum", bsd_line.encode())
        mirror.add(releases.kernel_devel_paths(rel)[1], self.rpm)  # only under update/: OS/ answers 404


@pytest.fixture
def upstream(mirror: MirrorServer, monkeypatch: pytest.MonkeyPatch) -> Upstream:
    monkeypatch.setenv("EULERBAKE_MIRRORS", mirror.base_url)
    rel = releases.matrix(["22.03-LTS"], ["x86_64"])[0]
    return Upstream(rel, os.urandom(400_000), os.urandom(700_000), os.urandom(90_000))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "recipes").mkdir(parents=True)
    return root


def lock_main(argv: list[str], project: Path) -> int:
    """`eulerbake lock` in `project`: this repository's release recipes, the project's own lock file and store."""
    here = Project(project)
    here.recipes = SimpleNamespace(  # type: ignore[assignment]
        pin_requests=recipes.pin_requests, LOCK_PATH=project / "recipes" / "sources.lock")
    return lock_cli.lock_main(argv, here)


def test_the_recipes_package_says_what_lock_pins() -> None:
    """`eulerbake lock` asks the project's recipes package (recipes/__init__.py) what to pin, and where."""
    repo = Path(__file__).resolve().parents[2]
    hook, lock_path = lock_cli._project_pins(Project(repo))
    assert hook is releases.pin_requests and lock_path == repo / "recipes" / "sources.lock"


def pins(data: bytes) -> tuple[int, str, str]:
    return len(data), hashlib.sha256(data).hexdigest(), blake3.blake3(data).hexdigest()


def test_lock_writes_correct_pins_and_fills_the_store(project: Path, upstream: Upstream, mirror: MirrorServer) -> None:
    upstream.publish(mirror)
    rel, base = upstream.rel, mirror.base_url

    assert lock_main([rel.version, "--arch", "x86_64"], project) == 0

    lock_path = project / "recipes" / "sources.lock"
    document = json.loads(lock_path.read_text())
    assert document["format"] == 1
    entries = document["sources"]
    assert sorted(entries) == [f"{rel.label}:iso", f"{rel.label}:kernel-devel", f"{rel.label}:qcow2"]
    for kind, data, path, checked in (
        ("qcow2", upstream.qcow2, releases.qcow2_xz_paths(rel)[0], True),
        ("iso", upstream.iso, releases.iso_paths(rel)[0], True),
        ("kernel-devel", upstream.rpm, releases.kernel_devel_paths(rel)[1], False),
    ):
        entry = entries[f"{rel.label}:{kind}"]
        assert (entry["size"], entry["sha256"], entry["blake3"]) == pins(data)
        assert entry["url"] == f"{base}/{path}"
        assert entry["upstream_checksum"] == (f"{base}/{path}.sha256sum" if checked else "")
    assert lock_path.read_text() == LockFile.read(lock_path).render()  # stable, sorted formatting

    # The build finds every pinned file in the store: nothing is downloaded again.
    lock = LockFile.read(lock_path)
    store = Store(project / "store")
    before = len(mirror.requests)
    for source in (releases.qcow2_xz_source(rel, lock), releases.iso_source(rel, lock),
                   releases.kernel_devel_source(rel, lock)):
        assert source.pinned and store.has(source)
        assert store.realise(source, log=lambda _m: None).built is False
    assert releases.kernel_devel_source(rel, lock).urls[0].endswith(releases.kernel_devel_paths(rel)[1])
    assert len(mirror.requests) == before
    assert not any(fetch.downloads_dir(store.root).iterdir())  # no partial downloads left behind

    # A second run pins nothing new and leaves the reviewed file byte for byte as it was.
    text = lock_path.read_text()
    assert lock_main([rel.version, "--arch", "x86_64"], project) == 0
    assert len(mirror.requests) == before and lock_path.read_text() == text


def test_mismatching_upstream_checksum_is_refused(project: Path, upstream: Upstream, mirror: MirrorServer) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    upstream.publish(mirror, qcow2_checksum=wrong)

    with pytest.raises(EulerbakeError) as caught:
        lock_main([upstream.rel.version, "--arch", "x86_64"], project)

    message = str(caught.value)
    assert "1 of 3 sources could not be pinned" in message
    assert wrong in message and hashlib.sha256(upstream.qcow2).hexdigest() in message
    entries = json.loads((project / "recipes" / "sources.lock").read_text())["sources"]
    assert f"{upstream.rel.label}:qcow2" not in entries and f"{upstream.rel.label}:iso" in entries
    store = Store(project / "store")
    names = [p.name for p in store.root.iterdir() if not p.name.startswith(".")]
    assert not any(upstream.rel.qcow2_xz_filename in name for name in names)
    assert not any(fetch.downloads_dir(store.root).iterdir())


def test_upstream_change_is_an_error_until_repinned(project: Path, upstream: Upstream, mirror: MirrorServer,
                                                   tmp_path: Path) -> None:
    upstream.publish(mirror)
    args = [upstream.rel.version, "--arch", "x86_64"]
    assert lock_main(args, project) == 0
    lock_path = project / "recipes" / "sources.lock"
    old = LockFile.read(lock_path)

    upstream.qcow2 = os.urandom(400_000)  # upstream silently replaces the image
    upstream.publish(mirror)
    source = releases.qcow2_xz_source(upstream.rel, old)
    with pytest.raises(EulerbakeError, match="does not match its pins"):
        Store(tmp_path / "fresh-store").realise(source, log=lambda _m: None)

    assert lock_main(args, project) == 0  # without --update, the pins stay
    assert LockFile.read(lock_path).render() == old.render()
    assert lock_main([*args, "--update"], project) == 0
    new = LockFile.read(lock_path)
    label = upstream.rel.label
    assert new.entries[f"{label}:qcow2"].sha256 == hashlib.sha256(upstream.qcow2).hexdigest()
    assert new.entries[f"{label}:iso"] == old.entries[f"{label}:iso"]


def test_lock_offline_from_a_file_mirror(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rel = releases.matrix(["24.03-LTS-SP1"], ["aarch64"])[0]
    airgap = tmp_path / "airgap"
    files = [("qcow2", releases.qcow2_xz_paths(rel)[0], os.urandom(64_000)),
             ("iso", releases.iso_paths(rel)[0], os.urandom(96_000)),
             ("kernel-devel", releases.kernel_devel_paths(rel)[0], os.urandom(32_000))]
    for kind, path, data in files:
        (airgap / path).parent.mkdir(parents=True, exist_ok=True)
        (airgap / path).write_bytes(data)
        if kind != "kernel-devel":
            (airgap / (path + ".sha256sum")).write_text(f"{hashlib.sha256(data).hexdigest()} *{Path(path).name}\n")
    monkeypatch.setenv("EULERBAKE_MIRRORS", f"file://{airgap}")

    assert lock_main([rel.version, "--arch", "aarch64"], project) == 0

    entries = LockFile.read(project / "recipes" / "sources.lock").entries
    for kind, path, data in files:
        entry = entries[f"{rel.label}:{kind}"]
        assert (entry.size, entry.sha256, entry.blake3) == pins(data)
        assert entry.url == f"file://{airgap}/{path}"
        assert entry.upstream_checksum == ("" if kind == "kernel-devel" else f"file://{airgap}/{path}.sha256sum")


def test_unknown_release_is_a_clear_error(project: Path) -> None:
    with pytest.raises(EulerbakeError, match="unknown openEuler release 21.09") as caught:
        lock_main(["21.09"], project)
    assert "22.03-LTS-SP4" in str(caught.value)
    assert not (project / "recipes" / "sources.lock").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{h}  openEuler-x.iso\n", "{h}"),
        ("{h} *openEuler-x.iso\n", "{h}"),
        ("{o}  other.iso\n{h}  ./ISO/openEuler-x.iso\n", "{h}"),
        ("SHA256 (openEuler-x.iso) = {h}\n", "{h}"),
        ("{H}\n", "{h}"),
    ],
)
def test_sha256sum_formats(text: str, expected: str) -> None:
    digest, other = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()
    parsed = fetch.parse_sha256sum(text.format(h=digest, H=digest.upper(), o=other), "openEuler-x.iso")
    assert parsed == expected.format(h=digest)


def test_sha256sum_for_another_file_is_refused() -> None:
    other = hashlib.sha256(b"b").hexdigest()
    with pytest.raises(EulerbakeError, match="gives no sha256 for openEuler-x.iso .it lists other.iso"):
        fetch.parse_sha256sum(f"{other}  other.iso\n", "openEuler-x.iso")
    with pytest.raises(EulerbakeError, match="gives no sha256"):
        fetch.parse_sha256sum("<html>not found</html>", "openEuler-x.iso")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "cannot read lock file"),
        ('{"format": 7, "sources": {}}', "not a format-1 eulerbake lock file"),
        ('{"format": 1, "sources": {"a:b": {"url": "u", "filename": "f", "size": 1, "sha256": "zz", "blake3": "zz"}}}',
         "entry 'a:b' has a sha256 or blake3 that is not 64 lowercase hex digits"),
        ('{"format": 1, "sources": {"a:b": {"url": "u", "filename": "f", "size": 1}}}',
         "entry 'a:b' lacks blake3, sha256"),
    ],
)
def test_broken_lock_file_is_a_clear_error(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "sources.lock"
    path.write_text(content)
    with pytest.raises(EulerbakeError, match=problem):
        LockFile.read(path)


def test_lock_entry_for_another_file_is_refused(tmp_path: Path) -> None:
    rel = releases.matrix(["22.03-LTS-SP4"], ["x86_64"])[0]
    entry_json = {"url": "u", "filename": "kernel-devel-5.10.0-1.oe2203sp4.x86_64.rpm", "size": 1,
                  "sha256": "0" * 64, "blake3": "0" * 64, "upstream_checksum": ""}
    path = tmp_path / "sources.lock"
    path.write_text(json.dumps({"format": 1, "sources": {f"{rel.label}:kernel-devel": entry_json}}))
    with pytest.raises(EulerbakeError, match="but the recipe now fetches kernel-devel-5.10.0-216"):
        releases.kernel_devel_source(rel, LockFile.read(path))


@pytest.mark.parametrize("validator", ["current", "stale", "none"])
def test_lock_continues_an_interrupted_download_only_when_the_server_can_validate_it(
        project: Path, upstream: Upstream, mirror: MirrorServer, validator: str) -> None:
    upstream.publish(mirror)
    rel = upstream.rel
    request = releases.pin_requests([rel.version], [rel.arch])[0]
    store = Store(project / "store")
    partial = fetch.store_partial(store.root, request.source)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(upstream.qcow2[:150_000])  # left by an interrupted `eulerbake lock`
    etag = {"current": MirrorServer.etag(upstream.qcow2), "stale": '"upstream-changed-since"', "none": None}[validator]
    if etag:
        sidecar = {"url": request.source.urls[0], "validator": etag}
        partial.with_name(partial.name + ".json").write_text(json.dumps(sidecar))

    assert lock_main([rel.version, "--arch", rel.arch], project) == 0

    first = mirror.gets(".qcow2.xz")[0]
    if validator == "current":
        assert (first.range, first.if_range, first.status, first.body_bytes) == (
            "bytes=150000-", etag, 206, len(upstream.qcow2) - 150_000)
    elif validator == "stale":  # the server no longer vouches for the old bytes: it sends everything
        assert (first.range, first.if_range, first.status) == ("bytes=150000-", etag, 200)
    else:  # nothing proves the old bytes are still upstream's: start over
        assert (first.range, first.status) == (None, 200)
    entry = LockFile.read(project / "recipes" / "sources.lock").entries[f"{rel.label}:qcow2"]
    assert (entry.size, entry.sha256, entry.blake3) == pins(upstream.qcow2)
