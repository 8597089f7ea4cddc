"""The quick start's pipeline part, timed from a fresh clone: ``git clone`` of this repository's HEAD into a
temporary folder, then ``dvc repro`` of the whole pipeline on the default model with an empty DVC cache, as
``make run`` runs it. The interpreter is this one (the install is timed apart: it is pip's, not ours).

Per-stage seconds come from the stages' run log (``$DIET_RUN_LOG``, one line per stage as it starts, which this
script stamps as it appears; a stage lasts until the next one starts), grouped by stage kind: how much of the
time is each kind and how many processes started. Writes ``benchmarks/results/quickstart-dvc.json`` and prints
a markdown table::

    env -u OMP_NUM_THREADS python benchmarks/quickstart.py         # torch's default threads, as make run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TOKENIZERS_PARALLELISM": "false"}


def _watch(log: Path, stamps: list[tuple[float, str]], stop: threading.Event) -> None:
    """Stamp each run-log line with the time it appeared (polled every 0.1 s)."""
    seen = 0
    while not stop.is_set():
        if log.exists():
            lines = log.read_text().splitlines()
            for line in lines[seen:]:
                stamps.append((time.monotonic(), json.loads(line)["stage"]))
            seen = len(lines)
        stop.wait(0.1)


def run(keep: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="diet-quickstart-"))
    clone = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, **OFFLINE, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    log = work / "runs.jsonl"
    env["DIET_RUN_LOG"] = str(log)
    command = [str(Path(bindir) / "dvc"), "repro"]
    stamps: list[tuple[float, str]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(log, stamps, stop), daemon=True)
    watcher.start()
    start = time.monotonic()
    with open(work / "output.log", "w") as out:
        proc = subprocess.run(command, cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT)
    end = time.monotonic()
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}): see {work / 'output.log'}")
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    stages = {}
    for (t, stage), nxt in zip(stamps, [s[0] for s in stamps[1:]] + [end]):
        stages[stage] = round(nxt - t, 1)
    kinds: dict[str, list[float]] = defaultdict(list)
    for stage, seconds in stages.items():
        kinds[stage.split("@")[0]].append(seconds)
    result = {"runner": "dvc",
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS") or "(unset: torch's default)",
              "cpus": os.cpu_count(), "seconds": round(end - start, 1),
              "before_first_stage": round(stamps[0][0] - start, 1) if stamps else None,
              "stages": stages,
              "kinds": {k: {"count": len(v), "seconds": round(sum(v), 1)} for k, v in kinds.items()},
              "git_status_clean": not dirty.strip(), "git_status": dirty.splitlines()}
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(r: dict) -> str:
    rows = [f"**dvc repro** (OMP_NUM_THREADS {r['omp_num_threads']}, {r['cpus']} CPUs): "
            f"{r['seconds']:.0f} s in all; `git status` after it {'clean' if r['git_status_clean'] else 'NOT clean'}",
            "", "| stage kind | processes | seconds | share |", "|---|---|---|---|"]
    for kind, v in sorted(r["kinds"].items(), key=lambda kv: -kv[1]["seconds"]):
        rows.append(f"| {kind} | {v['count']} | {v['seconds']:.0f} | {v['seconds'] / r['seconds']:.0%} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", action="store_true", help="keep the clone and its output.log")
    args = p.parse_args()
    result = run(args.keep)
    out = ROOT / "benchmarks" / "results" / "quickstart-dvc.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
