"""The compatibility modes and the readiness check: what each mode changes in the tarball (exactly that),
how Debian's cloud-init and a model of curtin's documented detection see the result, and what an image
curtin would fail on is refused with.

The curtin model follows curtin's distro.py and commands/install_grub.py (2025-2026): `get_distroinfo`
tries os-release ID, then each word of ID_LIKE, against DISTRO_NAMES and maps the variant to its family;
for UEFI the boot id is the variant (`rhel`/`ol` → `redhat`) and `find_efi_loader` looks for
EFI/<bootid>/shimx64.efi, EFI/BOOT/BOOTX64.EFI, EFI/<bootid>/grubx64.efi; the BIOS path needs `rpm -E %rhel`
in 7/8/9. Debian's cloud-init 22.4 runs for real on the extracted os-release.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from eulerbake.core.derivation import LocalTree
from eulerbake.core.errors import EulerbakeError
from recipes.stages.maas_tgz import maas_tgz
from tests.maas.conftest import CLOUD_INIT_OLD, CLOUD_INIT_PKG, DiskImage, build_single_root_image, run_stage

HYGIENE = {"/etc/machine-id", "/var/lib/cloud/instances", "/var/lib/cloud/instances/i-0abc",
           "/var/lib/cloud/instances/i-0abc/user-data.txt", "/var/lib/cloud/instance", "/var/lib/cloud/data",
           "/var/lib/cloud/data/instance-id", "/var/log/cloud-init.log", "/etc/ssh/ssh_host_ed25519_key",
           "/etc/ssh/ssh_host_ed25519_key.pub"}
EFI_COPY = {"/boot/efi/EFI/redhat", "/boot/efi/EFI/redhat/grub.cfg", "/boot/efi/EFI/redhat/grubx64.efi",
            "/boot/efi/EFI/redhat/shimx64.efi"}
MODE_CHANGES = {
    "masquerade": {"/usr/lib/os-release", "/etc/rpm/macros.dist"} | EFI_COPY,
    "id-like": {"/usr/lib/os-release", "/etc/rpm/macros.dist"} | EFI_COPY,
    "native": set(),  # this image's cloud-init (23.4) knows openEuler: nothing to patch
}


def _entry(path: Path) -> tuple[Any, ...]:
    st = os.lstat(path)
    xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                          for n in os.listxattr(path, follow_symlinks=False)))
    body: Any = path.read_bytes() if stat.S_ISREG(st.st_mode) else os.readlink(path) if stat.S_ISLNK(st.st_mode) \
        else None
    return st.st_mode, st.st_uid, st.st_gid, st.st_rdev, body, xattrs


def _tree(root: Path) -> dict[str, tuple[Any, ...]]:
    return {"/" + p.relative_to(root).as_posix(): _entry(p) for p in root.rglob("*")}


def _differences(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {path for path in a.keys() | b.keys() if a.get(path) != b.get(path)}


@pytest.fixture(scope="module")
def packed(single_root_image: DiskImage, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tarball's extraction for each mode (plus one without hygiene, the image as it is)."""
    store = tmp_path_factory.mktemp("store")
    found = {}
    for name, options in (("as-is", {"compat": "native", "hygiene": False}), ("masquerade", {"compat": "masquerade"}),
                          ("id-like", {"compat": "id-like"}), ("native", {"compat": "native"})):
        out = run_stage(maas_tgz(name, LocalTree(single_root_image.directory), arch="x86_64", firmware="both",
                                 **options), store)
        root = tmp_path_factory.mktemp(f"extracted-{name}")
        subprocess.run(["tar", "-C", root, "--xattrs", "--xattrs-include=*", "--selinux", "-Sxpzf", out / "root.tgz",
                        "--numeric-owner"], check=True)
        found[name] = root
        found[f"{name}:out"] = out
    return found


def test_hygiene_changes_exactly_its_files(packed: dict[str, Path]) -> None:
    assert _differences(_tree(packed["as-is"]), _tree(packed["native"])) == HYGIENE
    native = packed["native"]
    assert (native / "etc/machine-id").read_bytes() == b""
    assert stat.S_IMODE((native / "etc/machine-id").stat().st_mode) == 0o444  # emptied, attributes kept
    assert (native / "var/lib/cloud/seed/nocloud/meta-data").is_file()  # cloud-init clean keeps the seed
    assert os.path.islink(native / "var/lib/dbus/machine-id")  # a symlink to /etc/machine-id stays


@pytest.mark.parametrize("mode", ["masquerade", "id-like", "native"])
def test_each_mode_changes_exactly_the_files_it_says(packed: dict[str, Path], mode: str) -> None:
    changed = _differences(_tree(packed["native"]), _tree(packed[mode]))
    assert changed == MODE_CHANGES[mode]
    manifest = json.loads((packed[f"{mode}:out"] / "maas-tgz.json").read_text())
    assert {c["path"] for c in manifest["compat_changes"]} == MODE_CHANGES[mode]  # what it says is what it did
    out_files = {p.name for p in packed[f"{mode}:out"].iterdir()}
    assert ("curtin-openeuler.patch" in out_files) == (mode == "native")


def test_the_edits_themselves(packed: dict[str, Path]) -> None:
    original = (packed["native"] / "usr/lib/os-release").read_text()
    masquerade = (packed["masquerade"] / "usr/lib/os-release").read_text()
    assert masquerade == original.replace('ID="openEuler"', 'ID="rhel"')  # the seed's sed, nothing else
    id_like = (packed["id-like"] / "usr/lib/os-release").read_text()
    assert id_like == original + 'ID_LIKE="rhel centos fedora"\n'
    for mode in ("masquerade", "id-like"):
        root = packed[mode]
        assert os.readlink(root / "etc/os-release") == "../usr/lib/os-release"  # the file edited, not the link
        macros = root / "etc/rpm/macros.dist"
        assert macros.read_text() == "%rhel 8\n"
        assert os.getxattr(macros, "security.selinux") == os.getxattr(root / "etc/rpm", "security.selinux")
        for name in ("shimx64.efi", "grubx64.efi", "grub.cfg"):
            copy, source = root / "boot/efi/EFI/redhat" / name, root / "boot/efi/EFI/openEuler" / name
            assert _entry(copy) == _entry(source)
            assert os.lstat(copy).st_ino != os.lstat(source).st_ino  # a copy, not a hard link


# -- Debian's cloud-init on the extracted os-release ------------------------------------------------

_CLOUD_INIT_PROBE = r"""
import json, os, sys
os_release = sys.argv[1]
from cloudinit import util
real_exists, real_load = os.path.exists, util.load_file
os.path.exists = lambda p: True if p == "/etc/os-release" else real_exists(p)
util.load_file = lambda p, *a, **k: real_load(os_release if p == "/etc/os-release" else p, *a, **k)
from cloudinit import distros
from cloudinit.distros import rhel
info = util.system_info()
name = util.get_linux_distro()[0]
variant = info["variant"]
families = [family for family, members in distros.OSFAMILIES.items()
            if variant in (m.lower() for m in members) or name in members]
native = None
if name in distros.OSFAMILIES["redhat"]:
    native = issubclass(distros.fetch(name), rhel.Distro)
print(json.dumps({"variant": variant, "distro": name, "families": families, "native_class": native}))
"""


def _cloud_init_sees(root: Path) -> dict[str, Any]:
    proc = subprocess.run(["/usr/bin/python3", "-c", _CLOUD_INIT_PROBE, str(root / "usr/lib/os-release")],
                          capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    return dict(json.loads(proc.stdout))


def test_debians_cloud_init_sees_native_as_openeuler_and_the_others_as_rhel_family(packed: dict[str, Path]) -> None:
    native = _cloud_init_sees(packed["native"])
    assert native == {"variant": "openeuler", "distro": "openEuler", "families": ["redhat"], "native_class": True}
    masquerade = _cloud_init_sees(packed["masquerade"])
    assert masquerade["variant"] == "rhel" and masquerade["families"] == ["redhat"]
    id_like = _cloud_init_sees(packed["id-like"])
    assert id_like["families"] == ["redhat"]


# -- a model of curtin's documented detection --------------------------------------------------------

CURTIN_DISTRO_NAMES = ["arch", "centos", "debian", "fedora", "freebsd", "gentoo", "opensuse", "redhat", "rhel", "sles",
                       "suse", "ubuntu", "rocky"]
CURTIN_FAMILIES = {"debian": ["debian", "ubuntu"], "redhat": ["centos", "fedora", "redhat", "rhel", "rocky"],
                   "suse": ["opensuse", "sles", "suse"]}


def _shell_content(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(text) if "=" in item)  # curtin's load_shell_content


def curtin_distroinfo(os_release: str, extra_names: tuple[str, ...] = (),
                      extra_family: tuple[str, ...] = ()) -> tuple[str, str]:
    """(variant, family) as curtin's get_distroinfo computes them; ValueError when it fails."""
    names = CURTIN_DISTRO_NAMES + list(extra_names)
    families = {family: members + (list(extra_family) if family == "redhat" else [])
                for family, members in CURTIN_FAMILIES.items()}
    data = _shell_content(os_release)
    for name in [data["ID"], *data.get("ID_LIKE", "").split()]:
        if name in names:
            family = next(f for f, members in families.items() if name in members)
            return name, family
    raise ValueError(f"Unknown distro: {data['ID']}")


def curtin_efi_loader(root: Path, variant: str) -> str | None:
    bootid = "redhat" if variant in ("rhel", "ol") else variant
    for loader in (f"/boot/efi/EFI/{bootid}/shimx64.efi", "/boot/efi/EFI/BOOT/BOOTX64.EFI",
                   f"/boot/efi/EFI/{bootid}/grubx64.efi"):
        if (root / loader.lstrip("/")).exists():
            return loader
    return None


def curtin_rhel_ver(root: Path, patched: bool, os_release: str) -> str:
    """`rpm -E %rhel` in the target (macros files, last definition wins); the patch's fallback for openEuler."""
    value = "%rhel"
    for path in sorted((root / "usr/lib/rpm/macros.d").glob("macros.*")) + sorted((root / "etc/rpm").glob("macros*")):
        for match in re.finditer(r"^%rhel\s+(\S+)", path.read_text(), re.M):
            value = match.group(1)
    if patched and value == "%rhel" and _shell_content(os_release)["ID"] == "openEuler":
        return "8"
    return value


def _patch_additions(patch: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the shipped curtin patch adds to DISTRO_NAMES and to the redhat family."""
    added = [line[1:] for line in patch.read_text().splitlines() if line.startswith("+") and not line.startswith("+++")]
    names = tuple(re.findall(r"'(\w+)'\]", "".join(a for a in added if "]" in a and "DISTROS." not in a)))
    family = tuple(re.findall(r"DISTROS\.(\w+)\]", "".join(added)))
    return names, family


@pytest.mark.parametrize("mode", ["masquerade", "id-like", "native"])
def test_curtin_model_classifies_every_mode_as_redhat_and_finds_the_loader(packed: dict[str, Path], mode: str) -> None:
    root = packed[mode]
    os_release = (root / "usr/lib/os-release").read_text()
    patched = mode == "native"  # native ships the curtin patch for the MAAS server
    names, family = _patch_additions(packed["native:out"] / "curtin-openeuler.patch") if patched else ((), ())
    variant, os_family = curtin_distroinfo(os_release, names, family)
    assert os_family == "redhat"
    assert variant == {"masquerade": "rhel", "id-like": "rhel", "native": "openEuler"}[mode]
    loader = curtin_efi_loader(root, variant)
    assert loader == {"native": "/boot/efi/EFI/openEuler/shimx64.efi"}.get(mode, "/boot/efi/EFI/redhat/shimx64.efi")
    assert curtin_rhel_ver(root, patched, os_release) in ("7", "8", "9")  # the BIOS grub path goes on


def test_native_needs_the_curtin_patch(packed: dict[str, Path]) -> None:
    os_release = (packed["native"] / "usr/lib/os-release").read_text()
    with pytest.raises(ValueError, match="Unknown distro: openEuler"):
        curtin_distroinfo(os_release)  # stock curtin: the seed's "x not in tuple"
    assert _patch_additions(packed["native:out"] / "curtin-openeuler.patch") == (("openEuler",), ("openEuler",))


# -- an old cloud-init in the image, the readiness check -----------------------------------------------


@pytest.fixture(scope="module")
def old_cloud_init_image(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    return build_single_root_image(tmp_path_factory.mktemp("old-cloud-init"), cloud_init=CLOUD_INIT_OLD)


def test_native_patches_a_cloud_init_older_than_21_4(old_cloud_init_image: DiskImage, tmp_path: Path) -> None:
    out = run_stage(maas_tgz("old", LocalTree(old_cloud_init_image.directory), arch="x86_64", firmware="both",
                             compat="native"), tmp_path / "store")
    pkg = "/" + CLOUD_INIT_PKG
    manifest = json.loads((out / "maas-tgz.json").read_text())
    assert {c["path"] for c in manifest["compat_changes"]} == {
        f"{pkg}/util.py", f"{pkg}/distros/__init__.py", f"{pkg}/distros/openEuler.py", f"{pkg}/net/sysconfig.py"}
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", root, "--xattrs", "--xattrs-include=*", "-xpzf", out / "root.tgz",
                    "--numeric-owner"], check=True)
    package = root / CLOUD_INIT_PKG
    for source in package.rglob("*.py"):
        compile(source.read_text(), str(source), "exec")  # still Python
    known = ast.literal_eval((package / "net/sysconfig.py").read_text().split("=", 1)[1].strip())
    assert "openeuler" in known
    families: dict[str, Any] = {}
    exec((package / "distros/__init__.py").read_text(), families)
    assert "openEuler" in families["OSFAMILIES"]["redhat"]
    assert "'openeuler'" in (package / "util.py").read_text().replace('"', "'")
    assert "class Distro(rhel.Distro)" in (package / "distros/openEuler.py").read_text()
    assert os.getxattr(package / "distros/openEuler.py", "security.selinux") == \
        os.getxattr(package / "distros", "security.selinux")


def test_id_like_with_an_old_cloud_init_is_refused_before_deploying(old_cloud_init_image: DiskImage,
                                                                    tmp_path: Path) -> None:
    node = maas_tgz("old", LocalTree(old_cloud_init_image.directory), arch="x86_64", firmware="both", compat="id-like")
    with pytest.raises(EulerbakeError, match="No available network renderers") as failure:
        run_stage(node, tmp_path / "store")
    message = " ".join(str(failure.value).split())
    assert "its sysconfig renderer knows centos, fedora, rhel, suse but the variant is 'openeuler'" in message


def test_readiness_check_lists_everything_curtin_would_miss(tmp_path: Path) -> None:
    image = build_single_root_image(tmp_path / "image", omit=(
        "usr/bin/cloud-init", "usr/sbin/efibootmgr", "usr/lib/grub/x86_64-efi", "boot/efi/EFI",
        "usr/lib/grub/i386-pc"))
    node = maas_tgz("unready", LocalTree(image.directory), arch="x86_64", firmware="both", compat="id-like")
    with pytest.raises(EulerbakeError) as failure:
        run_stage(node, tmp_path / "store")
    message = str(failure.value)
    missing = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    assert [item.split(" (")[0] for item in missing] == [
        "cloud-init", "efibootmgr", "grub2 EFI modules", "shim", "the EFI loader directory", "grub2-pc"]
    assert "package grub2-efi-x64-modules" in message and "fix:" in message
    # the same image packs when told to, with the problems in its manifest
    out = run_stage(maas_tgz("unready", LocalTree(image.directory), arch="x86_64", firmware="both",
                             require_ready=False), tmp_path / "store")
    assert len(json.loads((out / "maas-tgz.json").read_text())["readiness_problems"]) == 6


def test_bios_readiness_wants_a_rhel_macro_curtin_accepts(single_root_image: DiskImage, tmp_path: Path) -> None:
    """curtin's BIOS path takes %rhel 7, 8 or 9 only (gen_install_commands): rhel_major=10 would fail there."""
    from eulerbake.fs.ext4 import Ext4Image, inside
    from eulerbake.fs.tarball import read_tree
    from recipes.stages.maas_tgz import Params, apply_compat, readiness_problems

    def problems(**changes: Any) -> list[str]:
        tree = read_tree(Ext4Image(inside(single_root_image.disk, 2**20), 0, tmp_path))
        params = Params(**{**dict(arch="x86_64", firmware="bios", compat="id-like", rhel_major=8,
                                  efi_vendor="openEuler", hygiene=True, require_ready=True, compresslevel=6,
                                  zlib=""), **changes})
        apply_compat(tree, params)
        return [problem.split(" (")[0] for problem in readiness_problems(tree, params)]

    assert problems() == []
    assert problems(rhel_major=10) == ["a %rhel macro of 7, 8 or 9"]
    assert problems(compat="native") == []  # the patched curtin needs no macro


def test_native_fixes_the_21_4_sysconfig_spelling_only(tmp_path: Path) -> None:
    """cloud-init 21.4-23.2 (Debian's 22.4 too) spells the distro `openEuler` in sysconfig's KNOWN_DISTROS while
    the variant it compares is `openeuler`: the seed's "No available network renderers". Native fixes just that."""
    from tests.maas.conftest import CLOUD_INIT_NEW

    cloud_init = {**CLOUD_INIT_NEW, "version.py": '__VERSION__ = "21.4"\n',
                  "net/sysconfig.py": 'KNOWN_DISTROS = ["centos", "fedora", "openEuler", "rhel", "suse"]\n',
                  "distros/openEuler.py": CLOUD_INIT_NEW["distros/openeuler.py"]}
    del cloud_init["distros/openeuler.py"], cloud_init["net/network_manager.py"]
    image = build_single_root_image(tmp_path / "image", cloud_init=cloud_init)
    out = run_stage(maas_tgz("ci214", LocalTree(image.directory), arch="x86_64", firmware="both", compat="native"),
                    tmp_path / "store")
    changes = json.loads((out / "maas-tgz.json").read_text())["compat_changes"]
    assert [c["path"] for c in changes] == [f"/{CLOUD_INIT_PKG}/net/sysconfig.py"]
    with pytest.raises(EulerbakeError, match="network renderer for cloud-init 21.4"):
        run_stage(maas_tgz("ci214", LocalTree(image.directory), arch="x86_64", firmware="both", compat="id-like"),
                  tmp_path / "store")
    # masquerade's ID="rhel" is a variant every sysconfig knows
    run_stage(maas_tgz("ci214", LocalTree(image.directory), arch="x86_64", firmware="both", compat="masquerade"),
              tmp_path / "store")
