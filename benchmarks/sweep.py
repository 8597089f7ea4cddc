"""Wall clock of a sweep run one point after the other (``mode=workspace``) and through DVC's queue
(``mode=queue``, ``--jobs`` at a time), on the tests' tiny repository.

    OMP_NUM_THREADS=1 python benchmarks/sweep.py --modes workspace queue --jobs 2

For each mode: a fresh tiny git + DVC project (``tests/repo_fixture.make_tiny_repo``: two tasks, a tiny random
llama, the real stages), ``dvc repro`` of the whole pipeline at its params (sparsity 0.2) committed, then
``sweep_flow`` over ``--sparsities`` timed around the call. A point at the committed sparsity is restored from
the cache in both modes. Prefect runs on a temporary test server. Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=["workspace", "queue"], choices=["workspace", "queue"])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="diet-bench-prefect-"))

    from prefect.testing.utilities import prefect_test_harness

    from diet.io import write_json
    from flows.sweep import sweep_flow
    from tests.repo_fixture import dvc, dvc_env, git, make_tiny_repo

    seconds = {}
    with tempfile.TemporaryDirectory(prefix="diet-bench-sweep-") as tmp, prefect_test_harness(server_startup_timeout=180):
        for mode in args.modes:
            repo = make_tiny_repo(tmp, name=f"repo-{mode}")
            subprocess.run([dvc(), "repro"], cwd=repo, env=dvc_env(), check=True, capture_output=True)
            git(repo, "add", "-A")
            git(repo, "commit", "-q", "-m", "pipeline run")
            start = time.monotonic()
            sweep_flow(repo=str(repo), sparsities=args.sparsities, methods=["vote"], mode=mode, jobs=args.jobs)
            seconds[mode] = round(time.monotonic() - start, 1)
            print(f"{mode}: {seconds[mode]} s", file=sys.stderr)
    result = {"sparsities": args.sparsities, "jobs": args.jobs, "cpus": os.cpu_count(), "seconds": seconds}
    if {"workspace", "queue"} <= set(seconds):
        result["speedup"] = round(seconds["workspace"] / seconds["queue"], 2)
    write_json(args.out, result)
    print("| mode | jobs | wall clock (s) |\n|---|---:|---:|")
    for mode, s in seconds.items():
        print(f"| {mode} | {args.jobs if mode == 'queue' else 1} | {s} |")
    return result


if __name__ == "__main__":
    main()
