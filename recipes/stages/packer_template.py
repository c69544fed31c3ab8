"""Stage `packer-template`: the Packer `amazon-ebs` build that adds cloud-init to the base AMI, rendered and
validated, ready for stage `packer-ami` to run.

From the base AMI's receipt (`receipt.json` → `resource.image_id` of the input publication) and the
jinja2 templates in `overlays/packer/`, it renders `amazon-ebs.pkr.hcl` (HCL2), its JSON twin
`amazon-ebs.json` (for Packer before 1.5) and `install-cloudinit.sh` (the seed's script with `-y`
everywhere and grub regenerated on both arches), then runs `packer validate` on both templates, so an
invalid template fails here with Packer's own message and not twenty minutes into an EC2 build.

No password anywhere: Packer logs in with the builder key (`builder_key.py`). Only its public key is a
parameter; the templates take the private key's path as the variable `ssh_private_key_file`, given at
build time. Validation uses a throw-away key made in the scratch directory, which never reaches the
output. The AMI's `eulerbake_key` tag is the variable `eulerbake_key`: the publication's key, which
depends on this stage's output and so cannot be rendered into it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eulerbake.core.derivation import BuildContext, Derivation, LocalTree, Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.run import CommandError, run

from recipes.stages.builder_key import SSHD_DROP_IN, builder_public_key, key_blob, normalise_public_key
from recipes.stages.render import render

TEMPLATES = Path(__file__).resolve().parents[2] / "overlays" / "packer"
HCL = "amazon-ebs.pkr.hcl"
JSON_TWIN = "amazon-ebs.json"
SCRIPT = "install-cloudinit.sh"
DESCRIPTION = "template.json"  # what `packer-ami` reads: the files, the public key, the region
VARIABLES = ("eulerbake_key", "ssh_private_key_file")  # given to `packer build`, never rendered
TOOLS = ("packer", "ssh-keygen")  # ssh-keygen makes the throw-away key `packer validate` reads

GRUB_CONFIGS = {"x86_64": "/boot/grub2/grub.cfg", "aarch64": "/boot/efi/EFI/openEuler/grub.cfg"}
DEFAULT_INSTANCE_TYPES = {"x86_64": "t3a.micro", "aarch64": "t4g.micro"}
# The seed's tool list (its install-cloudinit.sh), after cloud-init, cloud-utils-growpart and gdisk.
SEED_PACKAGES = ("vim", "tar", "make", "zip", "gzip", "wget", "git", "tmux", "conntrack-tools", "socat",
                 "iptables-services", "htop")
VALIDATION_KEY = "0" * 32  # the `eulerbake_key` packer validate sees

_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_AMI_ID_RE = re.compile(r"^ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_AMI_NAME_RE = re.compile(r"^[A-Za-z0-9()\[\] ./'@_-]{3,95}$")  # AWS's charset; 128 minus "-<key>"
_INSTANCE_TYPE_RE = re.compile(r"^[a-z0-9-]+\.[a-z0-9-]+$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_DURATION_RE = re.compile(r"^\d+[smh]$")
_TEXT_RE = re.compile(r"^[ !#&-z|~]{0,255}$")  # printable ASCII without " $ % \ { } (no interpolation)


@dataclass(frozen=True)
class Params:
    arch: str
    region: str
    ami_regions: tuple[str, ...]
    source_ami: str  # "" when it comes from the `base-ami` input's receipt
    public_key: str  # normalised builder public key
    ssh_username: str
    ssh_timeout: str
    instance_type: str
    ami_name: str
    ami_description: str
    packages: tuple[str, ...]
    update: bool  # `dnf -y update` before installing


def _check(value: str, pattern: re.Pattern[str], what: str, example: str) -> str:
    if not pattern.match(value):
        raise EulerbakeError(f"invalid {what} {value!r}", hint=f"use something like {example!r}")
    return value


def read_base_ami(receipt_dir: Path, region: str) -> str:
    """The image id in a base-AMI publication's receipt, which must be in `region`."""
    path = receipt_dir / "receipt.json"
    try:
        resource = json.loads(path.read_text())["resource"]
        image_id, where = str(resource["image_id"]), resource.get("region")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EulerbakeError(f"cannot read the base AMI id from {path}: {type(exc).__name__}: {exc}",
                             hint="the base-ami input must be a publication whose receipt has resource.image_id") \
            from None
    _check(image_id, _AMI_ID_RE, "base AMI id", "ami-0123456789abcdef0")
    if where is not None and where != region:
        raise EulerbakeError(f"the base AMI {image_id} is in {where}, but the Packer build runs in {region}",
                             hint=f"build in {where}, or publish the base AMI to {region}")
    return image_id


def template_variables(params: Params, source_ami: str) -> dict[str, Any]:
    """What the three templates are rendered with."""
    tags = sorted({"Name": params.ami_name, "eulerbake_arch": params.arch, "eulerbake_source_ami": source_ami}.items())
    return {
        "arch": params.arch,
        "region": params.region,
        "ami_regions": list(params.ami_regions),
        "source_ami": source_ami,
        "instance_type": params.instance_type,
        "ssh_username": params.ssh_username,
        "ssh_timeout": params.ssh_timeout,
        "ami_name": params.ami_name,
        "ami_description": params.ami_description,
        "tags": tags,
        "script": SCRIPT,
        "grub_cfg": GRUB_CONFIGS[params.arch],
        "key_blob": key_blob(params.public_key),
        "sshd_drop_in": SSHD_DROP_IN,
        "packages": list(params.packages),
        "update": params.update,
    }


@contextmanager
def packer_environment(work: Path) -> Iterator[dict[str, str]]:
    """Packer's environment: its own HOME (no user plugin or config changes what it accepts) and a short TMPDIR.

    Packer talks to its builder and provisioner plugins over unix sockets in TMPDIR, whose path may be
    108 bytes at most; the build's own TMPDIR, deep in the store, can be longer ("bind: invalid argument").
    """
    home = work / "home"
    home.mkdir(exist_ok=True)
    base = tempfile.gettempdir()
    sockets = Path(tempfile.mkdtemp(prefix="eulerbake-packer-", dir=base if len(base) <= 40 else "/tmp"))
    try:
        yield {"HOME": str(home), "TMPDIR": str(sockets), "CHECKPOINT_DISABLE": "1",
               "PACKER_CACHE_DIR": str(work / "packer_cache")}
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def packer_validate(ctx: BuildContext, template: Path) -> None:
    """`packer validate` with a throw-away key and a placeholder key tag; a refusal is Packer's message."""
    key = ctx.work / "validate-key"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "eulerbake-packer-validate", "-f", key])
    try:
        with packer_environment(ctx.work) as env:
            run(["packer", "validate", "-var", f"ssh_private_key_file={key}",
                 "-var", f"eulerbake_key={VALIDATION_KEY}", template], cwd=ctx.work, env=env)
    except CommandError as err:
        raise EulerbakeError(
            f"packer validate refused the rendered {template.name}:\n{err.output_tail.rstrip()}",
            hint=f"fix {TEMPLATES.name}/{template.name}.j2 (or the stage parameters it renders)",
        ) from None


def build(ctx: BuildContext) -> None:
    params: Params = ctx.params
    templates = ctx.inputs["templates"]
    source_ami = params.source_ami or read_base_ami(ctx.inputs["base-ami"], params.region)
    variables = template_variables(params, source_ami)
    for name in (HCL, JSON_TWIN, SCRIPT):
        (ctx.out / name).write_text(render(templates / f"{name}.j2", variables))
    (ctx.out / SCRIPT).chmod(0o755)
    try:
        json.loads((ctx.out / JSON_TWIN).read_text())
    except ValueError as exc:
        raise EulerbakeError(f"the rendered {JSON_TWIN} is not JSON: {exc}", hint=f"fix {JSON_TWIN}.j2") from None
    for name in (HCL, JSON_TWIN):
        packer_validate(ctx, ctx.out / name)
    description = {"arch": params.arch, "region": params.region, "ami_regions": list(params.ami_regions),
                   "source_ami": source_ami, "ami_name": params.ami_name, "public_key": params.public_key,
                   "template": HCL, "json_template": JSON_TWIN, "script": SCRIPT, "variables": list(VARIABLES)}
    (ctx.out / DESCRIPTION).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    ctx.log(f"packer-template: {HCL} and {JSON_TWIN} validated ({params.arch}, {source_ami} in {params.region})")


def packer_template(
    label: str,
    base_ami: Node | Mapping[str, str],
    *,
    arch: str,
    region: str,
    ami_name: str,
    public_key: str | None = None,
    ssh_username: str = "root",
    instance_type: str | None = None,
    ami_description: str | None = None,
    ami_regions: tuple[str, ...] = (),
    packages: tuple[str, ...] = SEED_PACKAGES,
    update: bool = True,
    ssh_timeout: str = "20m",
    templates: Path = TEMPLATES,
) -> Derivation:
    """Stage `packer-template:<label>`: the validated amazon-ebs build over `base_ami`.

    `base_ami` is the base AMI's publication (its receipt names the image), or, for an AMI made
    elsewhere, a receipt-like mapping `{"image_id": "ami-…", "region": "…"}`. `public_key` defaults
    to the builder key's (made on first use, see `builder_key`).
    """
    if arch not in GRUB_CONFIGS:
        raise EulerbakeError(f"unknown architecture {arch!r}", hint=f"use one of {sorted(GRUB_CONFIGS)}")
    _check(region, _REGION_RE, "AWS region", "ap-northeast-1")
    regions = tuple(dict.fromkeys((region, *ami_regions)))
    for name in regions:
        _check(name, _REGION_RE, "AMI region", "eu-west-1")
    _check(ami_name, _AMI_NAME_RE, "AMI name (3-95 characters of A-Za-z0-9()[] ./'@_-)", "openEuler-22.03-LTS-x86_64")
    description = ami_description if ami_description is not None else \
        f"{ami_name} ({arch}) with cloud-init, baked by eulerbake"
    _check(description, _TEXT_RE, "AMI description", "openEuler 22.03 LTS with cloud-init")
    instance = _check(instance_type or DEFAULT_INSTANCE_TYPES[arch], _INSTANCE_TYPE_RE, "instance type", "t3a.micro")
    _check(ssh_username, _USER_RE, "ssh user name", "root")
    _check(ssh_timeout, _DURATION_RE, "ssh timeout", "20m")
    for package in packages:
        _check(package, _PACKAGE_RE, "package name", "cloud-utils-growpart")
    inputs: dict[str, Node | LocalTree] = {"templates": LocalTree(Path(templates))}
    source_ami = ""
    if isinstance(base_ami, Node):
        inputs["base-ami"] = base_ami
    else:
        source_ami = _check(str(base_ami.get("image_id", "")), _AMI_ID_RE, "base AMI id", "ami-0123456789abcdef0")
        where = base_ami.get("region", region)
        if where != region:
            raise EulerbakeError(f"the base AMI {source_ami} is in {where}, but the Packer build runs in {region}",
                                 hint=f"build in {where}")
    key = normalise_public_key(public_key) if public_key is not None else builder_public_key()
    return Derivation(
        stage="packer-template",
        label=label,
        builder=build,
        inputs=inputs,
        params=Params(arch=arch, region=region, ami_regions=regions, source_ami=source_ami, public_key=key,
                      ssh_username=ssh_username, ssh_timeout=ssh_timeout, instance_type=instance, ami_name=ami_name,
                      ami_description=description, packages=tuple(packages), update=bool(update)),
        tools=TOOLS,
        doc=f"Packer amazon-ebs template ({arch}, {region}, {instance}): cloud-init on the base AMI, packer-validated",
    )
