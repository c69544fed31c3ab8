"""`eulerbake lock` against local mirrors: exactly the closure of what is named is pinned (a cell's sources, a
task's, a source label), upstream .sha256sum checks, the store import, re-pinning, missing sources reported."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import blake3
import pytest

import recipes
from eulerbake.cli import lock as lock_cli
from eulerbake.core.derivation import Derivation
from eulerbake.core.errors import EulerbakeError
from eulerbake.fetch import http as fetch
from eulerbake.fetch.lock import LockEntry, LockFile
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


def lock_project(project: Path) -> Project:
    """This repository's recipes, with the project's own lock file and store."""
    here = Project(project)
    here.recipes = SimpleNamespace(  # type: ignore[assignment]
        pin_requests=recipes.pin_requests, lock_targets=recipes.lock_targets, targets=recipes.targets,
        default_targets=recipes.default_targets, LOCK_PATH=project / "recipes" / "sources.lock")
    return here


def lock_main(argv: list[str], project: Path) -> int:
    """`eulerbake lock` in `project`."""
    return lock_cli.lock_main(argv, lock_project(project))


def locked(project: Path) -> dict[str, LockEntry]:
    return LockFile.read(project / "recipes" / "sources.lock").entries


def test_the_recipes_package_says_what_lock_pins() -> None:
    """`eulerbake lock` asks the project's recipes package (recipes/__init__.py) what to pin, and where."""
    repo = Path(__file__).resolve().parents[2]
    hook, lock_path = lock_cli._project_pins(Project(repo))
    assert hook is releases.pin_requests and lock_path == repo / "recipes" / "sources.lock"


@pytest.mark.parametrize(("names", "arches", "expected"), [
    (["22.03-LTS-SP4"], ["x86_64"], ["22.03-LTS-SP4:x86_64:qcow2"]),
    (["22.03-LTS-SP4"], ["aarch64"],
     ["22.03-LTS-SP4:aarch64:qcow2", "22.03-LTS-SP4:aarch64:kernel-devel", releases.ENA_LOCK_ID]),
    (["raw:24.03-LTS:x86_64"], None, ["24.03-LTS:x86_64:qcow2"]),
    (["kmod-build:24.03-LTS:aarch64"], None, ["24.03-LTS:aarch64:kernel-devel", releases.ENA_LOCK_ID]),
    ([releases.ENA_LOCK_ID], None, [releases.ENA_LOCK_ID]),
    (["fetch:22.03-LTS:x86_64:iso", "22.03-LTS:aarch64:iso"], None, ["22.03-LTS:x86_64:iso", "22.03-LTS:aarch64:iso"]),
])
def test_lock_asks_for_exactly_the_closure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: list[str],
                                          arches: list[str] | None, expected: list[str]) -> None:
    """The sources the named cells / tasks reach, by walking the graph, and named sources; no key is computed."""
    def forbidden(*_args: Any) -> NoReturn:
        raise AssertionError("a key was computed to find what to pin")

    monkeypatch.setattr(Derivation, "manifest", property(forbidden))
    requests = lock_cli.requests_for(lock_project(tmp_path), names, arches, releases.pin_requests())
    assert sorted(request.lock_id for request in requests) == sorted(expected)
    iso = releases.pin_requests(["22.03-LTS"], ["x86_64"])[1]
    assert iso.lock_id.endswith(":iso") and iso.checksum_suffix == ".sha256sum"  # pinnable, when named


def test_a_bare_lock_pins_every_cell_but_no_iso(tmp_path: Path) -> None:
    ids = [request.lock_id for request in lock_cli.requests_for(lock_project(tmp_path), [], None,
                                                                  releases.pin_requests())]
    cells = releases.matrix()
    assert len(ids) == len(set(ids)) == len(cells) + len([c for c in cells if c.arch == "aarch64"]) + 1
    assert not any(lock_id.endswith(":iso") for lock_id in ids)
    assert [lock_id for lock_id in ids if lock_id.endswith(":kernel-devel")] == [
        f"{c.label}:kernel-devel" for c in cells if c.arch == "aarch64"]


def test_arch_without_a_release_among_tasks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EulerbakeError, match="--arch picks the cells of the releases named"):
        lock_cli.requests_for(lock_project(tmp_path), ["raw:24.03-LTS:x86_64"], ["x86_64"], releases.pin_requests())


def pins(data: bytes) -> tuple[int, str, str]:
    return len(data), hashlib.sha256(data).hexdigest(), blake3.blake3(data).hexdigest()


def test_lock_writes_correct_pins_and_fills_the_store(project: Path, upstream: Upstream, mirror: MirrorServer) -> None:
    upstream.publish(mirror)
    rel, base = upstream.rel, mirror.base_url

    assert lock_main([rel.version, "--arch", "x86_64"], project) == 0

    lock_path = project / "recipes" / "sources.lock"
    document = json.loads(lock_path.read_text())
    assert document["format"] == 1
    assert sorted(document["sources"]) == [f"{rel.label}:qcow2"]  # the x86_64 cell's raw reaches nothing else
    assert not mirror.gets(".iso") and not mirror.gets(".rpm")
    # The other sources of the cell pin when named (upstream's ISO checksum is BSD-style, the RPM is under update/).
    assert lock_main([f"{rel.label}:iso", f"fetch:{rel.label}:kernel-devel"], project) == 0
    entries = json.loads(lock_path.read_text())["sources"]
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
        lock_main([upstream.rel.version, "--arch", "x86_64", f"{upstream.rel.label}:iso"], project)

    message = str(caught.value)
    assert "1 of 2 sources could not be pinned" in message
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
    assert new.entries[f"{label}:qcow2"] != old.entries[f"{label}:qcow2"] and sorted(new.entries) == [f"{label}:qcow2"]


def airgap_mirror(root: Path, rel: releases.Release, kinds: Sequence[str]) -> dict[str, tuple[str, bytes]]:
    """A file:// mirror in upstream's layout holding only `kinds` of `rel` (qcow2, iso, kernel-devel, ena):
    {lock id: (path under the mirror, content)}."""
    paths = {"qcow2": releases.qcow2_xz_paths(rel)[0], "iso": releases.iso_paths(rel)[0],
             "kernel-devel": releases.kernel_devel_paths(rel)[0], "ena": f"amzn-drivers/{releases.ENA_FILENAME}"}
    files = {}
    for kind in kinds:
        path, data = paths[kind], os.urandom(32_000 + 16_000 * len(files))
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        if kind in ("qcow2", "iso"):
            (root / (path + ".sha256sum")).write_text(f"{hashlib.sha256(data).hexdigest()} *{Path(path).name}\n")
        files[releases.ENA_LOCK_ID if kind == "ena" else f"{rel.label}:{kind}"] = (path, data)
    return files


def test_lock_of_an_x86_64_cell_needs_only_its_qcow2(project: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case: a mirror holding only what the x86_64 cell needs is enough, and only that is pinned."""
    rel = releases.matrix(["22.03-LTS-SP4"], ["x86_64"])[0]
    airgap = tmp_path / "airgap"
    files = airgap_mirror(airgap, rel, ["qcow2"])
    monkeypatch.setenv("EULERBAKE_MIRRORS", f"file://{airgap}")

    assert lock_main([rel.version, "--arch", "x86_64"], project) == 0

    entries = locked(project)
    assert sorted(entries) == [f"{rel.label}:qcow2"]
    path, data = files[f"{rel.label}:qcow2"]
    entry = entries[f"{rel.label}:qcow2"]
    assert (entry.size, entry.sha256, entry.blake3, entry.url) == (*pins(data), f"file://{airgap}/{path}")
    assert entry.upstream_checksum == f"file://{airgap}/{path}.sha256sum"


def test_lock_offline_from_a_file_mirror(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """aarch64 cells build the ENA module: qcow2, kernel-devel and the amzn-drivers tarball, and no ISO."""
    rel = releases.matrix(["24.03-LTS-SP1"], ["aarch64"])[0]
    airgap = tmp_path / "airgap"
    files = airgap_mirror(airgap, rel, ["qcow2", "iso", "kernel-devel", "ena"])
    monkeypatch.setenv("EULERBAKE_MIRRORS", f"file://{airgap}")

    assert lock_main([rel.version, "--arch", "aarch64"], project) == 0

    entries = locked(project)
    assert sorted(entries) == sorted([f"{rel.label}:qcow2", f"{rel.label}:kernel-devel", releases.ENA_LOCK_ID])
    for lock_id, entry in entries.items():
        path, data = files[lock_id]
        assert (entry.size, entry.sha256, entry.blake3) == pins(data)
        assert entry.url == f"file://{airgap}/{path}"
        checked = lock_id.endswith(":qcow2")
        assert entry.upstream_checksum == (f"file://{airgap}/{path}.sha256sum" if checked else "")


def test_a_source_label_alone(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rel = releases.matrix(["24.03-LTS-SP1"], ["aarch64"])[0]
    airgap = tmp_path / "airgap"
    files = airgap_mirror(airgap, rel, ["ena"])
    monkeypatch.setenv("EULERBAKE_MIRRORS", f"file://{airgap}")

    assert lock_main([releases.ENA_LOCK_ID], project) == 0

    assert sorted(locked(project)) == [releases.ENA_LOCK_ID]
    assert locked(project)[releases.ENA_LOCK_ID].sha256 == pins(files[releases.ENA_LOCK_ID][1])[1]


def test_a_source_missing_everywhere_names_every_url_and_the_rest_is_written(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rel = releases.matrix(["22.03-LTS-SP4"], ["aarch64"])[0]
    first, second = tmp_path / "mirror-a", tmp_path / "mirror-b"
    airgap_mirror(first, rel, ["qcow2", "ena"])  # no kernel-devel RPM on either mirror
    second.mkdir()
    monkeypatch.setenv("EULERBAKE_MIRRORS", f"file://{first} file://{second}")

    with pytest.raises(EulerbakeError) as caught:
        lock_main([rel.version, "--arch", "aarch64"], project)

    message = str(caught.value)
    assert "1 of 3 sources could not be pinned" in message and f"{rel.label}:kernel-devel" in message
    tried = [f"file://{root}/{path}" for root in (first, second) for path in releases.kernel_devel_paths(rel)]
    assert all(url in message for url in tried), message
    assert sorted(locked(project)) == sorted([f"{rel.label}:qcow2", releases.ENA_LOCK_ID])


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
