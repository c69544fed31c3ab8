"""Stage `packer-ami`: run the rendered Packer build (stage `packer-template`) and record the AMI it made.

A publication: its output is the receipt `{"image_id", "region"}` (plus `copies` when the template
copies the AMI to more regions). The publisher runs `packer build -machine-readable` on the rendered
HCL2 template with the builder's private key path and this publication's key as variables, so the key
never enters the store and the AMI is tagged `eulerbake_key=<key>`: `find` adopts an AMI already tagged
with the key (a run killed after Packer finished publishes nothing twice), `exists` asks EC2
(`describe_images`), `remove` deregisters the AMI and deletes its snapshots. Credentials come from
boto3's standard chain (`AWS_PROFILE`, env, SSO, instance role) and reach Packer as environment
variables only; the engine masks them in logs and refuses a receipt holding one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eulerbake.core.derivation import BuildContext, Derivation
from eulerbake.core.errors import EulerbakeError
from eulerbake.core.publication import Publication
from eulerbake.tools.run import run

from recipes.stages.builder_key import KEY_FILE_ENV, builder_key_path, public_key_of
from recipes.stages.packer_template import DESCRIPTION, HCL, packer_environment

TOOLS = ("packer", "ssh-keygen")  # ssh-keygen: the private key is checked against the template's public key
TAG = "eulerbake_key"
PACKER_COMMA = "%!(PACKER_COMMA)"  # how -machine-readable escapes a comma inside a field
USABLE_STATES = ("available", "pending")


def _unescape(field: str) -> str:
    return field.replace(PACKER_COMMA, ",").replace("\\n", "\n").replace("\\r", "\r")


def machine_readable_records(output: str) -> list[tuple[str, str, list[str]]]:
    """(target, type, data fields) of each `timestamp,target,type,data…` line of `packer -machine-readable`."""
    records = []
    for line in output.splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[0].isdigit():
            records.append((fields[1], fields[2], [_unescape(field) for field in fields[3:]]))
    return records


def ui_messages(output: str, kind: str) -> list[str]:
    """The `ui,<kind>` messages (say, message, error) of a machine-readable run, in order."""
    return [",".join(data[1:]) for _target, type_, data in machine_readable_records(output)
            if type_ == "ui" and data[:1] == [kind]]


def parse_artifact_ids(output: str) -> dict[str, str]:
    """{region: AMI id} from the `artifact,0,id,<region>:<ami>[,<region>:<ami>…]` line of an amazon-ebs build."""
    images: dict[str, str] = {}
    for _target, type_, data in machine_readable_records(output):
        if type_ == "artifact" and len(data) >= 3 and data[0] == "0" and data[1] == "id":
            for pair in ",".join(data[2:]).split(","):
                region, _, image_id = pair.strip().partition(":")
                if region and image_id.startswith("ami-"):
                    images[region] = image_id
    return images


def _ec2(region: str, secrets: Mapping[str, str]) -> Any:
    import boto3  # only when publishing: every doit run imports the recipes
    from botocore.config import Config

    return boto3.client(
        "ec2", region_name=region,
        aws_access_key_id=secrets.get("AWS_ACCESS_KEY_ID"), aws_secret_access_key=secrets.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=secrets.get("AWS_SESSION_TOKEN") or None,
        config=Config(retries={"mode": "adaptive", "max_attempts": 10}, connect_timeout=10, read_timeout=60),
    )


def _not_found(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return str(code).startswith(("InvalidAMIID.", "InvalidSnapshot.NotFound"))


def _images(receipt: Mapping[str, Any]) -> dict[str, str]:
    """{region: AMI id} of every image a receipt names (the AMI and its copies)."""
    return {str(receipt["region"]): str(receipt["image_id"]), **dict(receipt.get("copies", {}))}


@dataclass(frozen=True)
class PackerPublisher:
    """`packer build` of a `packer-template` output; the AMI is found again by its `eulerbake_key` tag."""

    def secrets(self, target: Mapping[str, Any]) -> Mapping[str, str]:
        import boto3

        credentials = boto3.Session(profile_name=target.get("profile") or None).get_credentials()
        if credentials is None:
            raise EulerbakeError("no AWS credentials found for the Packer build",
                                 hint="set AWS_PROFILE (or run `aws sso login`), export AWS_ACCESS_KEY_ID/"
                                 "AWS_SECRET_ACCESS_KEY, or run on an instance with a role")
        frozen = credentials.get_frozen_credentials()
        found = {"AWS_ACCESS_KEY_ID": frozen.access_key, "AWS_SECRET_ACCESS_KEY": frozen.secret_key}
        if frozen.token:
            found["AWS_SESSION_TOKEN"] = frozen.token
        return found

    def find(self, ctx: BuildContext, target: Mapping[str, Any]) -> dict[str, Any] | None:
        region = str(target["region"])
        ec2 = _ec2(region, ctx.secrets)
        answer = ec2.describe_images(Owners=["self"], Filters=[{"Name": f"tag:{TAG}", "Values": [ctx.key]}])
        images = sorted((image for image in answer.get("Images", []) if image.get("State") in USABLE_STATES),
                        key=lambda image: (image.get("CreationDate", ""), image["ImageId"]))
        if not images:
            return None
        image = images[0]
        if image["State"] == "pending":
            ctx.log(f"packer-ami: {image['ImageId']} (tagged with this key) is still pending; waiting for it")
            ec2.get_waiter("image_available").wait(ImageIds=[image["ImageId"]],
                                                   WaiterConfig={"Delay": 15, "MaxAttempts": 240})
        return {"image_id": image["ImageId"], "region": region}

    def create(self, ctx: BuildContext, target: Mapping[str, Any]) -> dict[str, Any]:
        template = ctx.inputs["template"]
        description = json.loads((template / DESCRIPTION).read_text())
        region = str(target["region"])
        key = builder_key_path(create=False)
        if public_key_of(key) != description["public_key"]:
            raise EulerbakeError(
                f"the builder key {key} is not the key the base AMI authorizes (the template was rendered for "
                f"{description['public_key'][:40]}…)",
                hint=f"set {KEY_FILE_ENV} to the key the base image was made with, or rebuild the base image and "
                "the template with this key",
            )
        ctx.log(f"packer-ami: packer build {HCL}: {description['source_ami']} in {region} → {description['ami_name']}"
                " (an EC2 instance runs install-cloudinit.sh; typically 10-20 minutes)")
        # No timeout: killing packer would leave its instance running; its own AWS waits are bounded.
        def progress(line: str) -> None:  # what packer says, as it says it (a build takes minutes)
            for message in ui_messages(line, "say"):
                for said in message.strip().splitlines():
                    ctx.log(f"packer-ami: {said}")

        with packer_environment(ctx.work) as env:
            proc = run(["packer", "build", "-machine-readable", "-var", f"ssh_private_key_file={key}",
                        "-var", f"{TAG}={ctx.key}", template / HCL], cwd=ctx.work, env={**ctx.secrets, **env},
                       check=False, on_line=progress)
        output = proc.stdout.decode(errors="replace")
        if proc.returncode != 0:
            said = [line for message in ui_messages(output, "message") for line in message.splitlines() if line.strip()]
            errors = ui_messages(output, "error") or [proc.stderr.decode(errors="replace")]
            # The provisioner's last words (install-cloudinit.sh's output), then Packer's errors.
            lines = said[-15:] + [line for error in errors for line in error.strip().splitlines() if line.strip()]
            raise EulerbakeError(
                f"packer build failed (exit {proc.returncode}):\n" + "\n".join(f"  | {line}" for line in lines),
                hint="packer cleans up what it launched (-on-error=cleanup); fix the cause and run again "
                "(an AMI it made anyway is adopted by its eulerbake_key tag)",
            )
        images = parse_artifact_ids(output)
        if region not in images:
            raise EulerbakeError(f"packer build reported no AMI in {region} (artifacts: {images or 'none'})",
                                 hint="check the template's region; an AMI made anyway is adopted by its tag next run")
        receipt: dict[str, Any] = {"image_id": images.pop(region), "region": region}
        if images:
            receipt["copies"] = dict(sorted(images.items()))
        return receipt

    def exists(self, receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> bool:
        try:
            answer = _ec2(str(receipt["region"]), secrets).describe_images(ImageIds=[str(receipt["image_id"])])
        except Exception as exc:
            if _not_found(exc):
                return False
            raise
        return any(image.get("State") in USABLE_STATES for image in answer.get("Images", []))

    def remove(self, receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        """Deregister the AMI (and its copies), then delete the snapshots behind them."""
        for region, image_id in _images(receipt).items():
            ec2 = _ec2(region, secrets)
            try:
                images = ec2.describe_images(ImageIds=[image_id]).get("Images", [])
            except Exception as exc:
                if _not_found(exc):
                    continue
                raise
            if not images:
                continue  # already deregistered
            mappings = [mapping for image in images for mapping in image.get("BlockDeviceMappings", [])]
            snapshots = [m["Ebs"]["SnapshotId"] for m in mappings if m.get("Ebs", {}).get("SnapshotId")]
            try:
                ec2.deregister_image(ImageId=image_id)
            except Exception as exc:
                if not _not_found(exc):
                    raise
            for snapshot in snapshots:
                try:
                    ec2.delete_snapshot(SnapshotId=snapshot)
                except Exception as exc:
                    if not _not_found(exc):
                        raise


PUBLISHER = PackerPublisher()


def packer_ami(label: str, template: Derivation, *, profile: str | None = None) -> Publication:
    """Stage `packer-ami:<label>`: `packer build` of `template` (a `packer-template`); the receipt names the AMI."""
    if template.stage != "packer-template":
        raise EulerbakeError(f"packer_ami needs a packer-template derivation, got {template.task_name}",
                             hint="pass packer_template(...)")
    region = template.params.region
    return Publication(
        stage="packer-ami",
        label=label,
        publisher=PUBLISHER,
        target={"region": region, "profile": profile or ""},
        inputs={"template": template},
        tools=TOOLS,
        doc=f"AMI with cloud-init from {template.task_name} (packer build in {region})",
    )
