"""The Packer stages with the real tools: Debian's packer 1.6.6 (`packer validate`, offline) and ssh-keygen.

`packer build` needs AWS, so it does not run here; what can run does: the builder key's life cycle, the
authorized-key overlay, both templates rendered and validated for x86_64 and aarch64, broken templates
failing with jinja2's or Packer's message, the private key absent from every file of the store,
bit-identical outputs under another umask and TZ, the provisioner's last step run on sample files, the
receipt parsed from a recorded machine-readable run, and the publisher's tag lookup against moto.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, Derivation
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store
from recipes.stages import builder_key
from recipes.stages.authorized_key_overlay import authorized_key_overlay
from recipes.stages.builder_key import builder_key_path, builder_public_key, normalise_public_key, public_key_of
from recipes.stages.packer_ami import PUBLISHER, packer_ami, parse_artifact_ids, ui_messages
from recipes.stages.packer_template import HCL, JSON_TWIN, SCRIPT, TEMPLATES, packer_template
from recipes.stages.raw import read_attrs_manifest

REPO = Path(__file__).resolve().parents[2]
REGION = "ap-northeast-1"
BASE_AMI = "ami-0123456789abcdef0"
ARCHES = ("x86_64", "aarch64")
GRUB = {"x86_64": "/boot/grub2/grub.cfg", "aarch64": "/boot/efi/EFI/openEuler/grub.cfg"}

pytestmark = [
    pytest.mark.skipif(shutil.which("packer") is None, reason="packer (Debian package packer) not installed"),
    pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) not installed"),
]

# What `packer build -machine-readable` of the amazon-ebs template prints (packer 1.6, abridged).
RECORDED_BUILD = """\
1700000000,,ui,say,amazon-ebs.openeuler: output will be in this color.
1700000000,,ui,say,
1700000001,,ui,say,==> amazon-ebs.openeuler: Prevalidating any provided VPC information
1700000001,,ui,say,==> amazon-ebs.openeuler: Prevalidating AMI Name: openEuler-22.03-LTS-x86_64-0123
1700000420,,ui,say,==> amazon-ebs.openeuler: Provisioning with shell script: /store/x/install-cloudinit.sh
1700000421,,ui,message,    amazon-ebs.openeuler: ==> install-cloudinit: dnf -y update
1700000900,,ui,say,==> amazon-ebs.openeuler: Creating AMI openEuler-22.03-LTS-x86_64-0123 from instance i-0a1b
1700000900,,ui,message,    amazon-ebs.openeuler: AMI: ami-0a1b2c3d4e5f67890
1700001100,,ui,say,Build 'amazon-ebs.openeuler' finished after 18 minutes 20 seconds.
1700001100,,ui,say,\\n==> Wait completed after 18 minutes 20 seconds
1700001100,,ui,say,\\n==> Builds finished. The artifacts of successful builds are:
1700001100,amazon-ebs.openeuler,artifact-count,1
1700001100,amazon-ebs.openeuler,artifact,0,builder-id,mitchellh.amazonebs
1700001100,amazon-ebs.openeuler,artifact,0,id,ap-northeast-1:ami-0a1b2c3d4e5f67890
1700001100,amazon-ebs.openeuler,artifact,0,string,AMIs were created:\\nap-northeast-1: ami-0a1b2c3d4e5f67890\\n
1700001100,amazon-ebs.openeuler,artifact,0,files-count,0
1700001100,amazon-ebs.openeuler,artifact,0,end
1700001100,,ui,say,--> amazon-ebs.openeuler: AMIs were created:\\nap-northeast-1: ami-0a1b2c3d4e5f67890\\n
"""


def build_base_ami(ctx: BuildContext) -> None:
    """A stand-in for the base-AMI publication: only its receipt, which is all packer-template reads."""
    resource = {"image_id": ctx.params["image_id"], "region": ctx.params["region"]}
    (ctx.out / "receipt.json").write_text(json.dumps({"key": ctx.key, "resource": resource}, sort_keys=True))


def base_ami(image_id: str = BASE_AMI, region: str = REGION) -> Derivation:
    return Derivation(stage="test-base-ami", label="sample", builder=build_base_ami,
                      params={"image_id": image_id, "region": region})


def template_for(arch: str, **kwargs: object) -> Derivation:
    return packer_template(arch, base_ami(), arch=arch, region=REGION, ami_name=f"openEuler-22.03-LTS-{arch}",
                           **kwargs)  # type: ignore[arg-type]


def make_key(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "someone@laptop", "-f", str(path)],
                   check=True)
    return path


def validate(template: Path, key: Path) -> subprocess.CompletedProcess[str]:
    argv = ["packer", "validate", "-var", f"ssh_private_key_file={key}", "-var", f"eulerbake_key={'f' * 32}",
            str(template)]
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "CHECKPOINT_DISABLE": "1"},
                          timeout=120)


def private_key_forms(path: Path) -> list[bytes]:
    """Ways the private key could show up in a file: the PEM, each of its base64 lines, the raw seed."""
    text = path.read_text()
    forms = [text.encode(), *(line.encode() for line in text.splitlines() if len(line) >= 16 and "-----" not in line)]
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    key = serialization.load_ssh_private_key(text.encode(), password=None)
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    import base64

    forms += [seed, seed.hex().encode(), base64.b64encode(seed).rstrip(b"=")]
    return forms


def files_under(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state directory of our own: the builder key is made here, never in the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv(builder_key.KEY_FILE_ENV, raising=False)
    return tmp_path / "state"


# -- the builder key -----------------------------------------------------------------------------


def test_the_builder_key_is_made_once_in_the_state_directory_with_mode_0600(state_home: Path) -> None:
    key = builder_key_path()
    assert key == state_home / "eulerbake" / "packer-builder-key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    first = builder_public_key()
    assert first.startswith("ssh-ed25519 ") and first.endswith(" eulerbake-packer-builder")
    assert builder_public_key() == first == public_key_of(key)  # made once, and the .pub agrees with the key
    assert "PRIVATE" not in first


def test_a_key_from_the_environment_is_used_and_one_others_can_read_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state_home: Path) -> None:
    key = make_key(tmp_path / "ci-key")
    monkeypatch.setenv(builder_key.KEY_FILE_ENV, str(key))
    assert builder_key_path() == key
    assert builder_public_key() == normalise_public_key((tmp_path / "ci-key.pub").read_text())
    assert not (state_home / "eulerbake").exists()  # nothing made when the key is given
    key.chmod(0o640)
    with pytest.raises(EulerbakeError, match="readable by others") as err:
        builder_key_path()
    assert "chmod 600" in str(err.value)
    monkeypatch.setenv(builder_key.KEY_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(EulerbakeError, match="does not exist"):
        builder_key_path()


def test_a_public_key_is_normalised_and_garbage_refused(tmp_path: Path) -> None:
    line = (make_key(tmp_path / "k").with_suffix(".pub")).read_text()
    normal = normalise_public_key(line)
    assert normal == normalise_public_key(line.replace("someone@laptop", "other comment") + "\n")
    assert normal.split()[:2] == line.split()[:2]
    for bad in ("", "ssh-ed25519", "ssh-ed25519 not-base64!", "ssh-rsa " + line.split()[1],
                "-----BEGIN OPENSSH PRIVATE KEY-----"):
        with pytest.raises(EulerbakeError):
            normalise_public_key(bad)


# -- the overlay ---------------------------------------------------------------------------------


def test_the_overlay_authorizes_the_key_for_root_with_modes_raw_understands(tmp_path: Path) -> None:
    public = builder_public_key()
    overlay = Store(tmp_path / "store").realise(authorized_key_overlay("sample")).path
    assert (overlay / "root/.ssh/authorized_keys").read_text() == public + "\n"
    attrs = read_attrs_manifest(overlay)  # the raw stage's own parser
    assert {path: (a.mode, a.uid, a.gid) for path, a in attrs.items()} == {
        "root/.ssh": (0o700, 0, 0),
        "root/.ssh/authorized_keys": (0o600, 0, 0),
        "etc/systemd/system/sshd.service.d/90-eulerbake-packer-builder.conf": (0o644, 0, 0),
    }
    drop_in = (overlay / "etc/systemd/system/sshd.service.d/90-eulerbake-packer-builder.conf").read_text()
    assert "ExecStart=\nExecStart=/usr/sbin/sshd -D -o PermitRootLogin=prohibit-password" in drop_in
    assert "password" not in drop_in.replace("prohibit-password", "").replace("never a password", "").lower()


SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if Path(p).exists()), None)
PRIVSEP_DIRS = ("/run/sshd", "/var/empty/sshd", "/var/empty")  # `sshd -T` insists on one


@pytest.mark.skipif(SSHD is None or not any(Path(d).is_dir() for d in PRIVSEP_DIRS),
                    reason="sshd (Debian package openssh-server) not installed, or its /run/sshd missing")
def test_sshd_started_by_the_drop_in_lets_root_in_by_key_over_the_hygiene_config(tmp_path: Path) -> None:
    """sshd's own answer (`sshd -T`): the drop-in's -o beats hygiene's first-line `PermitRootLogin no`,
    and passwords stay refused; without the drop-in, root stays out."""
    import shlex

    from recipes.stages.hygiene import harden_sshd_config

    overlay = Store(tmp_path / "store").realise(authorized_key_overlay("sample")).path
    drop_in = (overlay / "etc/systemd/system/sshd.service.d/90-eulerbake-packer-builder.conf").read_text()
    exec_start = shlex.split(drop_in.strip().splitlines()[-1].partition("=")[2])
    options = [word for word in exec_start[1:] if not word.startswith("$") and word != "-D"]
    sample = REPO / "recipes/sample-root/root/etc/ssh/sshd_config"
    config = tmp_path / "sshd_config"
    stock = "".join(line for line in sample.read_text().splitlines(keepends=True) if not line.startswith("HostKey"))
    config.write_text(harden_sshd_config(stock))
    host_key = make_key(tmp_path / "host_key")

    def effective(*extra: str) -> dict[str, str]:
        proc = subprocess.run([str(SSHD), "-T", "-f", str(config), "-h", str(host_key), *extra,
                               "-C", "user=root,host=builder,addr=192.0.2.10"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)

    assert options == ["-o", "PermitRootLogin=prohibit-password"]
    assert effective()["permitrootlogin"] == "no"
    with_drop_in = effective(*options)
    assert with_drop_in["permitrootlogin"] == "without-password"  # sshd's name for prohibit-password
    assert with_drop_in["passwordauthentication"] == "no" and with_drop_in["pubkeyauthentication"] == "yes"


def test_same_key_same_overlay_bytes_and_another_key_another_overlay(tmp_path: Path) -> None:
    other = normalise_public_key(make_key(tmp_path / "other").with_suffix(".pub").read_text())
    first = Store(tmp_path / "a").realise(authorized_key_overlay("sample", builder_public_key())).path
    again = Store(tmp_path / "b").realise(authorized_key_overlay("sample")).path
    assert hashing.hash_tree(first) == hashing.hash_tree(again)
    assert first.name == again.name
    assert authorized_key_overlay("sample", other).key != authorized_key_overlay("sample").key


# -- the template --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
def test_both_templates_render_and_pass_packer_validate(arch: str, tmp_path: Path) -> None:
    out = Store(tmp_path / "store").realise(template_for(arch)).path
    key = make_key(tmp_path / "validate-key")
    for name in (HCL, JSON_TWIN):
        proc = validate(out / name, key)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    hcl, twin = (out / HCL).read_text(), json.loads((out / JSON_TWIN).read_text())
    builder = twin["builders"][0]
    assert f'source_ami              = "{BASE_AMI}"' in hcl and builder["source_ami"] == BASE_AMI
    assert builder["region"] == REGION and builder["ami_regions"] == [REGION]
    assert builder["instance_type"] == {"x86_64": "t3a.micro", "aarch64": "t4g.micro"}[arch]
    assert builder["ssh_username"] == "root" and builder["ena_support"] is True
    assert '"eulerbake_key" = var.eulerbake_key' in hcl
    assert builder["tags"]["eulerbake_key"] == "{{user `eulerbake_key`}}"
    assert "ssh_private_key_file    = var.ssh_private_key_file" in hcl
    for text in (hcl, (out / JSON_TWIN).read_text()):
        assert "ssh_password" not in text and "openEuler12" not in text  # the seed's stock password
    description = json.loads((out / "template.json").read_text())
    assert description["source_ami"] == BASE_AMI and description["public_key"] == builder_public_key()


@pytest.mark.parametrize("arch", ARCHES)
def test_the_script_installs_with_yes_and_regenerates_grub_on_both_arches(arch: str, tmp_path: Path) -> None:
    script = Store(tmp_path / "store").realise(template_for(arch)).path / SCRIPT
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert f"readonly EXPECTED_ARCH={arch}\n" in text and f"readonly GRUB_CFG={GRUB[arch]}\n" in text
    code = [line for line in text.splitlines() if not line.strip().startswith("#")]
    assert not [line for line in code if "arm64" in line]  # uname -m never says arm64 on openEuler
    assert '"$pm" -y update' in text
    assert '"$pm" -y install cloud-init cloud-utils-growpart gdisk' in text
    assert ("readonly PACKAGES=(vim tar make zip gzip wget git tmux conntrack-tools socat iptables-services htop)"
            in text)
    calls = [line.strip() for line in code if line.strip().startswith('"$pm" ')]
    assert len(calls) == 4 and all(call.startswith('"$pm" -y ') or call == '"$pm" clean all' for call in calls)
    main = text[text.index("main() {"):]
    steps = [line.strip() for line in main.splitlines()[1:main.splitlines().index("}")]]
    assert steps[-5:] == ["remove_builder_key /root/.ssh/authorized_keys", 'remove_sshd_override "$SSHD_DROP_IN"',
                          "forbid_root_login /etc/ssh/sshd_config /etc/ssh/sshd_config.d/*.conf",
                          "systemctl daemon-reload", "/usr/sbin/sshd -t"]


def test_the_last_step_removes_only_the_builder_key_and_forbids_root_login(tmp_path: Path) -> None:
    script = Store(tmp_path / "store").realise(template_for("x86_64")).path / SCRIPT
    other = normalise_public_key(make_key(tmp_path / "other").with_suffix(".pub").read_text())
    keys = tmp_path / "authorized_keys"
    keys.write_text(f"{builder_public_key()}\nno-pty {other}\n{builder_public_key().rsplit(' ', 1)[0]} renamed\n")
    only = tmp_path / "only_keys"
    only.write_text(builder_public_key() + "\n")
    config = tmp_path / "sshd_config"
    config.write_text("PermitRootLogin no\nPasswordAuthentication no\n#PermitRootLogin yes\n"
                      "PermitRootLogin prohibit-password\nMatch User admin\n    permitrootlogin=yes\n")
    drop_in = tmp_path / "sshd_config.d" / "50-cloud.conf"
    drop_in.parent.mkdir()
    drop_in.write_text("PermitRootLogin yes\n")
    bare = tmp_path / "bare_sshd_config"
    bare.write_text("UsePAM yes\n")
    override = tmp_path / "sshd.service.d" / "90-eulerbake-packer-builder.conf"
    override.parent.mkdir()
    override.write_text("[Service]\n")
    subprocess.run(["bash", "-c", 'source "$1"; remove_builder_key "$2"; remove_builder_key "$3"; '
                    'remove_builder_key "$4/absent"; forbid_root_login "$5" "$6"; forbid_root_login "$7"; '
                    'remove_sshd_override "$8"',
                    "_", str(script), str(keys), str(only), str(tmp_path), str(config), str(drop_in), str(bare),
                    str(override)], check=True)
    assert keys.read_text() == f"no-pty {other}\n"
    assert not only.exists()
    assert config.read_text() == ("PermitRootLogin no\nPasswordAuthentication no\n#PermitRootLogin yes\n"
                                  "PermitRootLogin no\nMatch User admin\n    PermitRootLogin no\n")
    assert drop_in.read_text() == "PermitRootLogin no\n"
    assert bare.read_text() == "PermitRootLogin no\nUsePAM yes\n"
    assert not override.exists() and not override.parent.exists()


def test_a_receipt_mapping_can_stand_for_an_ami_made_elsewhere(tmp_path: Path) -> None:
    node = packer_template("own", {"image_id": "ami-0fedcba9876543210", "region": REGION}, arch="x86_64",
                           region=REGION, ami_name="openEuler-own")
    assert node.dependencies() == []
    out = Store(tmp_path / "store").realise(node).path
    assert json.loads((out / JSON_TWIN).read_text())["builders"][0]["source_ami"] == "ami-0fedcba9876543210"
    with pytest.raises(EulerbakeError, match="is in eu-west-1"):
        packer_template("own", {"image_id": BASE_AMI, "region": "eu-west-1"}, arch="x86_64", region=REGION,
                        ami_name="openEuler-own")


def test_a_base_ami_in_another_region_or_a_bad_receipt_fails_the_stage(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    elsewhere = packer_template("x", Derivation(stage="test-base-ami", label="eu", builder=build_base_ami,
                                                params={"image_id": BASE_AMI, "region": "eu-west-1"}),
                                arch="x86_64", region=REGION, ami_name="openEuler-x")
    with pytest.raises(EulerbakeError, match="is in eu-west-1, but the Packer build runs in ap-northeast-1"):
        store.realise(elsewhere)
    garbled = packer_template("y", Derivation(stage="test-base-ami", label="bad", builder=build_base_ami,
                                              params={"image_id": "snap-0123", "region": REGION}),
                              arch="x86_64", region=REGION, ami_name="openEuler-y")
    with pytest.raises(EulerbakeError, match="invalid base AMI id 'snap-0123'"):
        store.realise(garbled)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"arch": "arm64"}, "unknown architecture 'arm64'"),
    ({"region": "Tokyo"}, "invalid AWS region"),
    ({"ami_name": "x"}, "invalid AMI name"),
    ({"ami_name": "name-with-${var.x}"}, "invalid AMI name"),
    ({"ami_description": "{{user `x`}}"}, "invalid AMI description"),
    ({"instance_type": "big"}, "invalid instance type"),
    ({"packages": ("vim; rm -rf /",)}, "invalid package name"),
    ({"public_key": "hunter2"}, "not an OpenSSH public key"),
])
def test_bad_parameters_are_refused_when_the_graph_is_built(kwargs: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"arch": "x86_64", "region": REGION, "ami_name": "openEuler-x", **kwargs}
    with pytest.raises(EulerbakeError, match=message):
        packer_template("x", base_ami(), **settings)  # type: ignore[arg-type]


def _broken_templates(tmp_path: Path, name: str, old: str, new: str) -> Path:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    path = templates / f"{name}.j2"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return templates


def test_an_undefined_template_variable_fails_with_jinja2s_message(tmp_path: Path) -> None:
    templates = _broken_templates(tmp_path, HCL, "{{ instance_type | hcl }}", "{{ instance_typo | hcl }}")
    node = template_for("x86_64", templates=templates)
    store = Store(tmp_path / "store")
    with pytest.raises(EulerbakeError, match="'instance_typo' is undefined") as err:
        store.realise(node)
    assert f"{HCL}.j2" in str(err.value)
    assert not store.has(node)


def test_a_template_packer_refuses_fails_the_stage_with_packers_message(tmp_path: Path) -> None:
    templates = _broken_templates(tmp_path, HCL, "  ena_support             = true\n",
                                  "  ena_support             = true\n  ena_supported = true\n")
    node = template_for("x86_64", templates=templates)
    store = Store(tmp_path / "store")
    with pytest.raises(EulerbakeError, match=f"packer validate refused the rendered {HCL}") as err:
        store.realise(node)
    assert 'An argument named "ena_supported" is not expected here' in str(err.value)
    assert not store.has(node)


def test_a_json_twin_packer_refuses_fails_the_stage_too(tmp_path: Path) -> None:
    templates = _broken_templates(tmp_path, JSON_TWIN, '"ena_support": true,', '"ena_support": true, "bogus": 1,')
    with pytest.raises(EulerbakeError, match=f"(?s)packer validate refused the rendered {JSON_TWIN}.*'\"bogus\"'"):
        Store(tmp_path / "store").realise(template_for("aarch64", templates=templates))


# -- secrets and reproducibility ----------------------------------------------------------------


def test_the_private_key_never_reaches_the_store_or_a_rendered_template(tmp_path: Path, state_home: Path) -> None:
    store_root = tmp_path / "store"
    store = Store(store_root)
    outputs = [store.realise(authorized_key_overlay("sample")).path]
    outputs += [store.realise(template_for(arch)).path for arch in ARCHES]
    private = builder_key_path(create=False)
    forms = private_key_forms(private)
    checked = 0
    for path in files_under(store_root):
        data = path.read_bytes()
        assert not any(form in data for form in forms), f"{path} holds the builder's private key"
        assert b"PRIVATE KEY" not in data, f"{path} holds a private key"
        assert str(state_home).encode() not in data, f"{path} names the private key's location"
        checked += 1
    assert checked > 10  # outputs, metadata, seals and build logs were all looked at
    for out in outputs[1:]:
        assert builder_key.key_blob(builder_public_key()) in (out / SCRIPT).read_text()  # the public half only
        assert not (out / "validate-key").exists()


def _build_all(store: Store) -> dict[str, Path]:
    nodes = [authorized_key_overlay("sample"), *(template_for(arch) for arch in ARCHES)]
    return {node.task_name: store.realise(node).path for node in nodes}


def test_same_inputs_give_bit_identical_outputs_under_another_umask_and_tz(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _build_all(Store(tmp_path / "one"))
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    previous = os.umask(0o077)
    try:
        second = _build_all(Store(tmp_path / "two"))
    finally:
        os.umask(previous)
        monkeypatch.undo()
        time.tzset()
    assert first.keys() == second.keys()
    for task, path in first.items():
        assert path.name == second[task].name, f"{task}: another key"
        files = sorted(p.relative_to(path) for p in files_under(path))
        assert files == sorted(p.relative_to(second[task]) for p in files_under(second[task]))
        for rel in files:
            assert (path / rel).read_bytes() == (second[task] / rel).read_bytes(), f"{task}: {rel} differs"
            assert (path / rel).stat().st_mode == (second[task] / rel).stat().st_mode
        assert hashing.hash_tree(path) == hashing.hash_tree(second[task])


# -- the publication ----------------------------------------------------------------------------


def test_the_ami_id_is_parsed_from_packers_machine_readable_output() -> None:
    assert parse_artifact_ids(RECORDED_BUILD) == {"ap-northeast-1": "ami-0a1b2c3d4e5f67890"}
    copied = RECORDED_BUILD.replace("artifact,0,id,ap-northeast-1:ami-0a1b2c3d4e5f67890",
                                    "artifact,0,id,ap-northeast-1:ami-0a1b2c3d4e5f67890%!(PACKER_COMMA)"
                                    "eu-west-1:ami-0fedcba9876543210")
    assert parse_artifact_ids(copied) == {"ap-northeast-1": "ami-0a1b2c3d4e5f67890",
                                          "eu-west-1": "ami-0fedcba9876543210"}
    assert parse_artifact_ids("1700000000,,ui,error,Build 'amazon-ebs.openeuler' errored: timeout\n") == {}
    assert ui_messages(RECORDED_BUILD, "say")[2] == \
        "==> amazon-ebs.openeuler: Prevalidating any provided VPC information"
    assert ui_messages("1700000000,,ui,error,Build errored: InvalidAMIID.NotFound%!(PACKER_COMMA) gone\n", "error") \
        == ["Build errored: InvalidAMIID.NotFound, gone"]


def test_the_publication_runs_packer_on_the_template_and_its_key_ignores_credentials(
        monkeypatch: pytest.MonkeyPatch) -> None:
    template = template_for("x86_64")
    node = packer_ami("sample:x86_64", template)
    assert (node.stage, node.task_name, node.kind) == ("packer-ami", "packer-ami:sample:x86_64", "publication")
    assert node.dependencies() == [template] and "packer" in node.tools
    assert dict(node.target) == {"region": REGION, "profile": ""}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    assert packer_ami("sample:x86_64", template_for("x86_64")).key == node.key
    assert packer_ami("sample:x86_64", template, profile="prod").key != node.key
    assert packer_ami("sample:x86_64", template_for("aarch64")).key != node.key
    with pytest.raises(EulerbakeError, match="needs a packer-template"):
        packer_ami("x", base_ami())


def test_packer_is_not_started_with_a_key_the_base_ami_does_not_authorize(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = Store(tmp_path / "store").realise(template_for("x86_64")).path  # for the state directory's key
    monkeypatch.setenv(builder_key.KEY_FILE_ENV, str(make_key(tmp_path / "another-key")))
    ctx = BuildContext(inputs={"template": out}, params={}, out=tmp_path / "out", key="0" * 32, work=tmp_path,
                       secrets={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    with pytest.raises(EulerbakeError, match="is not the key the base AMI authorizes"):
        PUBLISHER.create(ctx, {"region": REGION, "profile": ""})


@pytest.mark.slow  # moto's EC2 backend takes ~8 s to start
def test_the_publisher_finds_by_tag_confirms_and_removes_against_moto(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moto = pytest.importorskip("moto")
    import boto3

    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    target = {"region": REGION, "profile": ""}
    secrets = PUBLISHER.secrets(target)  # boto3's standard chain: here, the environment
    assert secrets == {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
    with moto.mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        stock = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        instance = ec2.run_instances(ImageId=stock, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        made = ec2.create_image(InstanceId=instance, Name="openEuler-22.03-LTS-x86_64-" + "a" * 32)["ImageId"]
        ec2.create_tags(Resources=[made], Tags=[{"Key": "eulerbake_key", "Value": "a" * 32}])

        def ctx(key: str) -> BuildContext:
            return BuildContext(inputs={}, params={}, out=tmp_path, key=key, work=tmp_path, secrets=secrets,
                                log=lambda _message: None)

        assert PUBLISHER.find(ctx("b" * 32), target) is None
        receipt = PUBLISHER.find(ctx("a" * 32), target)
        assert receipt == {"image_id": made, "region": REGION}
        assert PUBLISHER.exists(receipt, secrets)
        snapshots = [m["Ebs"]["SnapshotId"] for m in ec2.describe_images(ImageIds=[made])["Images"][0]
                     ["BlockDeviceMappings"]]
        PUBLISHER.remove(receipt, secrets)
        assert not PUBLISHER.exists(receipt, secrets)
        remaining = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
        assert not remaining & set(snapshots)
        PUBLISHER.remove(receipt, secrets)  # already gone: nothing to do, no error


@pytest.mark.slow  # packer gives up on the unreachable (or refusing) EC2 endpoint after ~45 s
def test_packer_build_runs_the_template_and_a_failure_is_packers_message(tmp_path: Path) -> None:
    """The real `packer build` with the builder key and fake credentials: it gets as far as asking EC2, and
    its refusal (no network here; AuthFailure with one) is one message; no receipt comes back."""
    out = Store(tmp_path / "store").realise(template_for("x86_64")).path
    work = tmp_path / "work"
    work.mkdir()
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAEULERBAKETEST", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret-key",
               "AWS_MAX_ATTEMPTS": "1"}
    messages: list[str] = []
    ctx = BuildContext(inputs={"template": out}, params={}, out=tmp_path / "out", key="c" * 32, work=work,
                       secrets=secrets, log=messages.append)
    with pytest.raises(EulerbakeError, match=r"packer build failed \(exit 1\)") as err:
        PUBLISHER.create(ctx, {"region": REGION, "profile": ""})
    assert "amazon-ebs.openeuler" in str(err.value)
    assert any("packer build amazon-ebs.pkr.hcl" in message for message in messages)
    forms = private_key_forms(builder_key_path(create=False))
    for path in files_under(work):
        assert not any(form in path.read_bytes() for form in forms)
