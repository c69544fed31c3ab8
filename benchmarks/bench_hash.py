#!/usr/bin/env python3
"""blake3 of a large file: eulerbake vs b3sum vs sha256sum, then the stat-cache hit. Prints ratios.

Goal: eulerbake ≥ 0.9× b3sum's speed (ratio b3sum_time / eulerbake_time ≥ 0.9).
usage: benchmarks/bench_hash.py [--size-gib 2] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from eulerbake.core import hashing


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    return min(timed(fn) for _ in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "big.bin"
        size = int(args.size_gib * 1024**3)
        block = os.urandom(64 * 1024 * 1024)
        with path.open("wb") as f:
            written = 0
            while written < size:
                f.write(block[: min(len(block), size - written)])
                written += len(block)
        os.utime(path, (1_600_000_000, 1_600_000_000))  # outside the stat cache's racy window
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache

        ours = best_of(3, lambda: hashing.hash_file(path, use_cache=False))
        results = {"eulerbake (blake3, mmap, threads)": ours}
        if shutil.which("b3sum"):
            results["b3sum"] = best_of(3, lambda: subprocess.run(["b3sum", str(path)], capture_output=True, check=True))
        results["sha256sum"] = timed(lambda: subprocess.run(["sha256sum", str(path)], capture_output=True, check=True))
        results["eulerbake blake3+sha256 one pass"] = timed(lambda: hashing.hash_file_pair(path, use_cache=False))

        hashing.use_stat_cache(Path(tmp) / "cache.sqlite3")
        hashing.hash_file(path)
        results["eulerbake, stat cache hit"] = best_of(5, lambda: hashing.hash_file(path))

        print(f"file: {size / 1024**3:.2f} GiB, page cache warm, best of runs")
        for name, seconds in results.items():
            print(f"  {name:36s} {seconds:8.3f} s  {size / seconds / 1024**3:8.2f} GiB/s")
        if "b3sum" in results:
            print(f"ratio b3sum_time / eulerbake_time = {results['b3sum'] / ours:.2f}  (goal >= 0.9)")
        print(f"ratio sha256sum_time / eulerbake_time = {results['sha256sum'] / ours:.1f}")
        print(f"ratio cold / stat-cache hit = {ours / results['eulerbake, stat cache hit']:.0f}x")


if __name__ == "__main__":
    main()
