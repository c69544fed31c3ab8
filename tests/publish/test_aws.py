"""The AMI publication (recipes/publish/aws.py) through boto3 against moto's server, with the shim in front.

Every test publishes a disk made with sfdisk + mkfs through `Store.realise`, then looks at what the
account holds (moto) and at what crossed the wire (the shim's counts and checks).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from eulerbake.core.derivation import Derivation
from eulerbake.core.errors import EulerbakeError
from eulerbake.core.publication import Publication, read_receipt
from eulerbake.store.local import Realised, Store
from recipes.publish import aws as aws_recipe
from recipes.publish.aws import AWS_PUBLISHER, ami, boot_mode_for, sparse_sha256
from recipes.publish.ebs import BLOCK_SIZE, data_blocks
from tests.publish.conftest import ACCESS_KEY, SECRET_KEY, Aws
from tests.publish.disks import (
    MIB,
    RawDisk,
    ami_node,
    file_blake3,
    nonzero_blocks,
    raw_node,
    snapshot_blake3,
)

REPO = Path(__file__).resolve().parents[2]
BOOT_MODES = {"x86_64": "legacy-bios", "aarch64": "uefi"}
EC2_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}
RECEIPT_FIELDS = {"image_id", "snapshot_id", "name", "region", "endpoint", "boot_mode", "architecture", "via",
                  "blocks_sent", "bytes_sent", "adopted"}


def publish(store: Store, node: Publication) -> tuple[Realised, dict[str, Any], list[str]]:
    messages: list[str] = []
    realised = store.realise(node, log=messages.append)
    return realised, read_receipt(realised.path)["resource"], messages


def tagged(aws: Aws, kind: str, key: str) -> list[dict[str, Any]]:
    """Snapshots or images tagged with `key` (through the shim: snapshot states as AWS would show them)."""
    ec2 = aws.client("ec2")
    filters = [{"Name": "tag:eulerbake:key", "Values": [key]}]
    if kind == "snapshots":
        return list(ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"])
    return list(ec2.describe_images(Owners=["self"], Filters=filters)["Images"])


def assert_no_credentials(root: Path) -> None:
    """Neither the secret key nor the key id in any file under `root` (entries, metadata, logs, caches)."""
    files = [path for path in root.rglob("*") if path.is_file() and not path.is_symlink()]
    assert files
    leaked = [str(path) for path in files for value in (SECRET_KEY, ACCESS_KEY) if value.encode() in path.read_bytes()]
    assert leaked == []


def uploaded_data_blocks(store: Store, raw: Derivation) -> int:
    """Blocks overlapping a data region of the disk.raw that was published (the store's copy).

    Not of the test's source disk: ext4 reports an unwritten (fallocated) extent as data to SEEK_DATA
    once its pages are in the page cache, so a file read end to end shows more data regions than a fresh
    copy of it.
    """
    path = store.path(raw) / "disk.raw"
    with path.open("rb") as f:
        return len(data_blocks(f.fileno(), path.stat().st_size))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- no AWS needed ---------------------------------------------------------------------------------------


def test_holes_are_never_read_and_the_sha256_feeds_them_as_zeros(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    with path.open("wb") as f:
        f.truncate(256 * MIB)
        f.write(b"\x01" * 100)
        f.seek(10 * BLOCK_SIZE + 5)
        f.write(os.urandom(600_000))  # blocks 10 and 11
        f.seek(256 * MIB - 10)
        f.write(b"end")
    with path.open("rb") as f:
        assert data_blocks(f.fileno(), path.stat().st_size) == [0, 10, 11, 511]
    assert sparse_sha256(path) == sha256_of(path)


def test_boot_mode_follows_the_disk() -> None:
    esp = {"type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"}
    bios_boot = {"type": "21686148-6449-6E6F-744E-656564454649"}
    dos = {"table": {"label": "dos", "partitions": [{"type": "83"}]}}
    gpt = {"table": {"label": "gpt", "partitions": [esp, {"type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"}]}}
    hybrid = {"table": {"label": "gpt", "partitions": [bios_boot, esp]}}
    assert boot_mode_for("x86_64", dos, "auto") == "legacy-bios"
    assert boot_mode_for("aarch64", gpt, "auto") == "uefi"
    assert boot_mode_for("x86_64", gpt, "auto") == "uefi"
    assert boot_mode_for("x86_64", hybrid, "auto") == "uefi-preferred"
    with pytest.raises(EulerbakeError, match="aarch64 AMI boots with UEFI only") as caught:
        boot_mode_for("aarch64", dos, "auto")
    assert caught.value.hint
    with pytest.raises(EulerbakeError, match="needs an EFI system partition"):
        boot_mode_for("x86_64", dos, "uefi")


def test_the_key_covers_the_target_not_how_it_is_published(disks: dict[str, RawDisk]) -> None:
    raw = raw_node(disks["x86_64"])
    base = {"region": "eu-west-1", "name": "openEuler-24.03-x86_64", "arch": "x86_64"}
    node = ami("24.03:x86_64", raw, **base)
    assert node.task_name == "ami:24.03:x86_64" and node.publisher is AWS_PUBLISHER
    assert node.target["release"] == "24.03" and node.target["profile"] == ""
    assert ami("24.03:x86_64", raw, **base, workers=8, poll=0.1).key == node.key  # how, not what
    assert ami("24.03:x86_64", raw, **{**base, "region": "eu-north-1"}).key != node.key
    assert ami("24.03:x86_64", raw, **base, profile="ci").target["profile"] == "ci"  # the name, never keys
    for bad, words in (({"arch": "riscv64"}, "unknown architecture"), ({"via": "ftp"}, "unknown upload path"),
                       ({"via": "s3"}, "names no bucket"), ({"bucket": "b"}, "uses no bucket"),
                       ({"name": "x"}, "invalid AMI name"), ({"arch": "aarch64", "boot_mode": "legacy-bios"},
                                                              "UEFI only")):
        with pytest.raises(EulerbakeError, match=words) as caught:
            ami("24.03:x86_64", raw, **{**base, **bad})
        assert caught.value.hint


# -- credentials -------------------------------------------------------------------------------------------


def test_credentials_come_from_the_standard_chain(aws: Aws, disks: dict[str, RawDisk], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    node = ami_node(raw_node(disks["x86_64"]), aws.endpoint, "x86_64")
    assert dict(node.secrets()) == {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}
    credentials = tmp_path / "credentials"
    credentials.write_text("[ci]\naws_access_key_id = AKIACIPROFILE0000001\naws_secret_access_key = ci-secret\n"
                           "aws_session_token = ci-session-token\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    profiled = ami_node(raw_node(disks["x86_64"]), aws.endpoint, "x86_64", profile="ci")
    assert profiled.secrets()["aws_session_token"] == "ci-session-token"
    assert "ci-secret" not in json.dumps(profiled.manifest)

    with pytest.raises(EulerbakeError, match="profile 'nope' is not configured") as caught:
        ami_node(raw_node(disks["x86_64"]), aws.endpoint, "x86_64", profile="nope").secrets()
    assert "aws configure --profile nope" in str(caught.value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    with pytest.raises(EulerbakeError, match="no AWS credentials found") as caught:
        node.secrets()
    assert "AWS_PROFILE" in str(caught.value.hint)


# -- EBS direct ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_ebs_direct_sends_the_data_blocks_once_and_registers_a_current_ami(
        arch: str, aws: Aws, disks: dict[str, RawDisk], tmp_path: Path) -> None:
    disk = disks[arch]
    store = Store(tmp_path / "store")
    raw = raw_node(disk)
    node = ami_node(raw, aws.endpoint, arch, workers=64)
    realised, receipt, log = publish(store, node)
    key = node.key
    assert realised.built and set(receipt) == RECEIPT_FIELDS

    # Exactly the non-zero blocks crossed the wire, each with its right checksum, then the right aggregate.
    wanted = nonzero_blocks(disk.path)
    read = uploaded_data_blocks(store, raw)
    assert read > len(wanted)  # some data blocks hold only zeros: skipped
    assert aws.shim.counts["PutSnapshotBlock"] == len(wanted) == receipt["blocks_sent"]
    assert aws.shim.bytes_in["PutSnapshotBlock"] == len(wanted) * BLOCK_SIZE == receipt["bytes_sent"]
    assert aws.shim.checksum_errors == []
    (snapshot,) = aws.shim.snapshots.values()
    assert snapshot.snapshot_id == receipt["snapshot_id"] and snapshot.complete_checked
    assert set(snapshot.digests) == wanted and snapshot.state == "completed"
    (start,) = aws.shim.start_requests
    assert len(start["ClientToken"]) == 32 and start["Timeout"] == 24 * 60 and "Encrypted" not in start
    assert {"Key": "eulerbake:key", "Value": key} in start["Tags"]
    assert any(f"{read}/{read} data blocks done" in line and "MB/s" in line for line in log)
    assert any(f"{len(wanted)} of {disk.size // BLOCK_SIZE} blocks sent ({read} read)" in line for line in log)

    # The snapshot read back block by block is the raw image.
    digest, listed = snapshot_blake3(aws.direct("ebs"), receipt["snapshot_id"], disk.size)
    assert listed == wanted and digest == file_blake3(disk.path)

    # RegisterImage carried what moto ignores; the AMI is tagged with the key and the disk's identity.
    (registered,) = aws.shim.register_requests
    assert registered["BootMode"] == BOOT_MODES[arch] == receipt["boot_mode"]
    assert registered["ImdsSupport"] == "v2.0"
    assert registered["Architecture"] == EC2_ARCH[arch] == receipt["architecture"]
    assert (registered["EnaSupport"], registered["VirtualizationType"], registered["RootDeviceName"]) == \
        ("true", "hvm", "/dev/xvda")
    assert registered["BlockDeviceMapping.1.Ebs.SnapshotId"] == receipt["snapshot_id"]
    assert registered["BlockDeviceMapping.1.Ebs.VolumeType"] == "gp3"
    assert registered["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"
    (image,) = tagged(aws, "images", key)
    tags = {tag["Key"]: tag["Value"] for tag in image["Tags"]}
    assert image["ImageId"] == receipt["image_id"] and image["Name"] == f"eulerbake-test-{arch}"
    assert tags["eulerbake:raw-key"] == raw.key and tags["eulerbake:raw-sha256"] == sha256_of(disk.path)
    assert (tags["eulerbake:release"], tags["eulerbake:arch"], tags["eulerbake:snapshot"]) == \
        ("test", arch, receipt["snapshot_id"])

    # Again: nothing to do, nothing sent; doit's up-to-date check asks one question.
    aws.shim.reset_counts()
    assert store.realise(node, log=lambda _m: None).built is False
    assert sum(aws.shim.counts.values()) == 0
    assert node.confirm(realised.path) is True
    assert dict(aws.shim.counts) == {"DescribeImages": 1}

    # The receipt forgotten: the AMI tagged with the key is adopted, nothing is uploaded or registered again.
    store.delete(store.read_meta(store.meta_path(node)))
    aws.shim.reset_counts()
    again, adopted, log = publish(store, node)
    assert again.built and adopted["adopted"] is True and adopted["image_id"] == receipt["image_id"]
    assert adopted["snapshot_id"] == receipt["snapshot_id"] and adopted["blocks_sent"] == 0
    assert not {"StartSnapshot", "PutSnapshotBlock", "RegisterImage"} & set(aws.shim.counts)
    assert any("adopted" in line for line in log)
    assert len(tagged(aws, "images", key)) == 1 and len(tagged(aws, "snapshots", key)) == 1

    assert_no_credentials(tmp_path / "store")


def test_unpublish_deregisters_the_ami_and_deletes_its_snapshot(aws: Aws, disks: dict[str, RawDisk],
                                                               tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    node = ami_node(raw_node(disks["x86_64"]), aws.endpoint, "x86_64")
    realised, receipt, _ = publish(store, node)
    node.unpublish(realised.path)
    assert aws.shim.ok_count("DeregisterImage") == 1 and aws.shim.ok_count("DeleteSnapshot") == 1
    assert tagged(aws, "images", node.key) == [] and tagged(aws, "snapshots", node.key) == []
    assert node.confirm(realised.path) is False
    node.unpublish(realised.path)  # already gone: not an error


def test_encrypted_snapshot_sends_its_zero_blocks_too(aws: Aws, disks: dict[str, RawDisk], tmp_path: Path) -> None:
    disk = disks["x86_64"]
    store = Store(tmp_path / "store")
    raw = raw_node(disk)
    _, receipt, _ = publish(store, ami_node(raw, aws.endpoint, "x86_64", encrypted=True))
    data = uploaded_data_blocks(store, raw)
    assert receipt["blocks_sent"] == data == aws.shim.counts["PutSnapshotBlock"] > len(nonzero_blocks(disk.path))
    assert aws.shim.start_requests[0]["Encrypted"] is True and aws.shim.checksum_errors == []


@pytest.mark.slow  # botocore's adaptive mode slows the client down after each throttle, as it should: ~10 s
def test_throttling_and_server_errors_are_retried(aws: Aws, disks: dict[str, RawDisk], tmp_path: Path) -> None:
    disk = disks["aarch64"]
    aws.shim.inject("StartSnapshot", 1, status=503, code="ServiceUnavailableException", message="try again")
    aws.shim.inject("PutSnapshotBlock", 4, after=3)  # 400 ThrottlingException
    aws.shim.inject("PutSnapshotBlock", 2, status=503, code="InternalServerException", message="oops", after=10)
    aws.shim.inject("CompleteSnapshot", 2, code="ThrottlingException", message="Rate exceeded")
    aws.shim.inject("RegisterImage", 1, code="RequestLimitExceeded", message="Request limit exceeded.")
    node = ami_node(raw_node(disk), aws.endpoint, "aarch64")
    _, receipt, _ = publish(Store(tmp_path / "store"), node)
    assert aws.shim.injected == {"StartSnapshot": 1, "PutSnapshotBlock": 6, "CompleteSnapshot": 2, "RegisterImage": 1}
    wanted = nonzero_blocks(disk.path)
    assert aws.shim.ok_count("PutSnapshotBlock") == len(wanted) == receipt["blocks_sent"]
    assert aws.shim.checksum_errors == []
    assert snapshot_blake3(aws.direct("ebs"), receipt["snapshot_id"], disk.size)[0] == file_blake3(disk.path)
    assert len(tagged(aws, "snapshots", node.key)) == 1 and len(tagged(aws, "images", node.key)) == 1


def test_a_permanent_error_is_one_message_and_leaves_nothing_half_made(aws: Aws, disks: dict[str, RawDisk],
                                                                      tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    node = ami_node(raw_node(disks["x86_64"]), aws.endpoint, "x86_64")
    denied = "User: arn:aws:iam::123456789012:user/ci is not authorized to perform: ebs:PutSnapshotBlock"
    aws.shim.inject("PutSnapshotBlock", None, status=403, code="AccessDeniedException", message=denied, after=5)
    with pytest.raises(EulerbakeError) as caught:
        store.realise(node, log=lambda _m: None)
    message = str(caught.value)
    assert "PutSnapshotBlock failed with AccessDeniedException" in message and denied in message
    assert "fix:" in message and "Traceback" not in message and len(message.splitlines()) == 2
    assert aws.shim.ok_count("PutSnapshotBlock") == 5  # it stopped at the first refusal (no retries of a 403)
    assert aws.shim.ok_count("DeleteSnapshot") == 1
    assert tagged(aws, "snapshots", node.key) == [] and tagged(aws, "images", node.key) == []
    assert aws.shim.ok_count("RegisterImage") == 0 and not store.has(node)
    assert_no_credentials(tmp_path / "store")

    aws.shim.clear_rules()  # the permission granted: the next run starts clean and finishes
    _, receipt, _ = publish(store, node)
    (snapshot,) = tagged(aws, "snapshots", node.key)
    assert snapshot["SnapshotId"] == receipt["snapshot_id"] and snapshot["State"] == "completed"


@pytest.mark.slow
def test_a_killed_upload_is_cleaned_up_and_the_next_run_finishes(aws: Aws, disks: dict[str, RawDisk],
                                                                tmp_path: Path) -> None:
    disk = disks["x86_64"]
    store = Store(tmp_path / "store")
    store.realise(raw_node(disk), log=lambda _m: None)  # the child goes straight to the upload
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"path": str(disk.path), "arch": disk.arch, "table": disk.table, "root": disk.root,
                                "endpoint": aws.endpoint, "overrides": {"workers": 2}}))
    aws.shim.delay("PutSnapshotBlock", 0.3)
    child = subprocess.Popen([sys.executable, "-m", "tests.publish.killrun", str(store.root), str(spec)], cwd=REPO,
                             env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while aws.shim.ok_count("PutSnapshotBlock") < 4 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.kill()
    output = child.communicate()[0].decode()
    assert child.returncode == -9, f"the child was not killed mid-upload:\n{output}"
    node = ami_node(raw_node(disk), aws.endpoint, "x86_64")
    (half,) = tagged(aws, "snapshots", node.key)
    assert half["State"] == "pending", output  # what a SIGKILL leaves: no handler ran
    first_token = aws.shim.start_requests[0]["ClientToken"]

    aws.shim.delay("PutSnapshotBlock", 0.0)
    aws.shim.reset_counts()
    _, receipt, log = publish(store, node)
    assert any(f"deleted {half['SnapshotId']} (pending)" in line for line in log)
    (snapshot,) = tagged(aws, "snapshots", node.key)
    assert snapshot["SnapshotId"] == receipt["snapshot_id"] != half["SnapshotId"] and snapshot["State"] == "completed"
    assert aws.shim.start_requests[0]["ClientToken"] != first_token  # a fresh token for a fresh snapshot
    assert snapshot_blake3(aws.direct("ebs"), receipt["snapshot_id"], disk.size)[0] == file_blake3(disk.path)
    assert len(tagged(aws, "images", node.key)) == 1


def test_a_completed_snapshot_of_a_killed_run_is_registered_not_uploaded_again(
        aws: Aws, disks: dict[str, RawDisk], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    node = ami_node(raw_node(disks["x86_64"]), aws.endpoint, "x86_64")

    def killed(*_args: Any, **_kwargs: Any) -> str:
        raise SystemExit("killed after CompleteSnapshot")  # stands in for a SIGKILL: no cleanup for it below

    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(aws_recipe.AmiPublisher, "_register", killed)
        patch.setattr(aws_recipe.ebs_upload, "delete_snapshot_quietly", lambda *_a: None)
        store.realise(node, log=lambda _m: None)
    (left,) = tagged(aws, "snapshots", node.key)
    assert left["State"] == "completed" and tagged(aws, "images", node.key) == []
    aws.shim.reset_counts()
    _, receipt, _ = publish(store, node)
    assert receipt["snapshot_id"] == left["SnapshotId"] and receipt["blocks_sent"] == 0
    assert "PutSnapshotBlock" not in aws.shim.counts and aws.shim.ok_count("RegisterImage") == 1


# -- S3 import -------------------------------------------------------------------------------------------------


def test_s3_import_checks_the_vmimport_role_and_imports_the_disk(aws: Aws, disks: dict[str, RawDisk],
                                                                tmp_path: Path) -> None:
    disk = disks["x86_64"]
    bucket = "eulerbake-images"
    aws.direct("s3").create_bucket(Bucket=bucket)
    store = Store(tmp_path / "store")
    raw = raw_node(disk)
    without = ami_node(raw, aws.endpoint, "x86_64", via="s3", bucket=bucket)
    with pytest.raises(EulerbakeError, match="IAM role vmimport that VM Import needs does not exist") as caught:
        store.realise(without, log=lambda _m: None)
    assert "create_role=True" in str(caught.value.hint)
    assert aws.shim.counts["ImportSnapshot"] == 0 and aws.shim.counts["UploadPart"] == 0

    node = ami_node(raw, aws.endpoint, "x86_64", via="s3", bucket=bucket, create_role=True)
    assert node.key == without.key
    _, receipt, log = publish(store, node)
    assert receipt["via"] == "s3" and receipt["bytes_sent"] == disk.size and receipt["blocks_sent"] == 0
    assert aws.shim.ok_count("CreateMultipartUpload") == 1 and aws.shim.ok_count("UploadPart") == 2  # 96 MiB
    role = aws.direct("iam").get_role(RoleName="vmimport")["Role"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "vmie.amazonaws.com"}
    policy = aws.direct("iam").get_role_policy(RoleName="vmimport", PolicyName="vmimport")["PolicyDocument"]
    assert f"arn:aws:s3:::{bucket}/*" in policy["Statement"][0]["Resource"]
    (task,) = aws.shim.tasks.values()
    assert task.status == "completed" and task.snapshot_id == receipt["snapshot_id"]
    assert {"Key": "eulerbake:key", "Value": node.key} in task.tags
    assert any("active" in line for line in log) and aws.shim.counts["DescribeImportSnapshotTasks"] >= 2
    assert snapshot_blake3(aws.direct("ebs"), receipt["snapshot_id"], disk.size)[0] == file_blake3(disk.path)
    (registered,) = aws.shim.register_requests
    assert (registered["BootMode"], registered["ImdsSupport"]) == ("legacy-bios", "v2.0")
    assert len(tagged(aws, "snapshots", node.key)) == 1 and len(tagged(aws, "images", node.key)) == 1
    assert aws.direct("s3").list_objects_v2(Bucket=bucket)["KeyCount"] == 0  # the object served: deleted
    assert_no_credentials(tmp_path / "store")


def test_s3_import_of_a_non_disk_ends_with_aws_status_message(aws: Aws, disks: dict[str, RawDisk],
                                                            tmp_path: Path) -> None:
    bucket = "eulerbake-images"
    aws.direct("s3").create_bucket(Bucket=bucket)
    node = ami_node(raw_node(disks["garbage"]), aws.endpoint, "x86_64", via="s3", bucket=bucket, create_role=True)
    with pytest.raises(EulerbakeError, match="ended deleted: ClientError: No valid partitions") as caught:
        Store(tmp_path / "store").realise(node, log=lambda _m: None)
    assert "partition table" in str(caught.value.hint)
    assert tagged(aws, "images", node.key) == [] and tagged(aws, "snapshots", node.key) == []
    assert aws.direct("s3").list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_a_killed_s3_import_is_adopted_not_started_twice(aws: Aws, disks: dict[str, RawDisk], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = "eulerbake-images"
    aws.direct("s3").create_bucket(Bucket=bucket)
    store = Store(tmp_path / "store")
    node = ami_node(raw_node(disks["x86_64"]), aws.endpoint, "x86_64", via="s3", bucket=bucket, create_role=True)

    def killed(*_args: Any, **_kwargs: Any) -> str:
        raise SystemExit("killed while the import task runs")  # stands in for a SIGKILL: no cleanup for it

    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(aws_recipe.s3import, "wait_for_import", killed)
        patch.setattr(aws_recipe.s3import, "cancel_quietly", lambda *_a: None)
        patch.setattr(aws_recipe.s3import, "delete_object_quietly", lambda *_a: None)
        store.realise(node, log=lambda _m: None)
    (task,) = aws.shim.tasks.values()
    aws.shim.reset_counts()
    _, receipt, log = publish(store, node)
    assert task.status == "completed" and receipt["snapshot_id"] == task.snapshot_id
    assert aws.shim.counts["ImportSnapshot"] == 0 and aws.shim.counts["UploadPart"] == 0
    assert any("imported by a previous run" in line or "waiting on the import task" in line for line in log)
    assert len(tagged(aws, "snapshots", node.key)) == 1 and len(tagged(aws, "images", node.key)) == 1
