"""Benchmark: the shared cache, against moto's S3 in server mode on 127.0.0.1 (its own process).

    .venv/bin/python benchmarks/bench_cache.py [--data-mib 96] [--size-mib 1024] [--rounds 3] [--workdir DIR]

Two figures, each the median of the rounds:
- cold vs warm: realising a small image-shaped graph on a fresh store with no cache (its builders take
  real time: a sparse disk compressed into a qcow2 by `qemu-img convert -c` and converted back to raw by
  `qemu-img convert`, a module-sized `gcc -O2` compile, an image step hashing the raw), against
  realising the same targets (raw, kmod, image) on another fresh store whose S3 cache holds A's push:
  the plan fetches those three and cuts disk and qcow2. Goal: warm ≤ 10 % of cold.
- restore vs download: substituting the sparse raw entry from S3 into a fresh store (fetch, verify,
  unpack sparse, re-hash, seal, commit), against a plain boto3 `download_file` of an object holding the
  same data bytes (the holes excluded: what any route must move). Goal: ≤ 1.2x.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import blake3  # noqa: E402

from eulerbake.core.derivation import BuildContext, Derivation, Node  # noqa: E402
from eulerbake.store.local import Store  # noqa: E402
from eulerbake.store.signing import SecretKey  # noqa: E402
from eulerbake.store.substituters import CacheSettings  # noqa: E402
from eulerbake.tasks import planning  # noqa: E402
from eulerbake.tools.run import run  # noqa: E402

MiB = 1024 * 1024
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


# -- the graph (module-level builders: their code is part of the keys) -------------------------------


def make_disk(ctx: BuildContext) -> None:
    """A sparse raw disk: `data_mib` of incompressible data in 1 MiB pieces spread over `size_mib`."""
    size, pieces = ctx.params["size_mib"] * MiB, ctx.params["data_mib"]
    stride = size // pieces
    with (ctx.out / "disk.raw").open("wb") as f:
        f.truncate(size)
        for index in range(pieces):
            f.seek(index * stride)
            f.write(blake3.blake3(ctx.seed("disk") + index.to_bytes(4, "big")).digest(length=MiB))


def to_qcow2(ctx: BuildContext) -> None:
    run(["qemu-img", "convert", "-c", "-O", "qcow2", str(Path(ctx.inputs["disk"]) / "disk.raw"),
         str(ctx.out / "disk.qcow2")])


def to_raw(ctx: BuildContext) -> None:
    run(["qemu-img", "convert", "-O", "raw", str(Path(ctx.inputs["qcow2"]) / "disk.qcow2"), str(ctx.out / "disk.raw")])


def compile_module(ctx: BuildContext) -> None:
    """A kernel-module-sized compile (the sample's ENA build takes about a minute): `functions` C functions."""
    source = ctx.work / "module.c"
    source.write_text("".join(
        f"unsigned long f{i}(unsigned long x) {{ for (int k = 0; k < {i % 7 + 3}; k++) x = x * {i + 3} ^ (x >> 7);"
        f" return x + \"{ctx.params['salt']}\"[0]; }}\n" for i in range(ctx.params["functions"])))
    run(["gcc", "-O2", "-c", str(source), "-o", str(ctx.out / "module.o")])


def image(ctx: BuildContext) -> None:
    sha = hashlib.sha256()
    with (Path(ctx.inputs["raw"]) / "disk.raw").open("rb") as f:
        while chunk := f.read(16 * MiB):
            sha.update(chunk)
    module = (Path(ctx.inputs["kmod"]) / "module.o").stat().st_size
    (ctx.out / "image.manifest").write_text(f"disk.raw sha256 {sha.hexdigest()}\nmodule.o {module}\n")


def graph(data_mib: int, size_mib: int, functions: int, salt: str) -> dict[str, Derivation]:
    disk = Derivation("disk", "bench", make_disk, {}, {"data_mib": data_mib, "size_mib": size_mib, "salt": salt})
    qcow2 = Derivation("qcow2", "bench", to_qcow2, {"disk": disk}, tools=("qemu-img",))
    raw = Derivation("raw", "bench", to_raw, {"qcow2": qcow2}, tools=("qemu-img",))
    kmod = Derivation("kmod", "bench", compile_module, {}, {"functions": functions, "salt": salt}, tools=("gcc",))
    final = Derivation("image", "bench", image, {"raw": raw, "kmod": kmod})
    return {"disk": disk, "qcow2": qcow2, "raw": raw, "kmod": kmod, "image": final}


# -- moto -----------------------------------------------------------------------------------------------


def start_moto(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=(workdir / "moto.log").open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, **AWS_ENV})
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(endpoint + "/moto-api/", timeout=1)
            return process, endpoint
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto.server did not start")


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def settle() -> None:
    """Start each phase from the disk, not the page cache (root only), after a sync."""
    os.sync()
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")


def quiet(_message: str) -> None:
    pass


def realise(root: Path, roots: list[Node], settings: CacheSettings | None) -> float:
    caches = settings.caches() if settings else []
    for cache in caches:  # a boto3 client is made once per process, not once per entry: not timed
        getattr(cache.backend, "client", None)
    store = Store(root, substituters=caches)
    settle()
    started = time.perf_counter()
    planning.realise(store, roots, log=quiet)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-mib", type=int, default=96)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--functions", type=int, default=6000, help="size of the module compile (gcc -O2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if shutil.which("qemu-img") is None or shutil.which("gcc") is None:
        sys.exit("qemu-img and gcc are needed: apt-get install qemu-utils gcc")
    os.environ.update(AWS_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.workdir))
    process, endpoint = start_moto(workdir)
    key = SecretKey.generate("bench-1")
    cold, warm, restore, download = [], [], [], []
    try:
        client = s3_client(endpoint)
        for round_index in range(args.rounds + 1):  # round 0 warms up (imports, moto's first requests)
            bucket = f"bench-{round_index}-{os.getpid()}"
            client.create_bucket(Bucket=bucket)
            url = f"s3://{bucket}/cache?endpoint_url={endpoint}&region=us-east-1"
            settings = CacheSettings((url,), (str(key.public()),))
            nodes = graph(args.data_mib, args.size_mib, args.functions, salt=f"{round_index}")
            wanted: list[Node] = [nodes["raw"], nodes["kmod"], nodes["image"]]  # what a laptop or a job wants

            a = workdir / f"a{round_index}"
            cold_seconds = realise(a, wanted, None)
            store_a = Store(a)
            metas = [store_a.read_meta(store_a.meta_path(node)) for node in nodes.values()]
            settings.push_cache().push_all(store_a, metas, key, log=quiet)

            warm_seconds = realise(workdir / f"b{round_index}", list(wanted), settings)

            restore_seconds = realise(workdir / f"c{round_index}", [nodes["raw"]], settings)
            data = workdir / f"data{round_index}.bin"  # the raw disk's data bytes, holes left out
            with data.open("wb") as f:
                for index in range(args.data_mib):
                    f.write(blake3.blake3(os.urandom(8) + index.to_bytes(4, "big")).digest(length=MiB))
            client.upload_file(str(data), bucket, "plain/data.bin")
            target = workdir / f"download{round_index}.bin"
            settle()
            started = time.perf_counter()
            client.download_file(bucket, "plain/data.bin", str(target))
            os.sync()  # the store's commit makes its entry durable: so does this side
            download_seconds = time.perf_counter() - started

            if round_index:
                cold.append(cold_seconds)
                warm.append(warm_seconds)
                restore.append(restore_seconds)
                download.append(download_seconds)
            for path in (a, workdir / f"b{round_index}", workdir / f"c{round_index}"):
                planning_cleanup(path)
            data.unlink()
            target.unlink()
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)

    med = statistics.median
    print(f"graph: disk {args.size_mib} MiB with {args.data_mib} MiB of data → qcow2 (qemu-img convert -c) → raw ┐, "
          f"module ({args.functions} functions, gcc -O2) ┴→ image (sha256 of the raw); targets raw, kmod, image "
          f"(the warm run fetches those three; disk and qcow2 are cut); {args.rounds} rounds")
    print(f"cold build        {med(cold):7.2f} s")
    print(f"warm (S3 cache)   {med(warm):7.2f} s   warm/cold = {med(warm) / med(cold):.1%}  (goal ≤ 10%)")
    print(f"restore raw (S3)  {med(restore):7.2f} s")
    print(f"download_file     {med(download):7.2f} s   restore/download = {med(restore) / med(download):.2f}x  "
          "(goal ≤ 1.2x)")


def planning_cleanup(root: Path) -> None:
    from eulerbake.store.local import remove_tree

    if root.exists():
        remove_tree(root)


if __name__ == "__main__":
    from benchmarks import bench_cache  # builders live in an importable module: their source is in the keys

    bench_cache.main()
