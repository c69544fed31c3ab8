#!/usr/bin/env python3
"""No-op rebuild: `doit` on the project's default graph vs plain doit over as many trivial tasks.

Both graphs are built once, then each no-op run is timed as a whole process (best of N). Goal:
ratio ≤ 2× and eulerbake's no-op ≤ 0.5 s.
usage: benchmarks/bench_noop.py [--project DIR] [--runs 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PLAIN_DODO = '''
from pathlib import Path
N = {n}
def touch(target):
    Path(target).write_text("x")
def task_plain():
    for i in range(N):
        dep = "inputs/in%d.txt" % i
        yield {{"name": str(i), "actions": [(touch, ["out%d.txt" % i])], "file_dep": [dep],
               "targets": ["out%d.txt" % i], "task_dep": ["plain:%d" % (i - 1)] if i else []}}
DOIT_CONFIG = {{"backend": "sqlite3", "dep_file": ".plain.sqlite3", "verbosity": 0}}
'''


def best_wall(cmd: list[str], cwd: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project", type=Path, default=REPO)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    doit = [sys.executable, "-m", "doit"]

    print("building the project's default graph once (may take a while on a fresh store)…")
    subprocess.run(doit, cwd=args.project, check=True, capture_output=True)
    listing = subprocess.run([*doit, "list", "--all", "--quiet"], cwd=args.project, check=True,
                             capture_output=True, text=True).stdout.split()
    n_tasks = sum(1 for name in listing if ":" in name)
    ours = best_wall(doit, args.project, args.runs)

    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp)
        (plain / "inputs").mkdir()
        for i in range(n_tasks):
            (plain / "inputs" / f"in{i}.txt").write_text(str(i))
        (plain / "dodo.py").write_text(PLAIN_DODO.format(n=n_tasks))
        subprocess.run(doit, cwd=plain, check=True, capture_output=True)
        theirs = best_wall(doit, plain, args.runs)

    print(f"tasks in the graph: {n_tasks}")
    print(f"eulerbake no-op (doit + store + blake3 checks): {ours:.3f} s")
    print(f"plain doit no-op over {n_tasks} trivial tasks:   {theirs:.3f} s")
    print(f"ratio eulerbake / plain doit = {ours / theirs:.2f}  (goal <= 2.0, and <= 0.5 s absolute)")


if __name__ == "__main__":
    main()
