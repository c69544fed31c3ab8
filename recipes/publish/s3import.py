"""S3 import (`via="s3"`, the seed's path): upload the raw disk to a bucket, let VM Import make the snapshot.

Slower than EBS direct — the whole disk crosses the wire, holes included, and the import task takes
minutes — but it needs only S3 and VM Import permissions, which some accounts grant where EBS direct's
are not. What the seed did by hand with the aws CLI, made safe to repeat: the upload resumes (an object
already there for this key is kept), the `vmimport` role is checked (and made with the seed's two
policies when asked), an import task already running for this key is waited on instead of started
twice, and a task that ends `deleted`/`error` is one message carrying AWS's StatusMessage — not a
poll that never ends (euler-packer's loop).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eulerbake.core.errors import EulerbakeError

from recipes.publish import MIB, Progress, aws_error, wait_until

ROLE = "vmimport"  # the name VM Import looks for unless told otherwise
TRUST_POLICY: dict[str, Any] = {  # the seed's trust-policy.json
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "vmie.amazonaws.com"}, "Action": "sts:AssumeRole",
                   "Condition": {"StringEquals": {"sts:Externalid": "vmimport"}}}],
}
IMPORT_FAILED = ("deleting", "deleted", "error")
PART_SIZE = 64 * MIB
MAX_PARTS = 9000  # S3 allows 10000 parts: keep a margin


def role_policy(bucket: str) -> dict[str, Any]:
    """The seed's role-policy.json for `bucket`."""
    resources = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:GetObject", "s3:ListBucket"],
             "Resource": resources},
            {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:GetObject", "s3:ListBucket", "s3:PutObject",
                                           "s3:GetBucketAcl"], "Resource": resources},
            {"Effect": "Allow", "Action": ["ec2:ModifySnapshotAttribute", "ec2:CopySnapshot", "ec2:RegisterImage",
                                           "ec2:Describe*"], "Resource": "*"},
        ],
    }


def _statements(document: Any) -> list[dict[str, Any]]:
    if isinstance(document, str):
        document = json.loads(document)
    statements = document.get("Statement", []) if isinstance(document, dict) else []
    return [statements] if isinstance(statements, dict) else list(statements)


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _trusts_vm_import(document: Any) -> bool:
    def services(statement: dict[str, Any]) -> list[str]:
        principal = statement.get("Principal")
        return _as_list(principal.get("Service")) if isinstance(principal, dict) else []

    return any(statement.get("Effect") == "Allow" and "vmie.amazonaws.com" in services(statement)
               for statement in _statements(document))


def _covers_bucket(document: Any, bucket: str) -> bool:
    """Some Allow statement lets the role GetObject an object of `bucket` (wildcards as IAM matches them)."""
    wanted = f"arn:aws:s3:::{bucket}/disk.raw"
    return any(statement.get("Effect") == "Allow"
               and any(fnmatch.fnmatchcase("s3:GetObject", action) for action in _as_list(statement.get("Action")))
               and any(fnmatch.fnmatchcase(wanted, pattern) for pattern in _as_list(statement.get("Resource")))
               for statement in _statements(document))


def ensure_vmimport_role(iam: Any, bucket: str, *, create: bool, log: Callable[[str], None]) -> None:
    """The `vmimport` role exists, trusts VM Import and may read `bucket`; made (the seed's policies) if `create`."""
    create_hint = (f"pass create_role=True to ami(), or create it as the seed does: aws iam create-role --role-name "
                   f"{ROLE} --assume-role-policy-document file://trust-policy.json && aws iam put-role-policy "
                   f"--role-name {ROLE} --policy-name {ROLE} --policy-document file://role-policy.json")
    try:
        try:
            role = iam.get_role(RoleName=ROLE)["Role"]
        except Exception as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") != "NoSuchEntity":
                raise
            if not create:
                raise EulerbakeError(f"the IAM role {ROLE} that VM Import needs does not exist",
                                     hint=create_hint) from None
            iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps(TRUST_POLICY),
                            Description="VM Import/Export service role (made by eulerbake)")
            iam.put_role_policy(RoleName=ROLE, PolicyName=ROLE, PolicyDocument=json.dumps(role_policy(bucket)))
            log(f"ami: created the IAM role {ROLE} with the VM Import trust policy and access to s3://{bucket}")
            return
        if not _trusts_vm_import(role.get("AssumeRolePolicyDocument", {})):
            raise EulerbakeError(f"the IAM role {ROLE} does not trust vmie.amazonaws.com: VM Import cannot use it",
                                 hint="give it the seed's trust policy: aws iam update-assume-role-policy "
                                 f"--role-name {ROLE} --policy-document file://trust-policy.json")
        documents = [iam.get_role_policy(RoleName=ROLE, PolicyName=name)["PolicyDocument"]
                     for name in iam.list_role_policies(RoleName=ROLE)["PolicyNames"]]
        for attached in iam.list_attached_role_policies(RoleName=ROLE)["AttachedPolicies"]:
            policy = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]
            documents.append(iam.get_policy_version(PolicyArn=attached["PolicyArn"],
                                                    VersionId=policy["DefaultVersionId"])["PolicyVersion"]["Document"])
        if any(_covers_bucket(document, bucket) for document in documents):
            return
        if not create:
            raise EulerbakeError(f"the IAM role {ROLE} may not read s3://{bucket}: VM Import could not fetch the disk",
                                 hint=f"pass create_role=True to add a policy for the bucket, or: aws iam "
                                 f"put-role-policy --role-name {ROLE} --policy-name {ROLE}-{bucket} "
                                 "--policy-document file://role-policy.json")
        # A policy of its own per bucket: the role may already serve other buckets, whose policy stays.
        iam.put_role_policy(RoleName=ROLE, PolicyName=f"{ROLE}-{bucket}",
                            PolicyDocument=json.dumps(role_policy(bucket)))
        log(f"ami: gave the IAM role {ROLE} access to s3://{bucket}")
    except EulerbakeError:
        raise
    except Exception as exc:
        raise aws_error(exc, f"checking the IAM role {ROLE}") from None


def upload_object(s3: Any, path: Path, bucket: str, object_key: str, *, key: str, workers: int,
                  log: Callable[[str], None]) -> int:
    """Multipart-upload `path` to s3://bucket/object_key (resumable by key); returns the bytes sent (0: kept)."""
    from boto3.s3.transfer import TransferConfig

    size = path.stat().st_size
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception as exc:
        raise aws_error(exc, f"looking for the bucket {bucket}",
                        hint=f"create it (aws s3 mb s3://{bucket}) or name an existing bucket in ami(bucket=…)") \
            from None
    try:
        head = s3.head_object(Bucket=bucket, Key=object_key)
        if head.get("ContentLength") == size and head.get("Metadata", {}).get("eulerbake-key") == key:
            log(f"ami: s3://{bucket}/{object_key} is already there (a previous run uploaded it): kept")
            return 0
    except Exception as exc:
        if getattr(exc, "response", {}).get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise aws_error(exc, f"looking for s3://{bucket}/{object_key}") from None
    _abort_stale_uploads(s3, bucket, object_key, log)
    part = max(PART_SIZE, -(-size // MAX_PARTS // MIB) * MIB)
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                            max_concurrency=max(1, min(workers, 16)), use_threads=True)
    progress = Progress(log, f"ami: s3://{bucket}/{object_key}", size)

    def sent(count: int) -> None:
        progress.add(count, count)
        progress.report()

    try:
        s3.upload_file(str(path), bucket, object_key, ExtraArgs={"Metadata": {"eulerbake-key": key}}, Config=config,
                       Callback=sent)
    except Exception as exc:
        cause = exc.__cause__ if exc.__cause__ is not None and hasattr(exc.__cause__, "response") else exc
        raise aws_error(cause, f"uploading {path.name} to s3://{bucket}/{object_key}") from None
    progress.report(final=True)
    return size


def _abort_stale_uploads(s3: Any, bucket: str, object_key: str, log: Callable[[str], None]) -> None:
    """A killed run's multipart upload keeps its parts (and bills them): abort it before starting again."""
    try:
        uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=object_key).get("Uploads", [])
        for upload in uploads:
            if upload.get("Key") == object_key:
                s3.abort_multipart_upload(Bucket=bucket, Key=object_key, UploadId=upload["UploadId"])
                log(f"ami: aborted a stale multipart upload of s3://{bucket}/{object_key}")
    except Exception as exc:
        log(f"ami: WARNING: could not list stale multipart uploads of s3://{bucket}/{object_key}: {exc}")


def delete_object_quietly(s3: Any, bucket: str, object_key: str, log: Callable[[str], None]) -> None:
    try:
        s3.delete_object(Bucket=bucket, Key=object_key)
        log(f"ami: deleted s3://{bucket}/{object_key}")
    except Exception as exc:
        log(f"ami: WARNING: could not delete s3://{bucket}/{object_key}: {exc}")


def tagged_import_tasks(ec2: Any, key_tag: str, key: str) -> list[dict[str, Any]]:
    """Import snapshot tasks of the last 7 days (AWS keeps no older ones) tagged with this key."""
    try:
        tasks: list[dict[str, Any]] = []
        for page in ec2.get_paginator("describe_import_snapshot_tasks").paginate():
            tasks.extend(page.get("ImportSnapshotTasks", []))
    except Exception as exc:
        raise aws_error(exc, "listing the import snapshot tasks") from None
    return [task for task in tasks if {"Key": key_tag, "Value": key} in task.get("Tags", [])]


def start_import(ec2: Any, bucket: str, object_key: str, *, tags: Sequence[Mapping[str, str]], client_token: str,
                 description: str, encrypted: bool) -> str:
    """ImportSnapshot of the RAW object; returns the import task id."""
    request: dict[str, Any] = {
        "Description": description,
        "DiskContainer": {"Description": description, "Format": "RAW",
                          "UserBucket": {"S3Bucket": bucket, "S3Key": object_key}},
        "RoleName": ROLE,
        "ClientToken": client_token,
        "TagSpecifications": [{"ResourceType": "import-snapshot-task", "Tags": list(tags)}],
    }
    if encrypted:
        request["Encrypted"] = True
    try:
        task_id: str = ec2.import_snapshot(**request)["ImportTaskId"]
    except Exception as exc:
        raise aws_error(exc, f"starting the import of s3://{bucket}/{object_key}") from None
    return task_id


def wait_for_import(ec2: Any, task_id: str, *, timeout: float, poll: float, log: Callable[[str], None]) -> str:
    """Poll DescribeImportSnapshotTasks with backoff until the task completes; returns the snapshot id.

    A task that ends deleted/error is one message with AWS's StatusMessage (e.g. "ClientError: No valid
    partitions" for an object that is not a raw disk); one that outlives `timeout` is cancelled.
    """
    seen: list[str] = []

    def check() -> str | None:
        try:
            (task,) = ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"]
        except Exception as exc:
            raise aws_error(exc, f"asking for the import task {task_id}") from None
        detail = task.get("SnapshotTaskDetail", {})
        status = detail.get("Status", "")
        shown = f"{status} {detail.get('Progress', '')}% {detail.get('StatusMessage', '')}".strip()
        if not seen or seen[-1] != shown:
            seen.append(shown)
            log(f"ami: import task {task_id}: {shown}")
        if status == "completed":
            snapshot_id: str = detail["SnapshotId"]
            return snapshot_id
        if status in IMPORT_FAILED:
            message = detail.get("StatusMessage") or "AWS gave no status message"
            hint = ("the object is not a raw disk with a partition table AWS can read: check the raw stage's disk.raw"
                    if "No valid partitions" in message else
                    "fix what AWS names and run again; the uploaded object was deleted")
            raise EulerbakeError(f"the import task {task_id} ended {status}: {message}", hint=hint)
        return None

    try:
        result: str = wait_until(check, timeout=timeout, first=poll, what=f"the import task {task_id}",
                                 hint="the task was cancelled: run again, or give the publisher a longer "
                                 "wait_timeout")
    except EulerbakeError as err:
        if err.message.startswith("gave up waiting"):
            cancel_quietly(ec2, task_id, log)
        raise
    return result


def cancel_quietly(ec2: Any, task_id: str, log: Callable[[str], None]) -> None:
    """Cancel an import task that is still running (one that already ended refuses: that is fine)."""
    try:
        (task,) = ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"]
        if task.get("SnapshotTaskDetail", {}).get("Status") in ("active", "pending"):
            ec2.cancel_import_task(ImportTaskId=task_id, CancelReason="eulerbake stopped waiting")
            log(f"ami: cancelled the import task {task_id}")
    except Exception as exc:
        log(f"ami: WARNING: could not cancel the import task {task_id}: {exc}")
