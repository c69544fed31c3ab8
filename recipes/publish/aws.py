"""Stage `ami`: the raw disk (`raw:<release>:<arch>`) published as a registered AMI, with boto3.

`ami(label, raw, …)` returns a `Publication`; its key covers the raw disk's key and the target (endpoint,
region, profile *name*, AMI name, arch, via, bucket), never a credential. `AmiPublisher` does the work:

- credentials: boto3's standard chain (`profile=`/AWS_PROFILE, environment, shared files, SSO, instance
  role), resolved once into `ctx.secrets`; clients use adaptive retries and bounded timeouts;
- the snapshot: EBS direct (`ebs.py`, default: only the data blocks cross the wire) or S3 import
  (`s3import.py`, the seed's path);
- RegisterImage as a current AMI should be — hvm, /dev/xvda on gp3 deleted on termination, ENA,
  `BootMode` from the disk (legacy-bios for the x86_64 dos disk, uefi for the aarch64 GPT+ESP one),
  `ImdsSupport v2.0` — tagged with the store key, release, arch, the raw disk's key, sha256 and the sha256
  of its signed provenance (`eulerbake audit ami-…` checks it) by
  TagSpecifications (atomic on AWS) and CreateTags again (moto ignores TagSpecifications);
- idempotent by tag: `find` adopts an AMI tagged with the key, `create` adopts a completed snapshot
  tagged with it (a run killed before RegisterImage) and deletes a half-made one (a run killed during
  the upload), so an account never holds two of either for one key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, Derivation, Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.core.publication import Publication
from eulerbake.provenance import provenance_path

from recipes.publish import aws_error, s3import, wait_until
from recipes.publish import ebs as ebs_upload

ARCHITECTURES = {"x86_64": "x86_64", "aarch64": "arm64"}  # eulerbake's arch → EC2's Architecture
BOOT_MODES = ("legacy-bios", "uefi", "uefi-preferred")
VIAS = ("ebs", "s3")
KEY_TAG = "eulerbake:key"
ROOT_DEVICE = "/dev/xvda"
ESP_TYPES = {"C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "EF"}  # GPT type GUID, dos type byte
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"  # GPT BIOS boot partition (grub's core.img)
AMI_NAME_RE = re.compile(r"^[A-Za-z0-9()\[\] ./'@_-]{3,128}$")  # what RegisterImage accepts
USABLE_IMAGE_STATES = ("available", "pending")
SHA_CHUNK = 4 << 20
_ZEROS = bytes(SHA_CHUNK)


# -- credentials and clients ---------------------------------------------------------------------------


def standard_credentials(profile: str | None) -> dict[str, str]:
    """boto3's standard credential chain, resolved now (SSO and role credentials are fetched once)."""
    import boto3
    import botocore.exceptions

    where = f"profile {profile!r}" if profile else "AWS_PROFILE, the environment, ~/.aws, SSO or an instance role"
    try:
        credentials = boto3.session.Session(profile_name=profile or None).get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
    except botocore.exceptions.ProfileNotFound:
        raise EulerbakeError(f"the AWS profile {profile!r} is not configured on this machine",
                             hint=f"aws configure --profile {profile} (or aws configure sso), or drop profile= "
                             "to use the default credential chain") from None
    except botocore.exceptions.BotoCoreError as exc:  # an expired SSO token, a broken credential_process
        raise EulerbakeError(f"the AWS credentials from {where} could not be loaded: {exc}",
                             hint="aws sso login" + (f" --profile {profile}" if profile else "") +
                             ", or check the credential_process / role settings in ~/.aws/config") from None
    if frozen is None or not frozen.access_key or not frozen.secret_key:
        raise EulerbakeError(f"no AWS credentials found (looked in {where})",
                             hint="set AWS_PROFILE (aws configure / aws configure sso), or export "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run on a machine with an instance role")
    secrets = {"aws_access_key_id": frozen.access_key, "aws_secret_access_key": frozen.secret_key}
    if frozen.token:
        secrets["aws_session_token"] = frozen.token
    return secrets


class Clients:
    """boto3 clients for one region and endpoint, made on first use (each costs ~50 ms to build)."""

    def __init__(self, region: str, endpoint: str, secrets: Mapping[str, str], *, workers: int = 8) -> None:
        import boto3
        from botocore.config import Config

        self._session = boto3.session.Session(
            aws_access_key_id=secrets.get("aws_access_key_id"),
            aws_secret_access_key=secrets.get("aws_secret_access_key"),
            aws_session_token=secrets.get("aws_session_token") or None,
            region_name=region,
        )
        self._endpoint = endpoint or None
        # Adaptive retries slow every worker down together when AWS throttles (one client is shared);
        # bounded timeouts turn a stalled connection into a retry instead of a hang.
        self._config = Config(retries={"mode": "adaptive", "max_attempts": 10}, connect_timeout=10, read_timeout=120,
                              max_pool_connections=workers + 8, user_agent_extra="eulerbake")
        self._lock = threading.Lock()

    def _client(self, service: str) -> Any:
        with self._lock:  # a boto3 session is not thread-safe; the clients it makes are
            return self._session.client(service, endpoint_url=self._endpoint, config=self._config)

    @cached_property
    def ec2(self) -> Any:
        return self._client("ec2")

    @cached_property
    def ebs(self) -> Any:
        return self._client("ebs")

    @cached_property
    def s3(self) -> Any:
        return self._client("s3")

    @cached_property
    def iam(self) -> Any:
        return self._client("iam")


# -- the disk ------------------------------------------------------------------------------------------


def read_layout(raw_dir: Path) -> dict[str, Any]:
    """disk.json of the raw stage: the partition table (label, partitions), root number, disk size."""
    try:
        layout: dict[str, Any] = json.loads((raw_dir / "disk.json").read_text())
        layout["table"]["label"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EulerbakeError(f"{raw_dir} has no readable disk.json ({exc})",
                             hint="publish the output of the raw stage (disk.raw + disk.json)") from None
    return layout


def boot_mode_for(arch: str, layout: Mapping[str, Any], requested: str) -> str:
    """The AMI's BootMode: what the disk can boot with (a dos disk has no ESP; Graviton boots UEFI only)."""
    table = layout["table"]
    types = {str(part.get("type", "")).upper() for part in table.get("partitions", [])}
    has_esp = bool(types & ESP_TYPES)
    if arch == "aarch64" and not (table["label"] == "gpt" and has_esp):
        raise EulerbakeError(f"an aarch64 AMI boots with UEFI only, but disk.raw has a {table['label']} table "
                             f"{'with' if has_esp else 'without'} an EFI system partition",
                             hint="publish an aarch64 raw disk with a GPT table and an ESP")
    if requested != "auto":
        if requested in ("uefi", "uefi-preferred") and not has_esp:
            raise EulerbakeError(f"boot_mode={requested!r} needs an EFI system partition, and disk.raw has none",
                                 hint="use boot_mode='legacy-bios' or leave it to the disk (boot_mode=None)")
        return requested
    if arch == "aarch64":
        return "uefi"
    if has_esp:  # x86_64 GPT with an ESP; a BIOS boot partition too means it boots both ways
        return "uefi-preferred" if BIOS_BOOT_TYPE in types else "uefi"
    return "legacy-bios"


def sparse_sha256(path: Path, stop: threading.Event | None = None) -> str:
    """sha256 of a sparse file: data regions read, holes fed as zeros (never read from the disk).

    SHA-256 has no shortcut for zeros, so the holes still cost CPU (~1.3 GB/s here); `create` runs this
    in a thread next to the upload, which waits on the network anyway.
    """
    sha = hashlib.sha256()

    def zeros(count: int) -> None:
        while count > 0:
            step = min(count, SHA_CHUNK)
            sha.update(_ZEROS if step == SHA_CHUNK else _ZEROS[:step])
            count -= step
            if stop is not None and stop.is_set():
                raise InterruptedError("stopped")

    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        position = 0
        for start, end in hashing.data_segments(fd, size):
            zeros(start - position)
            for offset in range(start, end, SHA_CHUNK):
                sha.update(os.pread(fd, min(SHA_CHUNK, end - offset), offset))
            position = end
        zeros(size - position)
    return sha.hexdigest()


def provenance_sha256(entry: Path) -> str:
    """sha256 of a store entry's signed provenance (`<entry>.provenance.json`); "" when it has none (no tag)."""
    path = provenance_path(entry)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def store_key_of(path: Path) -> str:
    """The store key of an input from its store path (`<key>-<name>`), for the tags."""
    key = path.name.split("-", 1)[0]
    return key if re.fullmatch(r"[0-9a-f]{32}", key) else ""


def _tags(pairs: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": name, "Value": value} for name, value in pairs.items() if value]


def _tag(resource: Mapping[str, Any], name: str) -> str:
    return next((tag["Value"] for tag in resource.get("Tags", []) if tag.get("Key") == name), "")


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


# -- the publisher -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AmiPublisher:
    """How an AMI is published; none of this is in the key (more workers do not make another AMI)."""

    workers: int = 64
    create_role: bool = False  # S3 import: create the vmimport role (the seed's policies) when it is missing
    poll: float = 2.0  # first pause between status polls; it grows to 30 s
    wait_timeout: float = 3 * 3600.0  # seconds to wait for a snapshot, an import task, an image
    snapshot_timeout_minutes: int = 24 * 60  # StartSnapshot Timeout: AWS errors a snapshot left pending longer

    def secrets(self, target: Mapping[str, Any]) -> Mapping[str, str]:
        return standard_credentials(target.get("profile") or None)

    def clients(self, target: Mapping[str, Any], secrets: Mapping[str, str]) -> Clients:
        return Clients(target["region"], target.get("endpoint", ""), secrets, workers=self.workers)

    # -- find: an AMI already tagged with the key ---------------------------------------------------------
    def find(self, ctx: BuildContext, target: Mapping[str, Any]) -> dict[str, Any] | None:
        images = tagged_images(self.clients(target, ctx.secrets).ec2, ctx.key)
        usable = [image for image in images if image.get("State") in USABLE_IMAGE_STATES]
        if not usable:
            return None
        image = min(usable, key=lambda found: str(found.get("CreationDate", "")))
        ctx.log(f"ami: {image['ImageId']} ({image.get('Name', '')}) is already tagged with key {ctx.key}: adopted")
        boot_mode = _tag(image, "eulerbake:boot-mode") or image.get("BootMode", "")
        return self._receipt(target, image["ImageId"], _image_snapshot(image), boot_mode=boot_mode, blocks_sent=0,
                             bytes_sent=0, adopted=True)

    # -- create: snapshot (adopted, or uploaded), then the image ----------------------------------------
    def create(self, ctx: BuildContext, target: Mapping[str, Any]) -> dict[str, Any]:
        raw_dir = ctx.inputs["raw"]
        disk = raw_dir / "disk.raw"
        layout = read_layout(raw_dir)
        boot_mode = boot_mode_for(target["arch"], layout, target.get("boot_mode", "auto"))
        size = disk.stat().st_size
        c = self.clients(target, ctx.secrets)
        base_tags = {"Name": target["name"], KEY_TAG: ctx.key, "eulerbake:release": target.get("release", ""),
                     "eulerbake:arch": target["arch"], "eulerbake:raw-key": store_key_of(raw_dir),
                     "eulerbake:via": target["via"]}
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
            known = layout.get("sha256")
            sha = hasher.submit(lambda: str(known) if known else sparse_sha256(disk, stop))
            try:
                snapshot_id, blocks, sent = self._snapshot(ctx, target, c, disk, size, base_tags)
            except BaseException:
                stop.set()
                raise
            try:
                image_tags = {**base_tags, "eulerbake:raw-sha256": sha.result(), "eulerbake:snapshot": snapshot_id,
                              "eulerbake:boot-mode": boot_mode,
                              "eulerbake:raw-provenance-sha256": provenance_sha256(raw_dir)}
                image_id = self._register(ctx, target, c, snapshot_id, size, boot_mode, image_tags)
            except BaseException:
                stop.set()
                ebs_upload.delete_snapshot_quietly(c.ec2, snapshot_id, ctx.log)
                raise
        ctx.log(f"ami: registered {image_id} ({target['name']}, {ARCHITECTURES[target['arch']]}, {boot_mode}) "
                f"from {snapshot_id}")
        return self._receipt(target, image_id, snapshot_id, boot_mode=boot_mode, blocks_sent=blocks, bytes_sent=sent,
                             adopted=False)

    def _snapshot(self, ctx: BuildContext, target: Mapping[str, Any], c: Clients, disk: Path, size: int,
                  tags: Mapping[str, str]) -> tuple[str, int, int]:
        """(snapshot id, blocks sent, bytes sent): a completed one left by a killed run, or a new one."""
        adopted, cleaned = self._leftover_snapshot(ctx, c, size)
        if adopted is not None:
            return adopted, 0, 0
        description = f"{target['name']} ({target['arch']}) disk, eulerbake key {ctx.key}"
        if target["via"] == "ebs":
            # A new token after a clean-up: AWS would answer a reused one with the snapshot just deleted.
            token = hashing.hash_bytes(f"{ctx.key}:start-snapshot:{','.join(cleaned)}".encode())[:32]
            upload = ebs_upload.upload_snapshot(
                c.ebs, c.ec2, disk, tags=_tags(tags), client_token=token, description=description,
                encrypted=bool(target.get("encrypted")), workers=self.workers,
                timeout_minutes=self.snapshot_timeout_minutes, wait_timeout=self.wait_timeout, poll=self.poll,
                log=ctx.log)
            ctx.log(f"ami: {upload.snapshot_id}: {upload.blocks_sent} of {size // ebs_upload.BLOCK_SIZE} blocks sent "
                    f"({upload.blocks_read} read) in {upload.seconds:.1f} s")
            return upload.snapshot_id, upload.blocks_sent, upload.bytes_sent
        return self._import(ctx, target, c, disk, tags, description)

    def _leftover_snapshot(self, ctx: BuildContext, c: Clients, size: int) -> tuple[str | None, list[str]]:
        """Snapshots tagged with the key: a completed one is adopted, half-made (pending/error) ones deleted.

        On AWS a snapshot reaches `completed` only after CompleteSnapshot checked every block (or after
        the import task finished), so a completed one is whole; one still pending belongs to a killed
        run (the store's per-key lock keeps two runs of one key on one machine apart).
        """
        try:
            found = [snapshot for page in c.ec2.get_paginator("describe_snapshots").paginate(
                OwnerIds=["self"], Filters=[{"Name": f"tag:{KEY_TAG}", "Values": [ctx.key]}])
                for snapshot in page.get("Snapshots", [])]
        except Exception as exc:
            raise aws_error(exc, "looking for snapshots tagged with the key") from None
        adopted: str | None = None
        cleaned: list[str] = []
        for snapshot in sorted(found, key=lambda s: str(s.get("StartTime", ""))):
            whole = snapshot.get("State") == "completed" and snapshot.get("VolumeSize") == ebs_upload.volume_gib(size)
            if whole and adopted is None:
                adopted = snapshot["SnapshotId"]
                ctx.log(f"ami: adopting the completed snapshot {adopted} a previous run made for key {ctx.key}")
                continue
            try:
                c.ec2.delete_snapshot(SnapshotId=snapshot["SnapshotId"])
            except Exception as exc:
                raise aws_error(exc, f"deleting the half-made snapshot {snapshot['SnapshotId']} of a previous run",
                                hint=f"delete it by hand (aws ec2 delete-snapshot --snapshot-id "
                                f"{snapshot['SnapshotId']}) and run again") from None
            cleaned.append(snapshot["SnapshotId"])
            ctx.log(f"ami: deleted {snapshot['SnapshotId']} ({snapshot.get('State')}), left by a run that was killed")
        return adopted, cleaned

    def _import(self, ctx: BuildContext, target: Mapping[str, Any], c: Clients, disk: Path, tags: Mapping[str, str],
                description: str) -> tuple[str, int, int]:
        """The seed's path: the object uploaded (or kept), the vmimport role checked, ImportSnapshot waited on.

        A previous run's import task tagged with the key is used instead of a new one: a completed one's
        snapshot is adopted (a run killed before it tagged the snapshot), a running one is waited on.
        """
        bucket = target["bucket"]
        object_key = f"eulerbake/{ctx.key}/disk.raw"
        tasks = s3import.tagged_import_tasks(c.ec2, KEY_TAG, ctx.key)
        for task in tasks:
            detail = task.get("SnapshotTaskDetail", {})
            if detail.get("Status") == "completed" and _snapshot_exists(c.ec2, detail.get("SnapshotId", "")):
                ctx.log(f"ami: adopting {detail['SnapshotId']}, imported by a previous run ({task['ImportTaskId']})")
                self._tag_imported(c, detail["SnapshotId"], tags, ctx)
                return detail["SnapshotId"], 0, 0
        running = [task for task in tasks if task.get("SnapshotTaskDetail", {}).get("Status") in ("active", "pending")]
        if not running:
            s3import.ensure_vmimport_role(c.iam, bucket, create=self.create_role, log=ctx.log)
        sent = 0
        try:
            if running:
                task_id = running[0]["ImportTaskId"]
                ctx.log(f"ami: waiting on the import task {task_id} a previous run started for key {ctx.key}")
            else:
                sent = s3import.upload_object(c.s3, disk, bucket, object_key, key=ctx.key, workers=self.workers,
                                              log=ctx.log)
                token = hashing.hash_bytes(
                    f"{ctx.key}:import-snapshot:{','.join(sorted(t['ImportTaskId'] for t in tasks))}".encode())[:32]
                task_id = s3import.start_import(c.ec2, bucket, object_key, tags=_tags(tags), client_token=token,
                                                description=description, encrypted=bool(target.get("encrypted")))
                ctx.log(f"ami: import task {task_id} started for s3://{bucket}/{object_key}")
            try:
                snapshot_id = s3import.wait_for_import(c.ec2, task_id, timeout=self.wait_timeout, poll=self.poll,
                                                       log=ctx.log)
            except BaseException:  # Ctrl-C, a lost connection: a task left running would finish unseen
                s3import.cancel_quietly(c.ec2, task_id, ctx.log)
                raise
            self._tag_imported(c, snapshot_id, tags, ctx)
        finally:  # the object has served (or failed): a bucket full of old disks costs money
            s3import.delete_object_quietly(c.s3, bucket, object_key, ctx.log)
        return snapshot_id, 0, sent

    @staticmethod
    def _tag_imported(c: Clients, snapshot_id: str, tags: Mapping[str, str], ctx: BuildContext) -> None:
        """An imported snapshot carries no tags: tag it, so that a killed run's one is found and adopted."""
        try:
            c.ec2.create_tags(Resources=[snapshot_id], Tags=_tags(tags))
        except Exception as exc:
            ebs_upload.delete_snapshot_quietly(c.ec2, snapshot_id, ctx.log)
            raise aws_error(exc, f"tagging the imported snapshot {snapshot_id}") from None

    def _register(self, ctx: BuildContext, target: Mapping[str, Any], c: Clients, snapshot_id: str, size: int,
                  boot_mode: str, tags: Mapping[str, str]) -> str:
        """RegisterImage + CreateTags + wait for `available`; anything failing deregisters what it registered."""
        request = {
            "Name": target["name"],
            "Description": target.get("description") or target["name"],
            "Architecture": ARCHITECTURES[target["arch"]],
            "RootDeviceName": ROOT_DEVICE,
            "BlockDeviceMappings": [{"DeviceName": ROOT_DEVICE, "Ebs": {
                "SnapshotId": snapshot_id, "VolumeType": "gp3", "VolumeSize": ebs_upload.volume_gib(size),
                "DeleteOnTermination": True}}],
            "VirtualizationType": "hvm",
            "EnaSupport": True,
            "BootMode": boot_mode,
            "ImdsSupport": "v2.0",
            "TagSpecifications": [{"ResourceType": "image", "Tags": _tags(tags)}],
        }
        try:
            image_id: str = c.ec2.register_image(**request)["ImageId"]
        except Exception as exc:
            if _code(exc) == "InvalidAMIName.Duplicate":
                raise EulerbakeError(f"an AMI named {target['name']!r} already exists in {target['region']} and is "
                                     f"not tagged with this key ({ctx.key}); the snapshot was deleted",
                                     hint="AMI names are unique per account and region: choose another name=, or "
                                     "deregister the old AMI (eulerbake unpublish, if eulerbake made it)") from None
            raise aws_error(exc, f"registering the AMI {target['name']!r}") from None
        try:
            c.ec2.create_tags(Resources=[image_id], Tags=_tags(tags))
            self._wait_for_image(c, image_id)
        except BaseException:
            try:
                c.ec2.deregister_image(ImageId=image_id)
                ctx.log(f"ami: deregistered the half-made image {image_id}")
            except Exception as exc:
                ctx.log(f"ami: WARNING: could not deregister {image_id} ({exc})")
            raise
        return image_id

    def _wait_for_image(self, c: Clients, image_id: str) -> None:
        def check() -> bool | None:
            try:
                images = c.ec2.describe_images(ImageIds=[image_id])["Images"]
            except Exception as exc:
                raise aws_error(exc, f"asking for the state of {image_id}") from None
            state = images[0].get("State") if images else "missing"
            if state == "available":
                return True
            if state != "pending":
                reason = (images[0].get("StateReason") or {}).get("Message", "") if images else ""
                raise EulerbakeError(f"the AMI {image_id} ended {state}: {reason or 'AWS gave no reason'}",
                                     hint="check the snapshot's partition table and the boot mode; run again")
            return None

        wait_until(check, timeout=self.wait_timeout, first=self.poll, what=f"the AMI {image_id} to become available",
                   hint="run again later: the next run adopts the AMI once it is tagged with the key")

    @staticmethod
    def _receipt(target: Mapping[str, Any], image_id: str, snapshot_id: str, *, boot_mode: str, blocks_sent: int,
                 bytes_sent: int, adopted: bool) -> dict[str, Any]:
        return {"image_id": image_id, "snapshot_id": snapshot_id, "name": target["name"], "region": target["region"],
                "endpoint": target.get("endpoint", ""), "boot_mode": boot_mode,
                "architecture": ARCHITECTURES[target["arch"]], "via": target["via"], "blocks_sent": blocks_sent,
                "bytes_sent": bytes_sent, "adopted": adopted}

    # -- exists / remove: from the receipt alone ------------------------------------------------------
    def exists(self, receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> bool:
        ec2 = Clients(receipt["region"], receipt.get("endpoint", ""), secrets).ec2
        try:
            images = ec2.describe_images(ImageIds=[receipt["image_id"]])["Images"]
        except Exception as exc:
            if _code(exc) in ("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable", "InvalidAMIID.Malformed"):
                return False
            raise aws_error(exc, f"asking whether {receipt['image_id']} still exists") from None
        return any(image.get("State") in USABLE_IMAGE_STATES for image in images)

    def remove(self, receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        """Deregister the AMI, then delete its snapshot (AWS refuses to delete a snapshot an AMI still uses)."""
        ec2 = Clients(receipt["region"], receipt.get("endpoint", ""), secrets).ec2
        steps = ((ec2.deregister_image, "ImageId", receipt["image_id"], ("InvalidAMIID.NotFound",
                                                                         "InvalidAMIID.Unavailable")),
                 (ec2.delete_snapshot, "SnapshotId", receipt["snapshot_id"], ("InvalidSnapshot.NotFound",)))
        for call, name, resource, gone in steps:
            if not resource:
                continue
            try:
                call(**{name: resource})
            except Exception as exc:
                if _code(exc) not in gone:  # already gone is what we wanted
                    raise aws_error(exc, f"removing {resource}") from None


def tagged_images(ec2: Any, key: str) -> list[dict[str, Any]]:
    """This account's AMIs tagged with the store key."""
    try:
        return [image for page in ec2.get_paginator("describe_images").paginate(
            Owners=["self"], Filters=[{"Name": f"tag:{KEY_TAG}", "Values": [key]}]) for image in page.get("Images", [])]
    except Exception as exc:
        raise aws_error(exc, "looking for an AMI tagged with the key") from None


def _snapshot_exists(ec2: Any, snapshot_id: str) -> bool:
    if not snapshot_id:
        return False
    try:
        return bool(ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"])
    except Exception as exc:
        if _code(exc) == "InvalidSnapshot.NotFound":
            return False
        raise aws_error(exc, f"looking for the snapshot {snapshot_id}") from None


def _image_snapshot(image: Mapping[str, Any]) -> str:
    """The root snapshot of an AMI: our tag, or the root device's mapping."""
    tagged = _tag(image, "eulerbake:snapshot")
    if tagged:
        return tagged
    root = image.get("RootDeviceName")
    for mapping in image.get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == root:
            return str(mapping.get("Ebs", {}).get("SnapshotId", ""))
    return ""


AWS_PUBLISHER = AmiPublisher()


def ami(
    label: str,
    raw: Derivation,
    *,
    region: str,
    name: str,
    arch: str,
    profile: str | None = None,
    endpoint_url: str | None = None,
    via: str = "ebs",
    bucket: str | None = None,
    encrypted: bool = False,
    boot_mode: str | None = None,
    release: str | None = None,
    description: str | None = None,
    boot_check: Node | None = None,
    workers: int = 64,
    create_role: bool = False,
    poll: float = 2.0,
    wait_timeout: float = 3 * 3600.0,
) -> Publication:
    """Publication `ami:<label>`: `raw`'s disk.raw registered as the AMI `name` in `region`.

    `boot_check` (a node, e.g. a boot test of the same disk) must be built first: an image that does not
    boot is never published; the target (and so the receipt) says whether there was one. `boot_mode`
    defaults to what the disk can boot (see `boot_mode_for`).
    `workers`, `create_role`, `poll` and `wait_timeout` shape how it is published, not what: they are
    not part of the key.
    """
    if arch not in ARCHITECTURES:
        raise EulerbakeError(f"unknown architecture {arch!r} for ami:{label}",
                             hint=f"use one of {sorted(ARCHITECTURES)}")
    if via not in VIAS:
        raise EulerbakeError(f"unknown upload path via={via!r} for ami:{label}",
                             hint="use via='ebs' (EBS direct, the default) or via='s3' (S3 import)")
    if via == "s3" and not bucket:
        raise EulerbakeError(f"ami:{label} imports through S3 but names no bucket", hint="pass bucket='my-bucket'")
    if via == "ebs" and bucket:
        raise EulerbakeError(f"ami:{label} uploads with EBS direct, which uses no bucket (bucket={bucket!r})",
                             hint="drop bucket=, or pass via='s3'")
    if not AMI_NAME_RE.match(name):
        raise EulerbakeError(f"invalid AMI name {name!r} for ami:{label}",
                             hint="3-128 characters: letters, digits, ( ) [ ] space . / ' @ _ -")
    if boot_mode is not None and boot_mode not in BOOT_MODES:
        raise EulerbakeError(f"unknown boot_mode {boot_mode!r} for ami:{label}", hint=f"use one of {list(BOOT_MODES)}")
    if arch == "aarch64" and boot_mode == "legacy-bios":
        raise EulerbakeError(f"ami:{label}: aarch64 AMIs boot with UEFI only", hint="drop boot_mode= (or use 'uefi')")
    if not region:
        raise EulerbakeError(f"ami:{label} names no region", hint="pass region='eu-west-1' (or another region)")
    if workers < 1:
        raise EulerbakeError(f"ami:{label}: workers must be at least 1, not {workers}", hint="use workers=64")
    target = {
        "service": "aws-ami",
        "endpoint": endpoint_url or "",
        "region": region,
        "profile": profile or "",
        "name": name,
        "description": description or f"{name} ({ARCHITECTURES[arch]}), built by eulerbake",
        "release": release if release is not None else label.split(":")[0],
        "arch": arch,
        "boot_mode": boot_mode or "auto",
        "via": via,
        "bucket": bucket or "",
        "encrypted": encrypted,
        "boot_check": "on" if boot_check is not None else "off",  # in the receipt: was it proven to boot?
    }
    publisher = AWS_PUBLISHER
    settings = {"workers": workers, "create_role": create_role, "poll": poll, "wait_timeout": wait_timeout}
    if any(getattr(publisher, field) != value for field, value in settings.items()):
        publisher = dataclasses.replace(publisher, **settings)  # type: ignore[arg-type]
    inputs: dict[str, Node] = {"raw": raw}
    if boot_check is not None:
        inputs["boot_check"] = boot_check
    return Publication(stage="ami", label=label, publisher=publisher, target=target, inputs=inputs,
                       doc=f"publish {raw.task_name} as the AMI {name!r} in {region} (via {via})")


__all__ = ["AWS_PUBLISHER", "AmiPublisher", "ami", "boot_mode_for", "sparse_sha256", "standard_credentials"]
