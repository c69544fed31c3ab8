"""EBS direct: a sparse raw disk → an EBS snapshot, sending only the 512 KiB blocks that hold data.

Why this is the default: no bucket, no vmimport role, no import task that takes many minutes, and a
sparse disk costs what it holds. Measured against moto (benchmarks/bench_ebs.py): a 1 GiB disk with
264 MiB in non-zero 4 KiB pages sent 270 MiB (1.02×), in 0.4-0.5× the wall time of a plain S3
upload_file of the same file (which sends all 1024 MiB). Holes (SEEK_DATA/
SEEK_HOLE) are never read; all-zero data blocks are skipped too (an unwritten block of an unencrypted
snapshot reads back as zeros), except for an encrypted snapshot, whose unwritten blocks do not.

The wire format follows the AWS docs and bottlerocket's coldsnap: block index = offset // 524288, each
block's base64 SHA256 in `Checksum`, and CompleteSnapshot's LINEAR aggregate = SHA256 over the blocks'
raw 32-byte digests concatenated in block-index order. A failed or interrupted upload deletes its
half-made snapshot; a SIGKILLed one leaves it tagged with the key, and the next run deletes it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eulerbake.core import hashing
from eulerbake.core.errors import EulerbakeError

from recipes.publish import Progress, aws_error, wait_until

BLOCK_SIZE = 524288  # AWS's EBS direct block size; moto reports 512, so the response's BlockSize is never used
ZERO_BLOCK = bytes(BLOCK_SIZE)
GIB = 1 << 30
QUEUED_PER_WORKER = 2  # blocks waiting per worker: enough to keep every worker busy, memory stays bounded


@dataclass(frozen=True)
class Upload:
    """What one EBS direct upload did (the receipt's blocks_sent/bytes_sent, the benchmark's numbers)."""

    snapshot_id: str
    blocks_sent: int
    bytes_sent: int
    blocks_read: int  # blocks overlapping a data region; the rest of the disk was never read
    seconds: float


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def volume_gib(size: int) -> int:
    """The snapshot's volume size: EBS sizes are whole GiB, so a disk is rounded up (the rest reads as zeros)."""
    return max(1, -(-size // GIB))


def data_blocks(fd: int, size: int) -> list[int]:
    """Indices of the blocks that overlap a data region of the file, ascending; blocks inside holes are left out."""
    indices: list[int] = []
    for start, end in hashing.data_segments(fd, size):
        first = start // BLOCK_SIZE
        if indices and first <= indices[-1]:
            first = indices[-1] + 1
        indices.extend(range(first, (end - 1) // BLOCK_SIZE + 1))
    return indices


def linear_checksum(digests: Mapping[int, bytes]) -> str:
    """CompleteSnapshot's LINEAR aggregate: SHA256 over the raw block digests in block-index order, base64."""
    return b64(hashlib.sha256(b"".join(digests[index] for index in sorted(digests))).digest())


def upload_snapshot(ebs: Any, ec2: Any, path: Path, *, tags: Sequence[Mapping[str, str]], client_token: str,
                    description: str, encrypted: bool, workers: int, timeout_minutes: int, wait_timeout: float,
                    poll: float, log: Callable[[str], None]) -> Upload:
    """StartSnapshot → PutSnapshotBlock × the data blocks (in parallel) → CompleteSnapshot → wait for `completed`.

    Anything failing on the way (AWS errors after botocore's retries, Ctrl-C) deletes the snapshot and
    raises one EulerbakeError naming the AWS error.
    """
    started = time.monotonic()
    size = path.stat().st_size
    request: dict[str, Any] = {"VolumeSize": volume_gib(size), "Tags": list(tags), "Description": description,
                               "ClientToken": client_token, "Timeout": timeout_minutes}
    if encrypted:  # passed only when wanted: Encrypted=False is refused where encryption by default is on
        request["Encrypted"] = True
    try:
        snapshot_id: str = ebs.start_snapshot(**request)["SnapshotId"]
    except Exception as exc:
        raise aws_error(exc, "starting the EBS snapshot") from None
    log(f"ami: EBS direct snapshot {snapshot_id} started ({request['VolumeSize']} GiB volume, {workers} workers)")
    try:
        with path.open("rb") as f:
            indices = data_blocks(f.fileno(), size)
            progress = Progress(log, f"ami: {snapshot_id}", len(indices) * BLOCK_SIZE, unit="data blocks done",
                                total_units=len(indices))
            digests = _send_blocks(ebs, snapshot_id, f.fileno(), indices, encrypted=encrypted, workers=workers,
                                   progress=progress)
        progress.report(final=True)
        complete: dict[str, Any] = {"SnapshotId": snapshot_id, "ChangedBlocksCount": len(digests)}
        if digests:
            complete.update(Checksum=linear_checksum(digests), ChecksumAlgorithm="SHA256",
                            ChecksumAggregationMethod="LINEAR")
        try:
            ebs.complete_snapshot(**complete)
        except Exception as exc:
            raise aws_error(exc, f"completing the EBS snapshot {snapshot_id}") from None
        wait_for_snapshot(ec2, snapshot_id, timeout=wait_timeout, poll=poll)
    except BaseException:
        delete_snapshot_quietly(ec2, snapshot_id, log)
        raise
    return Upload(snapshot_id, len(digests), len(digests) * BLOCK_SIZE, len(indices), time.monotonic() - started)


def _send_blocks(ebs: Any, snapshot_id: str, fd: int, indices: Sequence[int], *, encrypted: bool, workers: int,
                 progress: Progress) -> dict[int, bytes]:
    """PutSnapshotBlock for every block of `indices` worth sending; returns block index → raw SHA256 digest.

    At most workers × QUEUED_PER_WORKER blocks are queued at a time, so memory stays bounded on a 40 GiB disk.
    The first failure stops the queue; blocks already in flight finish (each is bounded by the timeouts).
    """

    def send(index: int) -> bytes | None:
        data = os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE)
        if len(data) < BLOCK_SIZE:  # the disk's last, partial block: EBS blocks are always whole
            data += bytes(BLOCK_SIZE - len(data))
        if not encrypted and data == ZERO_BLOCK:
            progress.add(BLOCK_SIZE, units=1)
            return None
        digest = hashlib.sha256(data).digest()
        ebs.put_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockData=data, DataLength=BLOCK_SIZE,
                               Checksum=b64(digest), ChecksumAlgorithm="SHA256")
        progress.add(BLOCK_SIZE, BLOCK_SIZE, 1)
        return digest

    digests: dict[int, bytes] = {}
    queue = iter(indices)
    in_flight: dict[Future[bytes | None], int] = {}
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ebs-put") as pool:
        try:
            while True:
                while failure is None and len(in_flight) < workers * QUEUED_PER_WORKER:
                    index = next(queue, None)
                    if index is None:
                        break
                    in_flight[pool.submit(send, index)] = index
                if not in_flight:
                    break
                done, _ = wait(in_flight, timeout=progress.interval, return_when=FIRST_COMPLETED)
                for future in done:
                    index = in_flight.pop(future)
                    if future.cancelled():  # dropped from the queue after a failure
                        continue
                    error = future.exception()
                    if error is not None:
                        failure = failure or error
                        continue
                    digest = future.result()
                    if digest is not None:
                        digests[index] = digest
                if failure is not None:
                    for future in in_flight:
                        future.cancel()
                progress.report()
        except BaseException:  # Ctrl-C: drop the queue, let the blocks in flight end, then clean up
            for future in in_flight:
                future.cancel()
            raise
    if failure is not None:
        raise aws_error(failure, f"uploading the blocks of {snapshot_id}") from None
    return digests


def wait_for_snapshot(ec2: Any, snapshot_id: str, *, timeout: float, poll: float) -> None:
    """Poll DescribeSnapshots until the snapshot is `completed`; its `error` state becomes one message."""

    def check() -> bool | None:
        try:
            (snapshot,) = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        except Exception as exc:
            raise aws_error(exc, f"asking for the state of {snapshot_id}") from None
        state = snapshot.get("State")
        if state == "completed":
            return True
        if state == "error":
            raise EulerbakeError(f"the snapshot {snapshot_id} ended in state error: "
                                 f"{snapshot.get('StateMessage') or 'AWS gave no reason'}",
                                 hint="run again (the failed snapshot was deleted); if it repeats, check the "
                                 "StartSnapshot timeout and the account's EBS quotas")
        return None

    wait_until(check, timeout=timeout, first=poll, what=f"the snapshot {snapshot_id} to complete",
               hint="AWS is slow to seal the snapshot: run again later (the next run starts clean)")


def delete_snapshot_quietly(ec2: Any, snapshot_id: str, log: Callable[[str], None]) -> None:
    """Delete a half-made snapshot; a failure to do so is logged, never hides the error that got us here."""
    try:
        ec2.delete_snapshot(SnapshotId=snapshot_id)
        log(f"ami: deleted the half-made snapshot {snapshot_id}")
    except Exception as exc:
        log(f"ami: WARNING: could not delete the half-made snapshot {snapshot_id} ({exc}); the next run deletes it")
