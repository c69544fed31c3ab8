"""The release matrix as data: every cell's upstream URLs follow repo.openeuler.org's layout exactly."""

from __future__ import annotations

import re
import urllib.parse

import pytest

from eulerbake.core.derivation import NAME_RE, FixedOutput
from eulerbake.core.errors import EulerbakeError
from eulerbake.fetch.lock import LockEntry, LockFile
from recipes import releases

REQUIRED = ["20.03-LTS-SP1", "20.03-LTS-SP2", "20.03-LTS-SP3", "20.03-LTS-SP4", "22.03-LTS", "22.03-LTS-SP1",
            "22.03-LTS-SP2", "22.03-LTS-SP3", "22.03-LTS-SP4", "24.03-LTS", "24.03-LTS-SP1", "24.03-LTS-SP2"]
EMPTY = LockFile(releases.LOCK_PATH.with_name("no-such.lock"))


def _path_of(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    assert (parsed.scheme, parsed.netloc, parsed.query, parsed.fragment) == ("https", "repo.openeuler.org", "", "")
    return parsed.path


def test_matrix_covers_every_release_on_both_arches() -> None:
    cells = releases.matrix()
    assert [v for v in REQUIRED if v not in releases.RELEASES] == []
    assert len(cells) == 2 * len(releases.RELEASES)
    assert {cell.label for cell in cells} == {f"{v}:{a}" for v in releases.RELEASES for a in ("x86_64", "aarch64")}


@pytest.mark.parametrize("rel", releases.matrix(), ids=lambda rel: rel.label)
def test_cell_urls_follow_the_upstream_layout(rel: releases.Release) -> None:
    ver, arch = rel.version, rel.arch
    top = f"/openEuler-{ver}"

    qcow2 = releases.qcow2_xz_source(rel, EMPTY)
    assert [_path_of(u) for u in qcow2.urls] == [f"{top}/virtual_machine_img/{arch}/openEuler-{ver}-{arch}.qcow2.xz"]
    assert (qcow2.filename, qcow2.task_name) == (f"openEuler-{ver}-{arch}.qcow2.xz", f"fetch:{ver}:{arch}:qcow2")

    iso = releases.iso_source(rel, EMPTY)
    assert [_path_of(u) for u in iso.urls] == [f"{top}/ISO/{arch}/openEuler-{ver}-{arch}-dvd.iso"]
    assert iso.task_name == f"fetch:{ver}:{arch}:iso"

    rpm = releases.kernel_devel_source(rel, EMPTY)
    name = f"kernel-devel-{rel.expected_kernel}.{arch}.rpm"
    assert [_path_of(u) for u in rpm.urls] == [f"{top}/{repo}/{arch}/Packages/{name}" for repo in ("OS", "update")]
    assert rpm.task_name == f"fetch:{ver}:{arch}:kernel-devel"

    for source in (qcow2, iso, rpm):  # unpinned until `eulerbake lock`: the engine refuses to fetch them
        assert not source.pinned and source.size == -1 and source.sha256 == source.blake3 == ""
        assert all(u.endswith("/" + source.filename) for u in source.urls)

    image = releases.qcow2_image(rel, EMPTY)
    assert image.task_name == f"unpack:{ver}:{arch}" and NAME_RE.match(image.name)
    assert image.inputs["archive"] is not None and image.params.output == f"openEuler-{ver}-{arch}.qcow2"


@pytest.mark.parametrize("rel", releases.matrix(), ids=lambda rel: rel.label)
def test_expected_facts_agree_with_the_release(rel: releases.Release) -> None:
    """The kernel's dist tag must name the release it is listed under (catches a row copied to the wrong place)."""
    major, _, sp = rel.version.partition("-LTS")
    sp = sp.lstrip("-").lower()
    if major == "20.03":  # 20.03 SP1-SP3 kernels carry the plain `oe1` tag
        dist = "oe1" if sp in ("sp1", "sp2", "sp3") else f"oe2003{sp}"
    else:
        dist = f"oe{major.replace('.', '')}{sp}"
    kernel_line = {"20.03": "4.19.90", "22.03": "5.10.0", "24.03": "6.6.0"}[major]
    assert re.fullmatch(rf"{re.escape(kernel_line)}-[0-9.]+\.{dist}", rel.expected_kernel), rel.expected_kernel
    assert rel.expected_kernel_release == f"{rel.expected_kernel}.{rel.arch}"
    assert rel.default_user == ("openeuler" if major == "24.03" else "openEuler")
    if rel.arch == "x86_64":
        assert (rel.layout.table, rel.layout.partitions, rel.layout.root_number) == ("dos", ("boot", "root"), 2)
    else:
        assert (rel.layout.table, rel.layout.partitions, rel.layout.root_number) == ("gpt", ("esp", "boot", "root"), 3)


def test_known_kernels_from_the_issue() -> None:
    by_label = {rel.label: rel for rel in releases.matrix()}
    assert by_label["22.03-LTS:x86_64"].expected_kernel == "5.10.0-60.18.0.50.oe2203"
    assert by_label["24.03-LTS:aarch64"].expected_kernel == "6.6.0-28.0.0.34.oe2403"


def test_every_task_name_is_unique() -> None:
    names = [s.task_name for rel in releases.matrix()
             for s in (releases.qcow2_xz_source(rel, EMPTY), releases.iso_source(rel, EMPTY),
                       releases.kernel_devel_source(rel, EMPTY))]
    names += [releases.qcow2_image(rel, EMPTY).task_name for rel in releases.matrix()]
    names.append(releases.ena_source(EMPTY).task_name)
    assert len(names) == len(set(names)) == 4 * len(releases.matrix()) + 1


def test_ena_source_is_a_github_tag_archive() -> None:
    ena = releases.ena_source(EMPTY)
    assert ena.urls == (f"https://github.com/amzn/amzn-drivers/archive/refs/tags/{releases.ENA_TAG}.tar.gz",)
    assert re.fullmatch(r"ena_linux_\d+\.\d+\.\d+", releases.ENA_TAG)
    assert ena.filename == f"amzn-drivers-{releases.ENA_TAG}.tar.gz" and not ena.pinned


def test_mirrors_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    rel = releases.matrix(["22.03-LTS-SP4"], ["aarch64"])[0]
    monkeypatch.setenv("EULERBAKE_MIRRORS", "file:///srv/oe/, https://mirror.example.org/openeuler")
    urls = releases.kernel_devel_source(rel, EMPTY).urls
    assert [u.split("/openEuler-22.03-LTS-SP4/")[0] for u in urls] == [
        "file:///srv/oe", "file:///srv/oe", "https://mirror.example.org/openeuler", "https://mirror.example.org/openeuler"]
    assert [u.split("/")[-4] for u in urls] == ["OS", "update", "OS", "update"]
    assert releases.ena_source(EMPTY).urls[0] == f"file:///srv/oe/amzn-drivers/{releases.ENA_FILENAME}"


@pytest.mark.parametrize("bad", ["ftp://mirror.example.org", "file://relative/path", "repo.openeuler.org"])
def test_bad_mirror_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("EULERBAKE_MIRRORS", bad)
    with pytest.raises(EulerbakeError, match="EULERBAKE_MIRRORS holds"):
        releases.mirrors()


def test_pins_and_the_location_that_served_them_come_from_the_lock() -> None:
    rel = releases.matrix(["24.03-LTS-SP2"], ["x86_64"])[0]
    served = f"https://old-mirror.example.org/{releases.kernel_devel_paths(rel)[1]}"
    entry = LockEntry(served, rel.kernel_devel_filename, 1234, "a" * 64, "b" * 64)
    source = releases.kernel_devel_source(rel, LockFile(releases.LOCK_PATH, {f"{rel.label}:kernel-devel": entry}))
    assert isinstance(source, FixedOutput) and source.pinned
    assert (source.size, source.sha256, source.blake3) == (1234, "a" * 64, "b" * 64)
    assert "/update/" in source.urls[0] and "/OS/" in source.urls[1]  # the path that served goes first
    assert source.urls[-1] == served  # and the exact URL stays as a last resort


@pytest.mark.parametrize(("names", "arches", "problem"), [
    (["21.03"], None, "unknown openEuler release 21.03"),
    (None, ["riscv64"], "unknown architecture riscv64"),
])
def test_unknown_cells_are_clear_errors(names: list[str] | None, arches: list[str] | None, problem: str) -> None:
    with pytest.raises(EulerbakeError, match=problem):
        releases.matrix(names, arches)


def test_committed_lock_file_is_valid_and_only_pins_what_the_matrix_knows() -> None:
    lock = LockFile.read(releases.LOCK_PATH)
    known = {r.lock_id for r in releases.pin_requests()}
    assert set(lock.entries) <= known
    assert releases.LOCK_PATH.read_text() == lock.render()
