#!/usr/bin/env python3
"""EBS direct vs a plain S3 upload of the same raw disk, against moto's server (with the test shim counting).

Prints: bytes EBS direct sent ÷ the raw image's non-zero bytes (goal ≤ 1.05×; counted at 4 KiB pages,
the filesystem's own granularity, so the ratio shows what 512 KiB EBS blocks cost on top), and the wall
time of EBS direct (`recipes.publish.ebs.upload_snapshot`) vs `s3.upload_file` of the same file. Asserts nothing.
usage: benchmarks/bench_ebs.py [--disk-mib 1024] [--payload-mib 160] [--files 3000] [--workers 64] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/ and tests/ are not installed packages

import boto3  # noqa: E402

from recipes.publish.aws import Clients  # noqa: E402
from recipes.publish.ebs import BLOCK_SIZE, upload_snapshot  # noqa: E402
from tests.publish.conftest import fake_credentials_env, start_moto  # noqa: E402
from tests.publish.disks import REGION, make_disk, nonzero_blocks  # noqa: E402
from tests.publish.shim import AwsShim  # noqa: E402

PAGE = 4096


def nonzero_pages(path: Path) -> int:
    """4 KiB pages holding a non-zero byte, by reading every byte: the most a perfect uploader must send."""
    zero = bytes(PAGE)
    count = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            chunk = chunk.ljust(-(-len(chunk) // PAGE) * PAGE, b"\0")
            count += sum(1 for offset in range(0, len(chunk), PAGE) if chunk[offset:offset + PAGE] != zero)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--disk-mib", type=int, default=1024)
    parser.add_argument("--payload-mib", type=float, default=160.0)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        os.environ.update(fake_credentials_env(tmp))
        disk = make_disk(tmp / "disk.raw", label="dos", arch="x86_64", size_mib=args.disk_mib, files=args.files,
                         payload_mib=args.payload_mib)
        moto, url = start_moto(tmp / "moto.log")
        shim = AwsShim(url).start()
        try:
            size = disk.size
            allocated = os.stat(disk.path).st_blocks * 512
            pages = nonzero_pages(disk.path)
            blocks = len(nonzero_blocks(disk.path))
            clients = Clients(REGION, shim.url, {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"},
                              workers=args.workers)
            started = time.perf_counter()
            upload = upload_snapshot(clients.ebs, clients.ec2, disk.path, tags=[{"Key": "bench", "Value": "ebs"}],
                                     client_token="bench", description="bench", encrypted=False,
                                     workers=args.workers, timeout_minutes=60, wait_timeout=600, poll=0.05,
                                     log=lambda _m: None)
            ebs_seconds = time.perf_counter() - started
            ebs_bytes = shim.bytes_in["PutSnapshotBlock"]

            s3 = boto3.client("s3", endpoint_url=shim.url, region_name=REGION)
            s3.create_bucket(Bucket="bench-images")
            started = time.perf_counter()
            s3.upload_file(str(disk.path), "bench-images", "disk.raw")
            s3_seconds = time.perf_counter() - started
            s3_bytes = shim.bytes_in["UploadPart"] + shim.bytes_in["PutObject"]
        finally:
            shim.stop()
            moto.terminate()
            moto.wait(timeout=10)

    mib = 1 << 20
    print(f"disk: {size / mib:.0f} MiB, {allocated / mib:.1f} MiB allocated, {pages * PAGE / mib:.1f} MiB in non-zero "
          f"4 KiB pages, {blocks} non-zero 512 KiB blocks ({upload.blocks_read} blocks overlap data)")
    print(f"EBS direct: {upload.blocks_sent} blocks, {ebs_bytes / mib:.1f} MiB sent in {ebs_seconds:.2f} s "
          f"({ebs_bytes / ebs_seconds / 1e6:.0f} MB/s), {args.workers} workers")
    print(f"S3 upload_file: {s3_bytes / mib:.1f} MiB sent in {s3_seconds:.2f} s "
          f"({s3_bytes / s3_seconds / 1e6:.0f} MB/s)")
    print(f"bytes sent ÷ non-zero bytes (4 KiB pages): {ebs_bytes / (pages * PAGE):.3f}x (goal ≤ 1.05x)")
    print(f"bytes sent ÷ non-zero 512 KiB blocks: {ebs_bytes / (blocks * BLOCK_SIZE):.3f}x")
    print(f"bytes sent, S3 ÷ EBS direct: {s3_bytes / ebs_bytes:.1f}x")
    print(f"wall time, EBS direct ÷ S3 upload_file: {ebs_seconds / s3_seconds:.2f}x")


if __name__ == "__main__":
    main()
